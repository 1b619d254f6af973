"""`moefuse ensemble --members DIR [DIR ...] --shards SPLIT_SOURCE --out DIR`: an ensemble folder of exported models,
its combiner fit on a split and cross-fitted, so every figure it reports comes from samples its combiner was not
fit on.

What it fits and writes: `moefuse.evaluation.ensemble`, the library this entry point runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moefuse.datasets.corruption import corruption_arg
from moefuse.errors import MAX_PROCESSES, Number, command, positive_int

RULES = ("soft", "weighted", "gated", "majority")


@command("moefuse ensemble")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument("--members", required=True, nargs="+", type=Path, metavar="DIR",
                   help="exported model folders (a run's model/); they must answer the same tasks with the same "
                        "vocabularies, and may differ in modalities, fusion, size and seed")
    p.add_argument("--shards", required=True, nargs="+",
                   help="shards the combiner is fit on: build-shards folders (read at --split), dataset.json paths, "
                        "brace patterns or URLs")
    p.add_argument("--out", required=True, type=Path, help="the ensemble folder to write (new or empty)")
    p.add_argument("--split", default="val", help="split to fit on (default: val)")
    p.add_argument("--combine", choices=RULES, default="gated",
                   help="how the members' answers are combined: soft (mean), weighted (stacking weights), gated (a "
                        "gate per sample) or majority (vote); every rule is reported, this one stored (default gated)")
    p.add_argument("--folds", type=Number(int, 2, 100), default=5,
                   help="cross-fitting folds, 2 to 100 (default 5)")
    p.add_argument("--fit-drop", nargs="*", metavar="MODALITY", default=None,
                   help="modalities removed in turn from copies of the split's samples, which the combiner is fit on "
                        "beside the split as it is, so that the gate learns which member to trust without each one "
                        "(default: every modality the members read; the flag alone: the split as it is)")
    p.add_argument("--score-corrupt", nargs="+", metavar="MODALITY:KIND", default=[], type=corruption_arg,
                   help="also score every member and the cross-fitted ensemble with a modality corrupted (as evaluate "
                        "--corrupt: MODALITY:noise[:SNR_DB] or MODALITY:conflict); never fit on")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per batch, >= 1 (default 64)")
    p.add_argument("--num-workers", type=Number(int, 0, MAX_PROCESSES), default=0,
                   help=f"data-loading processes, 0 (in this process) to {MAX_PROCESSES} (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress (bars on a terminal, lines in a log)")
    args = p.parse_args(argv)
    # imported once the flags are checked, so that `--help` and flag errors answer at once
    from moefuse.evaluation.ensemble import build_ensemble, format_build

    build = build_ensemble(args.members, args.shards, args.out, args.split, args.combine, args.folds,
                           args.batch_size, args.num_workers, progress=not args.quiet, fit_drop=args.fit_drop,
                           score_corrupt=args.score_corrupt)
    print(format_build(build))
    print(f"ensemble: {build.out}")
    return 0
