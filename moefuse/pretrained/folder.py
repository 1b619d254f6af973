"""The model folder: what `save_pretrained` writes and `from_pretrained`, `evaluate`, `predict` and `serve` load,
with no pickle.

    model.safetensors   the weights
    config.yaml         the resolved model config (encoders, fusion, heads, tasks with their vocabularies)
    <modality>/         each encoder's architecture files (`save_architecture`; weights are in model.safetensors):
                        text/ BERT config.json + tokenizer, image/ data_config.json (timm preprocessing),
                        audio/ wav2vec2 config.json
    export.json         provenance (step, metrics, training shards) and `media`: the settings the training shards
                        were built with (image size and fit, sample rate, limits), which `predict` applies to raw files
    README.md           the model card (`moefuse.pretrained.model_card`)

The format knows nothing of one model class: `load_exported` is given the class, which builds itself from its config
and the architecture files (`model_class.from_config(cfg, arch_dir)`), as transformers' `PreTrainedModel` does.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from moefuse.configutil import ConfigError, atomic_write_text, dumps_json, from_dict, replace_dir, to_dict
from moefuse.errors import naming
from moefuse.pretrained.model_card import model_card

if TYPE_CHECKING:
    from torch import nn

EXPORT_FORMAT = 1




def export_model(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the self-contained export folder atomically (temp folder, then rename). A failed write removes the
    temp folder and raises an OSError naming the export; an earlier export stays as it was."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    try:
        with naming(out_dir, temp=tmp):
            if out_dir.exists() and not out_dir.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of the export folder", str(out_dir))
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            _write_export(model, tmp, extra)
            replace_dir(tmp, out_dir)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise
        raise OSError(errno.EIO, f"cannot write the export: {e}", str(out_dir)) from e
    return out_dir


def _write_export(model: nn.Module, tmp: Path, extra: dict | None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "moefuse", "version": str(EXPORT_FORMAT)})
    atomic_write_text(tmp / "config.yaml", yaml.safe_dump(to_dict(model.cfg), sort_keys=False))
    for modality, encoder in model.encoders.items():  # each encoder writes its own architecture files
        (tmp / modality).mkdir()
        encoder.save_architecture(tmp / modality)
    atomic_write_text(tmp / "export.json", dumps_json({"format": EXPORT_FORMAT, **(extra or {})}, "export.json",
                                                      indent=2))
    atomic_write_text(tmp / "README.md", model_card(model, extra))


def read_model_config(path: Path, config_type: type) -> Any:
    """An export's config.yaml -> a `config_type` (the model class's config, or a subclass that declares more
    modalities);
    anything wrong is a ConfigError naming the file."""
    where = path / "config.yaml"
    try:
        data = yaml.safe_load(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{where} is not a valid YAML model config (Python tags are never loaded): {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping (the model config), got {type(data).__name__}")
    try:
        return from_dict(config_type, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_export_info(path: Path) -> dict:
    """An export's export.json (provenance, and the modalities the model was trained without); {} if absent."""
    where = path / "export.json"
    if not where.exists():
        return {}
    try:
        info = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{where} cannot be read as JSON: {e}") from None
    if not isinstance(info, dict) or not isinstance(info.get("drop_modalities", []), list):
        raise ConfigError(f"{where} must be a JSON object whose drop_modalities is a list")
    return info


def load_exported(path: str | Path, model_class: type[nn.Module], device: str | torch.device = "cpu",
                  config_type: type | None = None) -> Any:
    """Rebuild a `model_class` from an export folder: architecture from its configs
    (`model_class.from_config(cfg, arch_dir)`, the config read as `config_type`, by default the class's
    `config_class`), weights from safetensors. A damaged or mismatched folder is a ConfigError that names the
    file."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give the model/ folder a training run wrote")
    if not (path / "model.safetensors").is_file() or not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not an exported moefuse model (needs model.safetensors and config.yaml); "
                          f"give the model/ folder a training run wrote")
    cfg = read_model_config(path, config_type or model_class.config_class)
    try:
        model = model_class.from_config(cfg, arch_dir=path)
    except ConfigError:
        raise
    except Exception as e:  # transformers / timm / json on a damaged text/, image/ or audio/ file
        raise ConfigError(f"{path}: cannot rebuild the model from its architecture files: {type(e).__name__}: "
                          f"{e}") from None
    try:
        state = load_file(str(path / "model.safetensors"), device=str(device))
    except Exception as e:
        raise ConfigError(f"{path / 'model.safetensors'} is damaged (truncated or not safetensors): {e}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape edited in config.yaml
        raise ConfigError(f"{path / 'model.safetensors'} does not fit {path / 'config.yaml'} (was a size edited?): "
                          f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}") from None
    if missing or unexpected:
        raise ConfigError(f"{path}/model.safetensors does not match its config.yaml "
                          f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); "
                          f"the folder mixes files from different runs")
    model.export_info = read_export_info(path)  # what decides answers beyond the weights: media settings
    return model.to(device).eval()
