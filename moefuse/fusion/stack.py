"""The fusion stack over the concatenated tokens of all present modalities.

`kind: moe`   L pre-norm blocks: self-attention (key-padding mask) -> SparseMoE FFN (shared experts optional).
`kind: dense` the same blocks with a dense SwiGLU FFN of equal active compute (width top_k * d_expert).
`kind: concat` a late-fusion baseline: masked mean per modality, concatenated with presence flags, then an MLP.
Pre-norm residual blocks as in GPT-2 / nanoGPT; the MoE-in-place-of-FFN layout is GShard's and LIMoE's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moefuse.configutil import check
from moefuse.fusion.moe import DenseFFN, MoEOutput, SparseMoE


@dataclass
class FusionConfig:
    kind: Literal["moe", "dense", "concat"] = "moe"
    """moe: sparse-MoE FFN blocks; dense: dense FFN blocks of equal active compute; concat: late-fusion MLP."""
    d_model: int = 128
    """Fusion width D; every encoder's tokens are projected to it."""
    num_layers: int = 2
    """Number of fusion blocks L."""
    num_heads: int = 4
    """Attention heads per block (d_model must divide evenly)."""
    dropout: float = 0.1
    """Dropout on attention and FFN outputs."""
    num_experts: int = 8
    """E routed experts per MoE layer."""
    top_k: int = 2
    """K experts per token: 1 = Switch, 2 = GShard/Mixtral."""
    d_expert: int = 256
    """Hidden width H of each expert; the dense baseline's FFN is top_k * d_expert wide."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """Expert (and dense FFN) MLP type."""
    normalize_top_k: bool = True
    """Renormalise the chosen experts' probabilities to sum to 1 (Mixtral)."""
    router_jitter: float = 0.0
    """Multiplicative uniform noise on the router input during training (Switch), 0 = off."""
    router_noise_std: float = 0.0
    """Additive Gaussian noise on router logits during training (noisy top-k), 0 = off."""
    capacity_factor: float | None = None
    """None = dropless; else each expert keeps ceil(cf * N * K / E) tokens and the overflow is dropped (counted)."""
    shared_expert: bool = False
    """Add an always-on dense expert of width d_expert beside the routed ones (the dense baseline grows alike)."""
    balance_coef: float = 0.01
    """Weight of the Switch load-balancing loss."""
    z_coef: float = 0.001
    """Weight of the ST-MoE router z-loss."""
    local_entropy_coef: float = 0.0
    """Weight of the LIMoE local (per-token) entropy loss, per modality."""
    global_entropy_coef: float = 0.0
    """Weight of the LIMoE global entropy loss (minus the entropy of a modality's mean routing), per modality."""
    pooling: Literal["cls", "mean", "modality"] = "cls"
    """Fused representation: cls = the fusion token's output; mean = the masked mean over all tokens; modality = the
    masked mean of each modality's tokens (zeros when absent), concatenated and projected to d_model, so that no
    modality is outweighed by another's token count (on AV-digits it did worse than mean: avdigits/NOTES.md)."""
    modality_dropout: float = 0.0
    """In training, drop each present modality of a sample with this probability (never all of them)."""
    backend: Literal["auto", "native", "loop"] = "auto"
    """Grouped-matmul kernel for the experts: auto = torch._grouped_mm where it has a kernel (on CPU only when no
    weight gradient is needed: the loop backward measured faster there), else the loop fallback."""

    def __post_init__(self) -> None:
        check(self.d_model >= 8, "fusion.d_model", f"must be >= 8, got {self.d_model}")
        check(self.num_layers >= 1, "fusion.num_layers", f"must be >= 1, got {self.num_layers}")
        check(self.num_heads >= 1 and self.d_model % self.num_heads == 0, "fusion.num_heads",
              f"must divide d_model={self.d_model}, got {self.num_heads}")
        check(0.0 <= self.dropout < 1.0, "fusion.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.num_experts >= 1, "fusion.num_experts", f"must be >= 1, got {self.num_experts}")
        check(1 <= self.top_k <= self.num_experts, "fusion.top_k",
              f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        check(self.d_expert >= 1, "fusion.d_expert", f"must be >= 1, got {self.d_expert}")
        check(self.capacity_factor is None or self.capacity_factor > 0, "fusion.capacity_factor",
              f"must be null (dropless) or > 0, got {self.capacity_factor}")
        check(0.0 <= self.modality_dropout < 1.0, "fusion.modality_dropout",
              f"must be in [0, 1), got {self.modality_dropout}")
        for name in ("router_jitter", "router_noise_std", "balance_coef", "z_coef", "local_entropy_coef",
                     "global_entropy_coef"):
            check(getattr(self, name) >= 0, f"fusion.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass
class FusionOutput:
    """The fused sequence, its pooled summary and the MoE losses and stats summed over layers."""

    tokens: torch.Tensor  # [B, T, D]
    pooled: torch.Tensor  # [B, D]
    aux_loss: torch.Tensor  # scalar, weighted MoE losses summed over layers (0 for dense/concat)
    moe: list[MoEOutput] = field(default_factory=list)  # one per MoE layer


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask (scaled dot-product attention)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).unbind(2)  # [B, T, h, d/h] each
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, h, T, d/h]
        attn_mask = mask[:, None, None, :]  # [B, 1, 1, T]: True = may attend to this key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # [B, T, D]


class FusionBlock(nn.Module):
    """x + attn(norm(x)); x + ffn(norm(x)) with the FFN either a SparseMoE or a dense FFN."""

    def __init__(self, cfg: FusionConfig, num_modalities: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.kind == "moe":
            self.ffn = SparseMoE(
                cfg.d_model, cfg.d_expert, cfg.num_experts, cfg.top_k, activation=cfg.activation,
                normalize_top_k=cfg.normalize_top_k, router_jitter=cfg.router_jitter,
                router_noise_std=cfg.router_noise_std, capacity_factor=cfg.capacity_factor,
                num_modalities=num_modalities, balance_coef=cfg.balance_coef, z_coef=cfg.z_coef,
                local_entropy_coef=cfg.local_entropy_coef, global_entropy_coef=cfg.global_entropy_coef,
                shared_expert_hidden=cfg.d_expert if cfg.shared_expert else 0, backend=cfg.backend,
            )
        else:  # equal active compute: K experts of width H are one FFN of width K * H
            width = cfg.top_k * cfg.d_expert + (cfg.d_expert if cfg.shared_expert else 0)
            self.ffn = DenseFFN(cfg.d_model, width, cfg.activation)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor
    ) -> tuple[torch.Tensor, MoEOutput | None]:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        h = self.norm2(x)
        if isinstance(self.ffn, SparseMoE):
            moe = self.ffn(h, modality_ids=modality_ids, mask=mask)
            return x + self.drop(moe.out), moe
        return x + self.drop(self.ffn(h)), None


class FusionStack(nn.Module):
    """Attention + FFN (MoE or dense) blocks over [fusion token; text; image; audio] tokens, or the concat MLP."""

    def __init__(self, cfg: FusionConfig, num_modalities: int):
        super().__init__()
        self.cfg, self.num_modalities = cfg, num_modalities
        if cfg.kind == "concat":
            d = cfg.d_model
            self.mlp = nn.Sequential(nn.Linear(num_modalities * (d + 1), 2 * d), nn.GELU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(2 * d, d))
        else:
            self.blocks = nn.ModuleList(FusionBlock(cfg, num_modalities) for _ in range(cfg.num_layers))
            if cfg.pooling == "modality":
                self.pool_proj = nn.Linear(num_modalities * cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor) -> FusionOutput:
        """x [B, T, D] (position 0 is the fusion token), mask [B, T] bool, modality_ids [B, T] long."""
        if self.cfg.kind == "concat":
            return self._concat(x, mask, modality_ids)
        aux = x.new_zeros(())
        moes = []
        for block in self.blocks:
            x, moe = block(x, mask, modality_ids)
            if moe is not None:
                aux = aux + moe.aux_loss
                moes.append(moe)
        x = self.norm(x)
        if self.cfg.pooling == "cls":
            pooled = x[:, 0]  # [B, D]
        elif self.cfg.pooling == "modality":
            means, _ = self._modality_means(x, mask, modality_ids)
            pooled = self.pool_proj(torch.cat(means, dim=-1))  # [B, M * D] -> [B, D]
        else:
            w = mask.unsqueeze(-1).to(x.dtype)  # [B, T, 1]
            pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return FusionOutput(tokens=x, pooled=pooled, aux_loss=aux, moe=moes)

    def _modality_means(self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Masked mean of each modality's tokens [B, D] (zeros where absent) and its presence flag [B, 1]."""
        means, present = [], []
        for m in range(self.num_modalities):
            w = (mask & (modality_ids == m)).unsqueeze(-1).to(x.dtype)  # [B, T, 1]
            count = w.sum(1)  # [B, 1]
            means.append((x * w).sum(1) / count.clamp_min(1.0))
            present.append((count > 0).to(x.dtype))
        return means, present

    def _concat(self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor) -> FusionOutput:
        means, present = self._modality_means(x, mask, modality_ids)
        parts = [t for pair in zip(means, present) for t in pair]  # mean_0, flag_0, mean_1, flag_1, ...
        pooled = self.norm(self.mlp(torch.cat(parts, dim=-1)))  # [B, M * (D + 1)] -> [B, D]
        return FusionOutput(tokens=x, pooled=pooled, aux_loss=x.new_zeros(()))
