"""The model folder: what `save_pretrained` writes and `from_pretrained`, `evaluate`, `predict` and `serve` load,
with no pickle; laid out as a Hugging Face Hub model repository.

    config.json         the Hub's entry point: `model_type` ("moefuse"), `architectures` (the class), the moefuse
                        version, then the resolved model config (the same as config.yaml)
    config.yaml         the resolved model config (encoders, fusion, heads, tasks with their vocabularies): what
                        moefuse reads; config.json must agree with it (older folders have config.yaml alone)
    model.safetensors   the weights
    <modality>/         each encoder's architecture files (`save_architecture`; weights are in model.safetensors):
                        text/ BERT config.json + tokenizer, image/ data_config.json (timm preprocessing),
                        audio/ wav2vec2 config.json
    export.json         provenance (step, metrics, calibration, training shards), the card's license and datasets,
                        and `media`: the settings the training shards were built with (image size and fit, sample
                        rate, limits), which `predict` applies to raw files (`moefuse.pretrained.export_info`)
    README.md           the model card, with the Hub's YAML metadata (`moefuse.pretrained.model_card`)

Loading checks every file before anything is allocated, and names the file and the field of what is wrong (a
ConfigError): export.json by its schema; the config by its typed classes and their bounds; each encoder's files by
the encoder (`EncoderConfig.check_architecture`); then the model is built on the meta device (no memory) and every
tensor of the safetensors header (names, shapes and dtypes: the truth of what was saved) is checked against it,
before a byte of weights is read or a real parameter allocated.

The format knows nothing of one model class: `load_exported` is given the class, which builds itself from its config
and the architecture files (`model_class.from_config(cfg, arch_dir)`), as transformers' `PreTrainedModel` does.
"""

from __future__ import annotations

import errno
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moefuse.configutil import (
    ConfigError,
    atomic_write_file,
    atomic_write_text,
    dumps_json,
    from_dict,
    read_json_file,
    replace_dir,
    to_dict,
)
from moefuse.errors import naming
from moefuse.pretrained.export_info import EXPORT_FORMAT, ExportInfo, export_info, read_export_record
from moefuse.pretrained.model_card import model_card

if TYPE_CHECKING:
    from torch import nn

WEIGHTS, CONFIG_YAML, CONFIG_JSON, EXPORT_JSON = "model.safetensors", "config.yaml", "config.json", "export.json"
MODEL_TYPE = "moefuse"
"""config.json's `model_type` when the class names none (`model_class.model_type`)."""
MAX_CONFIG_BYTES = 64 << 20
"""The largest config.yaml or config.json read (a vocabulary of a million answers is about 20 MiB)."""
HUB_KEYS = ("model_type", "architectures", "moefuse_version")
"""The keys of config.json that are not the model config."""

# safetensors dtype names (the header's "dtype") -> torch dtypes
SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                      "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F32": torch.float32, "F64": torch.float64}


def export_model(model: nn.Module, out_dir: str | Path, extra: ExportInfo | dict | None = None) -> Path:
    """Write the self-contained export folder atomically (temp folder, then rename). `extra`: what export.json
    holds, checked first as loading checks it (a ConfigError names the field, and nothing is written). A failed
    write removes the temp folder and raises an OSError naming the export; an earlier export stays as it was."""
    out_dir = Path(out_dir)
    if isinstance(extra, dict):  # as it will be written: JSON types, non-finite numbers null (with a warning)
        extra = json.loads(dumps_json(extra, f"{out_dir / EXPORT_JSON}"))
    info = export_info(extra, f"the export record of {out_dir}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    try:
        with naming(out_dir, temp=tmp):
            if out_dir.exists() and not out_dir.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of the export folder", str(out_dir))
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            _write_export(model, tmp, info, out_dir.name)
            replace_dir(tmp, out_dir)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise
        raise OSError(errno.EIO, f"cannot write the export: {e}", str(out_dir)) from e
    return out_dir


def _write_export(model: nn.Module, tmp: Path, info: ExportInfo, name: str) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_file(tmp / WEIGHTS, lambda path: save_file(state, str(path), metadata={
        "format": "moefuse", "version": str(EXPORT_FORMAT)}))  # through the atomic writer: 0644 like any file
    config = to_dict(model.cfg)
    atomic_write_text(tmp / CONFIG_YAML, yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(tmp / CONFIG_JSON, dumps_json({**hub_fields(type(model)), **config}, CONFIG_JSON, indent=2))
    for modality, encoder in model.encoders.items():  # each encoder writes its own architecture files
        (tmp / modality).mkdir()
        encoder.save_architecture(tmp / modality)
    atomic_write_text(tmp / EXPORT_JSON, dumps_json(info.to_json(), EXPORT_JSON, indent=2))
    atomic_write_text(tmp / "README.md", model_card(model, info, name))


def hub_fields(model_class: type) -> dict:
    """What config.json says beside the model config, as transformers' configs do: the model type the Hub and
    AutoConfig-style tools read, the class (`architectures`) and the version of the library that wrote it."""
    try:
        version = metadata.version("moefuse")
    except metadata.PackageNotFoundError:
        version = None
    return {"model_type": getattr(model_class, "model_type", MODEL_TYPE), "architectures": [model_class.__name__],
            "moefuse_version": version}


# ----------------------------------------------------------------------------------------------------------------
# reading, each file checked


def read_model_config(path: Path, config_type: type) -> Any:
    """A model folder's config -> a `config_type` (the model class's config, or a subclass that declares more
    modalities): config.yaml, or config.json for a folder that has only that; anything wrong is a ConfigError naming
    the file and the key."""
    if (path / CONFIG_YAML).is_file():
        return _config_from_yaml(path / CONFIG_YAML, config_type)
    return _config_from_json(path / CONFIG_JSON, config_type, None)[0]


def _config_from_yaml(where: Path, config_type: type) -> Any:
    if where.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is {where.stat().st_size} bytes, over the {MAX_CONFIG_BYTES >> 20} MiB limit of a "
                          f"model config: it was replaced or damaged")
    try:
        data = yaml.safe_load(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{where} is not a valid YAML model config (Python tags are never loaded): {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping (the model config), got {type(data).__name__}")
    try:
        return from_dict(config_type, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _config_from_json(where: Path, config_type: type, model_type: str | None) -> tuple[Any, dict]:
    """config.json -> (the model config, the Hub fields); `model_type`: what it must say (None: any)."""
    data = read_json_file(where, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object (the model config), got {type(data).__name__}")
    hub = {k: data.pop(k) for k in HUB_KEYS if k in data}
    if model_type is not None and hub.get("model_type") != model_type:
        raise ConfigError(f"{where}: model_type: {hub.get('model_type')!r} is not a {model_type} model folder "
                          f"(expected model_type {model_type!r})")
    try:
        return from_dict(config_type, data), hub
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_config_json(path: Path, cfg: Any, model_class: type) -> None:
    """config.json, where there is one: its model_type is the class's, and its config is the one moefuse read (from
    config.yaml); a difference names the first key that differs."""
    where = path / CONFIG_JSON
    if not where.is_file():
        return
    model_type = getattr(model_class, "model_type", MODEL_TYPE)
    other, hub = _config_from_json(where, type(cfg), model_type)
    version, classes = hub.get("moefuse_version"), hub.get("architectures")
    if not (version is None or (isinstance(version, str) and len(version) <= 64)):
        raise ConfigError(f"{where}: moefuse_version: must be a version string or null, got {str(version)[:80]!r}")
    if not (classes is None or (isinstance(classes, list) and len(classes) <= 16
                                and all(isinstance(c, str) and 0 < len(c) <= 200 for c in classes))):
        raise ConfigError(f"{where}: architectures: must be a list of class names, got {str(classes)[:80]!r}")
    key = _first_difference(to_dict(cfg), to_dict(other))
    if key is not None:
        raise ConfigError(f"{where} and {path / CONFIG_YAML} disagree at {key}: the folder was edited by hand; "
                          f"config.yaml fits the weights, so make config.json say the same (or copy the folder again)")


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(k), b.get(k), f"{key}.{k}".lstrip("."))
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{key}[{i}]")
            if found is not None:
                return found
        return None
    return None if a == b else (key or "the top level")


def read_export_info(path: Path) -> dict:
    """An export's export.json as a plain object (provenance, media, the modalities the model was trained without),
    checked (`moefuse.pretrained.export_info`); the empty record's if absent."""
    return read_export_record(path).to_json()


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else \
        "complex" if dtype.is_complex else "integer"


def read_weights_header(where: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    """{tensor name: (shape, dtype)} from a safetensors file's header alone (no tensor is read); a damaged header,
    a truncated file or a dtype moefuse does not load is a ConfigError naming the file."""
    try:
        with safe_open(str(where), framework="pt") as f:
            meta = f.metadata() or {}
            header = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors' own errors: a bad header, offsets past the end of a truncated file
        raise ConfigError(f"{where} is damaged (truncated or not safetensors): {str(e)[:300]}") from None
    if meta.get("format") == "moefuse" and meta.get("version") not in [str(v) for v in range(1, EXPORT_FORMAT + 1)]:
        raise ConfigError(f"{where}: metadata version {str(meta.get('version'))[:20]!r} is not a format this moefuse "
                          f"reads (1 to {EXPORT_FORMAT})")
    unknown = {k: d for k, (_, d) in header.items() if d not in SAFETENSORS_DTYPES}
    if unknown:
        name, dtype = next(iter(unknown.items()))
        raise ConfigError(f"{where}: {name} is stored as {dtype}, which moefuse does not load (use one of "
                          f"{', '.join(SAFETENSORS_DTYPES)})")
    return {k: (shape, SAFETENSORS_DTYPES[d]) for k, (shape, d) in header.items()}


def check_weights(where: Path, skeleton: nn.Module, described_by: str) -> None:
    """Every tensor of the safetensors header against the state of `skeleton` (the model the config files describe,
    built on the meta device): the same names (after the model's own load hooks, e.g. a buffer older folders lack),
    the same shapes, and a dtype of the same kind (a float stored as an integer is refused; float16 for float32 is
    fine, as load_state_dict converts it). Nothing is read but the header."""
    header = read_weights_header(where)
    expected = skeleton.state_dict()
    for name, (shape, dtype) in header.items():
        if name not in expected:
            continue
        want = expected[name]
        if shape != list(want.shape):
            n = sum(1 for k, (s, _) in header.items() if k in expected and s != list(expected[k].shape))
            raise ConfigError(f"{where} does not fit the model {described_by} describe: {name} is {shape} in the file "
                              f"but {list(want.shape)} by the config ({n} tensor(s) differ; was a size edited, or do "
                              f"the files come from different models?)")
        if _kind(dtype) != _kind(want.dtype):
            raise ConfigError(f"{where}: {name} is stored as {str(dtype).removeprefix('torch.')} but the model holds "
                              f"{_kind(want.dtype)} {str(want.dtype).removeprefix('torch.')} there: the file was "
                              f"rewritten by something else; export the model again")
    fake = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in header.items()}
    missing, unexpected = skeleton.load_state_dict(fake, strict=False, assign=True)
    if missing or unexpected:
        raise ConfigError(f"{where} does not match the model {described_by} describe (missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}): the folder mixes files from different models")


# ----------------------------------------------------------------------------------------------------------------
# loading


def _build(model_class: type[nn.Module], cfg: Any, path: Path, device: str | torch.device) -> nn.Module:
    """`model_class.from_config(cfg, arch_dir=path)` on `device` ("meta": shapes only, no memory)."""
    try:
        with torch.device(device):
            return model_class.from_config(cfg, arch_dir=path)
    except ConfigError:
        raise
    except Exception as e:  # transformers / timm / tokenizers on a damaged text/, image/ or audio/ file
        raise ConfigError(f"{path}: cannot rebuild the model from its architecture files: {type(e).__name__}: "
                          f"{str(e)[:300]}") from None


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give the model/ folder a training run wrote")
    if (path / "ensemble.json").is_file() and not (path / WEIGHTS).is_file():
        raise ConfigError(f"{path} is an ensemble folder (ensemble.json), not one model: load it with "
                          f"EnsembleModel.from_pretrained or moefuse.load_inference_model")
    if not (path / WEIGHTS).is_file() or not ((path / CONFIG_YAML).is_file() or (path / CONFIG_JSON).is_file()):
        raise ConfigError(f"{path} is not an exported moefuse model (needs {WEIGHTS} and {CONFIG_JSON} or "
                          f"{CONFIG_YAML}); give the model/ folder a training run wrote")


def load_exported(path: str | Path, model_class: type[nn.Module], device: str | torch.device = "cpu",
                  config_type: type | None = None) -> Any:
    """Rebuild a `model_class` from an export folder: architecture from its configs
    (`model_class.from_config(cfg, arch_dir)`, the config read as `config_type`, by default the class's
    `config_class`), weights from safetensors, and the folder's export.json kept as `model.export_info`. Every file
    is checked first (export.json, the config, the architecture files, the weights' header against the model built
    on the meta device, and the export record against the model by `model_class.check_export_info` where the class
    has one); a damaged or mismatched folder is a ConfigError that names the file and the field."""
    path = Path(path)
    _check_folder(path)
    info = read_export_record(path)
    cfg = read_model_config(path, config_type or model_class.config_class)
    config_file = CONFIG_YAML if (path / CONFIG_YAML).is_file() else CONFIG_JSON
    skeleton = _build(model_class, cfg, path, "meta")
    check_weights(path / WEIGHTS, skeleton, f"{path / config_file} and the encoders' architecture files")
    if hasattr(skeleton, "check_export_info"):
        try:
            skeleton.check_export_info(info)
        except ConfigError as e:
            raise ConfigError(f"{path / EXPORT_JSON}: {e}") from None
    del skeleton
    if config_file == CONFIG_YAML:
        check_config_json(path, cfg, model_class)
    model = _build(model_class, cfg, path, "cpu")
    try:
        state = load_file(str(path / WEIGHTS), device=str(device))
    except Exception as e:
        raise ConfigError(f"{path / WEIGHTS} is damaged (truncated or not safetensors): {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # checked on the header already; kept as a guard
        raise ConfigError(f"{path / WEIGHTS} does not match its {config_file} (missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}); the folder mixes files from different runs")
    model.export_info = info
    return model.to(device).eval()
