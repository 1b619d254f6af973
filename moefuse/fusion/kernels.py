"""The ops the experts run, kept apart from the MoE layer (as MegaBlocks' `ops/` and torchtune's `moe/utils.py`):
the grouped matmul of dropless dispatch (MegaBlocks, Gale et al. 2022) and the expert activation.

`grouped_mm(x, w, offs)`: out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e] for every expert e, x sorted by
expert, either through `torch._grouped_mm` ("native") or one `mm` per expert in a custom autograd Function
("loop"), whose backward writes each expert's weight gradient into one preallocated [E, K_in, N_out] tensor.

Huge pages for CPU training with many experts: that weight gradient is E times a dense layer's and freshly
allocated on every backward (grads are set to None between steps); once it is over glibc's 32 MiB mmap threshold
its first touch costs one page fault per 4 KiB. PyTorch backs every CPU allocation of 2 MiB or more with
transparent huge pages (2 MiB-aligned and `madvise`d) when `THP_MEM_ALLOC_ENABLE=1` is in the environment before
torch allocates anything:

    THP_MEM_ALLOC_ENABLE=1 moefuse train configs/x.yaml fusion.num_experts=64 ...

Measured on the 2-core dev VM (THP mode `madvise`): allocating and first touching the two weight gradients of
E=64, D=256, H=512 (96 MiB) took 86 ms of CPU without it and 26 ms with it. The loop used to do the same for its
weight gradient alone (libc `madvise` through ctypes); that was removed, as its gain on a whole SparseMoE fwd+bwd
(N=4096, D=256, H=512, K=2, paired rounds) was 0 at E=16, 11% of CPU time at E=64 on one thread, and within the
noise (3% +- 12%) in wall time on two.

Shapes: S (token, expert) assignments sorted by expert, E experts, K_in / N_out the matmul's inner / output width,
H an expert's hidden width.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Activation = Literal["swiglu", "gelu"]
Backend = Literal["auto", "native", "loop"]

# ----------------------------------------------------------------------------------------------------------------
# the expert activation


def activation_in_width(d_hidden: int, activation: Activation) -> int:
    """Columns the input projection of an FFN of hidden width H feeds `activate`: 2H for SwiGLU, H for GELU."""
    return 2 * d_hidden if activation == "swiglu" else d_hidden


def activate(h: torch.Tensor, activation: Activation) -> torch.Tensor:
    """The FFN nonlinearity: [..., 2H] -> [..., H] for SwiGLU (Shazeer 2020), silu(gate) * up with the gate in the
    first H columns and the up projection in the last H (Mixtral's order); [..., H] -> [..., H] for GELU."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)  # [..., H] each
        return F.silu(gate) * up
    return F.gelu(h)


# ----------------------------------------------------------------------------------------------------------------
# grouped matmul


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
    the experts that got no rows are zero-filled.
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
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        bounds = ctx.bounds
        grad = grad.contiguous()  # [S, N_out]
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(w, memory_format=torch.contiguous_format) if ctx.needs_input_grad[1] else None
        if grad_x is not None:
            grad_x[bounds[-1] :].zero_()
        for e in range(w.shape[0]):
            s, t = bounds[e], bounds[e + 1]
            if t == s:
                if grad_w is not None:
                    grad_w[e].zero_()
                continue
            if grad_x is not None:
                torch.mm(grad[s:t], w[e].t(), out=grad_x[s:t])  # [S_e, K_in]
            if grad_w is not None:
                torch.mm(x[s:t].t(), grad[s:t], out=grad_w[e])  # [K_in, N_out]
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


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """x [S, K_in] sorted by group, w [E, K_in, N_out], offs [E] int32 cumulative group ends -> [S, N_out].

    "auto" takes torch._grouped_mm where it has a kernel, except when a CPU weight gradient will be needed: there
    it takes the loop (measured faster at E=64 fp32 fwd+bwd in benchmarks/moe_dispatch.py when the loop's weight
    gradient was in huge pages; see the module docstring); both run the same per-group matmuls otherwise.
    """
    if backend == "auto":
        cpu_training = w.device.type == "cpu" and w.requires_grad and torch.is_grad_enabled()
        backend = "native" if native_grouped_mm_available(x, w) and not cpu_training else "loop"
    if backend == "native":
        return torch._grouped_mm(_ContiguousGrad.apply(x), w, offs=offs)
    return _LoopGroupedMatmul.apply(x, w, offs)


__all__ = [
    "Activation",
    "Backend",
    "activate",
    "activation_in_width",
    "grouped_mm",
    "native_grouped_mm_available",
]
