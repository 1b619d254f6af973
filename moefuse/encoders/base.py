"""The one encoder interface: every modality encoder returns tokens [B, T, D_enc] and a boolean mask [B, T].

Also the shared fine-tuning switch (full / frozen / LoRA through peft) that every encoder config carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from moefuse.configutil import check

Finetune = Literal["full", "frozen", "lora"]


@dataclass
class EncoderOutput:
    """Tokens of one modality for a batch."""

    tokens: torch.Tensor  # [B, T, D_enc]
    mask: torch.Tensor  # [B, T] bool, True = real token


def check_finetune(key: str, finetune: str, lora_r: int, lora_alpha: float, lora_dropout: float) -> None:
    """Shared `__post_init__` checks of the fine-tuning fields."""
    check(finetune in ("full", "frozen", "lora"), f"{key}.finetune", f"must be full, frozen or lora, got {finetune!r}")
    check(lora_r >= 1, f"{key}.lora_r", f"must be >= 1, got {lora_r}")
    check(lora_alpha > 0, f"{key}.lora_alpha", f"must be > 0, got {lora_alpha}")
    check(0.0 <= lora_dropout < 1.0, f"{key}.lora_dropout", f"must be in [0, 1), got {lora_dropout}")


def apply_finetune(
    model: nn.Module, finetune: Finetune, lora_targets: list[str], r: int, alpha: float, dropout: float
) -> nn.Module:
    """Full: train everything. Frozen: no gradients. LoRA (Hu et al. 2021): inject peft adapters into the
    `lora_targets` linear layers and train only those."""
    if finetune == "full":
        return model
    if finetune == "frozen":
        model.requires_grad_(False)
        return model
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets)
    model = inject_adapter_in_model(lora, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model
