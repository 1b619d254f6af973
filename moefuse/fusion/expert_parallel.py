"""Expert parallelism: each MoE layer's E experts spread over N ranks, tokens sent to their experts' ranks.

The layout is GShard's (Lepikhin et al. 2020) and DeepSpeed-MoE's (Rajbhandari et al. 2022): the world of W
ranks is cut into W / N expert-parallel (EP) groups of N consecutive ranks; rank j of a group holds experts
[j * E / N, (j + 1) * E / N) of every MoE layer, and the ranks at the same place j of every group (its
*replicas*) hold the same experts. Everything else (router, attention, encoders, heads) is replicated and stays
data-parallel over all W ranks.

A forward on one rank (`run_experts`): the layer routes its own tokens and sorts them by expert as in a single
process; the per-expert counts are exchanged first (`dist.all_to_all_single` of E integers), then the tokens
travel to the ranks of their experts with the autograd-aware `torch.distributed.nn.functional.all_to_all_single`
(uneven splits), are regrouped by local expert, run through the same grouped matmul, and travel back the same
way. Its backward is the reverse exchange, so an expert's weight gradient sums the contributions of every rank of
its EP group; `reduce_expert_grads` then sums it over the replicas and divides by W, which is the gradient of the
mean of the W ranks' losses, what data parallelism gives every other parameter.

The router losses (balance, z, LIMoE entropies) are computed from sums over all W ranks (`reduce_sums`, an
autograd-aware all-reduce), so they are those of one process holding the global batch. Routing stats stay per
rank (their sum over ranks is the single-process count). Dropless dispatch is exact; with a capacity factor each
rank applies the limit to its own tokens (GShard's per-group capacity).

Collectives run on groups of their own (not the default group that DDP reduces on), so their order never
interleaves with DDP's bucketed all-reduces. Every rank must call every MoE layer the same number of times per
step (a rank may bring zero tokens): training and validation keep the ranks in step, a rank out of data running
a batch again uncounted (`TrainRecipe.train_epoch`, `evaluate_loader(in_step=True)`).

Shapes: S kept (token, expert) assignments of this rank sorted by expert, R assignments received, D width,
E experts, E_loc = E / N experts on this rank, N ranks per EP group.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as all_reduce_autograd
from torch.distributed.nn.functional import all_to_all_single as all_to_all_autograd

from moefuse.fusion.kernels import Backend


@dataclass
class ExpertParallel:
    """This rank's place in the expert-parallel layout and the process groups it exchanges on."""

    size: int  # N ranks per EP group
    rank: int  # j: this rank's place in its EP group; it holds experts [j * E / N, (j + 1) * E / N)
    replica: int  # which EP group this rank is in (0 .. W / N - 1)
    world_size: int  # W
    group: dist.ProcessGroup  # this rank's EP group: the token all-to-alls
    replicas: dist.ProcessGroup  # the ranks holding the same experts: expert gradients are summed over it
    stats: dist.ProcessGroup  # all W ranks, apart from the default group: router-loss sums

    def local_experts(self, num_experts: int) -> slice:
        """The experts of `num_experts` this rank holds."""
        per_rank = num_experts // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def init_expert_parallel(size: int) -> ExpertParallel:
    """Create the EP, replica and stats groups of an initialised process group (every rank must call this)."""
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialised: start the run with "
                           "`accelerate launch --multi_gpu --num_processes N` or torchrun")
    world, me = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"fusion.expert_parallel_size={size} must divide the number of processes ({world})")
    ep_groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world // size)]
    replica_groups = [dist.new_group(list(range(j, world, size))) for j in range(size)]
    stats = dist.new_group(list(range(world)))
    return ExpertParallel(size=size, rank=me % size, replica=me // size, world_size=world,
                          group=ep_groups[me // size], replicas=replica_groups[me % size], stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# the token exchange


@dataclass
class _Received:
    """Where the assignments a rank received came from, to regroup them by local expert and send them back."""

    send_splits: list[int]  # [N] rows sent to each rank of the EP group
    recv_splits: list[int]  # [N] rows received from each
    order: torch.Tensor  # [R] received rows in local-expert-major order (source-major as they arrive)
    tokens_per_expert: torch.Tensor  # [E_loc] rows per local expert, over all sources


def _plan_exchange(tokens_per_expert: torch.Tensor, ep: ExpertParallel) -> _Received:
    """Exchange the per-expert counts [E] of this rank's sorted assignments -> the split sizes and the regrouping."""
    counts = tokens_per_expert.view(ep.size, -1).contiguous()  # [N, E_loc]: row n goes to EP rank n
    recv = torch.empty_like(counts)  # [N_src, E_loc]
    dist.all_to_all_single(recv, counts, group=ep.group)
    e_loc = counts.shape[1]
    block = torch.arange(recv.numel(), device=recv.device)  # (source, expert) blocks in arrival order
    key = (block % e_loc) * ep.size + block // e_loc  # expert-major rank of each block
    row_key = torch.repeat_interleave(key, recv.reshape(-1))  # [R]
    return _Received(send_splits=counts.sum(1).tolist(), recv_splits=recv.sum(1).tolist(),
                     order=torch.sort(row_key, stable=True).indices, tokens_per_expert=recv.sum(0))


def run_experts(experts: nn.Module, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                ep: ExpertParallel, backend: Backend = "auto") -> torch.Tensor:
    """x_sorted [S, D] sorted by global expert, tokens_per_expert [E] -> the experts' outputs [S, D], in the same
    order, computed on the ranks that hold them (`experts` is this rank's E_loc-expert shard)."""
    plan = _plan_exchange(tokens_per_expert, ep)
    d = x_sorted.shape[-1]
    received = all_to_all_autograd(x_sorted.new_empty(sum(plan.recv_splits), d), x_sorted,
                                   plan.recv_splits, plan.send_splits, group=ep.group)  # [R, D]
    offs = torch.cumsum(plan.tokens_per_expert, 0).to(torch.int32)  # [E_loc]
    y = experts(received.index_select(0, plan.order), offs, backend)  # [R, D] local-expert-major
    y = torch.empty_like(y).index_copy(0, plan.order, y)  # back to arrival order
    return all_to_all_autograd(y.new_empty(sum(plan.send_splits), d), y,
                               plan.send_splits, plan.recv_splits, group=ep.group)  # [S, D]


def reduce_sums(sums: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """Sum a vector of router statistics over all W ranks, with gradient (the backward sums alike)."""
    return all_reduce_autograd(sums, group=ep.stats)


# ----------------------------------------------------------------------------------------------------------------
# sharding a model, and its gradients


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The SparseMoE layers of `model`, in module order: the modules with routed `experts` and an `ep` slot
    (`SparseMoE.ep`; moe.py imports this module, so it is recognised by what it has, not by its class)."""
    return [m for m in model.modules() if hasattr(m, "ep") and hasattr(m, "experts")]


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The routed-expert modules of every SparseMoE layer in `model`, in module order."""
    return [m.experts for m in moe_layers(model)]


def expert_param_names(model: nn.Module) -> list[str]:
    """Qualified names of the expert-sharded parameters (DDP must leave them alone)."""
    ids = {id(p) for e in expert_modules(model) for p in e.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def shard_experts(model: nn.Module, ep: ExpertParallel) -> None:
    """Keep only this rank's experts in every SparseMoE of `model` (in place) and give the layers the groups.
    Every rank must have built `model` from the same seed: the full initial weights agree before slicing."""
    for moe in moe_layers(model):
        if moe.num_experts % ep.size:
            raise ValueError(f"fusion.expert_parallel_size={ep.size} must divide fusion.num_experts="
                             f"{moe.num_experts}")
        keep = ep.local_experts(moe.num_experts)
        for name, p in list(moe.experts.named_parameters(recurse=False)):
            setattr(moe.experts, name, nn.Parameter(p.detach()[keep].clone(), requires_grad=p.requires_grad))
        moe.ep = ep


def reduce_expert_grads(model: nn.Module, ep: ExpertParallel) -> None:
    """Expert gradients: summed over the replicas, divided by W (the mean over ranks of their losses' gradients,
    as DDP averages the rest). Call once per optimizer step, after the last backward."""
    for experts in expert_modules(model):
        for p in experts.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=ep.replicas)
            p.grad.div_(ep.world_size)


def clip_grad_norm_(params: Iterable[nn.Parameter], expert_params: Iterable[nn.Parameter], max_norm: float,
                    ep: ExpertParallel) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient: the replicated parameters' (the same on every rank) and the
    expert shards' summed over the EP group -> that total norm (as torch.nn.utils.clip_grad_norm_)."""
    experts = [p for p in expert_params if p.grad is not None]
    expert_ids = {id(p) for p in experts}
    others = [p for p in params if p.grad is not None and id(p) not in expert_ids]

    device = (others or experts)[0].grad.device

    def sq(ps: list[nn.Parameter]) -> torch.Tensor:
        return sum((p.grad.detach().float().square().sum() for p in ps), torch.zeros((), device=device))

    expert_sq = sq(experts)
    dist.all_reduce(expert_sq, group=ep.group)
    total = (sq(others) + expert_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in others + experts:
        p.grad.detach().mul_(scale.to(p.grad.device, p.grad.dtype))
    return total


__all__ = ["ExpertParallel", "clip_grad_norm_", "expert_modules", "expert_param_names", "init_expert_parallel",
           "reduce_expert_grads", "reduce_sums", "run_experts", "shard_experts"]
