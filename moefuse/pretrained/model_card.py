"""The model card (README.md) of an export folder: what someone handed the folder needs to know before using it.

Tasks and vocabularies, modalities and encoders, the fusion stack and the voters, the calibration fit after
training, the validation metrics the run recorded, the training data, how to load and run it, and its limits
(Mitchell et al. 2019, "Model Cards for Model Reporting", trimmed to what a training run knows).

It opens with the Hugging Face Hub's YAML metadata block (https://huggingface.co/docs/hub/model-cards), written by
huggingface_hub's `ModelCardData`: `library_name` and `tags` (the class's, from its `ModelHubMixin` declaration, and
the model's modalities), the `license` and `datasets` the user set (export.json), and the validation metrics with
their values as a `model-index` (one result per task and metric).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCardData

if TYPE_CHECKING:
    from moefuse.fusion.model import MultimodalMoEModel
    from moefuse.pretrained.export_info import ExportInfo

CARD_METRICS = (("acc", "accuracy", "accuracy"), ("macro_f1", "f1", "macro F1"),
                ("exact_match", "exact_match", "exact match"))
"""(metric suffix in the run's `val/<task>/<suffix>`, Hub metric id, name in the card) of the card's model-index."""


def _vocabulary(labels: list[str], shown: int = 20) -> str:
    head = ", ".join(f"`{v}`" for v in labels[:shown])
    return head + (f", ... ({len(labels)} in all)" if len(labels) > shown else "")


def _metrics(extra: dict) -> list[str]:
    result, final = extra.get("result") or {}, extra.get("final_val_metrics") or {}
    if not result:
        return ["No training record: this folder was exported outside a training run, so no metrics are known."]
    best, metric = result.get("best_metric"), result.get("metric")
    value = f"= {best:.4f}" if isinstance(best, float) else "not measured"
    lines = [f"`{metric}` {value} at step {result.get('best_step')} of {result.get('steps')}; the export holds step "
             f"{extra.get('step')}."]
    per_task = {k.split("/")[1]: v for k, v in final.items() if k.count("/") == 2 and k.endswith("/acc")}
    if per_task:
        when = "the exported step" if result.get("best_step") == result.get("steps") else "the last step"
        lines.append(f"Accuracy per task on the validation split at the last validation ({when}, before "
                     f"calibration): " + ", ".join(f"{t} {v:.3f}" for t, v in sorted(per_task.items())) + ".")
    return lines


def _calibration(extra: dict) -> list[str]:
    calibration = extra.get("calibration")
    if not calibration:
        return ["Not calibrated: temperature 1 and the vote weights as trained."]
    lines = []
    for task, c in calibration.items():
        if c.get("skipped"):
            lines.append(f"- {task}: not calibrated (temperature 1, vote weights as trained): {c['skipped']}")
            continue
        weights = c.get("vote_weights")
        lines.append(f"- {task}: temperature {c['temperature']:.3f} (validation NLL {c['nll_before']:.4f} -> "
                     f"{c['nll_after']:.4f}, {c['samples']} samples)"
                     + (f"; vote weights {', '.join(f'{w:.2f}' for w in weights)}" if weights else ""))
    return lines


def _compression(extra: dict) -> list[str]:
    """What `moefuse compress` did to the model (export.json `compression`, oldest first), or nothing."""
    records = extra.get("compression") or []
    lines = ["", "## Compression", ""] if records else []
    for c in records:
        lines += _compression_record(c)
    return lines


def _compression_record(c: dict) -> list[str]:
    """One compression record's paragraphs."""
    lines = []
    if c.get("weights_dtype") == "bfloat16":
        lines += ["The weight matrices (linear layers, convolutions, embeddings, experts; not the routers, norms or "
                  "biases) are stored in bfloat16: half the file. They load into fp32 as any weights.", ""]
    if c["layers"]:
        lines += [f"Expert pruning: each MoE layer keeps {c['num_experts_after']} of its {c['num_experts_before']} "
                  f"experts, those with the largest routing share (share of the layer's top-{c['top_k']} "
                  f"assignments) on split `{c['split']}` of {', '.join(f'`{s}`' for s in c['shards'])} "
                  f"({c['samples']} samples); the router's softmax runs over the kept experts"
                  + (", and each dropped expert was merged into its most similar kept one, weighted by routing "
                     "share" if c.get("merge") else "") + f". Method: {c['method']}.", "",
                  "| layer | kept (original ids; new id = position) | their routing share | dropped |",
                  "|---|---|---:|---|"]
        for i, layer in enumerate(c["layers"]):
            share = sum(layer["share"][j] for j in layer["kept"])
            lines.append(f"| {i} | {layer['kept']} | {share:.1%} | {layer['dropped']} |")
        lines.append("")
    lines += [f"Source model: `{c['source']}`. Accuracy on split `{c['split']}` of the calibration data (which also "
                 "chose any pruned experts: expect a little less elsewhere), before -> after: "
                 + ", ".join(f"{t} {a:.3f} -> {c['accuracy_after'].get(t, float('nan')):.3f}"
                             for t, a in sorted(c["accuracy_before"].items()))
                 + f"; the same answer as before on {c['same_answer']:.1%} of the samples. The validation metrics "
                 "below are the training run's, before compression.", ""]
    return lines


def _distillation(extra: dict) -> list[str]:
    """What the model was distilled from (export.json `distillation`), or nothing."""
    d = extra.get("distillation")
    if not d:
        return []
    missing = d.get("missing_rows") or 0
    return ["", "## Distillation", "",
            f"Trained on the soft targets of the teacher `{d['teacher']}` as well as the labels (knowledge "
            f"distillation, Hinton et al. 2015) for {', '.join(d['tasks'])}: loss = {d['weight']:g} x T^2 x "
            f"KL(teacher || student) + {1 - d['weight']:g} x cross-entropy, at temperature T = {d['temperature']:g}. "
            f"The teacher answered the {d['samples']} training samples once, on their full inputs; the student "
            "trained with its own modality dropout"
            + (f"; {missing} training rows had no teacher target and trained on their labels alone." if missing
               else ".")]


def card_metadata(model: MultimodalMoEModel, extra: dict, name: str | None = None) -> ModelCardData:
    """The Hub metadata of the card: library and tags of the model's class (its `ModelHubMixin` declaration) and
    its modalities, the license and datasets of `extra` (export.json), and its validation metrics as a model-index
    named `name` (the folder's, or the Hub repository's, name)."""
    declared: dict[str, Any] = {}
    mixin = getattr(type(model), "_hub_mixin_info", None)
    if mixin is not None:
        declared = mixin.model_card_data.to_dict()
    tags = sorted({*(declared.get("tags") or []), *model.cfg.encoders.configured()})
    datasets = list(extra.get("datasets") or [])
    metrics = extra.get("final_val_metrics") or {}
    results = []
    for task in model.cfg.tasks:
        for suffix, metric, label in CARD_METRICS:
            value = metrics.get(f"val/{task.name}/{suffix}")
            if isinstance(value, (int, float)):
                results.append(EvalResult(
                    task_type=task.type, task_name=task.name, dataset_type=datasets[0] if datasets else "local",
                    dataset_name=datasets[0] if datasets else "the training data", dataset_split="validation",
                    metric_type=metric, metric_value=value, metric_name=f"{task.name} {label}"))
    return ModelCardData(library_name=declared.get("library_name") or "moefuse",
                         license=extra.get("license") or declared.get("license"), tags=tags,
                         datasets=datasets or None, metrics=sorted({r.metric_type for r in results}) or None,
                         eval_results=results or None, model_name=(name or "moefuse-model") if results else None)


def model_card(model: MultimodalMoEModel, extra: ExportInfo | dict | None = None, name: str | None = None) -> str:
    """Markdown for the export's README.md, opening with the Hub's YAML metadata (`card_metadata`); `extra` is what
    export.json holds (the run's record, the card's license and datasets), if any; `name` the model's name in the
    model-index."""
    extra = (extra if isinstance(extra, dict) else extra.to_json()) if extra is not None else {}
    return f"---\n{card_metadata(model, extra, name).to_yaml()}\n---\n\n" + card_body(model, extra)


def card_body(model: MultimodalMoEModel, extra: dict) -> str:
    """The card's Markdown below the metadata."""
    cfg = model.cfg
    lines = ["# moefuse model", "",
             f"A multimodal mixture-of-experts model for {', '.join(model.task_names)}, written by moefuse. "
             f"Load it with `{type(model).__name__}.from_pretrained(FOLDER or a Hub id owner/name)` (`from "
             f"{type(model).__module__} import {type(model).__name__}`); run it with `moefuse predict --checkpoint "
             "FOLDER`, `moefuse evaluate` or `moefuse serve`. The weights are safetensors; nothing in this folder is "
             "pickled.", "",
             "## Tasks", "", "| task | type | answers |", "|---|---|---|"]
    lines += [f"| {t.name} | {t.type} | {_vocabulary(list(t.labels))} |" for t in cfg.tasks]
    lines += ["", "## Inputs", ""]
    for m, enc in cfg.encoders.configured().items():
        fields = ", ".join(f"`{f}`" + (" (file)" if f in enc.file_fields else "") for f in enc.sample_fields)
        lines.append(f"- {m}: preset `{getattr(enc, 'preset', '?')}`, fine-tuning `{enc.finetune}`; fields {fields}")
    dropped = extra.get("drop_modalities") or []
    if dropped:
        lines.append(f"- trained without: {', '.join(dropped)}")
    f = cfg.fusion
    lines += ["", "## Architecture", "",
              f"Fusion `{f.kind}`: {f.num_layers} layers of width {f.d_model}"
              + (f", {f.num_experts} experts, top-{f.top_k}" if f.kind == "moe" else "") + f", pooling `{f.pooling}`. "
              f"Voters per task: {', '.join(model.voter_names)}; combined by `{cfg.heads.combine}`. "
              "The full config is `config.yaml` (and `config.json`).", "", "## Calibration", ""]
    lines += _calibration(extra)
    lines += _compression(extra)
    lines += _distillation(extra)
    lines += ["", "## Validation metrics", ""] + _metrics(extra)
    shards = extra.get("train_shards")
    lines += ["", "## Training data", "",
              f"Shards: {', '.join(f'`{s}`' for s in shards)}." if shards else "Not recorded.", "",
              "## Intended use and limits", "",
              "- For research on the tasks above, on inputs like the training data (the media settings the shards "
              "were built with are in `export.json`, and `predict` and `serve` prepare raw files the same way).",
              "- The figures above are on the validation split, which also chose the exported step and fit the "
              "temperature and vote weights: expect lower accuracy and worse calibration on data from elsewhere "
              "(other speakers, image styles, wordings).",
              "- Probabilities are calibrated on that split only; use `--min-confidence` to abstain on low "
              "confidence rather than trusting every answer.",
              "- Not for decisions about people, or anything where a wrong answer does harm.", ""]
    return "\n".join(lines)
