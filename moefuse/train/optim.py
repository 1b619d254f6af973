"""The optimiser and the learning-rate schedule of a training run: AdamW with one learning rate per model part
(encoders, fusion, heads) and no weight decay on biases, norms and embeddings; linear warmup, then a cosine,
linear or constant decay down to `train.min_lr_ratio` of the peak at `train.max_steps`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moefuse.config import ExperimentConfig
from moefuse.fusion.model import MultimodalMoEModel


def param_groups(model: MultimodalMoEModel, cfg: ExperimentConfig) -> list[dict]:
    """Encoders / fusion (projections, embeddings, stack) / heads, each with its learning rate; no weight decay
    on biases, norms and embeddings (the usual AdamW practice, e.g. nanoGPT)."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "encoders" if name.startswith("encoders.") else "heads" if name.startswith("heads.") else "fusion"
        decay = p.dim() >= 2 and "embed" not in name and "fusion_token" not in name
        groups.setdefault((part, decay), []).append(p)
    lr = {"encoders": cfg.train.lr_encoders, "fusion": cfg.train.lr_fusion, "heads": cfg.train.lr_heads}
    return [{"params": ps, "lr": lr[part], "weight_decay": cfg.train.weight_decay if decay else 0.0, "name": part}
            for (part, decay), ps in sorted(groups.items())]


def lr_lambda(cfg: ExperimentConfig) -> Callable[[int], float]:
    """step -> the factor on each group's peak learning rate: warmup, then the configured decay."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return f


def build_optimizer(model: MultimodalMoEModel, cfg: ExperimentConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups` (each group keeps its part's name, for the lr/<part> log keys)."""
    return torch.optim.AdamW(param_groups(model, cfg), betas=tuple(cfg.train.betas or (0.9, 0.999)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ExperimentConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The warmup + decay schedule, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


__all__ = ["build_optimizer", "build_scheduler", "lr_lambda", "param_groups"]
