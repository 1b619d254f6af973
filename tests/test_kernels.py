"""The expert kernels apart from the layer: the grouped matmul's backends and the activation helper."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moefuse.fusion.kernels import activate, activation_in_width, grouped_mm

BACKENDS = ["native", "loop"]


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
