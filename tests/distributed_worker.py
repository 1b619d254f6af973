"""One rank of a tests/test_distributed.py case, started by torchrun on gloo (CPU): `python -m torch.distributed.run
--standalone --nproc_per_node W tests/distributed_worker.py CASE EP_SIZE OUT_JSON`.

Every rank builds the same single-process SparseMoE and the same global batch, runs the reference on all of it,
then the expert-parallel copy on its own slice of the batch, and checks that outputs, router losses, routing stats
and gradients agree within 1e-5. Rank 0 writes the largest differences to OUT_JSON.

Cases: `dense` (every rank has tokens, every expert gets some), `empty` (the last rank has no token at all and
expert 1 is never chosen).
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from moefuse.fusion.expert_parallel import init_expert_parallel, reduce_expert_grads, shard_experts
from moefuse.fusion.moe import MoEConfig, SparseMoE

D, E, K, G, TOKENS_PER_RANK = 16, 8, 2, 3, 24


def global_batch(case: str, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(x [N, D], group ids [N], loss weights [N, D], tokens of each rank) of the whole world, the same on every
    rank. `empty`: positive inputs (so a router row of negative weights never wins), the last rank without tokens."""
    gen = torch.Generator().manual_seed(7)
    sizes = [TOKENS_PER_RANK + 3 * r for r in range(world)]  # uneven on purpose
    if case == "empty":
        sizes[-1] = 0
    n = sum(sizes)
    x = torch.randn(n, D, generator=gen)
    if case == "empty":
        x = x.abs()
    return x, torch.randint(0, G, (n,), generator=gen), torch.randn(n, D, generator=gen), sizes


def build_layer(case: str) -> SparseMoE:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=D, d_expert=8, num_experts=E, top_k=K, num_groups=G, shared_expert_hidden=8,
                    local_entropy_coef=0.01, global_entropy_coef=0.01, backend="loop")
    moe = SparseMoE(cfg)
    if case == "empty":
        with torch.no_grad():
            moe.router.weight[1] = -1.0  # never among the top-k of a positive input
    return moe


def loss_of(out, weights: torch.Tensor) -> torch.Tensor:
    """A rank's loss: a task loss of its tokens plus the router losses (of all ranks' tokens). Data parallelism
    trains on their mean over the W ranks: the reference loss."""
    return (out.out * weights).sum() + out.aux_loss


def main(case: str, ep_size: int, out_json: str) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    x, groups, weights, sizes = global_batch(case, world)
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])

    ref = build_layer(case)
    x_ref = x.clone().requires_grad_(True)
    ref_out = ref(x_ref, modality_ids=groups)
    ((ref_out.out * weights).sum() / world + ref_out.aux_loss).backward()  # the mean of the W ranks' losses

    ep = init_expert_parallel(ep_size)
    moe = copy.deepcopy(build_layer(case))
    shard_experts(moe, ep)
    x_mine = x[mine].clone().requires_grad_(True)
    out = moe(x_mine, modality_ids=groups[mine])
    loss_of(out, weights[mine]).backward()
    # what DDP does for the replicated parameters, and the expert-parallel reduction for the experts
    for p in (p for n, p in moe.named_parameters() if not n.startswith("experts.")):
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    reduce_expert_grads(moe, ep)

    diffs = {"out": (out.out - ref_out.out[mine]).abs().max().item() if sizes[rank] else 0.0,
             # a rank's input gradient is that of the sum of the W losses: W times the mean's
             "x_grad": (x_mine.grad - world * x_ref.grad[mine]).abs().max().item() if sizes[rank] else 0.0}
    for name in ("aux_loss", "balance_loss", "z_loss", "local_entropy_loss", "global_entropy_loss"):
        diffs[name] = (getattr(out, name) - getattr(ref_out, name)).abs().item()
    for name in ("tokens_per_expert", "modality_expert_counts"):
        total = getattr(out, name).clone()
        dist.all_reduce(total)
        diffs[name] = (total - getattr(ref_out, name)).abs().max().item()
    for name, p in moe.named_parameters():
        ref_grad = dict(ref.named_parameters())[name].grad
        if name.startswith("experts."):
            ref_grad = ref_grad[ep.local_experts(E)]
        diffs[f"grad/{name}"] = (p.grad - ref_grad).abs().max().item()
    diffs["expert_1_tokens"] = int(ref_out.tokens_per_expert[1])
    every = [None] * world
    dist.all_gather_object(every, diffs)
    if rank == 0:
        worst = {k: max(d[k] for d in every) for k in every[0]}
        with open(out_json, "w") as f:
            json.dump(worst, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
