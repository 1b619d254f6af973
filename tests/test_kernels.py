"""The expert kernels apart from the layer: the grouped matmul's backends and the activation helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moefuse.fusion.kernels import activate, activation_in_width, auto_backend, grouped_mm, mkl_grouped_mm_available

HAS_MKL = mkl_grouped_mm_available(torch.empty(1), torch.empty(1))
BACKENDS = ["native", "loop"] + (["mkl"] if HAS_MKL else [])
needs_mkl = pytest.mark.skipif(not HAS_MKL, reason="this torch build has no MKL grouped GEMM")


def test_activate_swiglu_and_gelu() -> None:
    h = torch.randn(5, 2 * 6)
    torch.testing.assert_close(activate(h, "swiglu"), F.silu(h[:, :6]) * h[:, 6:], rtol=0, atol=0)
    torch.testing.assert_close(activate(h, "gelu"), F.gelu(h), rtol=0, atol=0)
    assert activation_in_width(6, "swiglu") == 12 and activation_in_width(6, "gelu") == 6


def test_grouped_mm_backends_agree_with_gradients() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(5, 8, 12, requires_grad=True)  # widths divisible by 4: native kernels need 16-byte strides
    offs = torch.tensor([10, 10, 25, 40, 50], dtype=torch.int32)  # includes an empty group
    g = torch.randn(50, 12)
    grads = []
    for backend in BACKENDS:
        x.grad = w.grad = None
        y = grouped_mm(x, w, offs, backend)
        y.backward(g)
        grads.append((y.detach(), x.grad.clone(), w.grad.clone()))
    ref = torch.cat([x[0:10] @ w[0], x[10:25] @ w[2], x[25:40] @ w[3], x[40:50] @ w[4]]).detach()
    for y, gx, gw in grads:
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, grads[0][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, grads[0][2], atol=1e-5, rtol=1e-5)
    assert (grads[1][2][1] == 0).all()  # the empty group's gradient is zero


def test_auto_backend_falls_back_on_unaligned_widths() -> None:
    x, w = torch.randn(10, 8), torch.randn(2, 8, 6)  # 6 floats = 24-byte rows: no native kernel
    offs = torch.tensor([4, 10], dtype=torch.int32)
    torch.testing.assert_close(grouped_mm(x, w, offs, "auto"), torch.cat([x[:4] @ w[0], x[4:] @ w[1]]))


def test_grouped_mm_check_script_passes() -> None:
    """benchmarks/grouped_mm_check.py (run by the GPU check in bf16 on CUDA) passes in fp32 on CPU."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "grouped_mm_check.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and "native vs loop" in proc.stdout


def loop_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, g: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out, grad_x, grad_w of sum(out * g) by plain autograd over per-group slices (rows past the last group: 0)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    bounds = [0, *offs.tolist()]
    out = torch.cat([x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])]
                    + [x.new_zeros(x.shape[0] - bounds[-1], w.shape[-1])])
    out.backward(g)
    return out.detach(), x.grad, w.grad


@needs_mkl
@pytest.mark.parametrize("sizes", [[10, 0, 15, 15, 10], [0, 0, 7], [9], [0, 3, 0], [0, 0]])
def test_mkl_grouped_mm_equals_reference(sizes: list[int]) -> None:
    """Forward and both gradients of the MKL grouped GEMM equal per-group autograd: empty groups first, inside and
    last, a single group, no rows at all, rows past the last group, and a transposed (non-contiguous) input."""
    torch.manual_seed(0)
    rows = sum(sizes) + 3  # 3 rows belong to no group
    x = torch.randn(8, rows).t().requires_grad_()  # [rows, 8], not contiguous
    w = torch.randn(len(sizes), 8, 12, requires_grad=True)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    g = torch.randn(rows, 12)
    out = grouped_mm(x, w, offs, "mkl")
    out.backward(g)
    ref_out, ref_gx, ref_gw = loop_reference(x, w, offs, g)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, ref_gx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, ref_gw, atol=1e-5, rtol=1e-5)
    assert (out[sum(sizes):] == 0).all() and (x.grad[sum(sizes):] == 0).all()


@pytest.mark.parametrize("backend", ["loop"] + (["mkl"] if HAS_MKL else []))
def test_weight_gradient_storage_is_recycled_only_when_free(backend: str) -> None:
    """The weight gradient reuses the last one's memory once nothing holds it (grads set to None between steps),
    every element rewritten (garbage left there, even in an empty group's slice, does not leak through); a
    gradient still held elsewhere is never overwritten; accumulation into a kept .grad still adds."""
    torch.manual_seed(0)
    x = torch.randn(20, 8)
    w = torch.randn(3, 8, 4, requires_grad=True)
    offs = torch.tensor([12, 12, 20], dtype=torch.int32)  # expert 1 gets no rows
    g = torch.randn(20, 4)
    ref = loop_reference(x, w, offs, g)[2]

    def step() -> torch.Tensor:
        grouped_mm(x, w, offs, backend).backward(g)
        return w.grad

    first = step()
    ptr = first.data_ptr()
    first.fill_(float("nan"))  # garbage in the memory that will be recycled
    del first
    w.grad = None
    second = step()
    assert second.data_ptr() == ptr  # recycled
    torch.testing.assert_close(second, ref)
    assert (second[1] == 0).all()
    kept = second  # still held: the next gradient must go elsewhere
    w.grad = None
    third = step()
    assert third.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, ref)
    torch.testing.assert_close(third, ref)
    step()  # w.grad kept: accumulates
    torch.testing.assert_close(w.grad, 2 * ref)


def test_auto_backend_choice() -> None:
    """auto: MKL's grouped GEMM for fp32 on CPU where torch has it, in training and inference; else the loop when a
    CPU weight gradient is needed, torch._grouped_mm when not (bf16 here)."""
    x, w = torch.randn(4, 8), torch.randn(2, 8, 8, requires_grad=True)  # bf16 rows of 16 bytes: native kernels
    assert auto_backend(x, w) == ("mkl" if HAS_MKL else "loop")
    xb, wb = x.bfloat16(), w.detach().bfloat16().requires_grad_()
    assert auto_backend(xb, wb) == "loop"
    with torch.no_grad():
        assert auto_backend(xb, wb) == "native"


@needs_mkl
def test_mkl_backend_refuses_what_it_cannot_run() -> None:
    x, w = torch.randn(4, 8).bfloat16(), torch.randn(2, 8, 4).bfloat16()
    with pytest.raises(ValueError, match="backend 'mkl' needs fp32 CPU tensors"):
        grouped_mm(x, w, torch.tensor([2, 4], dtype=torch.int32), "mkl")
