"""Sparse mixture-of-experts FFN with token-level top-k routing and dropless grouped dispatch.

Routing follows Shazeer et al. 2017 (sparsely-gated MoE), GShard (Lepikhin et al. 2020, top-2) and Switch
(Fedus et al. 2021, top-1, load-balancing loss). The router z-loss is from ST-MoE (Zoph et al. 2022); the
per-modality entropy losses from LIMoE (Mustafa et al. 2022). Dispatch is "dropless" as in MegaBlocks
(Gale et al. 2022): tokens are sorted by expert and every expert runs one matmul over its contiguous slice
(`moefuse.fusion.kernels.grouped_mm`), so the work is O(tokens * top_k) whatever the number of experts E.

A forward is four steps, one method each: `route` (router, top-k, capacity), `dispatch` (sort the kept
assignments by expert), `combine` (run the experts, sum each token's weighted outputs), then `losses` and the
routing stats (`_group_expert_counts`).

Shapes: N tokens, D model width, H expert width, E experts, K top-k, S = kept (token, expert) assignments,
G token groups (modalities, and the fusion token in the fusion stack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moefuse.configutil import Config
from moefuse.fusion import expert_parallel
from moefuse.fusion.kernels import (
    Activation,
    Backend,
    activate,
    activation_in_width,
    combine_slots,
    gather_tokens,
    grouped_mm,
)
from moefuse.outputs import pytree_output

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class ExpertsConfig(Config):
    """The routed-expert hyper-parameters a user sets, declared and checked once here: `MoEConfig` (one layer)
    and `FusionConfig` (the fusion stack's layers, errors naming `fusion.<field>`) both extend it."""

    d_model: int = 128
    """Token width D."""
    d_expert: int = 256
    """Hidden width H of each expert (and of the shared expert); the fusion stack's dense baseline FFN is
    top_k * d_expert wide (equal active compute)."""
    num_experts: int = 8
    """E routed experts per MoE layer."""
    top_k: int = 2
    """K experts per token: 1 = Switch, 2 = GShard/Mixtral."""
    activation: Activation = "swiglu"
    """Expert (and dense FFN) MLP type: SwiGLU (Shazeer 2020) or GELU (`kernels.activate`)."""
    normalize_top_k: bool = True
    """Renormalise the K chosen probabilities to sum to 1 (Mixtral); else use the raw router probabilities."""
    router_jitter: float = 0.0
    """Multiplicative uniform noise U(1 - j, 1 + j) on the router input in training (Switch), 0 = off."""
    router_noise_std: float = 0.0
    """Additive Gaussian noise on the router logits in training (noisy top-k, Shazeer 2017), 0 = off."""
    capacity_factor: float | None = None
    """None = dropless; else each expert keeps at most ceil(cf * N * K / E) assignments, first choices before
    second choices (GShard priority), and the overflow is dropped and counted."""
    balance_coef: float = 0.01
    """Weight of the Switch/GShard load-balancing loss in `aux_loss`."""
    z_coef: float = 0.001
    """Weight of the ST-MoE router z-loss in `aux_loss`."""
    local_entropy_coef: float = 0.0
    """Weight of the LIMoE local (per-token) entropy loss, averaged over the token groups present."""
    global_entropy_coef: float = 0.0
    """Weight of the LIMoE global entropy loss (minus the entropy of a group's mean routing), averaged alike."""
    backend: Backend = "auto"
    """Grouped-matmul kernel (`kernels.grouped_mm`): auto = MKL's grouped GEMM for fp32 on CPU where torch has it
    (measured fastest), else torch._grouped_mm where it has a kernel (on CPU only when no weight gradient is
    needed), else the loop; or one of mkl, native, loop."""

    def __post_init__(self) -> None:
        # upper bounds far above any model this runs, so that a size edited in a model folder's config cannot make
        # building the model allocate without end (the folder's weights then decide: moefuse.pretrained.folder)
        self.check_range("d_model", 1, 65536)
        self.check_range("d_expert", 1, 262144)
        self.check_range("num_experts", 1, 4096)
        self.check(1 <= self.top_k <= self.num_experts, "top_k",
                   f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        self.check(self.activation in ("swiglu", "gelu"), "activation",
                   f"must be 'swiglu' or 'gelu', got {self.activation!r}")
        self.check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
                   f"must be null (dropless) or > 0, got {self.capacity_factor}")
        for name in ("router_jitter", "router_noise_std", "balance_coef", "z_coef", "local_entropy_coef",
                     "global_entropy_coef"):
            self.check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        self.check(self.backend in ("auto", "native", "loop", "mkl"), "backend",
                   f"must be 'auto', 'native', 'loop' or 'mkl', got {self.backend!r}")

    def experts_fields(self) -> dict[str, Any]:
        """The `ExpertsConfig` fields of this config, by name (what a MoEConfig is built from)."""
        return {f.name: getattr(self, f.name) for f in fields(ExpertsConfig)}


@dataclass
class MoEConfig(ExpertsConfig):
    """Hyper-parameters of one SparseMoE layer: the expert fields plus what the layer's user decides (its token
    groups, a shared expert). `FusionConfig.moe_config` builds it for the fusion stack."""

    num_groups: int = 1
    """G token groups, ids 0..G-1 in `modality_ids`: the rows of `modality_expert_counts` [G, E] and the groups
    the LIMoE entropy losses average over. The fusion stack passes its M modalities + 1 (the fusion token)."""
    shared_expert_hidden: int = 0
    """Width of an always-on dense expert beside the routed ones (DeepSeekMoE), 0 = none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_range("num_groups", 1, 4096)
        self.check_range("shared_expert_hidden", 0, 262144)


# ----------------------------------------------------------------------------------------------------------------
# experts and the dense floor


class Router(nn.Linear):
    """The gating projection. A distinct type so that int8 dynamic quantisation (which matches exact types)
    leaves it in fp32: near-tied top-k choices flip under quantisation."""


class Experts(nn.Module):
    """E independent MLPs with stacked weights: SwiGLU (Shazeer 2020) `w_out(silu(x w_gate) * x w_up)` or GELU."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: Activation):
        super().__init__()
        self.activation = activation
        # [E, D, 2H] for SwiGLU: columns [:H] are the gate, [H:] the up projection (Mixtral's order).
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, activation_in_width(d_hidden, activation)))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))  # [E, H, D]
        nn.init.normal_(self.w_in, std=d_model**-0.5)
        nn.init.normal_(self.w_out, std=d_hidden**-0.5)

    def forward(self, x_sorted: torch.Tensor, offs: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
        """x_sorted [S, D] sorted by expert, offs [E] int32 cumulative group ends -> [S, D]."""
        h = activate(grouped_mm(x_sorted, self.w_in, offs, backend), self.activation)  # [S, H]
        return grouped_mm(h, self.w_out, offs, backend)  # [S, D]


class DenseFFN(nn.Module):
    """A dense SwiGLU or GELU FFN: the shared expert, and the dense-fusion floor of equal active compute."""

    def __init__(self, d_model: int, d_hidden: int, activation: Activation = "swiglu"):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, activation_in_width(d_hidden, activation), bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        return self.w_out(activate(self.w_in(x), self.activation))


# ----------------------------------------------------------------------------------------------------------------
# typed intermediate and final results


@pytree_output
@dataclass
class MoEOutput:
    """What one SparseMoE call returns. Losses are scalars; stats are detached counts over real tokens only."""

    out: torch.Tensor  # same shape as the input x
    aux_loss: torch.Tensor  # weighted sum of the losses below, with the layer's coefficients
    balance_loss: torch.Tensor  # Switch/GShard: E * sum_i f_i P_i
    z_loss: torch.Tensor  # ST-MoE: mean(logsumexp(logits)^2)
    local_entropy_loss: torch.Tensor  # LIMoE: mean over token groups of mean per-token routing entropy
    global_entropy_loss: torch.Tensor  # LIMoE: mean over token groups of -entropy(mean routing distribution)
    tokens_per_expert: torch.Tensor  # [E] kept assignments per expert
    modality_expert_counts: torch.Tensor  # [G, E] kept assignments by token group (modality)
    dropped_tokens: torch.Tensor  # scalar: (token, expert) assignments dropped by the capacity limit
    router_logits: torch.Tensor  # [N_real, E] fp32 logits of the real (unmasked) tokens
    top_k_index: torch.Tensor  # [N_real, K] chosen experts of the real tokens
    combine_weights: torch.Tensor  # [N_real, K] weights used to mix the chosen experts (0 where dropped)


@dataclass
class Routing:
    """The router's choice for N tokens (`SparseMoE.route`)."""

    logits: torch.Tensor  # [N, E] fp32
    probs: torch.Tensor  # [N, E] softmax of the logits
    weights: torch.Tensor  # [N, K] combine weights of the chosen experts, 0 where dropped by the capacity limit
    index: torch.Tensor  # [N, K] chosen experts, best first
    keep: torch.Tensor  # [N, K] bool: the assignment fits the capacity (all True when dropless)


@dataclass
class Dispatch:
    """The kept (token, expert) assignments sorted by expert: one contiguous slice per expert (`dispatch`)."""

    token: torch.Tensor  # [S] row of each assignment's token in the N routed tokens
    expert: torch.Tensor  # [S] its expert, ascending
    weight: torch.Tensor  # [S] its combine weight
    tokens_per_expert: torch.Tensor  # [E] slice sizes
    offs: torch.Tensor  # [E] int32 cumulative slice ends, the grouped matmul's `offs`
    # Dropless only (S = N*K, else None): the dispatch is a permutation of the N*K (token, slot) pairs, moved both
    # ways by row gathers (`kernels.gather_tokens`, `kernels.combine_slots`).
    order: torch.Tensor | None = None  # [S] flat slot n*K + j of each sorted assignment
    position: torch.Tensor | None = None  # [N*K] sorted position of each flat slot (the inverse of order)
    slot_weight: torch.Tensor | None = None  # [N, K] combine weights in slot order


@dataclass
class MoELosses:
    """The router losses of one call (`SparseMoE.losses`), scalars."""

    balance: torch.Tensor  # Switch/GShard load balance
    z: torch.Tensor  # ST-MoE router z-loss
    local_entropy: torch.Tensor  # LIMoE local entropy, mean over groups present
    global_entropy: torch.Tensor  # LIMoE global entropy (negated), mean over groups present
    aux: torch.Tensor  # the four weighted by the layer's coefficients


@dataclass
class _RealTokens:
    """The unmasked rows of a flattened input, which alone take part in routing, losses and stats."""

    tokens: torch.Tensor  # [N, D]
    groups: torch.Tensor | None  # [N] group (modality) ids
    rows: torch.Tensor | None  # [N] their rows in the flattened input; None = every row is real


# ----------------------------------------------------------------------------------------------------------------
# the MoE layer


class SparseMoE(nn.Module):
    """Token-level top-k sparse MoE FFN (Shazeer et al. 2017; GShard; Switch), dropless by default.

    `cfg` holds every hyper-parameter (see `MoEConfig`). The parameters are `router.weight` [E, D],
    `experts.w_in` [E, D, 2H or H], `experts.w_out` [E, H, D] and, optionally, the `shared_expert` DenseFFN.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg.d_model, cfg.num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=cfg.d_model**-0.5 * 0.1)  # near-uniform routing at init
        self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_expert, cfg.activation)
        self.shared_expert = (DenseFFN(cfg.d_model, cfg.shared_expert_hidden, cfg.activation)
                              if cfg.shared_expert_hidden else None)
        # Set by `expert_parallel.shard_experts`: `experts` then holds this rank's E / N experts only.
        self.ep: expert_parallel.ExpertParallel | None = None

    @property
    def num_experts(self) -> int:
        return self.cfg.num_experts

    @property
    def top_k(self) -> int:
        return self.cfg.top_k

    # -- routing --------------------------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> Routing:
        """x [N, D] -> the chosen experts and their weights, with the capacity limit applied."""
        cfg = self.cfg
        if self.training and cfg.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
        # The router runs in fp32 even under autocast: softmax over bf16 logits flips near-tied top-k choices.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # [N, E]
        if self.training and cfg.router_noise_std > 0:
            logits = logits + torch.randn_like(logits) * cfg.router_noise_std
        probs = logits.softmax(dim=-1)  # [N, E]
        top_w, top_i = probs.topk(cfg.top_k, dim=-1)  # [N, K]
        if cfg.normalize_top_k:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        keep = self.capacity_keep(top_i) if cfg.capacity_factor else torch.ones_like(top_i, dtype=torch.bool)
        return Routing(logits=logits, probs=probs, weights=top_w * keep, index=top_i, keep=keep)

    def capacity_keep(self, top_i: torch.Tensor) -> torch.Tensor:
        """[N, K] expert ids -> [N, K] bool: assignment kept under the capacity limit (GShard priority order)."""
        n, k = top_i.shape
        e = self.cfg.num_experts
        capacity = math.ceil(self.cfg.capacity_factor * n * k / e)
        by_rank = top_i.t().reshape(-1)  # [K*N]: all first choices, then all second choices, ...
        sorted_e, order = torch.sort(by_rank, stable=True)
        counts = torch.bincount(sorted_e, minlength=e)  # [E]
        starts = torch.cumsum(counts, 0) - counts  # [E]
        pos = torch.empty_like(by_rank)
        pos[order] = torch.arange(by_rank.numel(), device=top_i.device) - starts[sorted_e]  # slot within expert
        return (pos < capacity).view(k, n).t()  # [N, K]

    # -- dispatch and combine -------------------------------------------------------------------------------

    def dispatch(self, routing: Routing) -> Dispatch:
        """Sort the kept (token, expert) assignments by expert -> contiguous slices, one matmul each."""
        n, k = routing.index.shape
        flat_e = routing.index.reshape(-1)  # [N*K]
        flat_tok = torch.arange(n, device=flat_e.device).repeat_interleave(k)  # [N*K]
        flat_w = routing.weights.reshape(-1)  # [N*K]
        if self.cfg.capacity_factor:
            kept = routing.keep.reshape(-1)
            flat_e, flat_tok, flat_w = flat_e[kept], flat_tok[kept], flat_w[kept]  # [S]
        sorted_e, order = torch.sort(flat_e, stable=True)  # [S]
        tokens_per_expert = torch.bincount(sorted_e, minlength=self.cfg.num_experts)  # [E]
        plan = Dispatch(token=flat_tok[order], expert=sorted_e, weight=flat_w[order],
                        tokens_per_expert=tokens_per_expert,
                        offs=torch.cumsum(tokens_per_expert, 0).to(torch.int32))
        if not self.cfg.capacity_factor:
            plan.order, plan.slot_weight = order, routing.weights
            positions = torch.arange(order.numel(), device=order.device)
            plan.position = torch.empty_like(order).index_put_((order,), positions)
        return plan

    def combine(self, tokens: torch.Tensor, plan: Dispatch) -> torch.Tensor:
        """tokens [N, D] -> [N, D]: each expert on its slice, the K weighted outputs of a token summed, + shared."""
        dropless = plan.position is not None
        if dropless:  # gathers both ways (see kernels: torch's backward of index_select scatters)
            x_sorted = gather_tokens(tokens, plan.token, plan.position)  # [S, D]
        else:
            x_sorted = tokens.index_select(0, plan.token)  # [S, D]
        if self.ep is None:
            y = self.experts(x_sorted, plan.offs, self.cfg.backend)  # [S, D]
        else:  # the experts live on the ranks of the EP group: tokens travel there and back
            y = expert_parallel.run_experts(self.experts, x_sorted, plan.tokens_per_expert, self.ep, self.cfg.backend)
        if dropless:
            out = combine_slots(y, plan.slot_weight, plan.order, plan.position)  # [N, D]
        else:
            y = y * plan.weight.to(y.dtype).unsqueeze(-1)
            out = torch.zeros_like(tokens).index_add_(0, plan.token, y)  # [N, D]
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out

    # -- losses and stats -----------------------------------------------------------------------------------

    def losses(self, routing: Routing, groups: torch.Tensor | None) -> MoELosses:
        """Balance and z-loss over the N routed tokens; the LIMoE entropies per group when `groups` [N] is given
        and either coefficient is set (always in eval, for logging). Under expert parallelism N is every rank's
        tokens: the sums below are reduced over all ranks (`expert_parallel.reduce_sums`)."""
        cfg, probs = self.cfg, routing.probs
        entropy = groups is not None and bool(cfg.local_entropy_coef or cfg.global_entropy_coef or not self.training)
        sums = self._loss_sums(routing, groups if entropy else None)
        if self.ep is not None:
            sums = expert_parallel.reduce_sums(sums, self.ep)
        e, g = cfg.num_experts, cfg.num_groups
        n, counts, prob_sum, z_sum = sums[0], sums[1:1 + e], sums[1 + e:1 + 2 * e], sums[1 + 2 * e]
        n = n.clamp_min(1.0)  # no token anywhere: every sum is 0, and so is every loss (no host sync to ask)
        # f_i = top-k assignments to i / N (sums to K), P_i = mean router probability of i: the same normalisation
        # as transformers' load_balancing_loss_func, so the two agree exactly.
        balance = e * torch.sum((counts / n) * (prob_sum / n))
        z = z_sum / n
        local = global_ = probs.sum() * 0.0
        if entropy:
            group_n, group_ent = sums[2 + 2 * e:2 + 2 * e + g], sums[2 + 2 * e + g:2 + 2 * e + 2 * g]
            group_p = sums[2 + 2 * e + 2 * g:].view(g, e)  # [G, E] summed router probabilities
            local, global_ = self._entropy_losses(group_n, group_ent, group_p)
        aux = (cfg.balance_coef * balance + cfg.z_coef * z
               + cfg.local_entropy_coef * local + cfg.global_entropy_coef * global_)
        return MoELosses(balance=balance, z=z, local_entropy=local, global_entropy=global_, aux=aux)

    def _loss_sums(self, routing: Routing, groups: torch.Tensor | None) -> torch.Tensor:
        """The sums the router losses are ratios of, in one vector: [N, assignments per expert (E), router
        probability per expert (E), sum of squared logsumexp], then with `groups` [N]: tokens per group (G),
        routing entropy per group (G), router probability per group and expert (G * E)."""
        probs, e = routing.probs, self.cfg.num_experts
        counts = torch.zeros(e, device=probs.device).scatter_add_(
            0, routing.index.reshape(-1), torch.ones(routing.index.numel(), device=probs.device))  # [E]
        n = probs.new_full((1,), probs.shape[0])
        parts = [n, counts, probs.sum(0), torch.logsumexp(routing.logits, dim=-1).square().sum().reshape(1)]
        if groups is not None:
            g = self.cfg.num_groups
            token_entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1)  # [N]
            parts += [torch.zeros(g, device=probs.device).index_add_(0, groups, torch.ones_like(token_entropy)),
                      torch.zeros(g, device=probs.device).index_add_(0, groups, token_entropy),
                      probs.new_zeros(g, e).index_add_(0, groups, probs).reshape(-1)]
        return torch.cat(parts)

    @staticmethod
    def _entropy_losses(group_n: torch.Tensor, group_entropy: torch.Tensor, group_probs: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """LIMoE, from per-group sums (tokens [G], routing entropy [G], router probabilities [G, E]): (mean
        per-token entropy, -entropy of the mean routing) of each group present, averaged over those groups."""
        present = (group_n > 0).to(group_n.dtype)  # [G]
        groups = present.sum().clamp_min(1.0)
        n = group_n.clamp_min(1.0)  # an absent group's sums are 0: it adds nothing
        local = (group_entropy / n).sum() / groups
        mean_p = group_probs / n.unsqueeze(1)  # [G, E]
        global_ = (mean_p * mean_p.clamp_min(1e-9).log()).sum() / groups  # = -entropy
        return local, global_

    @torch.no_grad()
    def _group_expert_counts(self, plan: Dispatch, groups: torch.Tensor | None) -> torch.Tensor:
        """[G, E] kept assignments by token group and expert (zeros without group ids)."""
        g, e = self.cfg.num_groups, self.cfg.num_experts
        counts = torch.zeros(g * e, dtype=torch.long, device=plan.expert.device)
        if groups is not None and plan.token.numel():
            counts.index_add_(0, groups[plan.token] * e + plan.expert, torch.ones_like(plan.expert))
        return counts.view(g, e)

    # -- forward --------------------------------------------------------------------------------------------

    def _real_tokens(self, x: torch.Tensor, modality_ids: torch.Tensor | None,
                     mask: torch.Tensor | None) -> _RealTokens:
        """Check the input shapes; x [..., D] -> its real rows [N, D] and their group ids."""
        d = self.cfg.d_model
        if x.dim() not in (2, 3) or x.shape[-1] != d:
            raise ValueError(f"SparseMoE expects x of shape [N, {d}] or [B, T, {d}], got {tuple(x.shape)}")
        for name, t in (("mask", mask), ("modality_ids", modality_ids)):
            if t is not None and t.shape != x.shape[:-1]:
                raise ValueError(f"SparseMoE: {name} must have shape {tuple(x.shape[:-1])}, got {tuple(t.shape)}")
        flat = x.reshape(-1, d)  # [B*T, D]
        groups = modality_ids.reshape(-1) if modality_ids is not None else None
        if mask is None:
            return _RealTokens(tokens=flat, groups=groups, rows=None)
        rows = mask.reshape(-1).nonzero().squeeze(1)  # [N]
        return _RealTokens(tokens=flat.index_select(0, rows), rows=rows,
                           groups=groups.index_select(0, rows) if groups is not None else None)

    def forward(
        self, x: torch.Tensor, modality_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MoEOutput:
        """x [N, D] or [B, T, D]; modality_ids (group ids < num_groups) and mask (True = real token) of shape
        x.shape[:-1]. Padding takes no part in routing, losses or stats, and its output rows are zero."""
        real = self._real_tokens(x, modality_ids, mask)
        routing = self.route(real.tokens)
        plan = self.dispatch(routing)
        out = self.combine(real.tokens, plan)  # [N, D]
        if real.rows is not None:
            out = torch.zeros_like(x.reshape(-1, self.cfg.d_model)).index_copy_(0, real.rows, out)
        losses = self.losses(routing, real.groups)
        return MoEOutput(
            out=out.view(x.shape),
            aux_loss=losses.aux,
            balance_loss=losses.balance,
            z_loss=losses.z,
            local_entropy_loss=losses.local_entropy,
            global_entropy_loss=losses.global_entropy,
            tokens_per_expert=plan.tokens_per_expert.detach(),
            modality_expert_counts=self._group_expert_counts(plan, real.groups),
            dropped_tokens=(~routing.keep).sum(),
            router_logits=routing.logits,
            top_k_index=routing.index,
            combine_weights=routing.weights,
        )

    # -- peers ----------------------------------------------------------------------------------------------

    @classmethod
    def from_mixtral(cls, block: nn.Module, **overrides: Any) -> SparseMoE:
        """Copy a transformers `MixtralSparseMoeBlock`: router, SwiGLU experts, top-k renormalised, no jitter.
        `overrides` are further MoEConfig fields (e.g. backend="loop")."""
        experts = block.experts
        num_experts, two_h, d_model = experts.gate_up_proj.shape  # [E, 2H, D]
        cfg = MoEConfig(d_model, two_h // 2, num_experts, top_k=block.top_k, activation="swiglu",
                        normalize_top_k=True, **overrides)
        moe = cls(cfg)
        with torch.no_grad():
            moe.router.weight.copy_(block.gate.weight)  # [E, D]
            moe.experts.w_in.copy_(experts.gate_up_proj.transpose(1, 2))  # [E, D, 2H]
            moe.experts.w_out.copy_(experts.down_proj.transpose(1, 2))  # [E, H, D]
        return moe


__all__ = ["DenseFFN", "Dispatch", "Experts", "MoEConfig", "MoELosses", "MoEOutput", "Router", "Routing",
           "SparseMoE"]
