"""`moefuse predict --checkpoint DIR` for one sample (`--task` and any of --text/--question/--image/--audio) or
a manifest (`--manifest M.jsonl`), writing JSON Lines: id, task, prediction, probability, top 5, per-head votes,
agreement, and a routing summary (which experts each modality's tokens went to, per MoE layer).

Raw files are prepared by each modality's encoder with the settings the training shards were built with
(`moefuse.inference.predict`, the library this entry point runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moefuse.configutil import ConfigError, atomic_write_text, dumps_json
from moefuse.errors import command, positive_int, probability
from moefuse.inference.options import add_runtime_flags, runtime_options


def write_lines(lines: str, out: Path | None) -> None:
    """JSON Lines to --out (atomic) or stdout. If --out cannot be written, the lines still go to stdout (nothing
    computed is lost) and the OSError naming the path is raised after."""
    if out is None:
        sys.stdout.write(lines)
        return
    try:
        atomic_write_text(out, lines)
    except OSError:
        sys.stdout.write(lines)
        raise


@command("moefuse predict")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model folder (a run's model/)")
    p.add_argument("--manifest", type=Path, help="JSONL/CSV manifest of samples to predict (targets optional)")
    p.add_argument("--task", help="task of the single sample (default: the model's only task)")
    p.add_argument("--id", default="sample", help="id of the single sample")
    p.add_argument("--text", help="text (or a QA context)")
    p.add_argument("--question", help="question, for a QA task")
    p.add_argument("--image", type=Path, help="image file")
    p.add_argument("--audio", type=Path, help="audio file (wav/flac/ogg; resampled as needed)")
    p.add_argument("--out", type=Path, help="write JSON Lines here (default: stdout)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per batch, >= 1 (default 32)")
    p.add_argument("--min-confidence", type=probability, metavar="P",
                   help="mark answers whose calibrated probability is below P (in [0, 1]) as abstentions "
                        "(\"abstain\": true; the prediction is still the best guess)")
    add_runtime_flags(p)
    p.add_argument("--cache-encoders", nargs="*", metavar="MODALITY", default=None,
                   help="modalities whose encoder outputs are reused for inputs seen before, e.g. a repeated question "
                        "(default: the encoders frozen in training; the flag alone turns the cache off)")
    p.add_argument("--quiet", action="store_true", help="no progress over a manifest (bars on a terminal, lines in a "
                   "log)")
    args = p.parse_args(argv)
    # imported once the flags are checked, so that `--help` and flag errors answer at once
    from moefuse.fusion.loading import load_inference_model, say_startup
    from moefuse.inference.predict import export_media, load_media_sample, manifest_samples, predict_samples

    if args.manifest is not None and any([args.text, args.question, args.image, args.audio]):
        raise ConfigError("give either --manifest or single-sample inputs, not both")
    model = load_inference_model(args.checkpoint, cache_encoders=args.cache_encoders, **runtime_options(args))
    say_startup(model, "moefuse predict")
    media = export_media(model)
    bad: list[dict] = []
    if args.manifest is not None:
        samples, bad = manifest_samples(model, args.manifest, media)
    else:
        task = args.task
        if task is None:
            if len(model.task_names) != 1:
                raise ConfigError(f"this model has several tasks; choose one with --task "
                                  f"({', '.join(model.task_names)})")
            task = model.task_names[0]
        samples = [load_media_sample(model, args.id, task, media=media, text=args.text, question=args.question,
                                     image=args.image, audio=args.audio)]
    results = (predict_samples(model, samples, args.batch_size, args.min_confidence,
                               progress=args.manifest is not None and not args.quiet) if samples else [])
    for r, s in zip(results, samples):
        r.setdefault("line", s.get("line"))
    rows = sorted(results + bad, key=lambda r: r.get("line") or 0)
    failed = [r for r in rows if "error" in r]
    lines = "".join(dumps_json({k: v for k, v in r.items() if k != "line" or args.manifest is not None},
                               "a prediction") + "\n" for r in rows)
    write_lines(lines, args.out)
    if args.out is not None:
        print(f"wrote {len(rows) - len(failed)} predictions and {len(failed)} errors to {args.out}", file=sys.stderr)
    for b in failed:
        where = f"line {b['line']} " if b.get("line") else ""
        print(f"moefuse predict: {where}(id {b['id']}): {b['error']}", file=sys.stderr)
    return 1 if failed else 0
