"""Is a training run reproducible, and what changes it? The tiny config trained a few steps on demo shards, the same
seed each time, in four ways; the exported weights of each are compared bit for bit with the first:

    fresh, 1 thread         a fresh Python process, torch.set_num_threads(1)
    fresh, 1 thread again   the same once more (is a run reproducible at all?)
    after another run       one process that first trains another variant (fusion.kind=dense), then this one
                            (does what ran before in a process change a run? run.py trains its variants that way)
    fresh, 2 threads        a fresh process with 2 torch threads (does the thread count change a run?)

    python benchmarks/repro_check.py --steps 30

Issue #25 asked why a rerun of the AV-digits MoE variant on another machine of the same kind gave other figures;
this separates the candidates that one machine can test (process history, thread count). The machine's kernels
(another CPU, another MKL/oneDNN code path) cannot be tested here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _bench import command_line, demo_shards

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"


def train_once(shards: Path, out: Path, steps: int, threads: int, before: list[str]) -> None:
    """(The child's job.) With `threads` torch threads, train `before` variants first (if any), then the tiny
    config itself into `out`."""
    from moefuse.config import load_config
    from moefuse.train.recipe import train

    torch.set_num_threads(threads)
    base = [f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]", f"train.max_steps={steps}",
            "train.eval_every=1000", "train.save_every=1000", "train.tensorboard=false", "train.seed=0",
            "heads.calibration_min_samples=1000000"]  # no calibration: nothing but training is compared
    for i, override in enumerate(before):
        with contextlib.redirect_stdout(sys.stderr):
            train(load_config(CONFIG, [*base, f"train.output_dir={out}-before{i}", override]))
    with contextlib.redirect_stdout(sys.stderr):
        train(load_config(CONFIG, [*base, f"train.output_dir={out}"]))


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(tensors that differ, the largest absolute difference)."""
    diffs = [float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])]
    return len(diffs), max(diffs, default=0.0)


def val_accuracy(run: Path) -> str:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if any(k.startswith("val/") for k in r)][-1]
    return ", ".join(f"{k[4:-4]} {v:.3f}" for k, v in sorted(last.items())
                     if k.startswith("val/") and k.endswith("/acc"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    p.add_argument("--count", type=int, default=600, help="demo samples (default 600)")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # shards out steps threads before(,-separated)
    args = p.parse_args(argv)
    if args.child:
        shards, out, steps, threads, before = args.child
        train_once(Path(shards), Path(out), int(steps), int(threads), [b for b in before.split(",") if b])
        return
    ways = {"fresh, 1 thread": (1, ""), "fresh, 1 thread again": (1, ""),
            "after another run": (1, "fusion.kind=dense"), "fresh, 2 threads": (2, "")}
    with tempfile.TemporaryDirectory(prefix="moefuse-repro-") as tmp:
        work = Path(tmp)
        shards = demo_shards(work, args.count, seed=0)
        runs = {}
        for i, (name, (threads, before)) in enumerate(ways.items()):
            runs[name] = work / f"run{i}"
            subprocess.run([sys.executable, __file__, "--child", str(shards), str(runs[name]), str(args.steps),
                            str(threads), before], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = weights(runs["fresh, 1 thread"])
        print(f"tiny config, {args.steps} steps, seed 0, {args.count} demo samples; weights against 'fresh, 1 thread'"
              f" ({len(first)} tensors)\n")
        print("| run | tensors that differ | largest difference | validation accuracy |\n|---|---:|---:|---|")
        for name, run in runs.items():
            n, largest = compare(first, weights(run))
            print(f"| {name} | {n} | {largest:.2e} | {val_accuracy(run)} |")
    print(f"\nCommand: {command_line()}")


if __name__ == "__main__":
    main()
