"""`moefuse demo-data --out outputs/demo/data [--count 2000] [--seed 0]`: the built-in synthetic multimodal demo
dataset, a manifest plus media files for `moefuse build-shards`.

What it holds and how it never touches a file it did not write: `moefuse.datasets.demo`, the library this entry
point runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moefuse.datasets.demo import MAX_COUNT, MIN_COUNT, DemoError, make_demo_data
from moefuse.errors import Number, command, seed


@command("demo-data")
def main(argv: list[str] | None = None) -> int:
    """`moefuse demo-data`: exit code 0, 1 when the data cannot be written (DemoError), 2 for a failed write."""
    p = argparse.ArgumentParser(prog="moefuse demo-data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for manifest.jsonl and media/")
    p.add_argument("--count", type=Number(int, MIN_COUNT, MAX_COUNT), default=2000,
                   help=f"samples in all, half per task, {MIN_COUNT}-{MAX_COUNT}")
    p.add_argument("--seed", type=seed, default=0,
                   help="random seed, 0 to 2**32 - 1; the same seed gives the same files")
    p.add_argument("--overwrite", action="store_true",
                   help="regenerate over an earlier demo-data run (files it did not write are never touched)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        manifest = make_demo_data(args.out, args.count, args.seed, args.overwrite, progress=not args.quiet)
    except DemoError as e:
        print(f"demo-data: error: {e}", file=sys.stderr)
        return 1
    print(f"demo-data: wrote {manifest} ({args.count} samples); next: moefuse build-shards --manifest {manifest} "
          f"--out {Path(args.out) / 'shards'}")
    return 0
