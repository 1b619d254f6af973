"""The ops the experts run, kept apart from the MoE layer (as MegaBlocks' `ops/` and torchtune's `moe/utils.py`):
the grouped matmul of dropless dispatch (MegaBlocks, Gale et al. 2022), the row gathers that move tokens to their
experts and back, and the expert activation.

`grouped_mm(x, w, offs)`: out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e] for every expert e, x sorted by
expert, through one of three kernels:

* "mkl": MKL's grouped GEMM (`cblas_sgemm_batch`, one group per expert) in a custom autograd Function: one call
  for the forward and one for both backward products, group sizes read from memory (no per-expert Python loop,
  no host sync). fp32 on CPU, where torch's MKL exports it (x86 builds); the default there.
* "native": `torch._grouped_mm` (CPU: one `mm` per group inside; CUDA: bf16 grouped GEMM kernels).
* "loop": one `mm` per expert in a custom autograd Function.

On CPU with E=64 experts of N*K/E = 128 rows each, one GEMM per expert means ~430 OpenMP parallel regions per
SparseMoE fwd+bwd ("native" and "loop" alike) against 13 for the dense FFN of equal compute; on two threads each
region waits for the slower thread, and for one preempted by another process it waits a scheduler time slice.
On the busy 2-core dev VM, on two threads, the first expert matmul of a 64-expert forward (64 GEMMs of 128 x 256
x 1024) took 1000 ms of wall time (median) one `mm` per expert, 88 ms as one MKL grouped GEMM, and 76 ms as the
dense GEMM of the same FLOPs; MKL shares its threads over all the groups, and the whole layer's fwd+bwd runs 42
parallel regions.

The weight gradient: [E, K_in, N_out], E times a dense layer's, written by the backward (`_weight_grad_buffer`
recycles its memory between steps instead of paying ~34 ms of page faults for it at E=64, D=256, H=512). For
the other large tensors (activations and their gradients, the dense layers' too), `THP_MEM_ALLOC_ENABLE=1` in the
environment (before torch allocates anything) puts every CPU allocation of 2 MiB or more in transparent huge
pages, which makes their first touch cheaper (86 ms -> 26 ms of CPU for 96 MiB on the dev VM).

Shapes: S (token, expert) assignments sorted by expert, E experts, K_in / N_out the matmul's inner / output width,
H an expert's hidden width.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

Activation = Literal["swiglu", "gelu"]
Backend = Literal["auto", "native", "loop", "mkl"]

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
# moving tokens to their experts and back (dropless top-k)
#
# A dropless top-k dispatch is a permutation of the N*K (token, slot) pairs: sorted position p holds flat slot
# order[p] = n*K + j, and slot n*K + j sits at position[n*K + j]. So both directions, and both their backwards, are
# row gathers; torch's own autograd would scatter instead (index_add_ for the backward of index_select), whose CPU
# kernel for an expanded index (a parallel radix sort) took 0.8 ms on one thread but 70 ms on two threads of the
# 2-core dev VM while other processes competed for the cores: each of its many barriers waits for a preempted
# thread. Gathers are one parallel loop each.


class _GatherTokens(torch.autograd.Function):
    """x [N, D] -> x[order // K] [N*K, D]: each token's row at its K sorted positions; backward: the gradient rows
    of each token's K positions, gathered and summed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(position)
        ctx.n = x.shape[0]
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (position,) = ctx.saved_tensors
        n, d = ctx.n, grad.shape[-1]
        k = position.numel() // max(n, 1)
        slots = grad.index_select(0, position).view(n, k, d)  # [N, K, D]
        return torch.bmm(slots.new_ones(n, 1, k), slots).view(n, d), None, None


class _CombineSlots(torch.autograd.Function):
    """y [N*K, D] in sorted order, weight [N, K] -> [N, D]: sum_j weight[n, j] * y[position[n*K + j]]; backward:
    the weight gradient from the gathered rows, y's gradient gathered back into sorted order."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weight: torch.Tensor, position: torch.Tensor, order: torch.Tensor
                ) -> torch.Tensor:
        (n, k), d = weight.shape, y.shape[-1]
        slots = y.index_select(0, position).view(n, k, d)  # [N, K, D]
        ctx.save_for_backward(slots, weight, order)
        return torch.bmm(weight.unsqueeze(1), slots).view(n, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        slots, weight, order = ctx.saved_tensors
        (n, k), d = weight.shape, grad.shape[-1]
        grad = grad.view(n, 1, d)
        grad_w = torch.bmm(grad, slots.transpose(1, 2)).view(n, k) if ctx.needs_input_grad[1] else None
        grad_y = None
        if ctx.needs_input_grad[0]:
            grad_y = (weight.unsqueeze(2) * grad).view(n * k, d).index_select(0, order)  # [N*K, D]
        return grad_y, grad_w, None, None


def gather_tokens(x: torch.Tensor, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """x [N, D] -> x[token] [N*K, D], the rows of a dropless top-k dispatch in sorted order: token [N*K] is the
    token at each sorted position (order // K), position [N*K] the sorted position of each flat slot n*K + j."""
    return _GatherTokens.apply(x, token, position)


def combine_slots(y: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, position: torch.Tensor
                  ) -> torch.Tensor:
    """y [N*K, D] in the sorted order of a dropless top-k dispatch, weight [N, K] -> [N, D]: each token's K rows
    weighted and summed. order [N*K] is the flat slot n*K + j at each sorted position, position its inverse."""
    return _CombineSlots.apply(y, weight.to(y.dtype), position, order)


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


_WEIGHT_GRADS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> the storage of its last gradient


def _weight_grad_buffer(w: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor shaped like w, for w's gradient: on CPU, the storage of the gradient this
    function last returned for w when nothing else holds it any more, else fresh memory.

    Why: the [E, K_in, N_out] gradient is E times a dense layer's, and with grads set to None between steps glibc
    returns it to the kernel (it is over the 32 MiB mmap threshold), so every backward would first-touch it again:
    one page fault and a zeroed page per 4 KiB (34 ms of CPU for the 96 MiB of E=64, D=256, H=512 on the dev VM,
    ~15% of that layer's fwd+bwd). Recycling is safe because the storage is reused only when its use count says no
    tensor anywhere (a kept `p.grad`, an optimizer's reference, a hook's copy) still points at it; the cost is that
    the last gradient's memory stays allocated between steps instead of being freed by `zero_grad`.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if w.device.type != "cpu" or use_count is None:
        return torch.empty_like(w, memory_format=torch.contiguous_format)
    storage = _WEIGHT_GRADS.get(w)
    if storage is not None and storage.nbytes() == w.numel() * w.element_size() and use_count(storage._cdata) == 1:
        return torch.empty(0, dtype=w.dtype).set_(storage, 0, w.shape)
    grad = torch.empty_like(w, memory_format=torch.contiguous_format)
    _WEIGHT_GRADS[w] = grad.untyped_storage()
    return grad


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
        grad_w = _weight_grad_buffer(w) if ctx.needs_input_grad[1] else None
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


# MKL's grouped GEMM: cblas_sgemm_batch (oneMKL "group API"), called through ctypes on the copy of MKL that
# PyTorch's x86 builds link into libtorch_cpu and export.
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@dataclass
class _Gemms:
    """G row-major products C_g [m_g, n_g] = op(A_g) op(B_g), one MKL group each. A, B and C are contiguous fp32
    tensors seen as 2D [rows, cols]; a_row[g] etc. is the row of that view where operand g starts; op transposes
    when trans_a / trans_b. Fields are int64 [G] tensors (or ints for all groups)."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    trans_a: bool
    trans_b: bool
    m: torch.Tensor | int
    n: torch.Tensor | int
    k: torch.Tensor | int
    a_row: torch.Tensor
    b_row: torch.Tensor
    c_row: torch.Tensor


def _sgemm_batch_call(fn: ctypes._CFuncPtr, gemms: list[_Gemms]) -> None:
    """Run every product of `gemms` in one cblas_sgemm_batch call (so MKL shares its threads over all of them)."""
    g = [len(p.a_row) for p in gemms]

    def ints(attr: str) -> torch.Tensor:
        return torch.cat([torch.as_tensor(getattr(p, attr)).expand(n) for p, n in zip(gemms, g)]).to(torch.int32)

    def ptrs(attr: str) -> torch.Tensor:
        return torch.cat([getattr(p, attr).data_ptr() + getattr(p, f"{attr}_row") * getattr(p, attr).shape[-1] * 4
                          for p in gemms])

    lds = [torch.cat([torch.full((n,), getattr(p, t).shape[-1], dtype=torch.int32) for p, n in zip(gemms, g)])
           for t in ("a", "b", "c")]
    trans = [torch.cat([torch.full((n,), _TRANS if getattr(p, t) else _NO_TRANS, dtype=torch.int32)
                        for p, n in zip(gemms, g)]) for t in ("trans_a", "trans_b")]
    m, n, k = ints("m"), ints("n"), ints("k")
    alpha, beta, sizes = torch.ones(sum(g)), torch.zeros(sum(g)), torch.ones(sum(g), dtype=torch.int32)
    a, b, c = ptrs("a"), ptrs("b"), ptrs("c")
    fn(_ROW_MAJOR, trans[0].data_ptr(), trans[1].data_ptr(), m.data_ptr(), n.data_ptr(), k.data_ptr(),
       alpha.data_ptr(), a.data_ptr(), lds[0].data_ptr(), b.data_ptr(), lds[1].data_ptr(), beta.data_ptr(),
       c.data_ptr(), lds[2].data_ptr(), sum(g), sizes.data_ptr())


@functools.cache
def _mkl_sgemm_batch() -> ctypes._CFuncPtr | None:
    """MKL's cblas_sgemm_batch from libtorch_cpu, or None where this torch build has none or it fails a check of
    every operand layout the grouped matmul uses against torch.mm (which would catch, e.g., a 64-bit-int MKL)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        fn = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).cblas_sgemm_batch
    except (OSError, AttributeError):
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 13, ctypes.c_int, ctypes.c_void_p]
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(*s, generator=gen) for s in ((7, 3), (3, 3, 5), (7, 5)))
    offs = torch.tensor([2, 2, 7])
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]]), torch.cat([g[:2] @ w[0].t(), g[2:] @ w[2].t()]), torch.stack(
        [x[:2].t() @ g[:2], torch.zeros(3, 5), x[2:].t() @ g[2:]])
    got = [torch.full_like(t, float("nan")) for t in ref]
    _sgemm_batch_call(fn, _grouped_gemms(x, w, g, offs, *got))
    ok = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, ref))
    return fn if ok else None


def _grouped_gemms(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor | None, offs: torch.Tensor,
                   out: torch.Tensor | None, grad_x: torch.Tensor | None, grad_w: torch.Tensor | None) -> list[_Gemms]:
    """The products of a grouped matmul's forward (into out) or backward (into grad_x, grad_w), for `_Gemms`."""
    e, k_in, n_out = w.shape
    ends = offs.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # [E] rows per group
    starts, experts = ends - counts, torch.arange(e) * k_in  # first row of each group in x / w viewed 2D
    gemms = []
    if out is not None:  # out_e = x_e @ w_e
        gemms.append(_Gemms(x, w, out, False, False, counts, n_out, k_in, starts, experts, starts))
    if grad_x is not None:  # grad_x_e = grad_e @ w_e^T
        gemms.append(_Gemms(grad, w, grad_x, False, True, counts, k_in, n_out, starts, experts, starts))
    if grad_w is not None:  # grad_w_e = x_e^T @ grad_e; an empty group's product is 0 (k = 0, beta = 0)
        gemms.append(_Gemms(x, grad, grad_w, True, False, k_in, n_out, counts, starts, starts, experts))
    return gemms


class _MKLGroupedMatmul(torch.autograd.Function):
    """The grouped matmul as MKL grouped GEMMs: one call for the forward and one for both backward products, with
    no per-expert Python loop and no host sync (MKL reads the group sizes from memory). fp32 CPU tensors only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        out = x.new_empty(x.shape[0], w.shape[-1])  # [S, N_out]
        _sgemm_batch_call(_mkl_sgemm_batch(), _grouped_gemms(x, w, None, offs, out, None, None))
        out[int(offs[-1]) :].zero_()
        ctx.save_for_backward(x, w, offs)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()  # [S, N_out]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = _weight_grad_buffer(w) if ctx.needs_input_grad[1] else None
        if grad_x is not None or grad_w is not None:
            _sgemm_batch_call(_mkl_sgemm_batch(), _grouped_gemms(x, w, grad, offs, None, grad_x, grad_w))
        if grad_x is not None:
            grad_x[int(offs[-1]) :].zero_()
        return grad_x, grad_w, None


def mkl_grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the "mkl" backend runs these inputs: fp32 on CPU, with MKL's grouped GEMM in this torch build."""
    return (x.device.type == w.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and _mkl_sgemm_batch() is not None)


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

    "auto" takes MKL's grouped GEMM for fp32 on CPU where torch has it (measured fastest in fwd and fwd+bwd at
    every E in benchmarks/moe_dispatch.py), except while torch.compile traces (the ctypes call would break the
    graph); else torch._grouped_mm where it has a kernel, except when a CPU weight gradient will be needed: there
    the loop, whose backward measured faster. All backends run the same per-group products.
    """
    if backend == "auto":
        backend = auto_backend(x, w)
    if backend == "mkl":
        if not mkl_grouped_mm_available(x, w):
            raise ValueError(f"grouped_mm: backend 'mkl' needs fp32 CPU tensors and a torch build with MKL's grouped "
                             f"GEMM, got {x.dtype} on {x.device}; use backend 'auto', 'native' or 'loop'")
        return _MKLGroupedMatmul.apply(x, w, offs)
    if backend == "native":
        return torch._grouped_mm(_ContiguousGrad.apply(x), w, offs=offs)
    return _LoopGroupedMatmul.apply(x, w, offs)


def auto_backend(x: torch.Tensor, w: torch.Tensor) -> Backend:
    """What "auto" runs for these inputs (see `grouped_mm`)."""
    if not torch.compiler.is_compiling() and mkl_grouped_mm_available(x, w):
        return "mkl"
    cpu_training = w.device.type == "cpu" and w.requires_grad and torch.is_grad_enabled()
    return "native" if native_grouped_mm_available(x, w) and not cpu_training else "loop"


__all__ = [
    "Activation",
    "Backend",
    "activate",
    "activation_in_width",
    "auto_backend",
    "combine_slots",
    "gather_tokens",
    "grouped_mm",
    "mkl_grouped_mm_available",
    "native_grouped_mm_available",
]
