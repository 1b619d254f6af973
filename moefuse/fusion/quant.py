"""Dynamic int8 quantisation for CPU inference (`moefuse predict --int8`).

Every nn.Linear becomes torch.ao's DynamicQuantizedLinear (int8 weights, activations quantised per batch on the
fly; Jacob et al. 2018), and each MoE expert's stacked weights become one such layer per expert, applied to that
expert's contiguous slice of the sorted tokens. Routers stay fp32 (see `moe.Router`).

Why torch.ao and not torchao yet: torch.ao.quantization is deprecated upstream in favour of torchao's `quantize_`,
but torchao 0.18.0 (the current PyPI release; it installs, imports and quantises nn.Linear with torch 2.11 on CPU)
runs int8 on x86 CPU far slower than torch.ao's fbgemm kernels. Measured on the 2-core dev VM (one thread, CPU
time, paired rounds, eager, no_grad) against `quantize_dynamic(..., dtype=torch.qint8)`, over Linear(64, 256),
Linear(128, 64) and Linear(256, 1024) at 32, 512 and 4096 rows:
`Int8DynamicActivationInt8WeightConfig` 17-49x slower (eager `aten::_int_mm` plus Python-level quantisation of
the activations), `Int8DynamicActivationIntxWeightConfig` 2.1-16x slower, `Int8WeightOnlyConfig` 1.2-2.2x slower
(and no faster than fp32). Under `torch.compile` the int8-dynamic layer was still ~40x slower (Linear(256, 1024)
at 512 rows: 139 ms vs 3.3 ms) after a 25 s compile, and recompiles as the per-expert row counts change. Revisit
when torchao has an eager x86 int8 kernel (or move the predict path to torchao's pt2e X86InductorQuantizer flow).

Measured again for issue #27 (torchao 0.18.0, torch 2.11, this VM's Xeon with AVX512-VNNI, AVX512-BF16 and AMX;
one thread, CPU time, load average about 7 from other jobs): a Linear(384, 1536) -> GELU -> Linear(1536, 384) block
(MiniLM's FFN), under torch.compile with inductor freezing, static shapes, against eager fp32: at 24 rows fp32
compiled 0.92x, bf16 compiled 2.14x, torchao int8 weight-only 1.06x, torchao int8 dynamic 2.13x (relative error
1.5e-2 against 3.5e-3 for bf16); at 1024 rows 1.26x, 6.40x, 1.20x and 1.86x. bf16 is at least as fast as int8
there, twice as exact, and needs no new dependency (torch's own autocast and oneDNN kernels), so the 16-bit path
offered is `--quantize bf16` (`moefuse.fusion.runtime`; on whole models it pays only at batch 32 and compiled:
README, Benchmarks, Compression); torchao is not a dependency, and `--quantize int8` stays torch.ao's eager dynamic
quantisation, kept for comparison.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moefuse.fusion.kernels import Backend, activate
from moefuse.fusion.moe import Experts


def _quantized_linear(weight: torch.Tensor) -> nn.Module:
    """weight [in, out] (x @ W layout) -> an int8 dynamic linear computing x @ W."""
    from torch.ao.quantization import quantize_dynamic

    lin = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
    lin.weight.data.copy_(weight.t())
    return quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]


class Int8Experts(nn.Module):
    """Experts with one int8 dynamic linear per expert and matrix; same forward contract as `Experts`."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.activation = experts.activation
        with torch.no_grad():
            self.w_in = nn.ModuleList(_quantized_linear(w) for w in experts.w_in.detach().float())
            self.w_out = nn.ModuleList(_quantized_linear(w) for w in experts.w_out.detach().float())

    def forward(self, x_sorted: torch.Tensor, offs: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
        """x_sorted [S, D] sorted by expert, offs [E] int32 cumulative group ends -> [S, D] (`backend` unused)."""
        bounds = [0, *offs.tolist()]
        out = x_sorted.new_zeros(x_sorted.shape)  # [S, D]
        for e, (w_in, w_out) in enumerate(zip(self.w_in, self.w_out)):
            s, t = bounds[e], bounds[e + 1]
            if t == s:
                continue
            h = activate(w_in(x_sorted[s:t]), self.activation)  # [S_e, H]
            out[s:t] = w_out(h)  # [S_e, D]
        return out


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantise a (CPU, eval-mode) model in place: every nn.Linear and every MoE expert; routers stay fp32."""
    from torch.ao.quantization import quantize_dynamic

    model = model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        for name, module in list(model.named_modules()):
            if isinstance(module, Experts):
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                setattr(parent, name.rsplit(".", 1)[-1], Int8Experts(module))
        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
