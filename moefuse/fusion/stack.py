"""The fusion stack over the concatenated tokens of all present modalities.

`kind: moe`   L pre-norm blocks: self-attention (key-padding mask) -> SparseMoE FFN (shared experts optional).
`kind: dense` the same blocks with a dense SwiGLU FFN of equal active compute (width top_k * d_expert).
`kind: concat` a late-fusion baseline: masked mean per modality, concatenated with presence flags, then an MLP.
Pre-norm residual blocks as in GPT-2 / nanoGPT; the MoE-in-place-of-FFN layout is GShard's and LIMoE's.

Token groups: the stack takes M modalities with ids 0..M-1 and one fusion token with id M, so the MoE routing
stats and the per-group LIMoE entropy losses run over G = M + 1 token groups (`FusionStack.num_groups`).

Shapes: B samples, T tokens per sample, D = d_model, M modalities, G = M + 1 token groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from moefuse.fusion.moe import DenseFFN, ExpertsConfig, MoEConfig, MoEOutput, SparseMoE
from moefuse.outputs import pytree_output


@dataclass
class FusionConfig(ExpertsConfig):
    """The `fusion:` section: the routed-expert fields of `ExpertsConfig` (d_model is the fusion width D, to which
    every encoder's tokens are projected) plus the stack's own."""

    config_key: ClassVar[str] = "fusion"

    kind: Literal["moe", "dense", "concat"] = "moe"
    """moe: sparse-MoE FFN blocks; dense: dense FFN blocks of equal active compute; concat: late-fusion MLP."""
    num_layers: int = 2
    """Number of fusion blocks L."""
    num_heads: int = 4
    """Attention heads per block (d_model must divide evenly)."""
    dropout: float = 0.1
    """Dropout on attention and FFN outputs."""
    shared_expert: bool = False
    """Add an always-on dense expert of width d_expert beside the routed ones (the dense baseline grows alike)."""
    pooling: Literal["cls", "mean", "modality"] = "cls"
    """Fused representation: cls = the fusion token's output; mean = the masked mean over all tokens; modality = the
    masked mean of each token group's tokens (the M modalities and the fusion token; zeros when absent),
    concatenated and projected to d_model, so that no modality is outweighed by another's token count (on AV-digits
    it did worse than mean: avdigits/NOTES.md)."""
    modality_dropout: float | dict[str, float] = 0.0
    """In training, drop each present modality of a sample with this probability (never all of them): one rate for
    every modality, or a rate per modality ({image: 0.2, audio: 0.2}; one not named is never dropped), e.g. to
    keep the question of a QA sample while its media are dropped."""
    modality_dropout_tasks: list[str] | None = None
    """The tasks whose samples get modality dropout; None = every task. Dropping a modality keeps the label right
    only where each remaining modality still carries the answer (the same digit seen and heard), not for a question
    about both (their sum)."""
    expert_parallel_size: int = 1
    """N ranks each MoE layer's experts are spread over in training (E / N experts per rank; N must divide E and
    the number of processes): tokens travel to their experts' ranks and back (`fusion.expert_parallel`). A layout,
    not an architecture: the export always holds all E experts, and loads in one process."""

    def __post_init__(self) -> None:
        self.check(self.d_model >= 8, "d_model", f"must be >= 8, got {self.d_model}")
        self.check_range("num_layers", 1, 256)
        self.check(self.num_heads >= 1 and self.d_model % self.num_heads == 0, "num_heads",
                   f"must divide d_model={self.d_model}, got {self.num_heads}")
        self.check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        rates = self.modality_dropout.values() if isinstance(self.modality_dropout, dict) else [self.modality_dropout]
        self.check(all(0.0 <= p < 1.0 for p in rates), "modality_dropout",
                   f"rates must be in [0, 1), got {self.modality_dropout}")
        self.check(self.expert_parallel_size >= 1, "expert_parallel_size",
                   f"must be >= 1, got {self.expert_parallel_size}")
        if self.expert_parallel_size > 1:
            self.check(self.kind == "moe", "expert_parallel_size", f"needs kind: moe (experts to spread), got kind "
                       f"{self.kind!r}; set fusion.expert_parallel_size=1")
            self.check(self.num_experts % self.expert_parallel_size == 0, "expert_parallel_size",
                       f"{self.expert_parallel_size} must divide num_experts={self.num_experts}")
        super().__post_init__()  # the expert fields, whatever the kind (a config may switch kinds later)

    def dropout_rates(self, modalities: list[str]) -> list[float]:
        """The modality dropout rate of each of these modalities."""
        p = self.modality_dropout
        return [p.get(m, 0.0) for m in modalities] if isinstance(p, dict) else [p] * len(modalities)

    def moe_config(self, num_groups: int) -> MoEConfig:
        """The MoEConfig of this stack's MoE layers: its expert fields, the shared expert of width d_expert when
        `shared_expert`, and the stack's G token groups."""
        return MoEConfig(**self.experts_fields(), num_groups=num_groups,
                         shared_expert_hidden=self.d_expert if self.shared_expert else 0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of x [B, T, D] over the tokens where mask [B, T] is True -> [B, D] (zeros where none is)."""
    w = mask.unsqueeze(-1).to(x.dtype)  # [B, T, 1]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


@dataclass
class FusionOutput:
    """The fused sequence, its pooled summary and the MoE losses and stats summed over layers."""

    tokens: torch.Tensor  # [B, T, D]
    pooled: torch.Tensor  # [B, D]
    aux_loss: torch.Tensor  # scalar, weighted MoE losses summed over layers (0 for dense/concat)
    moe: list[MoEOutput] = field(default_factory=list)  # one per MoE layer


@pytree_output
@dataclass
class BlockOutput:
    """One fusion block's result."""

    x: torch.Tensor  # [B, T, D] the block's output sequence
    moe: MoEOutput | None  # the MoE FFN's losses and stats; None for a dense FFN


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

    def __init__(self, cfg: FusionConfig, num_groups: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.kind == "moe":
            self.ffn = SparseMoE(cfg.moe_config(num_groups))
        else:  # equal active compute: K experts of width H are one FFN of width K * H
            width = cfg.top_k * cfg.d_expert + (cfg.d_expert if cfg.shared_expert else 0)
            self.ffn = DenseFFN(cfg.d_model, width, cfg.activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor) -> BlockOutput:
        """x [B, T, D], mask [B, T] bool (True = real token), modality_ids [B, T] group ids."""
        x = x + self.drop(self.attn(self.norm1(x), mask))
        h = self.norm2(x)
        if isinstance(self.ffn, SparseMoE):
            moe = self.ffn(h, modality_ids=modality_ids, mask=mask)
            return BlockOutput(x=x + self.drop(moe.out), moe=moe)
        return BlockOutput(x=x + self.drop(self.ffn(h)), moe=None)


class FusionStack(nn.Module):
    """Attention + FFN (MoE or dense) blocks over [fusion token; modality tokens], or the concat MLP.

    Args:
        cfg: the stack's hyper-parameters.
        num_modalities: M real modalities, with ids 0..M-1 in `modality_ids`; the fusion token has id M. The MoE
            routing stats, the LIMoE entropy losses and `pooling: modality` run over `num_groups` = M + 1 token
            groups; the concat baseline over the M modalities alone.
    """

    def __init__(self, cfg: FusionConfig, num_modalities: int):
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"FusionStack needs num_modalities >= 1, got {num_modalities}")
        self.cfg, self.num_modalities = cfg, num_modalities
        self.num_groups = num_modalities + 1  # the modalities and the fusion token
        d = cfg.d_model
        if cfg.kind == "concat":
            self.mlp = nn.Sequential(nn.Linear(num_modalities * (d + 1), 2 * d), nn.GELU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(2 * d, d))
        else:
            self.blocks = nn.ModuleList(FusionBlock(cfg, self.num_groups) for _ in range(cfg.num_layers))
            if cfg.pooling == "modality":
                self.pool_proj = nn.Linear(self.num_groups * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor) -> FusionOutput:
        """x [B, T, D] (position 0 is the fusion token), mask [B, T] bool, modality_ids [B, T] long in [0, M]."""
        if self.cfg.kind == "concat":
            return self._concat(x, mask, modality_ids)
        aux = x.new_zeros(())
        moes = []
        for block in self.blocks:
            step = block(x, mask, modality_ids)
            x = step.x
            if step.moe is not None:
                aux = aux + step.moe.aux_loss
                moes.append(step.moe)
        x = self.norm(x)
        return FusionOutput(tokens=x, pooled=self._pool(x, mask, modality_ids), aux_loss=aux, moe=moes)

    def _pool(self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """The normed fused tokens x [B, T, D] -> [B, D], by `cfg.pooling`."""
        if self.cfg.pooling == "cls":
            return x[:, 0]  # [B, D]
        if self.cfg.pooling == "modality":
            means, _ = self._group_means(x, mask, modality_ids, self.num_groups)
            return self.pool_proj(torch.cat(means, dim=-1))  # [B, G * D] -> [B, D]
        return masked_mean(x, mask)

    @staticmethod
    def _group_means(x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor, count: int
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """For ids 0..count-1: the masked mean of that group's tokens [B, D] (zeros where absent) and its presence
        flag [B, 1]."""
        means, present = [], []
        for m in range(count):
            w = (mask & (modality_ids == m)).unsqueeze(-1).to(x.dtype)  # [B, T, 1]
            n = w.sum(1)  # [B, 1]
            means.append((x * w).sum(1) / n.clamp_min(1.0))
            present.append((n > 0).to(x.dtype))
        return means, present

    def _concat(self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor) -> FusionOutput:
        """Late fusion over the M real modalities (the fusion token takes no part)."""
        means, present = self._group_means(x, mask, modality_ids, self.num_modalities)
        parts = [t for pair in zip(means, present) for t in pair]  # mean_0, flag_0, mean_1, flag_1, ...
        pooled = self.norm(self.mlp(torch.cat(parts, dim=-1)))  # [B, M * (D + 1)] -> [B, D]
        return FusionOutput(tokens=x, pooled=pooled, aux_loss=x.new_zeros(()))
