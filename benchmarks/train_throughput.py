"""Training-step throughput and peak memory of the tiny config: sparse-MoE fusion at E in {4, 16, 64} vs dense.

What is measured (CPU, fp32, torch's default thread count): one training step = forward + backward + grad-norm
clipping (train.max_grad_norm, as ``moefuse train`` does) + AdamW step (``param_groups``) of the
``configs/tiny.yaml`` model with ``fusion.kind=moe, fusion.num_experts=E`` (top_k=2, d_expert=128: the active
compute per token is the same at every E) and with ``fusion.kind=dense`` (one SwiGLU FFN of width top_k * d_expert,
i.e. equal active compute). Every variant trains on the same --batches batches of 32 demo samples, collated once by
the tiny model's training collator and held in memory (no data loading is timed), with the same RNG seed before
each timed pass, so modality dropout drops the same inputs in every variant and every round.

How:

* Each variant lives in its own subprocess (this script with ``--child``), started from a parent that never imports
  torch, so the children's peak memory is their own: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the resident-set
  high-water mark, which Linux carries over ``exec`` from the parent; the parent stays small so that is negligible).
  The table gives the peak over the child's whole life (warm-up and every timed step) and that peak minus the
  high-water mark just before the model was built (torch, transformers and the batches already loaded): the model,
  AdamW state, activations and autograd buffers of the step.
* The children warm up one at a time (--warmup untimed passes over the batches: first-call costs per batch
  shape), then the parent times them round-robin, one pass over all batches per variant per round, the order rotated
  between rounds; only one child runs at a time, the others wait on a pipe. Each pass is divided by the dense
  variant's pass from the same round (and by the smallest E's), and the table reports medians of those per-round
  ratios (± half the interquartile range). Shared machines are noisy, so ratios taken close together in time are far
  steadier than absolute numbers, which are only secondary columns (medians).
* Parameter counts from the built model: total, and active per token (a MoE layer's experts count k/E: the router
  and the k chosen experts are active; a dense model is all active); also the FFN part alone (router + experts, or
  the dense FFN).

Expectation checked: step time stays flat as E grows (the largest E vs the smallest, by default E=64 vs E=4,
within ±10%; a threshold fixed before measuring).

Usage::

    python benchmarks/train_throughput.py              # E in {4, 16, 64} and dense, 3 batches of 32, 15 rounds
    python benchmarks/train_throughput.py --quick      # smoke run: E=4 and dense only, 2 batches, 3 rounds
    python benchmarks/train_throughput.py --experts 8 32 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from _bench import command_line, demo_shards, summary

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
BATCH_SIZE = 32
FLAT_TOLERANCE = 0.10  # "flat": the largest E's step time within ±10% of the smallest E's
SEED = 1234


def maxrss_kib() -> int:
    """This process's resident-set high-water mark in KiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss




def variant_overrides(name: str) -> list[str]:
    """"dense" or "moe-E<n>" -> config overrides."""
    if name == "dense":
        return ["fusion.kind=dense"]
    return ["fusion.kind=moe", f"fusion.num_experts={int(name.removeprefix('moe-E'))}"]


# ---------------------------------------------------------------------------------------------------------------
# subprocesses: data preparation, and one training variant each


def prepare(work: Path, count: int, batches: int, seed: int) -> None:
    """Demo data -> shards -> `batches` full training batches of the tiny model's collator, saved to batches.pt."""
    import dataclasses

    import torch

    from moefuse.config import load_config
    from moefuse.datasets.loader import make_loader
    from moefuse.fusion.model import build_collator, build_model
    from moefuse.train.preflight import resolve_tasks

    shards = demo_shards(work, count, seed)
    cfg = load_config(CONFIG, [f"data.train_shards=[{shards}]"])
    cfg = dataclasses.replace(cfg, tasks=resolve_tasks(cfg))
    collator = build_collator(build_model(cfg.model_config()), train=True, seed=seed)
    loader = make_loader([str(shards)], collator, BATCH_SIZE, split="train", shuffle=cfg.data.shuffle_buffer,
                         seed=seed)
    full = [b for b in loader if len(b["ids"]) == BATCH_SIZE][:batches]
    if len(full) < batches:
        raise SystemExit(f"only {len(full)} full batches in the train split; lower --batches or raise --count")
    torch.save(full, work / "batches.pt")


def param_counts(model: Any) -> dict[str, int]:
    """Total and per-token active parameters of the model and of its fusion FFNs."""
    from moefuse.fusion.moe import DenseFFN, SparseMoE

    total = sum(p.numel() for p in model.parameters())
    ffn_total = inactive = 0
    for block in getattr(model.fusion, "blocks", []):
        ffn = block.ffn  # a SparseMoE (router, experts, optional shared expert) or a DenseFFN
        ffn_total += sum(p.numel() for p in ffn.parameters())
        if isinstance(ffn, SparseMoE):
            experts = sum(p.numel() for p in ffn.experts.parameters())
            inactive += experts * (ffn.num_experts - ffn.top_k) // ffn.num_experts
        elif not isinstance(ffn, DenseFFN):
            raise TypeError(f"unexpected FFN type {type(ffn).__name__}")
    return {"total": total, "active": total - inactive, "ffn_total": ffn_total, "ffn_active": ffn_total - inactive}


def count_grouped_mm_calls(fn: Any) -> int:
    """Run fn() with torch._grouped_mm wrapped; how many times it was called."""
    import torch

    orig = getattr(torch, "_grouped_mm", None)
    if orig is None:
        fn()
        return 0
    calls = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return orig(*args, **kwargs)

    torch._grouped_mm = counted
    try:
        fn()
    finally:
        torch._grouped_mm = orig
    return calls


def child(work: Path, name: str, warmup: int, threads: int | None, proto: TextIO) -> None:
    """One variant: build, warm up, then on each "run" line time one pass over the batches; "quit" reports memory."""
    start_kib = maxrss_kib()
    import dataclasses
    import warnings

    import torch

    from moefuse.config import load_config
    from moefuse.fusion.model import build_model
    from moefuse.train.optim import param_groups
    from moefuse.train.preflight import resolve_tasks

    warnings.simplefilter("ignore")  # one-time notices of transformers / torch
    if threads:
        torch.set_num_threads(threads)
    batches = torch.load(work / "batches.pt", weights_only=False)
    cfg = load_config(CONFIG, [f"data.train_shards=[{work / 'shards'}]", *variant_overrides(name)])
    cfg = dataclasses.replace(cfg, tasks=resolve_tasks(cfg))
    base_kib = maxrss_kib()
    torch.manual_seed(0)
    model = build_model(cfg.model_config())
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=tuple(cfg.train.betas or (0.9, 0.999)))
    params = [p for p in model.parameters() if p.requires_grad]

    def one_pass() -> float:
        torch.manual_seed(SEED)  # the same modality-dropout and dropout draws in every pass
        t0 = time.perf_counter()
        for batch in batches:
            model(batch).loss.backward()
            if cfg.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    proto.write(json.dumps({"loaded": True}) + "\n")
    proto.flush()
    if sys.stdin.readline().strip() != "warmup":  # the parent warms the variants up one at a time
        return
    grouped_mm_calls = None  # torch._grouped_mm calls in the last warm-up pass: which expert kernel training uses
    for i in range(warmup):
        if i == warmup - 1:
            grouped_mm_calls = count_grouped_mm_calls(one_pass)
        else:
            one_pass()
    if cfg.fusion.kind != "moe" or grouped_mm_calls is None:
        backend = "-"
    elif grouped_mm_calls:
        backend = f"native (torch._grouped_mm, {grouped_mm_calls} calls per pass)"
    else:
        backend = "loop (no torch._grouped_mm call in a training pass)"

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    reply({"ready": True, "params": param_counts(model), "start_kib": start_kib, "base_kib": base_kib,
           "samples": sum(len(b["ids"]) for b in batches), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "backend": backend})
    for line in sys.stdin:
        if line.strip() == "run":
            reply({"seconds": one_pass()})
        else:
            break
    reply({"peak_kib": maxrss_kib()})


# ---------------------------------------------------------------------------------------------------------------
# the parent: torch-free, runs the children round-robin


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    info: dict = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    vs_dense: list[float] = field(default_factory=list)
    vs_small: list[float] = field(default_factory=list)  # per round, to the smallest E
    peak_kib: int = 0

    def ask(self, line: str) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        assert self.proc.stdout is not None
        reply = self.proc.stdout.readline()
        if not reply:
            raise SystemExit(f"variant {self.name} exited (code {self.proc.wait()}); see its errors above")
        return json.loads(reply)


def experts_of(c: Child) -> int:
    return int(c.name.removeprefix("moe-E"))


def smallest_moe(children: list[Child]) -> Child | None:
    return min((c for c in children if c.name != "dense"), key=experts_of, default=None)


def run_children(names: list[str], work: Path, args: argparse.Namespace) -> list[Child]:
    children = []
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", str(work), "--warmup",
               str(args.warmup), *(["--threads", str(args.threads)] if args.threads else [])]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(Child(name, proc))
    t0 = time.perf_counter()
    for c in children:  # they import and build concurrently (mostly one thread each) ...
        c.read()
    for c in children:  # ... but warm up one at a time: 2-thread torch processes side by side crawl on 2 cores
        c.info = c.ask("warmup")
    print(f"build and warm-up: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    dense = next(c for c in children if c.name == "dense")
    small = smallest_moe(children)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        shift = r % len(children)
        for c in children[shift:] + children[:shift]:
            c.seconds.append(c.ask("run")["seconds"])
        for c in children:
            c.vs_dense.append(c.seconds[-1] / dense.seconds[-1])
            if small is not None:
                c.vs_small.append(c.seconds[-1] / small.seconds[-1])
        print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for c in children:
        c.peak_kib = c.ask("quit")["peak_kib"]
        c.proc.wait()
    return children


def print_table(children: list[Child], args: argparse.Namespace) -> None:
    info = children[0].info
    samples = info["samples"]
    mib = 1024
    print(f"\nStep time as a ratio (median over {args.rounds} rounds of per-round ratios, ± half the interquartile "
          f"range); samples/s and memory are secondary ({samples} samples = {samples // BATCH_SIZE} steps of "
          f"{BATCH_SIZE} per pass; memory = ru_maxrss of each variant's own subprocess):\n")
    small = smallest_moe(children)
    e_small = experts_of(small) if small is not None else "-"
    print(f"| fusion | step time / dense | step time / E={e_small} | samples/s | peak RSS MiB | peak - pre-model MiB | "
          "params total | params active | FFN params total | FFN active |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in children:
        d_med, d_iqr = summary(c.vs_dense)
        e_cell = "-"
        if c.vs_small and c.name != "dense":
            e_med, e_iqr = summary(c.vs_small)
            e_cell = "1.00x (ref)" if c is small else f"{e_med:.2f}x ±{e_iqr:.2f}"
        d_cell = "1.00x (ref)" if c.name == "dense" else f"{d_med:.2f}x ±{d_iqr:.2f}"
        label = "dense (width k*H)" if c.name == "dense" else f"moe E={c.name.removeprefix('moe-E')}"
        p = c.info["params"]
        sps = samples / statistics.median(c.seconds)
        print(f"| {label} | {d_cell} | {e_cell} | {sps:.1f} | {c.peak_kib / mib:.0f} | "
              f"{(c.peak_kib - c.info['base_kib']) / mib:.0f} | {p['total']:,} | {p['active']:,} | "
              f"{p['ffn_total']:,} | {p['ffn_active']:,} |")
    starts = [c.info["start_kib"] / mib for c in children]
    print(f"\nru_maxrss at each child's start, before importing torch: {min(starts):.0f}-{max(starts):.0f} MiB "
          f"(the interpreter, plus whatever exec carries over from the torch-free parent; included in peak RSS); "
          f"MoE experts in training (fusion.backend=auto): "
          f"{'; '.join(sorted({c.info['backend'] for c in children if c.info['backend'] != '-'})) or '-'}")

    moes = [c for c in children if c.name != "dense"]
    top = max(moes, key=experts_of, default=None)
    if small is not None and top is not None and top is not small:
        med, half_iqr = summary(top.vs_small)
        flat = abs(med - 1.0) <= FLAT_TOLERANCE
        e, e0 = experts_of(top), experts_of(small)
        print(f"\nExpectation: step time flat as E grows (E={e} within ±{FLAT_TOLERANCE:.0%} of E={e0}): "
              f"{'MET' if flat else 'NOT MET'} (E={e} / E={e0} = {med:.2f}x ±{half_iqr:.2f}, per-round range "
              f"{min(top.vs_small):.2f}-{max(top.vs_small):.2f})")
    else:
        print("\nExpectation (step time flat as E grows): not checked, it needs at least two E values")
    print(f"\nCommand: {command_line()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64], help="E values (default 4 16 64)")
    parser.add_argument("--batches", type=int, default=3, help="batches of 32 per timed pass (default 3)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per variant first (default 2)")
    parser.add_argument("--count", type=int, default=400, help="demo samples to make the batches from (default 400)")
    parser.add_argument("--work", type=Path, help="folder for the demo data, shards and batches (default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads per variant (default: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: smallest E and dense, 2 batches, 3 rounds")
    parser.add_argument("--child", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    if parser.parse_args(argv).quick:  # the smoke-run presets; flags given explicitly still win
        parser.set_defaults(batches=2, rounds=3, warmup=1, count=240)
    args = parser.parse_args(argv)
    if args.quick and "--experts" not in (argv if argv is not None else sys.argv[1:]):
        args.experts = [min(args.experts)]  # two subprocesses: each pays ~20 s of imports and first-call costs

    if args.child:
        proto = os.fdopen(os.dup(1), "w")  # the protocol pipe; anything else printed goes to stderr
        os.dup2(2, 1)
        child(args.work, args.child, args.warmup, args.threads, proto)
        return
    if args.prepare:
        prepare(args.work, args.count, args.batches, args.seed)
        return

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="moefuse-train-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--prepare", "--work", str(work), "--count",
                        str(args.count), "--batches", str(args.batches), "--seed", str(args.seed)], check=True)
        print(f"data: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        names = [f"moe-E{e}" for e in args.experts] + ["dense"]
        children = run_children(names, work, args)
    info = children[0].info
    print(f"torch {info['torch']}, {info['threads']} threads per variant, {os.cpu_count()} CPU cores, load average "
          f"{load:.1f} at start; tiny config, E={args.experts} and dense, {args.batches} batches of {BATCH_SIZE}, "
          f"{args.rounds} rounds after {args.warmup} warm-up pass{'es' if args.warmup != 1 else ''}")
    print_table(children, args)


if __name__ == "__main__":
    main()
