"""Checkpoints and the exported model.

Resumable checkpoints (accelerate `save_state`: model, optimizer, scheduler, RNG; plus `trainer_state.json` with
the step and data position) are written into a hidden temp folder and renamed into place, so a crash mid-write
never leaves a broken checkpoint; `latest` and `best` are pointer files replaced atomically.

The export is a self-contained folder that `evaluate` and `predict` load with no pickle:
    model.safetensors   the weights
    config.yaml         the resolved model config (encoders, fusion, heads, tasks with their vocabularies)
    text/               BERT config.json + tokenizer files (architecture only; weights are in model.safetensors)
    image/              data_config.json (timm preprocessing)
    audio/              wav2vec2 config.json
    export.json         provenance: step, metrics, dataset info, moefuse version
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from moefuse.configutil import ConfigError, atomic_write_text, from_dict, to_dict
from moefuse.fusion.model import ModelConfig, MultimodalMoEModel, build_model

EXPORT_FORMAT = 1


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp folder to its final name (replacing an old one) with renames only."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


# ----------------------------------------------------------------------------------------------------------------
# resumable checkpoints


def save_checkpoint(accelerator, ckpt_root: Path, step: int, trainer_state: dict, keep_last: int,
                    is_best: bool) -> Path:
    """accelerate.save_state into ckpt_root/step-XXXXXXX atomically; update pointers; prune old ones."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2))
        _replace_dir(tmp, final)
        atomic_write_text(ckpt_root / "latest", final.name)
        if is_best:
            atomic_write_text(ckpt_root / "best", final.name)
        best = (ckpt_root / "best").read_text().strip() if (ckpt_root / "best").exists() else None
        steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
        for old in steps[:-keep_last]:
            if old.name != best:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` points at, else the newest complete step folder, else None."""
    pointer = ckpt_root / "latest"
    if pointer.exists():
        path = ckpt_root / pointer.read_text().strip()
        if (path / "trainer_state.json").exists():
            return path
    complete = sorted(p for p in ckpt_root.glob("step-*") if (p / "trainer_state.json").exists())
    return complete[-1] if complete else None


# ----------------------------------------------------------------------------------------------------------------
# export


def export_model(model: MultimodalMoEModel, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the self-contained export folder atomically (temp folder, then rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "moefuse", "version": str(EXPORT_FORMAT)})
    atomic_write_text(tmp / "config.yaml", yaml.safe_dump(to_dict(model.cfg), sort_keys=False))
    enc = model.encoders
    if "text" in enc:
        (tmp / "text").mkdir()
        enc["text"].bert.config.save_pretrained(tmp / "text")
        enc["text"].tokenizer.save_pretrained(tmp / "text")
    if "image" in enc:
        (tmp / "image").mkdir()
        atomic_write_text(tmp / "image" / "data_config.json", json.dumps(enc["image"].data_config, indent=2))
    if "audio" in enc:
        (tmp / "audio").mkdir()
        enc["audio"].wav2vec2.config.save_pretrained(tmp / "audio")
    atomic_write_text(tmp / "export.json", json.dumps({"format": EXPORT_FORMAT, **(extra or {})}, indent=2))
    _replace_dir(tmp, out_dir)
    return out_dir


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> MultimodalMoEModel:
    """Rebuild the model from an export folder: architecture from its configs, weights from safetensors."""
    path = Path(path)
    if not (path / "model.safetensors").is_file() or not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not an exported moefuse model (needs model.safetensors and config.yaml); "
                          f"give the model/ folder a training run wrote")
    cfg = from_dict(ModelConfig, yaml.safe_load((path / "config.yaml").read_text()))
    model = build_model(cfg, arch_dir=path)
    state = load_file(str(path / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}/model.safetensors does not match its config.yaml "
                          f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); "
                          f"the folder mixes files from different runs")
    return model.to(device).eval()
