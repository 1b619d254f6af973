"""Expert pruning of a model folder on calibration data, the library part of `moefuse compress`.

`compress_model` runs the model over a split (the calibration data), sums each MoE layer's top-k assignments per
expert (its routing share), prunes the experts with the least share (`moefuse.fusion.prune`), runs the pruned model
over the same split, and writes a new model folder whose export.json and model card (README.md) say what was
pruned, on which data, and the accuracy before and after. The split that chose the experts also measures the
result: on other data expect somewhat less.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from moefuse.configutil import ConfigError, to_dict
from moefuse.datasets import make_loader
from moefuse.evaluation.loop import DATA_COUNTS, evaluate_loader
from moefuse.evaluation.metrics import compute_metrics
from moefuse.fusion.model import MultimodalMoEModel, build_collator
from moefuse.fusion.prune import experts_to_keep, moe_layers, prune_experts, routing_share
from moefuse.fusion.runtime import bf16_storage
from moefuse.pretrained.export_info import CompressionInfo, ExportInfo, PrunedLayer
from moefuse.pretrained.folder import read_model_config


def run_split(model: MultimodalMoEModel, shards: list[str], split: str, batch_size: int,
              drop_modalities: list[str]) -> tuple[list[dict], dict]:
    """The model over a split -> per-sample records and stats (routing counts [L, G, E] summed), as evaluate."""
    collator = build_collator(model, train=False, drop_modalities=drop_modalities)
    loader = make_loader(shards, collator, batch_size, split=split, tasks=model.task_names, **model.decode_options())
    records, stats = evaluate_loader(model, loader, torch.device("cpu"))
    model.eval()  # evaluate_loader leaves the model in train mode
    if not records:
        found = ", ".join(f"{stats[k]} {v}" for k, v in DATA_COUNTS.items())
        raise ConfigError(f"no sample of the model's tasks ({', '.join(model.task_names)}) could be read from "
                          f"{', '.join(shards)} split {split!r} ({found}): give the calibration data with --shards")
    return records, stats


def accuracies(model: MultimodalMoEModel, records: list[dict]) -> dict[str, float]:
    """Accuracy per task of these records."""
    vocab = {t.name: list(t.labels) for t in model.cfg.tasks}
    flat = compute_metrics(records, vocab, {t.name: t.type for t in model.cfg.tasks})["metrics"]
    return {k.split("/")[0]: v for k, v in flat.items() if k.endswith("/acc")}


def same_answers(before: list[dict], after: list[dict]) -> float:
    """The share of samples (by task and id) with the same prediction in both runs."""
    first = {(r["task"], r["id"]): r["prediction"] for r in before}
    both = [(first[(r["task"], r["id"])], r["prediction"]) for r in after if (r["task"], r["id"]) in first]
    return sum(a == b for a, b in both) / max(1, len(both))


def compress_model(checkpoint: str | Path, out: str | Path, shards: list[str], split: str = "val",
                   keep: int | None = None, min_share: float | None = None, merge: bool = False,
                   batch_size: int = 64, weights_dtype: str = "float32") -> dict:
    """Prune a model folder's experts by their routing share on `shards` at `split` and/or store its weight matrices
    in bfloat16, and write the result to `out` (save_pretrained) -> the record written to its export.json under
    `compression`. `keep`: experts kept per layer; or `min_share`: keep every expert with at least this routing
    share in some layer (the layer that keeps most sets the count for all; never fewer than top_k); neither: no
    pruning. `weights_dtype` bfloat16: half the file (`runtime.bf16_storage`); the folder loads in fp32 as any."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise ConfigError(f"--out {out} is the model folder being compressed: write the compressed model elsewhere")
    if weights_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--weights-dtype must be float32 or bfloat16, got {weights_dtype!r}")
    prune = keep is not None or min_share is not None
    if not prune and weights_dtype == "float32":
        raise ConfigError("nothing to do: give --keep-experts N or --min-routing-share S (pruning) and/or "
                          "--weights-dtype bfloat16")
    if (checkpoint / "config.yaml").is_file():  # a bad count fails before the model is built
        fusion = read_model_config(checkpoint, MultimodalMoEModel.config_class).fusion
        if fusion.kind == "moe" and keep is not None:
            experts_to_keep(fusion.num_experts, fusion.top_k, torch.zeros(1, fusion.num_experts), keep=keep)
    model = MultimodalMoEModel.from_pretrained(checkpoint)
    layers = moe_layers(model)
    if prune and not layers:
        raise ConfigError(f"{checkpoint} has no MoE layer to prune (fusion.kind is {model.cfg.fusion.kind!r})")
    e, k = (layers[0].num_experts, layers[0].top_k) if layers else (0, 0)
    info = model.export_info or ExportInfo()
    drop = list(info.drop_modalities)
    before, stats = run_split(model, shards, split, batch_size, drop)
    plans = []
    if prune:
        share = routing_share(stats["modality_expert_counts"])  # [L, E]
        keep = experts_to_keep(e, k, share, keep=keep, min_share=min_share)
        plans = prune_experts(model, share, keep, merge=merge)
    if weights_dtype == "bfloat16":
        bf16_storage(model, keep_fp32=True)  # measured as it will load
    after, _ = run_split(model, shards, split, batch_size, drop)
    method = ["expert pruning by routing share (Chen et al. 2022; Lu et al. 2024)"] if prune else []
    method += ["dropped experts merged into the most similar kept one (Li et al. 2024)"] if prune and merge else []
    method += ["weight matrices stored in bfloat16"] if weights_dtype == "bfloat16" else []
    record = CompressionInfo(
        method="; ".join(method), weights_dtype=weights_dtype, source=str(checkpoint), shards=list(shards),
        split=split, samples=len(before), num_experts_before=e, num_experts_after=keep if prune else e, top_k=k,
        merge=prune and merge, min_routing_share=min_share, layers=[PrunedLayer(**p.as_dict()) for p in plans],
        accuracy_before=accuracies(model, before), accuracy_after=accuracies(model, after),
        same_answer=same_answers(before, after))
    record.check_values("compression")
    # a model compressed before keeps those records too, oldest first
    model.export_info = replace(info, compression=[*info.compression, record])
    if weights_dtype == "bfloat16":
        bf16_storage(model)  # the same values, held in bf16: half the file
    model.save_pretrained(out)
    return to_dict(record)


def format_record(record: dict) -> str:
    """The text summary `moefuse compress` prints."""
    lines = [f"{record['method']} ({record['split']}, {record['samples']} samples)"]
    if record["layers"]:
        lines.append(f"kept {record['num_experts_after']} of {record['num_experts_before']} experts per MoE layer"
                     + (", dropped experts merged" if record["merge"] else ""))
    for i, layer in enumerate(record["layers"]):
        kept_share = sum(layer["share"][j] for j in layer["kept"])
        lines.append(f"  layer {i}: kept {layer['kept']} ({kept_share:.1%} of the routing), dropped {layer['dropped']}")
    for task, acc in record["accuracy_before"].items():
        lines.append(f"  {task}: accuracy {acc:.4f} -> {record['accuracy_after'].get(task, float('nan')):.4f}")
    lines.append(f"  same answer as before on {record['same_answer']:.1%} of the samples")
    return "\n".join(lines)
