"""`moefuse evaluate --checkpoint DIR --shards PATTERN [--json OUT]`: metrics of an exported model on shards.

Per task: accuracy (exact match for QA), macro-F1 and a per-class report (precision/recall/F1/support) and
confusion matrix for classification, the ensemble against its best single head, expected calibration error,
head agreement against correctness (are the disagreements the errors?), and accuracy per modality subset
present (image only, audio only, all, ...) and per question type where the samples carry `meta.qtype`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moefuse.configutil import ConfigError, atomic_write_text
from moefuse.datasets import DataError, make_loader
from moefuse.fusion.model import ROUTING_ROWS, build_collator
from moefuse.train.checkpoint import load_exported
from moefuse.train.metrics import compute_metrics
from moefuse.train.plots import draw_routing_heatmap, save_png_atomic
from moefuse.train.run import evaluate_loader, routing_summary


def evaluate(checkpoint: str | Path, shards: list[str], split: str = "val", batch_size: int = 64,
             num_workers: int = 0, int8: bool = False, heatmap: Path | None = None, progress: bool = True,
             drop_modalities: list[str] | None = None) -> dict:
    """Metrics of an exported model. `drop_modalities` defaults to what the model was trained without
    (export.json), so an image-only model is evaluated on the images of audio-visual shards."""
    model = load_exported(checkpoint)
    if int8:
        from moefuse.fusion.quant import quantize_int8

        model = quantize_int8(model)
    audio_rate = model.encoders["audio"].sample_rate if "audio" in model.encoders else None
    if drop_modalities is None:
        export = Path(checkpoint) / "export.json"
        drop_modalities = json.loads(export.read_text()).get("drop_modalities", []) if export.exists() else []
    collator = build_collator(model, train=False, drop_modalities=drop_modalities)
    loader = make_loader(shards, collator, batch_size, split=split,
                         num_workers=num_workers, audio_sample_rate=audio_rate)
    records, stats = evaluate_loader(model, loader, torch.device("cpu"), progress=progress)
    if not records:
        raise ConfigError(f"no samples in {', '.join(shards)} (or none readable)")
    vocab = {t.name: list(t.labels) for t in model.cfg.tasks}
    types = {t.name: t.type for t in model.cfg.tasks}
    result = compute_metrics(records, vocab, types, detailed=True)
    result["routing"] = routing_summary(stats)
    result["skipped_corrupt"] = stats["skipped_corrupt"]
    result["checkpoint"] = str(checkpoint)
    result["shards"] = list(shards)
    result["drop_modalities"] = list(drop_modalities)
    if heatmap is not None and stats["modality_expert_counts"] is not None:
        save_png_atomic(draw_routing_heatmap(stats["modality_expert_counts"], list(ROUTING_ROWS), "evaluate"),
                        heatmap)
        result["routing_heatmap"] = str(heatmap)
    return result


def format_summary(result: dict) -> str:
    lines = []
    for task, d in result["tasks"].items():
        lines.append(f"{task} ({d['type']}, {d['samples']} samples): accuracy {d['accuracy']:.4f}"
                     + (f", macro-F1 {d['macro_f1']:.4f}" if d["type"] == "classification" else "")
                     + f", best single head {d['best_single_head_accuracy']:.4f}, ECE {d['ece']:.4f}")
        avc = d["agreement_vs_correctness"]
        if avc["accuracy_when_split"] is not None:
            lines.append(f"  heads unanimous on {avc['unanimous_fraction']:.1%}: accuracy "
                         f"{avc['accuracy_when_unanimous']:.4f} when unanimous, {avc['accuracy_when_split']:.4f} "
                         f"when split")
        for subset, v in d["accuracy_by_modalities"].items():
            lines.append(f"  {subset:<18} {v['accuracy']:.4f}  ({v['samples']})")
        for qtype, v in d["accuracy_by_qtype"].items():
            lines.append(f"  qtype {qtype:<12} {v['accuracy']:.4f}  ({v['samples']})")
        if d["unseen_targets"]:
            lines.append(f"  {d['unseen_targets']} samples have a target outside the model's vocabulary "
                         f"(counted wrong)")
    if result.get("skipped_corrupt"):
        lines.append(f"skipped {result['skipped_corrupt']} corrupt samples")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model folder (a run's model/)")
    p.add_argument("--shards", required=True, nargs="+",
                   help="shards: build-shards folders (read at --split), dataset.json paths, brace patterns or URLs")
    p.add_argument("--split", default="val", help="split to read from dataset folders (default: val)")
    p.add_argument("--json", type=Path, help="write the full report (JSON) here")
    p.add_argument("--heatmap", type=Path, help="write the modality x expert routing heatmap (PNG) here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--int8", action="store_true", help="evaluate the dynamic-int8 quantised model")
    p.add_argument("--drop", nargs="*", choices=["text", "image", "audio"], default=None,
                   help="modalities to remove from every sample (default: those the model was trained without)")
    args = p.parse_args(argv)
    try:
        result = evaluate(args.checkpoint, args.shards, args.split, args.batch_size, args.num_workers, args.int8,
                          args.heatmap, drop_modalities=args.drop)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"moefuse evaluate: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2))
        print(f"report: {args.json}")
    return 0
