"""`moefuse export RUN_DIR`: (re)write a training run's model folder from its checkpoints, without training.

For a run whose export failed (a full disk, a file in the way) or was deleted: the newest intact checkpoint gives
the trainer state, the best checkpoint the weights (the newest when the best one is gone or damaged), exactly as
the end of `moefuse train` does; RUN_DIR/model and RUN_DIR/results.json are written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moefuse.configutil import ConfigError
from moefuse.errors import command


@command("moefuse export")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="the training run's folder (train.output_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress (bars on a terminal, lines in a log)")
    args = p.parse_args(argv)
    # imported once the flags are checked, so that `--help` and flag errors answer at once
    from moefuse.train.checkpoint import export_run, load_run

    if not (args.run_dir / "config.yaml").is_file():
        raise ConfigError(f"{args.run_dir} is not a training run folder (no config.yaml); give the "
                          f"train.output_dir of a run")
    model, state, cfg = load_run(args.run_dir)
    result = export_run(model, args.run_dir, state, cfg, progress=not args.quiet)
    print(f"exported {result['model_dir']} (step {state.get('best_step') or state['step']} of a run stopped at "
          f"step {state['step']}); results in {args.run_dir / 'results.json'}")
    return 0
