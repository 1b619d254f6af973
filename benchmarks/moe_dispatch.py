"""Cost of sparse-MoE dispatch on CPU, as a ratio to a dense SwiGLU FFN of the same active compute.

What is measured (fp32 on CPU with torch's default thread count, unless --device / --dtype say otherwise):

* ``dense``: the floor, ``DenseFFN(d_model=D, d_hidden=k*H)``. A token through it does the same multiply-adds as a
  token through k experts of width H, so a perfect dispatch would cost 1.0x of it.
* ``moe-native`` / ``moe-loop``: ``SparseMoE(MoEConfig(D, H, E, top_k=k))`` (dropless) with ``backend="native"``
  (``torch._grouped_mm``) and ``backend="loop"`` (one ``mm`` per expert in a custom autograd Function).
  ``moe-auto`` is the default backend, whichever that picks (on CPU: native under ``no_grad``, the loop when a weight
  gradient is needed; see ``moefuse.fusion.kernels.grouped_mm``). For CPU training with many experts, compare runs
  with and without ``THP_MEM_ALLOC_ENABLE=1`` in the environment (see ``moefuse.fusion.kernels``).
* ``hf-grouped_mm`` / ``hf-eager``: transformers' ``MixtralSparseMoeBlock`` as peers, with
  ``config._experts_implementation`` set to ``"grouped_mm"`` (sort by expert, ``grouped_mm``) and to ``"eager"``
  (a Python loop over experts, slicing ``gate_up_proj[e]``). The SparseMoE variants are built with
  ``SparseMoE.from_mixtral(block)``, so all MoE variants share weights and routing; the script checks that their
  outputs agree and that the grouped_mm peer really calls the grouped-matmul kernel before timing anything.

Two modes: ``fwd`` (forward alone, under ``torch.no_grad``) and ``fwd+bwd`` (forward with autograd, then
``out.backward(g)`` on a fixed random ``g``, into the input and every parameter, router included; grads are set to
None between iterations).

How: for every E and mode, each variant is warmed up (which also sizes its sample: one call, or the mean of a few
when a call is shorter than --min-sample-ms, as at --quick sizes), then all are timed round-robin, one sample each
per round, the order rotated between rounds. Each sample is divided by the dense floor's sample from the same round,
and the table reports the median of those ratios over the rounds (± half their interquartile range). Shared machines
are noisy, so ratios taken close together in time are far steadier than absolute times; the floor's absolute time
is only a footnote.

Other processes: on Linux every sample also records what share of the CPUs its threads needed was taken by other
processes while it ran (/proc/stat busy time minus this process's CPU time, beyond the cores our threads leave
spare). Many small parallel regions (one per expert matmul) suffer far more from a preempted thread than the floor's
few large ones, so under contention wall-time ratios measure the scheduler, not the dispatch. A round's ratio is
clean when both its sample and the floor's stayed below --max-foreign; cells use the clean rounds when at least half
are clean, else all rounds, marked "*". --wait-quiet makes each round first wait (bounded) for a quiet moment.
--threads 1 --cpu-time measures work rather than scheduling (CPU time is not inflated by preemption; other processes
still share caches and memory bandwidth), so it stays meaningful on a busy machine.

Usage::

    python benchmarks/moe_dispatch.py                      # N=4096, D=256, H=512, k=2, E in {4, 16, 64}
    python benchmarks/moe_dispatch.py --quick              # small smoke run, seconds
    python benchmarks/moe_dispatch.py --experts 8 32 --rounds 15 --tokens 8192
    python benchmarks/moe_dispatch.py --threads 1 --cpu-time    # a busy machine: work, not scheduling
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/moe_dispatch.py    # every CPU tensor of >= 2 MiB in huge pages
    python benchmarks/moe_dispatch.py --device cuda --dtype bf16     # a GPU (benchmarks/gpu_check.sh runs this)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _bench import summary
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moefuse.fusion.kernels import auto_backend
from moefuse.fusion.moe import DenseFFN, SparseMoE

MODES = ("fwd", "fwd+bwd")
TARGET_RATIO = 1.4  # issue #27: SparseMoE forward+backward at E=64 at most this, relative to the dense floor


@dataclass
class Variant:
    """One timed module: `run(x)` returns the [B, T, D] output tensor."""

    name: str
    module: nn.Module
    run: Callable[[torch.Tensor], torch.Tensor]
    times: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    foreign: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})  # per sample
    ratios: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    clean: dict[str, list[bool]] = field(default_factory=lambda: {m: [] for m in MODES})  # per ratio
    calls: dict[str, int] = field(default_factory=lambda: {m: 1 for m in MODES})  # calls per timed sample


def mixtral_block(d_model: int, d_hidden: int, num_experts: int, top_k: int, impl: str, seed: int) -> nn.Module:
    """A MixtralSparseMoeBlock whose experts dispatch through transformers' `impl` ("eager" or "grouped_mm")."""
    config = MixtralConfig(hidden_size=d_model, intermediate_size=d_hidden, num_local_experts=num_experts,
                           num_experts_per_tok=top_k)
    # The supported switch: `_experts_implementation` on the config that the experts module keeps a reference to
    # (`use_experts_implementation` looks it up in ALL_EXPERTS_FUNCTIONS on every forward).
    config._experts_implementation = impl
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.normal_(std=d_model**-0.5)
        block.experts.gate_up_proj.normal_(std=d_model**-0.5)
        block.experts.down_proj.normal_(std=d_hidden**-0.5)
    return block


def count_grouped_mm_calls(fn: Callable[[], object]) -> int:
    """Run fn with torch's grouped-matmul entry points wrapped, and return how many times they were called."""
    calls = 0
    names = [n for n in ("_grouped_mm",) if hasattr(torch, n)]
    fnames = [n for n in ("grouped_mm",) if hasattr(torch.nn.functional, n)]
    saved = {("torch", n): getattr(torch, n) for n in names}
    saved.update({("F", n): getattr(torch.nn.functional, n) for n in fnames})

    def wrap(orig: Callable) -> Callable:
        def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            return orig(*args, **kwargs)

        return counted

    try:
        for n in names:
            setattr(torch, n, wrap(saved[("torch", n)]))
        for n in fnames:
            setattr(torch.nn.functional, n, wrap(saved[("F", n)]))
        fn()
    finally:
        for (where, n), orig in saved.items():
            setattr(torch if where == "torch" else torch.nn.functional, n, orig)
    return calls


def auto_choices(x: torch.Tensor, d_hidden: int, num_experts: int) -> tuple[str, str]:
    """The grouped-matmul backend SparseMoE's "auto" runs for x's device and dtype: (forward alone, fwd+bwd)."""
    w = torch.empty(num_experts, x.shape[-1], d_hidden, device=x.device, dtype=x.dtype, requires_grad=True)
    with torch.no_grad():
        fwd = auto_backend(x, w)
    return fwd, auto_backend(x, w)


def build_variants(d_model: int, d_hidden: int, num_experts: int, top_k: int, x: torch.Tensor,
                   seed: int) -> list[Variant]:
    """The dense floor, SparseMoE per backend and both transformers peers, sharing weights, on x's device and
    dtype; checked for sanity."""
    hf_eager = mixtral_block(d_model, d_hidden, num_experts, top_k, "eager", seed)
    hf_grouped = copy.deepcopy(hf_eager)  # deep-copies the config too, so the two switches are independent
    hf_grouped.experts.config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed + 1)
    dense = DenseFFN(d_model, top_k * d_hidden)
    place = {"device": x.device, "dtype": x.dtype}
    hf_eager, hf_grouped, dense = (m.to(**place) for m in (hf_eager, hf_grouped, dense))

    def moe_run(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: m(t).out

    def plain_run(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: m(t)

    variants = [Variant("dense", dense, plain_run(dense))]
    for backend in ("auto", "native", "loop"):  # auto = "mkl" where it has a kernel (printed in the header)
        moe = SparseMoE.from_mixtral(hf_eager, backend=backend).to(**place)
        variants.append(Variant(f"moe-{backend}", moe, moe_run(moe)))
    variants.append(Variant("hf-grouped_mm", hf_grouped, plain_run(hf_grouped)))
    variants.append(Variant("hf-eager", hf_eager, plain_run(hf_eager)))

    # Sanity: same routing and weights -> same outputs (bf16: within its rounding, relative to the output's
    # scale; a near-tied top-k choice may flip); each peer takes the code path its name says.
    with torch.no_grad():
        ref = hf_eager(x)
        tol = 1e-4 if x.dtype == torch.float32 else 0.05 * ref.abs().max().item()
        for v in variants[1:]:
            diff = (v.run(x) - ref).abs().max().item()
            if diff > tol:
                raise RuntimeError(f"{v.name} disagrees with hf-eager at E={num_experts}: max abs diff {diff:.2e}")
        n_grouped = count_grouped_mm_calls(lambda: hf_grouped(x))
        n_eager = count_grouped_mm_calls(lambda: hf_eager(x))
        n_native = count_grouped_mm_calls(lambda: next(v for v in variants if v.name == "moe-native").run(x))
    if n_grouped == 0 or n_eager != 0 or n_native == 0:
        raise RuntimeError(f"dispatch check failed: grouped_mm calls hf-grouped_mm={n_grouped} (want > 0), "
                           f"hf-eager={n_eager} (want 0), moe-native={n_native} (want > 0)")
    return variants


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, this process's CPU s), or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, time.process_time()


def foreign_share(a: tuple[float, float, float] | None, b: tuple[float, float, float] | None) -> float:
    """Share of the CPUs this process's threads need that other processes used between two snapshots (0 if unknown).

    Other processes' busy cores beyond the ones our threads leave spare, over our thread count: with 2 threads on
    2 cores, 0.5 means one core's worth of someone else's work competed with ours.
    """
    if a is None or b is None or b[0] <= a[0]:
        return 0.0
    cpus = os.cpu_count() or 1
    threads = min(torch.get_num_threads(), cpus)
    others = ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0])  # busy cores of other processes
    return min(1.0, max(0.0, others - (cpus - threads)) / threads)


def wait_quiet(max_wait_s: float, max_foreign: float) -> None:
    """Wait, at most max_wait_s, for a 1-second window in which other processes stay below max_foreign."""
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        a = cpu_snapshot()
        time.sleep(1.0)
        if foreign_share(a, cpu_snapshot()) <= max_foreign:
            return


CLOCK: Callable[[], float] = time.perf_counter  # --cpu-time switches to time.process_time


def no_sync() -> None:
    """CPU work is done when the call returns."""


SYNC: Callable[[], None] = no_sync  # --device cuda: torch.cuda.synchronize, so that a sample ends on the GPU


def time_call(v: Variant, x: torch.Tensor, g: torch.Tensor, mode: str) -> float:
    """Seconds per call, averaged over v.calls[mode] forwards (no grad) or forward+backwards of variant v."""
    total = 0.0
    for _ in range(v.calls[mode]):
        if mode == "fwd":
            with torch.no_grad():
                SYNC()
                t0 = CLOCK()
                v.run(x)
                SYNC()
                total += CLOCK() - t0
            continue
        x.grad = None
        for p in v.module.parameters():
            p.grad = None
        SYNC()
        t0 = CLOCK()
        v.run(x).backward(g)
        SYNC()
        total += CLOCK() - t0
    return total / v.calls[mode]


def measure(variants: list[Variant], x: torch.Tensor, g: torch.Tensor, rounds: int, warmup: int,
            min_sample_s: float, max_foreign: float, wait_quiet_s: float) -> None:
    """Interleaved timing: per mode, warm-up, then `rounds` rounds of one sample per variant in a rotating order.

    A sample is one call, or the mean of a few when one call is shorter than `min_sample_s` (small --quick sizes).
    """
    floor = variants[0]
    for mode in MODES:
        for v in variants:
            v.calls[mode] = 1
        for _ in range(warmup):
            for v in variants:
                time_call(v, x, g, mode)
        for v in variants:
            v.calls[mode] = max(1, min(100, round(min_sample_s / max(time_call(v, x, g, mode), 1e-6))))
        for r in range(rounds):
            if wait_quiet_s > 0:
                wait_quiet(wait_quiet_s, max_foreign)
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                before = cpu_snapshot()
                v.times[mode].append(time_call(v, x, g, mode))
                v.foreign[mode].append(foreign_share(before, cpu_snapshot()))
            for v in variants:
                v.ratios[mode].append(v.times[mode][-1] / floor.times[mode][-1])
                # CPU time is not inflated by preemption, so with --cpu-time every round counts as clean.
                worst = max(v.foreign[mode][-1], floor.foreign[mode][-1])
                v.clean[mode].append(CLOCK is time.process_time or worst <= max_foreign)


def copy_bandwidth(device: str, mib: int = 256, reps: int = 5) -> float:
    """Memory bandwidth in bytes/s by STREAM's "copy" kernel (McCalpin 1995): b[:] = a over two arrays far larger
    than the caches, with this process's threads, best of `reps`; counted as STREAM counts it (bytes read + bytes
    written, over wall time)."""
    a = torch.ones(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)  # first touch: no page faults in the timed copies
    best = float("inf")
    for _ in range(reps):
        SYNC()
        t0 = time.perf_counter()
        b.copy_(a)
        SYNC()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def weight_traffic(d_model: int, d_hidden: int, num_experts: int, top_k: int, itemsize: int) -> dict[str, int]:
    """Bytes of expert weights a call moves beyond the dense floor's, per mode: the forward reads every weight once;
    the backward reads them again (input gradient) and writes their gradient once (weight gradient). The SwiGLU
    experts hold E * 3 * D * H weights, the floor 3 * D * k * H; the router's E * D are left out."""
    extra = (num_experts - top_k) * 3 * d_model * d_hidden * itemsize
    return {"fwd": extra, "fwd+bwd": 3 * extra}


def profile_variants(variants: list[Variant], x: torch.Tensor, g: torch.Tensor, steps: int = 3,
                     top: int = 14) -> None:
    """torch.profiler over `steps` calls of the dense floor and moe-auto per mode: ops by self time (ms per call).

    The MKL grouped GEMM is a ctypes call inside an autograd Function: its time is the self time of the
    `_MKLGroupedMatmul` (forward) and `_MKLGroupedMatmulBackward` (both backward products) rows.
    """
    from torch.profiler import ProfilerActivity, profile

    for mode in MODES:
        for v in (v for v in variants if v.name in ("dense", "moe-auto")):
            time_call(v, x, g, mode)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    time_call(v, x, g, mode)
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
            print(f"\n{v.name} {mode}: {total:.1f} ms per call (profiler self times, wall clock)")
            for e in events[:top]:
                ms = e.self_cpu_time_total / steps / 1e3
                print(f"  {e.key[:44]:<44} {ms:8.2f} ms {ms / total:6.1%} {e.count // steps:6d} calls")


def ratios_used(v: Variant, mode: str) -> tuple[list[float], bool]:
    """The clean rounds' ratios when at least half the rounds are clean, else all of them (flag False)."""
    clean = [r for r, ok in zip(v.ratios[mode], v.clean[mode]) if ok]
    if 2 * len(clean) >= len(v.ratios[mode]):
        return clean, True
    return v.ratios[mode], False


def print_tables(results: dict[int, list[Variant]], experts: list[int], traffic: dict[int, dict[str, int]],
                 bandwidth: float) -> None:
    names = [v.name for v in next(iter(results.values()))]
    cols = [(mode, e) for mode in MODES for e in experts]
    heads = [f"{mode} E={e}" for mode, e in cols]

    def cell(name: str, mode: str, e: int, spread: bool) -> str:
        v = next(v for v in results[e] if v.name == name)
        values, clean = ratios_used(v, mode)
        med, half_iqr = summary(values)
        mark = "" if clean or v is results[e][0] else "*"
        return f"{med:.2f}x{mark} ±{half_iqr:.2f}" if spread else f"{med:.2f}x{mark}"

    rows = {name: [cell(name, m, e, True) for m, e in cols] for name in names}
    width = max(len(c) for c in heads + [c for r in rows.values() for c in r]) + 2
    what = "CPU time" if CLOCK is time.process_time else "Wall time"
    print(f"\n{what} / dense floor in the same round (median over rounds, ± half the interquartile range):\n")
    print(f"{'variant':<15}" + "".join(f"{h:>{width}}" for h in heads))
    for name in names:
        print(f"{name:<15}" + "".join(f"{c:>{width}}" for c in rows[name]))

    print("\nMarkdown:\n")
    print("| variant | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(heads))
    for name in names:
        print(f"| {name} | " + " | ".join(cell(name, m, e, False) for m, e in cols) + " |")

    print()
    for e in experts:
        floor = results[e][0]
        fwd = statistics.median(floor.times["fwd"]) * 1e3
        bwd = statistics.median(floor.times["fwd+bwd"]) * 1e3
        print(f"dense floor at E={e} ({what.lower()}, absolute, noisy): fwd {fwd:.1f} ms, fwd+bwd {bwd:.1f} ms "
              f"over {len(floor.times['fwd'])} rounds")
    print(f"\nWeight traffic beyond the floor's, at the measured copy bandwidth of {bandwidth / 1e9:.1f} GB/s "
          "(a bound of 1 + this for a layer that does not overlap it with compute):")
    for e in experts:
        floor = results[e][0]
        parts = []
        for mode in MODES:
            ms = traffic[e][mode] / bandwidth * 1e3
            parts.append(f"{mode} {traffic[e][mode] / 1e6:.0f} MB = {ms:.1f} ms = "
                         f"+{ms / (statistics.median(floor.times[mode]) * 1e3):.2f}x")
        print(f"  E={e}: " + "; ".join(parts))
    print("\nOther processes' share of the CPUs our threads needed, during the samples (median; a round is clean when "
          "both its samples are below --max-foreign, or always with --cpu-time):")
    for e in experts:
        parts = []
        for mode in MODES:
            share = statistics.median(f for v in results[e] for f in v.foreign[mode])
            clean = min(sum(v.clean[mode]) for v in results[e])
            parts.append(f"{mode} {share:.0%}, >= {clean}/{len(results[e][0].clean[mode])} rounds clean")
        print(f"  E={e}: " + "; ".join(parts))
    if any(not ratios_used(v, m)[1] for e in experts for v in results[e] for m in MODES):
        print("  * = fewer than half the rounds were clean: median over all rounds, which mostly measures contention")

    print(f"\nTarget: SparseMoE fwd+bwd <= {TARGET_RATIO}x dense and <= hf-grouped_mm, at every E")
    for e in experts:
        by_name = {v.name: summary(ratios_used(v, "fwd+bwd")[0])[0] for v in results[e]}
        peer = by_name.get("hf-grouped_mm", float("inf"))
        for name in (n for n in ("moe-auto", "moe-native", "moe-loop") if n in by_name):
            r = by_name[name]
            ok = r <= TARGET_RATIO and r <= peer
            print(f"  E={e:<3} {name:<11} {r:.2f}x (peer {peer:.2f}x): {'met' if ok else 'MISSED'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N tokens per call (default 4096)")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64], help="E values (default 4 16 64)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=512, help="expert width H (default 512)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per mode and E (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--min-sample-ms", type=float, default=30.0,
                        help="average several calls per sample when one is shorter than this (default 30)")
    parser.add_argument("--max-foreign", type=float, default=0.15,
                        help="a sample is clean if other processes used at most this share of the CPU (default 0.15)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each round wait up to S seconds for other processes to go quiet (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall time: immune to preemption by other "
                             "processes, meaningful with --threads 1 (with more threads it counts spin-waits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="parameters and activations (the router runs in fp32 regardless; default fp32)")
    parser.add_argument("--variants", nargs="+", default=[], metavar="NAME",
                        help="time only these variants besides the dense floor (default: all), e.g. moe-auto "
                             "hf-grouped_mm")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile the dense floor and moe-auto (torch.profiler) at each E")
    parser.add_argument("--quick", action="store_true", help="smoke run: N=512, D=64, H=128, E <= 16, 5 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.d_model, args.d_hidden, args.rounds, args.warmup = 512, 64, 128, 5, 1
        args.experts = [e for e in args.experts if e <= 16] or [4]

    global CLOCK, SYNC
    if args.device.startswith("cuda"):
        SYNC = torch.cuda.synchronize
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    clock = "process CPU time" if args.cpu_time else "wall time"
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock}, {args.dtype} on {where}; "
          f"N={args.tokens} tokens, "
          f"D={args.d_model}, H={args.d_hidden}, k={args.top_k}, E={args.experts}, "
          f"{args.rounds} rounds after {args.warmup} warm-up")
    fwd_auto, train_auto = auto_choices(torch.empty(1, args.d_model, device=args.device, dtype=dtype), args.d_hidden,
                                        args.experts[0])
    print(f"moe-auto runs the {fwd_auto!r} grouped matmul forward alone and {train_auto!r} for fwd+bwd")
    torch.manual_seed(args.seed)
    x = torch.randn(1, args.tokens, args.d_model, device=args.device, dtype=dtype, requires_grad=True)
    g = torch.randn(1, args.tokens, args.d_model, device=args.device, dtype=dtype)
    results: dict[int, list[Variant]] = {}
    for e in args.experts:
        t0 = time.perf_counter()
        results[e] = [v for v in build_variants(args.d_model, args.d_hidden, e, args.top_k, x.detach(), args.seed)
                      if v.name == "dense" or not args.variants or v.name in args.variants]
        if args.profile:
            print(f"\n--- E={e} ---")
            profile_variants(results[e], x, g)
            continue
        measure(results[e], x, g, args.rounds, args.warmup, args.min_sample_ms / 1e3, args.max_foreign,
                args.wait_quiet)
        print(f"E={e}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.profile:
        return
    traffic = {e: weight_traffic(args.d_model, args.d_hidden, e, args.top_k, x.element_size()) for e in args.experts}
    print_tables(results, args.experts, traffic, copy_bandwidth(args.device))


if __name__ == "__main__":
    main()
