"""The one encoder interface: every modality encoder returns tokens [B, T, D_enc] and a boolean mask [B, T].

Also the shared fine-tuning switch (full / frozen / LoRA through peft) that every encoder config carries, and the
`init_file` weights an encoder can start from (e.g. written by a per-modality pretraining run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from moefuse.configutil import ConfigError, atomic_write_bytes, check

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


def save_init_file(module: nn.Module, path: str | Path) -> None:
    """Write `module`'s state dict as safetensors, atomically (temp file, then rename), for `init_file`."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in module.state_dict().items()}))


def load_init_file(module: nn.Module, path: str, key: str) -> None:
    """Load a state dict written by `save_init_file` for exactly this architecture; anything else is an error
    that names the file and the config field `key`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: {file} does not exist or is not a file; write it first (for AV-digits: "
                          f"benchmarks/avdigits/probe_encoders.py --save) or set {key}: null")
    try:
        state = load_file(str(file))
    except SafetensorError as e:  # a file in another format
        raise ConfigError(f"{key}: {file} is not a safetensors file ({e}); point it at one written by "
                          f"save_init_file (probe_encoders.py --save)") from None
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        raise ConfigError(f"{key}: {file} does not fit this encoder: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ConfigError(f"{key}: {file} was written for another architecture (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); it must come from the same preset, conv_stem and frontend")
