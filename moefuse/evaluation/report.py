"""The evaluation report of an exported model on shards, the library part of `moefuse evaluate` (and of the demo
and the benchmarks): `evaluate()` -> a JSON-ready dict, `format_summary()` -> its text summary.

Per task: accuracy (exact match for QA), macro-F1 and a per-class report (precision/recall/F1/support) and
confusion matrix for classification, the ensemble against its best single head, expected calibration error,
head agreement against correctness (are the disagreements the errors?), and accuracy per modality subset
present (image only, audio only, all, ...) and per question type where the samples carry `meta.qtype`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from moefuse.configutil import ConfigError
from moefuse.datasets import make_loader
from moefuse.datasets.corruption import Corruption
from moefuse.errors import os_error_message
from moefuse.evaluation.confidence_plots import save_confidence_plot
from moefuse.evaluation.loop import DATA_COUNTS, evaluate_loader, routing_summary
from moefuse.evaluation.metrics import compute_metrics
from moefuse.evaluation.plots import save_routing_heatmap
from moefuse.fusion.loading import load_inference_model


def evaluate(checkpoint: str | Path, shards: list[str], split: str = "val", batch_size: int = 64,
             num_workers: int = 0, int8: bool = False, heatmap: Path | None = None, progress: bool = True,
             drop_modalities: list[str] | None = None, plots: Path | None = None,
             corrupt: Sequence[Corruption] = (), cache_encoders: list[str] | None = None, runtime: str = "eager",
             quantize: str = "none") -> dict:
    """Metrics of an exported model. `drop_modalities` defaults to what the model was trained without
    (export.json), so an image-only model is evaluated on the images of audio-visual shards. `corrupt`: modalities
    noised or taken from another sample (moefuse.datasets.corruption). `plots`: a folder for each task's
    reliability diagram and risk-coverage curve (`confidence-<task>.png`). `cache_encoders`, `runtime`, `quantize`
    (`int8=True` is quantize="int8"): as load_inference_model."""
    model = load_inference_model(checkpoint, int8=int8, cache_encoders=cache_encoders, runtime=runtime,
                                 quantize=quantize)
    if drop_modalities is None:
        drop_modalities = list(model.export_info.drop_modalities) if model.export_info is not None else []
    collator = model.collator(train=False, drop_modalities=drop_modalities, corrupt=corrupt)
    loader = make_loader(shards, collator, batch_size, split=split, num_workers=num_workers,
                         tasks=model.task_names, **model.decode_options())
    records, stats = evaluate_loader(model, loader, torch.device("cpu"), progress=progress)
    counts = {k: stats[k] for k in DATA_COUNTS}
    if not records:
        found = ", ".join(f"{n} {DATA_COUNTS[k]}" for k, n in counts.items())
        raise ConfigError(f"no sample of the model's tasks ({', '.join(model.task_names)}) could be read from "
                          f"{', '.join(shards)} split {split!r} ({found})")
    vocab = {t.name: list(t.labels) for t in model.cfg.tasks}
    types = {t.name: t.type for t in model.cfg.tasks}
    result = compute_metrics(records, vocab, types, detailed=True)
    temperatures = model.temperatures()
    for task, details in result["tasks"].items():
        details["temperature"] = temperatures[task]
        details["voters"] = list(model.voter_names)  # what each entry of head_accuracy read
    if getattr(model, "member_names", None):  # an ensemble: each member's figures beside the ensemble's
        result["members"] = member_figures(result["tasks"], list(model.member_names))
    result["non_finite_outputs"] = sum(not math.isfinite(r["probability"]) for r in records)
    if result["non_finite_outputs"]:
        warnings.warn(f"{result['non_finite_outputs']} of {len(records)} samples got non-finite (NaN or inf) model "
                      f"outputs from {checkpoint}: its weights are damaged or it diverged; they count as wrong",
                      stacklevel=2)
    result["routing"] = routing_summary(stats)
    result["data"] = counts
    result["skipped_corrupt"] = counts["skipped_corrupt"]  # kept at the top level for earlier readers
    result["checkpoint"] = str(checkpoint)
    result["shards"] = list(shards)
    result["drop_modalities"] = list(drop_modalities)
    result["corrupt"] = [str(c) for c in corrupt]
    result["errors"] = []
    if plots is not None:
        _save_confidence_plots(result, Path(plots))
    if heatmap is not None and stats["modality_expert_counts"] is not None:
        try:
            save_routing_heatmap(stats["modality_expert_counts"], stats["routing_rows"], "evaluate", [heatmap])
            result["routing_heatmap"] = str(heatmap)
        except OSError as e:  # the metrics are computed: report the failure, keep them
            result["errors"].append(f"the heatmap was not written: {os_error_message(e)}")
    return result


def member_figures(tasks: dict, members: list[str]) -> dict:
    """An ensemble's members, each with its accuracy per task over the samples it answered and the share it answered
    (its voter entries), and the best member that answers every sample beside the ensemble."""
    out: dict = {name: {} for name in members}
    for task, d in tasks.items():
        for name, acc, cover in zip(members, d["head_accuracy"], d["head_coverage"]):
            out[name][task] = {"accuracy": acc, "coverage": cover}
    return out


def _save_confidence_plots(result: dict, folder: Path) -> None:
    """Each task's confidence plot into `folder`; a failed write is reported in result["errors"]."""
    result["confidence_plots"] = {}
    for task, details in result["tasks"].items():
        path = folder / f"confidence-{task}.png"
        try:
            save_confidence_plot(details, task, path)
            result["confidence_plots"][task] = str(path)
        except OSError as e:
            result["errors"].append(f"the confidence plot of {task} was not written: {os_error_message(e)}")


def fmt(value: float | None, spec: str = ".4f") -> str:
    """A statistic for the summary; an optional one that could not be computed (None) prints as n/a."""
    return "n/a" if value is None else format(value, spec)


def format_summary(result: dict) -> str:
    lines = []
    altered = [f"without {m}" for m in result.get("drop_modalities", [])] + [
        f"corrupted {c}" for c in result.get("corrupt", [])]
    if altered:
        lines.append(f"evaluated {', '.join(altered)}")
    for task, d in result["tasks"].items():
        lines.append(f"{task} ({d['type']}, {d['samples']} samples): accuracy {fmt(d['accuracy'])}"
                     + (f", macro-F1 {fmt(d['macro_f1'])}" if d["type"] == "classification" else "")
                     + f", best single head {fmt(d['best_single_head_accuracy'])}")
        if "selective" in d:  # reports written before calibration have no confidence statistics
            sel = d["selective"]
            lines.append(f"  confidence: ECE {fmt(d['ece_uncalibrated'])} -> {fmt(d['ece'])} after temperature "
                         f"{fmt(d['temperature'], '.3f')}; AURC {fmt(sel['aurc'])}; wrong answers detected with "
                         f"AUROC {fmt(sel['auroc_confidence'])} by low confidence, {fmt(sel['auroc_disagreement'])} "
                         f"by disagreement")
        if "voters" in d and "head_coverage" in d:
            lines.append("  voters: " + ", ".join(
                f"{v} {fmt(a)}" + ("" if c == 1.0 else f" ({fmt(c, '.0%')} voted)")
                for v, a, c in zip(d["voters"], d["head_accuracy"], d["head_coverage"])))
        if "diversity" in d:  # reports written before it have none
            div = d["diversity"]
            lines.append(f"  voter diversity: some voter right on {fmt(div['oracle_accuracy'])} (oracle), hard "
                         f"majority vote {fmt(div['majority_accuracy'])}, pairwise disagreement "
                         f"{fmt(div['disagreement'])}")
        avc = d["agreement_vs_correctness"]
        lines.append(f"  heads unanimous on {fmt(avc['unanimous_fraction'], '.1%')}: accuracy "
                     f"{fmt(avc['accuracy_when_unanimous'])} when unanimous, {fmt(avc['accuracy_when_split'])} "
                     f"when split")
        for subset, v in d["accuracy_by_modalities"].items():
            lines.append(f"  {subset:<18} {fmt(v['accuracy'])}  ({v['samples']})")
        for qtype, v in d["accuracy_by_qtype"].items():
            lines.append(f"  qtype {qtype:<12} {fmt(v['accuracy'])}  ({v['samples']})")
        if d["unseen_targets"]:
            lines.append(f"  {d['unseen_targets']} samples have a target outside the model's vocabulary "
                         f"(counted wrong)")
    for name, per_task in (result.get("members") or {}).items():
        lines.append(f"member {name}: " + ", ".join(
            f"{t} {fmt(v['accuracy'])}" + ("" if v["coverage"] == 1.0 else f" ({fmt(v['coverage'], '.0%')} answered)")
            for t, v in per_task.items()))
    data = result.get("data", {})
    if any(data.values()):
        lines.append("data: " + ", ".join(f"{n} {DATA_COUNTS[k]}" for k, n in data.items() if n))
    return "\n".join(lines)
