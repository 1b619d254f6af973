"""`moefuse train CONFIG.yaml [key.sub=value ...] [--resume]`, also `accelerate launch -m moefuse train ...`.

The command line only: the recipe itself (setup, the training loop, validation, checkpoints, export) is
`moefuse.train.recipe`, whose `train(cfg)` is what tests, the demo and the benchmarks call.
"""

from __future__ import annotations

import argparse
import sys

from moefuse.errors import command


@command("moefuse train")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moefuse train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fusion.num_experts=16 train.max_steps=50")
    parser.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its newest "
                        "intact checkpoint (a finished run is only exported again)")
    parser.add_argument("--quiet", action="store_true", help="no progress (bars on a terminal, lines in a log)")
    args = parser.parse_args(argv)
    # imported once the flags are checked, so that `--help` and flag errors answer at once
    from moefuse.config import load_config
    from moefuse.train.recipe import train

    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg, resume=args.resume, progress=not args.quiet)
    except FloatingPointError as e:
        print(f"moefuse train: error: {e}", file=sys.stderr)
        return 2
    return 0
