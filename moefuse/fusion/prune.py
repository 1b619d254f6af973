"""Expert pruning (and merging) of a trained model's MoE layers: the model surgery of `moefuse compress`.

Which experts go is decided by their routing share on calibration data: the fraction of a layer's top-k
assignments each expert received (`ModelOutput.tokens_per_expert`, summed over a split). The experts a task
rarely routes to contribute little to its outputs, so dropping them costs little accuracy and makes the model
smaller: Chen et al. 2022 ("Task-Specific Expert Pruning for Sparse Mixture-of-Experts") keep the experts a
fine-tuned task routes to most; Lu et al. 2024 ("Not All Experts are Equal: Efficient Expert Pruning and Skipping
for Mixture-of-Experts LLMs") prune after training from a small calibration set, and give routing frequency as the
cheap criterion beside their search over expert subsets. This module implements the routing-share criterion, post
training, per layer.

After pruning, a layer's router keeps only the rows of its kept experts, so its softmax runs over the kept experts
alone (the probabilities are the full router's restricted to the kept experts and renormalised), and each token's
top-k is taken among them. With `merge`, each dropped expert is first folded into the kept expert whose weights are
most similar (cosine similarity of the flattened expert weights), as a routing-share weighted average of the
weights: the frequency-weighted merging of Li et al. 2024 ("Merge, Then Compress: Demystify Efficient SMoE with
Hints from Its Routing Policy"); the kept expert's router row is left as it is.

Every MoE layer keeps the same number of experts, because the model config has one `fusion.num_experts`.

Shapes: L MoE layers, E experts before, N kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moefuse.configutil import ConfigError
from moefuse.fusion.moe import SparseMoE


@dataclass
class LayerPlan:
    """What happens to one MoE layer's experts; ids are the layer's expert ids before pruning."""

    kept: list[int]  # ascending: the new expert i is the old expert kept[i]
    dropped: list[int]
    share: list[float]  # [E] routing share of every expert before pruning (sums to 1, or all 0 without tokens)
    merged_into: dict[int, int] = field(default_factory=dict)  # dropped expert -> the kept one it was merged into

    def as_dict(self) -> dict:
        return {"kept": self.kept, "dropped": self.dropped, "share": [round(s, 6) for s in self.share],
                "merged_into": {str(d): k for d, k in self.merged_into.items()}}


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    """The model's SparseMoE layers, in forward order (the order of ModelOutput.tokens_per_expert's rows)."""
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def routing_share(counts: torch.Tensor) -> torch.Tensor:
    """Top-k assignments per layer and expert [L, E] (or by token group, [L, G, E]) -> each expert's share of its
    layer's assignments [L, E] (a layer that saw no token: all 0)."""
    counts = counts.double()
    if counts.dim() == 3:
        counts = counts.sum(1)  # over token groups
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


def experts_to_keep(num_experts: int, top_k: int, share: torch.Tensor, keep: int | None = None,
                    min_share: float | None = None) -> int:
    """How many experts every layer keeps: `keep`, or enough to keep, in every layer, each expert whose routing share
    `share` [L, E] is at least `min_share` (never fewer than top_k). A count outside [top_k, E] is a ConfigError
    naming the flag."""
    if (keep is None) == (min_share is None):
        raise ConfigError("give either --keep-experts N or --min-routing-share S")
    if keep is not None:
        if not top_k <= keep <= num_experts:
            raise ConfigError(f"--keep-experts must be in [top_k={top_k}, num_experts={num_experts}] for this model "
                              f"(each token picks {top_k} experts among those kept), got {keep}")
        return keep
    if not 0.0 <= min_share <= 1.0:
        raise ConfigError(f"--min-routing-share must be in [0, 1], got {min_share}")
    return max(top_k, int((share >= min_share).sum(-1).max()))


def plan_layers(share: torch.Tensor, keep: int) -> list[LayerPlan]:
    """Per layer, keep the `keep` experts with the largest routing share (ties: the lower id), drop the rest."""
    plans = []
    for row in share.tolist():
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        plans.append(LayerPlan(kept=sorted(order[:keep]), dropped=sorted(order[keep:]), share=row))
    return plans


def _flat_expert(moe: SparseMoE, e: int) -> torch.Tensor:
    return torch.cat([moe.experts.w_in[e].reshape(-1), moe.experts.w_out[e].reshape(-1)]).double()


@torch.no_grad()
def merge_dropped(moe: SparseMoE, plan: LayerPlan) -> None:
    """Fold each dropped expert into its most similar kept one (cosine similarity of the flattened weights), as the
    routing-share weighted average of the weights (Li et al. 2024); fills `plan.merged_into`. A group whose experts
    all have share 0 is averaged with equal weights."""
    kept = torch.stack([_flat_expert(moe, k) for k in plan.kept])  # [N, P]
    kept = kept / kept.norm(dim=1, keepdim=True).clamp_min(1e-12)
    for d in plan.dropped:
        v = _flat_expert(moe, d)
        plan.merged_into[d] = plan.kept[int((kept @ (v / v.norm().clamp_min(1e-12))).argmax())]
    for k in plan.kept:
        group = [k, *(d for d, into in plan.merged_into.items() if into == k)]
        if len(group) == 1:
            continue
        w = torch.tensor([plan.share[e] for e in group], dtype=torch.float64)
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(group))
        for param in (moe.experts.w_in, moe.experts.w_out):
            mixed = sum(float(wi) * param[e].double() for wi, e in zip(w, group))
            param[k] = mixed.to(param.dtype)


@torch.no_grad()
def slice_experts(moe: SparseMoE, kept: list[int]) -> None:
    """Keep only these experts of one layer: the router's rows and the experts' stacked weights, in this order."""
    index = torch.tensor(kept, device=moe.router.weight.device)
    moe.router.weight = nn.Parameter(moe.router.weight.index_select(0, index).clone())
    moe.router.out_features = len(kept)
    moe.experts.w_in = nn.Parameter(moe.experts.w_in.index_select(0, index).clone())
    moe.experts.w_out = nn.Parameter(moe.experts.w_out.index_select(0, index).clone())
    moe.cfg.num_experts = len(kept)


def prune_experts(model: nn.Module, share: torch.Tensor, keep: int, merge: bool = False) -> list[LayerPlan]:
    """Prune every MoE layer of `model` (in place) to the `keep` experts of largest routing share `share` [L, E],
    optionally merging the dropped ones into the kept (see the module docstring), and set the model config's
    `fusion.num_experts` to `keep` -> each layer's plan. `keep` must be in [top_k, E]."""
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("this model has no MoE layer to prune (fusion.kind is not moe)")
    if share.shape != (len(layers), layers[0].num_experts):
        raise ValueError(f"routing share must be [{len(layers)}, {layers[0].num_experts}], got {tuple(share.shape)}")
    experts_to_keep(layers[0].num_experts, layers[0].top_k, share, keep=keep)  # the range check
    plans = plan_layers(share, keep)
    for moe, plan in zip(layers, plans):
        if merge and plan.dropped:
            merge_dropped(moe, plan)
        slice_experts(moe, plan.kept)
    fusion = model.cfg.fusion
    fusion.num_experts = keep
    if keep % fusion.expert_parallel_size:  # a training layout that no longer divides the experts
        fusion.expert_parallel_size = 1
    return plans


__all__ = ["LayerPlan", "experts_to_keep", "merge_dropped", "moe_layers", "plan_layers", "prune_experts",
           "routing_share", "slice_experts"]
