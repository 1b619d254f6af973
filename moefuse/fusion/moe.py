"""Sparse mixture-of-experts FFN with token-level top-k routing and dropless grouped dispatch.

Routing follows Shazeer et al. 2017 (sparsely-gated MoE), GShard (Lepikhin et al. 2020, top-2) and Switch
(Fedus et al. 2021, top-1, load-balancing loss). The router z-loss is from ST-MoE (Zoph et al. 2022); the
per-modality entropy losses from LIMoE (Mustafa et al. 2022). Dispatch is "dropless" as in MegaBlocks
(Gale et al. 2022): tokens are sorted by expert and every expert runs one matmul over its contiguous slice,
so the work is O(tokens * top_k) whatever the number of experts E.

Shapes: N tokens, D model width, H expert width, E experts, K top-k, S = kept (token, expert) assignments,
M modalities.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------------
# grouped matmul: out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]

_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_HUGEPAGE_MIN_BYTES = 8 << 20  # advise only buffers that span several 2 MiB pages


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _empty_weight_grad(w: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor like the [E, K, N] weight `w`, backed by transparent huge pages if it can.

    The weight gradient is E times a dense layer's and freshly allocated on every backward (grads are set to None
    between steps), so on CPU its first touch costs one page fault per 4 KiB: at E=64 experts of 256x(2*512) and
    512x256 that is 96 MiB, ~24k faults, ~45 ms per step on one core of the 2-core dev VM (7 ms with huge pages),
    the largest single cost that grows with E. Advising the untouched buffer as transparent huge pages (what
    PyTorch's opt-in THP_MEM_ALLOC_ENABLE=1 does for every large tensor) cuts the faults 512-fold. Best effort: a
    no-op off Linux, off CPU, for small buffers, or where THP is disabled.
    """
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    if out.device.type != "cpu" or out.nbytes < _HUGEPAGE_MIN_BYTES:
        return out
    madvise = _madvise()
    if madvise is not None:
        page = mmap.PAGESIZE
        start = -(-out.data_ptr() // page) * page  # only whole pages inside the buffer
        end = (out.data_ptr() + out.nbytes) // page * page
        madvise(start, end - start, _MADV_HUGEPAGE)  # the result is ignored: a refusal only costs the speed-up
    return out


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's CPU backward rejects stride-0 (expanded) gradients, e.g. the one `out.sum()` produces.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _LoopGroupedMatmul(torch.autograd.Function):
    """Fallback with the same contract as torch._grouped_mm for 2D x 3D inputs.

    Unlike slicing `w[e]` under autograd (whose backward materialises a full [E, ...] gradient per slice, so the
    cost grows with E), the backward here writes each expert's gradient into one preallocated tensor. Outputs and
    gradients are allocated uninitialised and written once by `mm(out=...)`; only the rows past the last group and
    the experts that got no rows are zero-filled. The weight gradient is allocated by `_empty_weight_grad`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        bounds = [0, *offs.tolist()]  # one host sync per call
        out = x.new_empty(x.shape[0], w.shape[-1])  # [S, N_out]
        for e in range(w.shape[0]):
            s, t = bounds[e], bounds[e + 1]
            if t > s:
                torch.mm(x[s:t], w[e], out=out[s:t])
        out[bounds[-1] :].zero_()
        ctx.save_for_backward(x, w)
        ctx.bounds = bounds
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        bounds = ctx.bounds
        grad = grad.contiguous()
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        grad_w = _empty_weight_grad(w) if ctx.needs_input_grad[1] else None
        if grad_x is not None:
            grad_x[bounds[-1] :].zero_()
        for e in range(w.shape[0]):
            s, t = bounds[e], bounds[e + 1]
            if t == s:
                if grad_w is not None:
                    grad_w[e].zero_()
                continue
            if grad_x is not None:
                torch.mm(grad[s:t], w[e].t(), out=grad_x[s:t])
            if grad_w is not None:
                torch.mm(x[s:t].t(), grad[s:t], out=grad_w[e])
        return grad_x, grad_w, None


def native_grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm has a kernel for these inputs (CPU: torch >= 2.9; CUDA: bf16 on sm80+)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The kernels need 16-byte aligned strides and data (e.g. fp32 widths divisible by 4).
    aligned = all(t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
                  for t in (x, w))
    if x.device.type == "cuda":
        return aligned and w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return aligned and x.device.type == "cpu" and x.dtype == w.dtype


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: Literal["auto", "native", "loop"] = "auto"
) -> torch.Tensor:
    """x [S, K_in] sorted by group, w [E, K_in, N_out], offs [E] int32 cumulative group ends -> [S, N_out].

    "auto" takes torch._grouped_mm where it has a kernel, except when a CPU weight gradient will be needed: there
    the loop, whose [E, K_in, N_out] gradient lands in huge pages (`_empty_weight_grad`), is faster as E grows
    (fp32 fwd+bwd at E=64 in benchmarks/moe_dispatch.py); both run the same per-group matmuls otherwise.
    """
    if backend == "auto":
        cpu_training = w.device.type == "cpu" and w.requires_grad and torch.is_grad_enabled()
        backend = "native" if native_grouped_mm_available(x, w) and not cpu_training else "loop"
    if backend == "native":
        return torch._grouped_mm(_ContiguousGrad.apply(x), w, offs=offs)
    return _LoopGroupedMatmul.apply(x, w, offs)


# ----------------------------------------------------------------------------------------------------------------
# experts and the dense floor


class Router(nn.Linear):
    """The gating projection. A distinct type so that int8 dynamic quantisation (which matches exact types)
    leaves it in fp32: near-tied top-k choices flip under quantisation."""


class Experts(nn.Module):
    """E independent MLPs with stacked weights: SwiGLU (Shazeer 2020) `w_out(silu(x w_gate) * x w_up)` or GELU."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: Literal["swiglu", "gelu"]):
        super().__init__()
        self.activation = activation
        n_in = 2 * d_hidden if activation == "swiglu" else d_hidden
        # [E, D, 2H] for SwiGLU: columns [:H] are the gate, [H:] the up projection (Mixtral's order).
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, n_in))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))  # [E, H, D]
        nn.init.normal_(self.w_in, std=d_model**-0.5)
        nn.init.normal_(self.w_out, std=d_hidden**-0.5)

    def forward(self, x_sorted: torch.Tensor, offs: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        h = grouped_mm(x_sorted, self.w_in, offs, backend)  # [S, 2H] or [S, H]
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # [S, H] each
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return grouped_mm(h, self.w_out, offs, backend)  # [S, D]


class DenseFFN(nn.Module):
    """A dense SwiGLU or GELU FFN: the shared expert, and the dense-fusion floor of equal active compute."""

    def __init__(self, d_model: int, d_hidden: int, activation: Literal["swiglu", "gelu"] = "swiglu"):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, 2 * d_hidden if activation == "swiglu" else d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.w_out(h)


# ----------------------------------------------------------------------------------------------------------------
# the MoE layer


@dataclass
class MoEOutput:
    """What one SparseMoE call returns. Losses are scalars; stats are detached counts over real tokens only."""

    out: torch.Tensor  # same shape as the input x
    aux_loss: torch.Tensor  # weighted sum of the losses below, with the layer's coefficients
    balance_loss: torch.Tensor  # Switch/GShard: E * sum_i f_i P_i
    z_loss: torch.Tensor  # ST-MoE: mean(logsumexp(logits)^2)
    local_entropy_loss: torch.Tensor  # LIMoE: mean over modalities of mean per-token routing entropy
    global_entropy_loss: torch.Tensor  # LIMoE: mean over modalities of -entropy(mean routing distribution)
    tokens_per_expert: torch.Tensor  # [E] kept assignments per expert
    modality_expert_counts: torch.Tensor  # [M, E] kept assignments by modality
    dropped_tokens: torch.Tensor  # scalar: (token, expert) assignments dropped by the capacity limit
    router_logits: torch.Tensor  # [N_real, E] fp32 logits of the real (unmasked) tokens
    top_k_index: torch.Tensor  # [N_real, K] chosen experts of the real tokens
    combine_weights: torch.Tensor  # [N_real, K] weights used to mix the chosen experts (0 where dropped)


class SparseMoE(nn.Module):
    """Token-level top-k sparse MoE FFN (Shazeer et al. 2017; GShard; Switch), dropless by default.

    Args:
        d_model: token width D.
        d_hidden: width H of each expert's hidden layer.
        num_experts: E.
        top_k: K experts per token (1 = Switch, 2 = GShard/Mixtral).
        activation: "swiglu" (default) or "gelu" experts.
        normalize_top_k: renormalise the K chosen probabilities to sum to 1 (Mixtral); else use raw probabilities.
        router_jitter: multiplicative uniform noise on the router input in training (Switch), 0 = off.
        router_noise_std: additive Gaussian noise on router logits in training (noisy top-k, Shazeer 2017).
        capacity_factor: None or 0 = dropless; else each expert keeps at most ceil(cf * N * K / E) assignments,
            first choices before second choices (GShard priority), and the overflow is dropped and counted.
        num_modalities: M, for the modality x expert stats and the per-modality entropy losses.
        balance_coef, z_coef, local_entropy_coef, global_entropy_coef: weights of the losses in `aux_loss`.
        shared_expert_hidden: width of an always-on shared expert beside the routed ones (0 = none; DeepSeekMoE).
        backend: grouped matmul kernel: "auto" (torch._grouped_mm where it runs, the loop for CPU training; see
            `grouped_mm`), "native" or "loop".
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int = 2,
        activation: Literal["swiglu", "gelu"] = "swiglu",
        normalize_top_k: bool = True,
        router_jitter: float = 0.0,
        router_noise_std: float = 0.0,
        capacity_factor: float | None = None,
        num_modalities: int = 3,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
        local_entropy_coef: float = 0.0,
        global_entropy_coef: float = 0.0,
        shared_expert_hidden: int = 0,
        backend: Literal["auto", "native", "loop"] = "auto",
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got top_k={top_k}")
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation must be 'swiglu' or 'gelu', got {activation!r}")
        if capacity_factor is not None and capacity_factor < 0:
            raise ValueError(f"capacity_factor must be None, 0 (dropless) or > 0, got {capacity_factor}")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.normalize_top_k = normalize_top_k
        self.router_jitter, self.router_noise_std = router_jitter, router_noise_std
        self.capacity_factor = capacity_factor or None
        self.num_modalities = num_modalities
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.local_entropy_coef, self.global_entropy_coef = local_entropy_coef, global_entropy_coef
        self.backend = backend
        self.router = Router(d_model, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=d_model**-0.5 * 0.1)  # near-uniform routing at init
        self.experts = Experts(num_experts, d_model, d_hidden, activation)
        self.shared_expert = DenseFFN(d_model, shared_expert_hidden, activation) if shared_expert_hidden else None

    # -- routing --------------------------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> logits [N, E] (fp32), probs [N, E], top-k weights [N, K], top-k index [N, K]."""
        if self.training and self.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        # The router runs in fp32 even under autocast: softmax over bf16 logits flips near-tied top-k choices.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # [N, E]
        if self.training and self.router_noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise_std
        probs = logits.softmax(dim=-1)  # [N, E]
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # [N, K]
        if self.normalize_top_k:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, probs, top_w, top_i

    def capacity_keep(self, top_i: torch.Tensor) -> torch.Tensor:
        """[N, K] expert ids -> [N, K] bool: assignment kept under the capacity limit (GShard priority order)."""
        n, k = top_i.shape
        capacity = math.ceil(self.capacity_factor * n * k / self.num_experts)
        by_rank = top_i.t().reshape(-1)  # [K*N]: all first choices, then all second choices, ...
        sorted_e, order = torch.sort(by_rank, stable=True)
        counts = torch.bincount(sorted_e, minlength=self.num_experts)  # [E]
        starts = torch.cumsum(counts, 0) - counts  # [E]
        pos = torch.empty_like(by_rank)
        pos[order] = torch.arange(by_rank.numel(), device=top_i.device) - starts[sorted_e]  # slot within expert
        return (pos < capacity).view(k, n).t()  # [N, K]

    # -- losses ---------------------------------------------------------------------------------------------

    def losses(
        self, logits: torch.Tensor, probs: torch.Tensor, top_i: torch.Tensor, modality_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = probs.shape[0]
        if n == 0:
            zero = probs.sum() * 0.0
            return zero, zero, zero, zero
        # f_i = top-k assignments to i / N (sums to K), P_i = mean router probability of i: the same
        # normalisation as transformers' load_balancing_loss_func, so the two agree exactly.
        counts = torch.zeros(self.num_experts, device=probs.device).scatter_add_(
            0, top_i.reshape(-1), torch.ones(top_i.numel(), device=probs.device)
        )
        balance = self.num_experts * torch.sum((counts / n) * probs.mean(dim=0))
        z = torch.logsumexp(logits, dim=-1).square().mean()
        local = global_ = probs.sum() * 0.0
        if modality_ids is not None and (self.local_entropy_coef or self.global_entropy_coef or not self.training):
            present = torch.unique(modality_ids)
            token_entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1)  # [N]
            for m in present.tolist():
                sel = modality_ids == m
                local = local + token_entropy[sel].mean()
                mean_p = probs[sel].mean(0)  # [E]
                global_ = global_ + (mean_p * mean_p.clamp_min(1e-9).log()).sum()  # = -entropy
            local, global_ = local / len(present), global_ / len(present)
        return balance, z, local, global_

    # -- forward --------------------------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, modality_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MoEOutput:
        """x [N, D] or [B, T, D]; modality_ids and mask (True = real token) of shape x.shape[:-1]."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"SparseMoE expects x of shape [N, {self.d_model}] or [B, T, {self.d_model}], "
                             f"got {tuple(x.shape)}")
        for name, t in (("mask", mask), ("modality_ids", modality_ids)):
            if t is not None and t.shape != x.shape[:-1]:
                raise ValueError(f"SparseMoE: {name} must have shape {tuple(x.shape[:-1])}, got {tuple(t.shape)}")
        shape = x.shape
        flat = x.reshape(-1, self.d_model)  # [N, D]
        if mask is not None:
            real = mask.reshape(-1).nonzero().squeeze(1)  # [N_real]
            tokens = flat.index_select(0, real)  # padding takes no part in routing, losses or stats
            mods = modality_ids.reshape(-1).index_select(0, real) if modality_ids is not None else None
        else:
            real, tokens = None, flat
            mods = modality_ids.reshape(-1) if modality_ids is not None else None
        n, k, e = tokens.shape[0], self.top_k, self.num_experts

        logits, probs, top_w, top_i = self.route(tokens)
        keep = self.capacity_keep(top_i) if self.capacity_factor else torch.ones_like(top_i, dtype=torch.bool)
        top_w = top_w * keep

        # Dispatch: sort the kept (token, expert) assignments by expert -> contiguous slices, one matmul each.
        flat_e = top_i.reshape(-1)  # [N*K]
        flat_tok = torch.arange(n, device=x.device).repeat_interleave(k)  # [N*K]
        if self.capacity_factor:
            kept = keep.reshape(-1)
            flat_e, flat_tok, flat_w = flat_e[kept], flat_tok[kept], top_w.reshape(-1)[kept]  # [S]
        else:
            flat_w = top_w.reshape(-1)  # [S = N*K]
        sorted_e, order = torch.sort(flat_e, stable=True)  # [S]
        tok_sorted = flat_tok[order]  # [S]
        tokens_per_expert = torch.bincount(sorted_e, minlength=e)  # [E]
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)  # [E] group ends
        x_sorted = tokens.index_select(0, tok_sorted)  # [S, D]
        y = self.experts(x_sorted, offs, self.backend)  # [S, D]
        y = y * flat_w[order].to(y.dtype).unsqueeze(-1)
        out_tokens = torch.zeros_like(tokens).index_add_(0, tok_sorted, y)  # [N, D]: sum over the K experts
        if self.shared_expert is not None:
            out_tokens = out_tokens + self.shared_expert(tokens)

        if real is not None:
            out = torch.zeros_like(flat).index_copy_(0, real, out_tokens).view(shape)
        else:
            out = out_tokens.view(shape)

        balance, z, local, global_ = self.losses(logits, probs, top_i, mods)
        aux = (self.balance_coef * balance + self.z_coef * z
               + self.local_entropy_coef * local + self.global_entropy_coef * global_)
        with torch.no_grad():
            m = self.num_modalities
            mod_counts = torch.zeros(m * e, dtype=torch.long, device=x.device)
            if mods is not None and flat_tok.numel():
                mod_counts.index_add_(0, mods[flat_tok] * e + flat_e, torch.ones_like(flat_e))
            dropped = (~keep).sum()
        return MoEOutput(
            out=out,
            aux_loss=aux,
            balance_loss=balance,
            z_loss=z,
            local_entropy_loss=local,
            global_entropy_loss=global_,
            tokens_per_expert=tokens_per_expert.detach(),
            modality_expert_counts=mod_counts.view(m, e),
            dropped_tokens=dropped,
            router_logits=logits,
            top_k_index=top_i,
            combine_weights=top_w,
        )

    # -- peers ----------------------------------------------------------------------------------------------

    @classmethod
    def from_mixtral(cls, block: nn.Module, **kwargs) -> SparseMoE:
        """Copy a transformers `MixtralSparseMoeBlock`: router, SwiGLU experts, top-k renormalised, no jitter."""
        experts = block.experts
        num_experts, two_h, d_model = experts.gate_up_proj.shape  # [E, 2H, D]
        moe = cls(d_model, two_h // 2, num_experts, top_k=block.top_k, activation="swiglu",
                  normalize_top_k=True, **kwargs)
        with torch.no_grad():
            moe.router.weight.copy_(block.gate.weight)  # [E, D]
            moe.experts.w_in.copy_(experts.gate_up_proj.transpose(1, 2))  # [E, D, 2H]
            moe.experts.w_out.copy_(experts.down_proj.transpose(1, 2))  # [E, H, D]
        return moe
