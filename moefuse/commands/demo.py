"""`moefuse demo [--out outputs/demo]`: the whole pipeline on built-in synthetic data, end to end.

demo data (rendered digits, DTMF tones, captions; no downloads) -> build-shards -> train configs/tiny.yaml ->
evaluate on the validation and test splits -> predict two test samples (one with its audio removed) -> print
where every output is and each task's accuracy on both splits next to its chance level (the majority-class rate).
The validation split chooses the exported step and fits the calibration; the test split is touched by neither.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from moefuse.configutil import ConfigError, atomic_write_text, dumps_json
from moefuse.datasets import BuildOptions, build_shards, make_demo_data, read_manifest
from moefuse.datasets.demo import MAX_COUNT, MIN_COUNT
from moefuse.errors import Number, command, seed

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def chance_levels(manifest: Path, split: str) -> dict[str, float]:
    """Majority-class rate per task on a split: the accuracy of always answering the most common target."""
    targets: dict[str, Counter] = {}
    for row in read_manifest(manifest):
        if row.split == split and not row.errors:
            targets.setdefault(row.task, Counter())[row.target] += 1
    return {task: c.most_common(1)[0][1] / sum(c.values()) for task, c in targets.items()}


def pick_test_samples(manifest: Path) -> list:
    """A test-split QA row with image and audio, and a test digit row with all three inputs."""
    rows = [r for r in read_manifest(manifest) if r.split == "test" and not r.errors]
    qa = next(r for r in rows if r.type == "qa" and r.image and r.audio)
    full = next((r for r in rows if r.type == "classification" and r.image and r.audio and r.text), rows[0])
    return [qa, full]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moefuse demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder for every demo output")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (default configs/tiny.yaml)")
    p.add_argument("--count", type=Number(int, MIN_COUNT, MAX_COUNT), default=2000,
                   help=f"demo samples to generate, {MIN_COUNT}-{MAX_COUNT} (default 2000)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the data, the splits and training, 0 to 2**32 - 1")
    p.add_argument("--quiet", action="store_true", help="no progress (bars on a terminal, lines in a log)")
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. train.max_steps=50")
    return p.parse_args(argv)


def predict_two(model_dir: Path, manifest: Path, out: Path) -> None:
    """Predict two test samples (the second without its audio) -> out/predictions.jsonl, and print them."""
    from moefuse.fusion.loading import load_inference_model
    from moefuse.inference.predict import export_media, load_media_sample, predict_samples

    model, media = load_inference_model(model_dir), export_media(model_dir)
    qa, full = pick_test_samples(manifest)
    samples = [
        load_media_sample(model, qa.id, qa.task, media=media, text=qa.text, question=qa.question, image=qa.image,
                          audio=qa.audio, target=qa.target),
        load_media_sample(model, f"{full.id}-no-audio", full.task, media=media, text=full.text, image=full.image,
                          target=full.target),
    ]
    predictions = predict_samples(model, samples)
    atomic_write_text(out / "predictions.jsonl", "".join(dumps_json(r, "a prediction") + "\n" for r in predictions))
    for r in predictions:
        if "error" in r:
            print(f"  {r['id']} ({r['task']}): error: {r['error']}")
            continue
        print(f"  {r['id']} ({r['task']}, {r['modalities']}): predicted {r['prediction']!r} "
              f"(p={r['probability']:.2f}, heads {r['votes']}), target {r.get('target')!r}")


def print_summary(out: Path, reports: dict[str, dict], manifest: Path) -> None:
    """Each task's accuracy on the validation and test splits next to the test split's chance level, which split
    chose what, then where every output is."""
    chance = chance_levels(manifest, "test")
    print("\naccuracy per split (validation chose the exported step and fit the calibration; the test split did "
          "neither):")
    print(f"  {'task':<8} {'val':>6} {'test':>6}   chance (test, majority class)")
    for task in reports["val"]["tasks"]:
        val, test = (reports[split]["tasks"].get(task, {}).get("accuracy") for split in ("val", "test"))
        print(f"  {task:<8} {_fmt(val):>6} {_fmt(test):>6}   {_fmt(chance.get(task))}")
    data, shards, run = out / "data", out / "shards", out / "run"
    print(f"\noutputs:\n  data         {data}\n  shards       {shards}\n  run          {run} (metrics.jsonl, "
          f"tensorboard/, checkpoints/)\n  model        {run / 'model'}\n  evaluation   {out / 'eval.json'} "
          f"(validation), {out / 'eval-test.json'} (test)\n"
          f"  heatmap      {out / 'routing_heatmap.png'}\n  predictions  {out / 'predictions.jsonl'}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@command("moefuse demo")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.config.is_file():
        print(f"moefuse demo: error: config {args.config} not found; pass --config configs/tiny.yaml from a "
              f"checkout of the repository", file=sys.stderr)
        return 2
    out = args.out
    data, shards, run = out / "data", out / "shards", out / "run"
    if run.exists():
        print(f"moefuse demo: error: {run} exists from an earlier demo; remove {out} or pass --out", file=sys.stderr)
        return 2

    # imported once the flags are checked, so that `--help` and flag errors answer at once
    from moefuse.config import load_config
    from moefuse.evaluation.report import evaluate, format_summary
    from moefuse.train.recipe import train

    print(f"[1/5] demo data -> {data}")
    manifest = make_demo_data(data, count=args.count, seed=args.seed, overwrite=True, progress=not args.quiet)
    print(f"[2/5] build-shards -> {shards}")
    build_shards(manifest, shards, BuildOptions(overwrite=True, seed=args.seed, maxcount=200,
                                                workers=min(8, os.cpu_count() or 1), progress=not args.quiet))
    print(f"[3/5] train {args.config} -> {run}")
    try:
        cfg = load_config(args.config, [f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]",
                                        f"train.output_dir={run}", f"train.seed={args.seed}", *args.overrides])
    except ConfigError as e:
        print(f"moefuse demo: error: {e}", file=sys.stderr)
        return 2
    train(cfg, progress=not args.quiet)
    model_dir = run / "model"

    print(f"[4/5] evaluate {model_dir} on the validation and test splits")
    reports = {}
    for split, name in (("val", "eval.json"), ("test", "eval-test.json")):
        heatmap = out / "routing_heatmap.png" if split == "val" else None
        reports[split] = evaluate(model_dir, [str(shards)], split=split, heatmap=heatmap, progress=False)
        atomic_write_text(out / name, dumps_json(reports[split], name, indent=2))
    print("the test split:\n" + format_summary(reports["test"]))

    print("[5/5] predict two test samples (the second without its audio)")
    predict_two(model_dir, manifest, out)
    print_summary(out, reports, manifest)
    return 0
