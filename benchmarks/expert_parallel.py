"""Expert parallelism on CPU processes: tokens/s and communication per training step at EP = 1, 2, 4.

What runs: W gloo processes (torchrun, one thread each), each with N tokens of its own, through one SparseMoE
layer (D, H, E experts, top-k K, dropless) forward and backward, then the expert-gradient reduction a training
step needs:

* EP=1 is data parallelism: every rank holds all E experts, and their gradients are all-reduced over the W ranks
  (what DDP does for them).
* EP=n (n divides W): each rank holds E / n experts; tokens travel to their experts' ranks and back
  (`moefuse.fusion.expert_parallel.run_experts`, all-to-all), and expert gradients are all-reduced over the
  W / n ranks that hold the same experts.

All sizes live in the same processes and are timed round-robin, one step each per round in a rotating order, with
barriers around each step (a step's time is the slowest rank's); the table gives each size's median step time as
a ratio to EP=1 in the same round. Communication is counted exactly: the bytes of tokens each rank sends to other
ranks in the forward all-to-alls (the backward sends the same amounts back), and the bytes of expert gradient each
rank puts into all-reduce.

Read the ratios with care: on a 2-core machine over gloo (TCP on loopback) this measures correctness of the
exchange and its volume, not the speed of expert parallelism, which pays when the experts no longer fit one
device or the all-to-all runs over NVLink / InfiniBand (NCCL). Each rank's parameter count is the memory it saves.

Usage::

    python benchmarks/expert_parallel.py                 # W=2: EP 1, 2; E=16, N=2048 tokens per rank
    python benchmarks/expert_parallel.py --world 4       # EP 1, 2, 4 (4 processes: oversubscribed on 2 cores)
    python benchmarks/expert_parallel.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import command_line, summary


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=min(4, max(2, (os.cpu_count() or 2) // 2 * 2)),
                        help="processes W (default: 2 or 4, by the cores here)")
    parser.add_argument("--tokens", type=int, default=2048, help="N tokens per rank (default 2048)")
    parser.add_argument("--experts", type=int, default=16, help="E experts (default 16)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=512, help="expert width H (default 512)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: N=256, D=64, H=128, 3 rounds")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.d_model, args.d_hidden, args.rounds, args.warmup = 256, 64, 128, 3, 1
    return args


# ----------------------------------------------------------------------------------------------------------------
# one rank


class ByteCounter:
    """Wraps the autograd all-to-all of `expert_parallel` and counts the bytes this rank sends to other ranks."""

    def __init__(self, module) -> None:
        self.module, self.inner, self.sent = module, module.all_to_all_autograd, 0

    def __call__(self, output, tensor, output_split_sizes, input_split_sizes, group):
        import torch.distributed as dist

        me = dist.get_group_rank(group, dist.get_rank())
        rows = sum(n for j, n in enumerate(input_split_sizes) if j != me)
        self.sent += rows * tensor.shape[1] * tensor.element_size()
        return self.inner(output, tensor, output_split_sizes, input_split_sizes, group=group)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from moefuse.fusion import expert_parallel as ep_mod
    from moefuse.fusion.moe import MoEConfig, SparseMoE

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [n for n in (1, 2, 4, 8) if n <= world and world % n == 0 and args.experts % n == 0]
    torch.manual_seed(0)
    base = SparseMoE(MoEConfig(args.d_model, args.d_hidden, args.experts, top_k=args.top_k, backend="loop"))
    world_group = dist.new_group(list(range(world)))
    layers, groups = {}, {}
    for n in sizes:
        layer = copy.deepcopy(base)
        if n > 1:
            ep = ep_mod.init_expert_parallel(n)
            ep_mod.shard_experts(layer, ep)
            groups[n] = ep.replicas
        else:
            groups[n] = world_group
        layers[n] = layer
    torch.manual_seed(1 + rank)
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)
    g = torch.randn(args.tokens, args.d_model)
    counter = ByteCounter(ep_mod)
    ep_mod.all_to_all_autograd = counter

    def step(n: int) -> tuple[float, int, int]:
        layer = layers[n]
        for p in layer.parameters():
            p.grad = None
        counter.sent = 0
        dist.barrier()
        t0 = time.perf_counter()
        out = layer(x)
        (out.out * g).sum().add(out.aux_loss).backward()
        reduced = 0
        for p in layer.experts.parameters():  # data parallelism's (n=1) or the replicas' reduction (n>1)
            if dist.get_world_size(groups[n]) > 1:
                dist.all_reduce(p.grad, group=groups[n])
                reduced += p.grad.numel() * p.grad.element_size()
        dist.barrier()
        return time.perf_counter() - t0, counter.sent, reduced

    for _ in range(args.warmup):
        for n in sizes:
            step(n)
    times = {n: [] for n in sizes}
    sent, reduced = {}, {}
    for r in range(args.rounds):
        order = sizes[r % len(sizes):] + sizes[:r % len(sizes)]
        for n in order:
            t, sent[n], reduced[n] = step(n)
            times[n].append(t)
    params = {n: sum(p.numel() for p in layers[n].parameters()) for n in sizes}
    every = [None] * world
    dist.all_gather_object(every, {"sent": sent, "reduced": reduced})
    if rank == 0:
        result = {"sizes": sizes, "times": times, "params": params,
                  "sent": {n: max(e["sent"][n] for e in every) for n in sizes},
                  "reduced": {n: reduced[n] for n in sizes}}
        Path(args.worker).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# the launcher


def launch(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.world),
               __file__, "--worker", str(out), "--tokens", str(args.tokens), "--experts", str(args.experts),
               "--d-model", str(args.d_model), "--d-hidden", str(args.d_hidden), "--top-k", str(args.top_k),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"the {args.world} worker processes failed:\n{proc.stderr[-4000:]}")
        return {k: {int(n): v for n, v in d.items()} if isinstance(d, dict) else d
                for k, d in json.loads(out.read_text()).items()}


def report(args: argparse.Namespace, res: dict) -> None:
    sizes, times = res["sizes"], res["times"]
    w, n_tok = args.world, args.tokens
    print(f"{w} gloo CPU processes, 1 thread each; N={n_tok} tokens per rank, D={args.d_model}, H={args.d_hidden}, "
          f"E={args.experts}, k={args.top_k}, fp32, {args.rounds} rounds after {args.warmup} warm-up\n")
    print("| EP | experts per rank | layer params per rank | tokens/s (all ranks) | step time / EP=1 | "
          "all-to-all MB sent per rank (fwd; bwd the same) | expert grads all-reduced MB per rank |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        ratios = [t / t1 for t, t1 in zip(times[n], times[sizes[0]])]
        med, half_iqr = summary(ratios)
        tok_s = w * n_tok / summary(times[n])[0]
        print(f"| {n} | {args.experts // n} | {res['params'][n]:,} | {tok_s:,.0f} | {med:.2f}x ±{half_iqr:.2f} | "
              f"{res['sent'][n] / 2**20:.2f} | {res['reduced'][n] / 2**20:.2f} |")
    print("\nOn this machine (gloo over loopback TCP, CPU matmuls) these ratios measure the exchange's correctness "
          "and volume, not the speed of expert parallelism on GPUs with NCCL.")
    print(f"\n{command_line()}")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        worker(args)
        return
    report(args, launch(args))


if __name__ == "__main__":
    main()
