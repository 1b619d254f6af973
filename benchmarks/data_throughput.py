"""Data pipeline throughput on the demo data: shard building, the streaming loader, and what training consumes.

What is measured (CPU, fp32, torch's default thread count in the main process):

* ``build``: ``build_shards`` of one demo manifest (``make_demo_data``, --count samples) with
  ``BuildOptions(maxcount=100, workers=W)`` for W in {1, 2}, each time into a fresh, empty folder. Samples/s =
  manifest rows / wall time of the call: reading and checking the manifest, decoding, normalising and re-encoding
  every image and recording (PNG, FLAC), writing the tars and ``dataset.json``; with W=2 the process pool's
  start-up too (the main process writes the tars while the pool encodes).
* ``loader``: one full epoch of the train split through ``make_loader(shards, collator, batch_size=32,
  split="train", shuffle=500, num_workers=W)`` for W in {0, 1, 2}, batches made by the real collator of the tiny
  model (``build_collator(build_model(configs/tiny.yaml), train=True)``: tokenising, image transform, audio crop
  and padding). Samples/s = samples in the epoch / wall time from ``iter(loader)`` to the last batch, so each
  epoch pays its workers' start-up (the loader's workers are not persistent, as in training).
* ``train step``: what the tiny training step consumes, with data loading excluded: forward + backward +
  grad-norm clipping (train.max_grad_norm, as ``moefuse train`` does) + AdamW step (``param_groups``) of the tiny
  config model, on --steps full batches of 32 collated once (from the loader above) and held in memory; the same
  RNG seed before each timed pass, so modality dropout and dropout draw the same masks every round.

How: one untimed warm-up round (page cache, the model's first-call costs per batch shape), then --rounds rounds in
which every variant runs once, the order rotated between rounds. Each loader epoch is divided by the training
step's samples/s from the same round, and the 2-worker build by the 1-worker build from the same round; the table
reports the medians of those per-round ratios (± half their interquartile range). Shared machines are noisy, so
ratios taken close together in time are far steadier than absolute numbers, which are only secondary columns
(medians over rounds).

Target (from the issue): the loader with 2 workers delivers >= 5x the samples/s the tiny training step consumes.
Caveat: each variant runs alone here; in real training on a 2-core machine the loader workers and the training
step share the same cores.

Usage::

    python benchmarks/data_throughput.py                 # 1200 demo samples, 9 rounds, 6 training steps per round
    python benchmarks/data_throughput.py --quick         # smoke run: 240 samples, 3 rounds, 2 steps
    python benchmarks/data_throughput.py --work /tmp/dt  # keep the demo data and shards there
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _bench import command_line, demo_shards, summary

from moefuse.config import ExperimentConfig, load_config
from moefuse.datasets.loader import make_loader
from moefuse.datasets.shards import BuildOptions, build_shards
from moefuse.fusion.model import MultimodalMoEModel, build_collator, build_model
from moefuse.train.optim import param_groups
from moefuse.train.preflight import resolve_tasks

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
TARGET = 5.0  # the target: loader (2 workers) samples/s >= 5x the training step's
BATCH_SIZE = 32
SHUFFLE = 500
MAXCOUNT = 100


@dataclass
class Variant:
    """One timed thing: `run()` returns (samples, seconds)."""

    name: str
    group: str  # "build", "loader" or "train"
    workers: int | None
    run: Callable[[], tuple[int, float]]
    sps: list[float] = field(default_factory=list)  # samples/s per round
    ratios: list[float] = field(default_factory=list)  # per round, to the group's reference




def tiny_config(shards: Path) -> ExperimentConfig:
    cfg = load_config(CONFIG, [f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]"])
    return dataclasses.replace(cfg, tasks=resolve_tasks(cfg))


def build_variant(manifest: Path, root: Path, workers: int) -> Callable[[], tuple[int, float]]:
    out = root / f"build-w{workers}"

    def run() -> tuple[int, float]:
        shutil.rmtree(out, ignore_errors=True)  # a fresh folder every time (not timed)
        opts = BuildOptions(maxcount=MAXCOUNT, workers=workers, overwrite=False, progress=False)
        t0 = time.perf_counter()
        info = build_shards(manifest, out, opts)
        seconds = time.perf_counter() - t0
        return sum(s["samples"] for s in info["splits"].values()), seconds

    return run


def loader_variant(shards: Path, collator: Callable, workers: int) -> Callable[[], tuple[int, float]]:
    def run() -> tuple[int, float]:
        loader = make_loader([str(shards)], collator, BATCH_SIZE, split="train", num_workers=workers,
                             shuffle=SHUFFLE)
        t0 = time.perf_counter()
        samples = sum(len(batch["ids"]) for batch in loader)
        return samples, time.perf_counter() - t0

    return run


def train_variant(model: MultimodalMoEModel, cfg: ExperimentConfig,
                  batches: list[dict]) -> Callable[[], tuple[int, float]]:
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=tuple(cfg.train.betas or (0.9, 0.999)))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def run() -> tuple[int, float]:
        torch.manual_seed(1234)  # the same dropout / modality-dropout masks every round
        t0 = time.perf_counter()
        for batch in batches:
            loss = model(batch).loss
            loss.backward()
            if cfg.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        return sum(len(b["ids"]) for b in batches), seconds

    return run


def measure(variants: list[Variant], rounds: int) -> None:
    """One untimed warm-up round, then `rounds` rounds of one run per variant in a rotating order."""
    t0 = time.perf_counter()
    for v in variants:
        v.run()
    print(f"warm-up round: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    refs = {"build": next(v for v in variants if v.group == "build" and v.workers == 1),
            "loader": next(v for v in variants if v.group == "train"),
            "train": next(v for v in variants if v.group == "train")}
    for r in range(rounds):
        shift = r % len(variants)
        t0 = time.perf_counter()
        for v in variants[shift:] + variants[:shift]:
            samples, seconds = v.run()
            v.sps.append(samples / seconds)
        for v in variants:
            v.ratios.append(v.sps[-1] / refs[v.group].sps[-1])
        print(f"round {r + 1}/{rounds}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def print_table(variants: list[Variant], args: argparse.Namespace, build_samples: int, epoch_samples: int) -> None:
    label = {"build": "build_shards (maxcount=100)", "loader": "loader epoch (batch 32, shuffle 500)",
             "train": "tiny train step (fwd+bwd+AdamW)"}
    ref = {"build": "build, 1 worker", "loader": "train step", "train": "train step"}
    print(f"\nSamples/s as a ratio (median over {args.rounds} rounds of per-round ratios, ± half the interquartile "
          f"range); absolute samples/s are medians, secondary:\n")
    print("| stage | workers | ratio | relative to | samples/s |")
    print("|---|---:|---:|---|---:|")
    for v in variants:
        med, half_iqr = summary(v.ratios)
        ratio = "1.00x (ref)" if v.group == "train" or (v.group == "build" and v.workers == 1) \
            else f"{med:.2f}x ±{half_iqr:.2f}"
        workers = "-" if v.workers is None else str(v.workers)
        print(f"| {label[v.group]} | {workers} | {ratio} | {ref[v.group]} | {statistics.median(v.sps):.0f} |")
    print(f"\nbuild: {build_samples} samples (all splits) per build; loader: {epoch_samples} train samples per epoch; "
          f"train step: {args.steps} batches of {BATCH_SIZE} per round")

    loader2 = next(v for v in variants if v.group == "loader" and v.workers == 2)
    med, half_iqr = summary(loader2.ratios)
    low = min(loader2.ratios)
    verdict = "MET" if med >= TARGET else "MISSED"
    print(f"\nTarget: loader with 2 workers >= {TARGET:.0f}x the samples/s the tiny training step consumes: "
          f"{verdict} (median {med:.1f}x ±{half_iqr:.1f}, lowest round {low:.1f}x)")
    build2 = next(v for v in variants if v.group == "build" and v.workers == 2)
    med, half_iqr = summary(build2.ratios)
    print(f"build with 2 workers vs 1: {med:.2f}x ±{half_iqr:.2f} on {os.cpu_count()} CPU cores")
    print(f"\nCommand: {command_line()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="folder for the demo data and shards (default: a temp folder)")
    parser.add_argument("--count", type=int, default=1200, help="demo samples (default 1200)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--steps", type=int, default=6, help="training steps (batches) per round (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 240 samples, 3 rounds, 2 steps")
    if parser.parse_args(argv).quick:  # the smoke-run presets; flags given explicitly still win
        parser.set_defaults(count=240, rounds=3, steps=2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPU cores, load average "
          f"{load:.1f} at start; {args.count} demo samples, {args.rounds} rounds after 1 warm-up round")
    with tempfile.TemporaryDirectory(prefix="moefuse-data-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        shards = demo_shards(work, args.count, args.seed, maxcount=MAXCOUNT)
        manifest = work / "data" / "manifest.jsonl"
        cfg = tiny_config(shards)
        torch.manual_seed(args.seed)
        model = build_model(cfg.model_config())
        collator = build_collator(model, train=True, seed=args.seed)
        epoch = list(make_loader([str(shards)], collator, BATCH_SIZE, split="train", shuffle=SHUFFLE))
        epoch_samples = sum(len(b["ids"]) for b in epoch)
        batches = [b for b in epoch if len(b["ids"]) == BATCH_SIZE][:args.steps]
        if len(batches) < args.steps:
            raise SystemExit(f"only {len(batches)} full batches in the train split; lower --steps or raise --count")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' and torch's one-time notices
            train_run = train_variant(model, cfg, batches)
            train_run()  # first-call costs per batch shape, before the warm-up round
            print(f"setup: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            variants = [Variant(f"build-w{w}", "build", w, build_variant(manifest, work, w)) for w in (1, 2)]
            variants += [Variant(f"loader-w{w}", "loader", w, loader_variant(shards, collator, w)) for w in (0, 1, 2)]
            variants.append(Variant("train", "train", None, train_run))
            measure(variants, args.rounds)
        build_samples = sum(1 for line in manifest.read_text().splitlines() if line.strip())
    print_table(variants, args, build_samples, epoch_samples)


if __name__ == "__main__":
    main()
