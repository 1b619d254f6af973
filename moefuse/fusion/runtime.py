"""How a loaded model runs inference: its runtime (eager PyTorch, or compiled with torch.compile's inductor) and the
precision of its weights (fp32, bf16, or torch.ao dynamic int8), as `evaluate`, `predict` and `serve` choose with
`--runtime` and `--quantize` (`moefuse.fusion.loading.load_inference_model`).

compiled: each encoder and each fusion block is compiled once per process with dynamic batch and sequence sizes
(`torch.compile(dynamic=True)`, inductor's C++ kernels on CPU; Ansel et al. 2024, "PyTorch 2"), and warmed up at
load on made-up inputs (`warm_up`: two input sizes at batch 1, 2 and 32), so the first request pays no compile. The
glue between them (which samples have which modality, the encoder cache, the voting heads) stays eager. The MoE
layers run `InferenceMoE`: the same routing and experts as `SparseMoE` with static shapes (padding tokens are routed
to a sentinel expert past the last real one instead of being removed with `nonzero`), the experts one opaque custom
op (`moefuse::experts_ffn`, the grouped matmul inductor cannot trace in fp32), and no router losses (inference has
no use for them: they are 0). Inductor keeps what it compiled in its cache folder (TORCHINDUCTOR_CACHE_DIR, by
default under the temp folder), so a second process on the same machine starts faster.

bf16: the weights of every linear layer, convolution and expert in bfloat16 (half the memory), the forward under
CPU autocast, so matmuls run in bf16 (AMX or AVX512-BF16 where the CPU has them) and accumulate in fp32; norms,
embeddings, routers (`moe.Router` runs in fp32 whatever the autocast) and the heads' softmax stay fp32.

int8: torch.ao dynamic quantisation (`moefuse.fusion.quant`), eager only.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from moefuse.configutil import ConfigError
from moefuse.fusion.kernels import activate, grouped_mm
from moefuse.fusion.moe import Experts, MoEOutput, Router, SparseMoE
from moefuse.fusion.quant import quantize_int8
from moefuse.fusion.stack import FusionBlock
from moefuse.inference.options import QUANTIZE, RUNTIMES
from moefuse.inference.predict import export_media, load_media_sample

Runtime = Literal["eager", "compiled"]
Quantize = Literal["none", "int8", "bf16"]

# ----------------------------------------------------------------------------------------------------------------
# the MoE layer with static shapes


@torch.library.custom_op("moefuse::experts_ffn", mutates_args=())
def experts_ffn(x_sorted: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, offs: torch.Tensor,
                activation: str) -> torch.Tensor:
    """Every expert's MLP on its slice of x_sorted [S, D] (sorted by expert; offs [E] int32 cumulative slice ends)
    -> [S, D]; rows past the last slice (padding) are 0. One op to the compiler: torch._grouped_mm has no fp32
    meta kernel for inductor to trace, so the experts run as in eager (`kernels.grouped_mm`)."""
    h = activate(grouped_mm(x_sorted, w_in, offs), activation)  # type: ignore[arg-type]
    out = grouped_mm(h, w_out, offs)
    out[int(offs[-1]) if offs.numel() else 0:] = 0
    return out


@experts_ffn.register_fake
def _experts_ffn_shape(x_sorted: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, offs: torch.Tensor,
                       activation: str) -> torch.Tensor:
    return x_sorted.new_empty(x_sorted.shape[0], w_out.shape[-1])


@torch.compiler.disable
def _real_rows(mask: torch.Tensor | None, *all_tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each per-token tensor [B*T, ...] cut to the real tokens (mask [B, T]), in row-major order, as SparseMoE
    reports them. Eager: the number of real tokens is data (a `nonzero`), which the compiled graph leaves out."""
    if mask is None:
        return list(all_tokens)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return [t.index_select(0, rows) for t in all_tokens]


class InferenceMoE(SparseMoE):
    """A SparseMoE's inference forward with static shapes, for torch.compile (see the module docstring): the same
    parameters (shared, not copied), the same outputs and routing stats, router losses 0. In training, with
    gradients, a capacity limit or expert parallelism it runs SparseMoE's own forward."""

    @classmethod
    def of(cls, moe: SparseMoE) -> InferenceMoE:
        """The layer `moe` (its parameters and config) with this forward."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.cfg, new.ep = moe.cfg, moe.ep
        new.router, new.experts, new.shared_expert = moe.router, moe.experts, moe.shared_expert
        return new.train(moe.training)

    def _experts(self, x_sorted: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.experts, Experts):  # int8 experts: their own eager forward
            return self.experts(x_sorted, offs)
        w_in, w_out = self.experts.w_in, self.experts.w_out
        y = experts_ffn(x_sorted.to(w_in.dtype), w_in, w_out, offs, self.cfg.activation)
        return y.to(x_sorted.dtype)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> MoEOutput:
        cfg = self.cfg
        if self.training or torch.is_grad_enabled() or cfg.capacity_factor or self.ep is not None:
            return super().forward(x, modality_ids, mask)
        e, k, g = cfg.num_experts, cfg.top_k, cfg.num_groups
        tokens = x.reshape(-1, cfg.d_model)  # [N, D], padding included
        n = tokens.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.router.weight.float())  # [N, E]
        top_w, top_i = logits.softmax(-1).topk(k, dim=-1)  # [N, K]
        if cfg.normalize_top_k:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        real = mask.reshape(-1) if mask is not None else torch.ones(n, dtype=torch.bool, device=x.device)
        flat_e = torch.where(real.repeat_interleave(k), top_i.reshape(-1), e)  # padding -> sentinel expert E
        sorted_e, order = torch.sort(flat_e, stable=True)
        token = torch.arange(n, device=x.device).repeat_interleave(k)[order]  # [N*K]
        ones = torch.ones_like(flat_e)
        per_expert = torch.zeros(e + 1, dtype=flat_e.dtype, device=x.device).scatter_add_(0, flat_e, ones)[:e]
        y = self._experts(tokens.index_select(0, token), torch.cumsum(per_expert, 0).to(torch.int32))
        weight = (top_w.reshape(-1) * real.repeat_interleave(k))[order]
        out = torch.zeros_like(tokens).index_add_(0, token, y * weight.to(y.dtype).unsqueeze(-1))
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens) * real.unsqueeze(-1).to(tokens.dtype)
        groups = modality_ids.reshape(-1) if modality_ids is not None else torch.zeros_like(real, dtype=torch.long)
        cell = torch.where(real.repeat_interleave(k), groups.repeat_interleave(k) * e + top_i.reshape(-1), g * e)
        by_group = torch.zeros(g * e + 1, dtype=flat_e.dtype, device=x.device).scatter_add_(0, cell, ones)
        by_group = by_group[:g * e].view(g, e) if modality_ids is not None else torch.zeros_like(by_group[:g * e])
        logits, top_i, top_w = _real_rows(mask, logits, top_i, top_w)
        zero = logits.new_zeros(())
        return MoEOutput(out=out.view(x.shape), aux_loss=zero, balance_loss=zero, z_loss=zero,
                         local_entropy_loss=zero, global_entropy_loss=zero, tokens_per_expert=per_expert,
                         modality_expert_counts=by_group.view(g, e), dropped_tokens=torch.zeros((), dtype=torch.long),
                         router_logits=logits, top_k_index=top_i, combine_weights=top_w)


# ----------------------------------------------------------------------------------------------------------------
# precision and compilation


def to_bf16(model: nn.Module) -> nn.Module:
    """bf16 weights for every linear layer, convolution and expert (routers stay fp32), and the model's forward
    under CPU autocast to bf16, in place."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, Experts)) and not isinstance(module, Router):
            module.to(torch.bfloat16)
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast_forward
    return model


def bf16_storage(model: nn.Module, keep_fp32: bool = False) -> int:
    """Round every weight matrix (a floating parameter of 2 or more dims: linear layers, convolutions, embeddings,
    experts; routers excepted, whose near ties decide the routing) to bfloat16, in place -> parameters rounded.
    `keep_fp32`: hold the rounded values in fp32 (what loading such a folder gives; to measure it), else in bf16
    (to be saved: half the file). Norms, biases, buffers stay fp32."""
    count = 0
    for module in model.modules():
        if isinstance(module, Router):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dim() >= 2:
                rounded = param.detach().to(torch.bfloat16)
                param.data = rounded.float() if keep_fp32 else rounded
                count += param.numel()
    return count


def use_inference_moe(model: nn.Module) -> None:
    """Every SparseMoE of the model's fusion blocks becomes an InferenceMoE (the same parameters)."""
    for block in model.modules():
        if isinstance(block, FusionBlock) and isinstance(block.ffn, SparseMoE):
            block.ffn = InferenceMoE.of(block.ffn)


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile (in place) each encoder and each fusion block with dynamic shapes; the first calls compile.
    `backend`: torch.compile's (the tests use "aot_eager", which traces the same graphs but runs them eagerly)."""
    use_inference_moe(model)
    # Dynamo keeps at most `recompile_limit` graphs per function (8), counting every block and model of the process
    # (batch 1, 2..15 and 16+ are three graphs each): past it, it would quietly run the function eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for encoder in model.encoders.values():
        encoder.compile(dynamic=True, backend=backend)
    for block in model.modules():
        if isinstance(block, FusionBlock):
            block.compile(dynamic=True, backend=backend)
    return model


def warm_up(model: nn.Module, batch_sizes: tuple[int, ...] = (1, 2, 32)) -> float:
    """Run the model on made-up inputs (each encoder's `example_input`) of two sizes, at each of `batch_sizes`, for
    every task, so that a compiled model compiles now and not at the first request -> seconds taken. Batch 1 gets a
    graph of its own (torch.compile specialises sizes 0 and 1), and a large batch can too (the convolutions' shape
    rules guard the batch size: 2..15 and 16 or more were two graphs for wav2vec2's), hence three sizes. The encoder
    caches are emptied after."""
    t0 = time.perf_counter()
    media = export_media(model)

    def sample(task: str, size: int) -> dict:
        inputs = {f: enc.example_input(f, size) for enc in model.encoders.values() for f in enc.cfg.sample_fields}
        return load_media_sample(model, f"warm-up-{size}", task, media=media,
                                 **{f: v for f, v in inputs.items() if v is not None})

    collator = model.collator(train=False)
    with torch.no_grad():
        for task in model.task_names:
            both = [sample(task, 1), sample(task, 2)]
            for size in batch_sizes:
                model(collator([both[i % 2] for i in range(size)]))
    model.cache_encoders(list(model.encoder_caches))
    return time.perf_counter() - t0


def prepare_inference(model: nn.Module, runtime: Runtime = "eager", quantize: Quantize = "none",
                      warm: bool = True) -> nn.Module:
    """The loaded (CPU, eval-mode) model set up for `runtime` and `quantize` (see the module docstring), in place;
    a compiled model is warmed up (`warm`) and `model.startup_s` records the seconds it took."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if runtime == "compiled" and quantize == "int8":
        raise ConfigError("--quantize int8 runs eager only (torch.ao's dynamic int8 layers do not compile): use "
                          "--runtime eager, or --quantize bf16 with --runtime compiled")
    if quantize == "int8":
        model = quantize_int8(model)
    elif quantize == "bf16":
        use_inference_moe(model)  # casts the experts' inputs to their dtype (SparseMoE's grouped matmul would not)
        model = to_bf16(model)
    model.startup_s = 0.0
    if runtime == "compiled":
        model = compile_model(model)
        if warm:
            model.startup_s = warm_up(model)
    return model


__all__ = ["QUANTIZE", "RUNTIMES", "InferenceMoE", "bf16_storage", "compile_model", "experts_ffn",
           "prepare_inference", "to_bf16", "use_inference_moe", "warm_up"]
