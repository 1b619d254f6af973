"""`moefuse evaluate --checkpoint DIR --shards PATTERN [--json OUT]`: metrics of an exported model on shards.

What the report holds: `moefuse.evaluation.report`, the library this entry point runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moefuse.configutil import atomic_write_text, dumps_json
from moefuse.datasets.corruption import corruption_arg
from moefuse.errors import MAX_PROCESSES, Number, command, os_error_message, positive_int
from moefuse.inference.options import add_runtime_flags, runtime_options


@command("moefuse evaluate")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model folder (a run's model/)")
    p.add_argument("--shards", required=True, nargs="+",
                   help="shards: build-shards folders (read at --split), dataset.json paths, brace patterns or URLs")
    p.add_argument("--split", default="val", help="split to read from dataset folders (default: val)")
    p.add_argument("--json", type=Path, help="write the full report (JSON) here")
    p.add_argument("--heatmap", type=Path, help="write the modality x expert routing heatmap (PNG) here")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="write each task's reliability diagram and risk-coverage curve (confidence-TASK.png) here")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per batch, >= 1 (default 64)")
    p.add_argument("--num-workers", type=Number(int, 0, MAX_PROCESSES), default=0,
                   help=f"data-loading processes, 0 (in this process) to {MAX_PROCESSES} (default 0)")
    add_runtime_flags(p)
    p.add_argument("--drop", nargs="*", metavar="MODALITY", default=None,
                   help="modalities to remove from every sample, e.g. audio (default: those the model was trained "
                        "without)")
    p.add_argument("--corrupt", nargs="+", metavar="MODALITY:KIND", default=[], type=corruption_arg,
                   help="corrupt a modality of every sample: MODALITY:noise[:SNR_DB] (white noise, default 0 dB) or "
                        "MODALITY:conflict (another sample's content), e.g. audio:noise:5 image:conflict")
    p.add_argument("--quiet", action="store_true", help="no progress (bars on a terminal, lines in a log)")
    args = p.parse_args(argv)
    # imported once the flags are checked, so that `--help` and flag errors answer at once
    from moefuse.evaluation.report import evaluate, format_summary

    result = evaluate(args.checkpoint, args.shards, args.split, args.batch_size, args.num_workers,
                      heatmap=args.heatmap, progress=not args.quiet, drop_modalities=args.drop, plots=args.plots,
                      corrupt=args.corrupt, **runtime_options(args))
    failures = list(result["errors"])
    written = False
    if args.json is not None:  # written before anything is printed: a failed print never loses the report
        try:
            atomic_write_text(args.json, dumps_json(result, f"report {args.json}", indent=2))
            written = True
        except OSError as e:
            failures.append(f"the report was not written: {os_error_message(e)}; it follows on stdout")
            print(dumps_json(result, "report", indent=2))
    print(format_summary(result))
    if written:
        print(f"report: {args.json}")
    for failure in failures:
        print(f"moefuse evaluate: error: {failure}", file=sys.stderr)
    return 1 if failures else 0
