"""Checkpoints and the exported model.

Resumable checkpoints (accelerate `save_state`: model, optimizer, scheduler, RNG; plus `trainer_state.json` with
the step and data position, and `checksums.json` with every file's size and sha256) are written into a hidden temp
folder and renamed into place, so a crash mid-write never leaves a broken checkpoint; `latest` and `best` are
pointer files replaced atomically. A checkpoint damaged later (a truncated file) is skipped with a warning and
the newest intact one is used instead.

The export is a self-contained folder that `evaluate` and `predict` load with no pickle:
    model.safetensors   the weights
    config.yaml         the resolved model config (encoders, fusion, heads, tasks with their vocabularies)
    <modality>/         each encoder's architecture files (`save_architecture`; weights are in model.safetensors):
                        text/ BERT config.json + tokenizer, image/ data_config.json (timm preprocessing),
                        audio/ wav2vec2 config.json
    export.json         provenance (step, metrics, training shards) and `media`: the settings the training shards
                        were built with (image size and fit, sample rate, limits), which `predict` applies to raw files
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moefuse.configutil import ConfigError, atomic_write_text, dumps_json, from_dict, sha256_file, to_dict
from moefuse.errors import UserError, naming
from moefuse.fusion.model import ModelConfig, MultimodalMoEModel, build_model
from moefuse.train import fsdp
from moefuse.train.calibrate import calibrate_run
from moefuse.train.expert_checkpoint import checkpoint_state
from moefuse.train.model_card import model_card

if TYPE_CHECKING:
    from moefuse.config import ExperimentConfig

EXPORT_FORMAT = 1
CHECKSUMS = "checksums.json"  # {file: [size, sha256]} of a checkpoint, checked before it is resumed


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


def _file_digests(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under `folder` (checksums.json itself excluded)."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        digests[path.relative_to(folder).as_posix()] = [path.stat().st_size, sha256_file(path)]
    return digests


def save_checkpoint(accelerator, ckpt_root: Path, step: int, trainer_state: dict, keep_last: int,
                    is_best: bool, write_shards: Callable[[Path], None] | None = None) -> Path:
    """accelerate.save_state into ckpt_root/step-XXXXXXX atomically, with checksums.json; update the pointers and
    prune old ones. `write_shards(folder)` runs on every process after save_state (each rank's own files: the
    expert shards of `expert_checkpoint`). A failed write (full disk, a file in the way) removes the temp folder
    and raises an OSError naming the checkpoint; the earlier checkpoints stay as they were."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    try:
        with naming(final, temp=tmp):
            if accelerator.is_main_process:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp), safe_serialization=True)
            if write_shards is not None:
                write_shards(tmp)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                atomic_write_text(tmp / "trainer_state.json", dumps_json(trainer_state, "trainer_state.json", indent=2))
                atomic_write_text(tmp / CHECKSUMS, json.dumps(_file_digests(tmp), indent=1))
                _replace_dir(tmp, final)
                atomic_write_text(ckpt_root / "latest", final.name)
                if is_best:
                    atomic_write_text(ckpt_root / "best", final.name)
    except Exception as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise
        raise OSError(errno.EIO, f"cannot write checkpoint {final.name}: {e}", str(final)) from e
    if accelerator.is_main_process:
        best = (ckpt_root / "best").read_text().strip() if (ckpt_root / "best").exists() else None
        steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
        for old in steps[:-keep_last]:
            if old.name != best:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def checkpoint_damage(path: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (a missing, truncated or changed file), or None when intact.
    Folders written before checksums.json existed get a structural check of their safetensors files."""
    if not (path / "trainer_state.json").is_file():
        return "no trainer_state.json (the write did not finish)"
    sums = path / CHECKSUMS
    if sums.is_file():
        try:
            expected = json.loads(sums.read_text())
        except ValueError as e:
            return f"{CHECKSUMS} is not valid JSON: {e}"
        actual = _file_digests(path)
        for name, (size, digest) in expected.items():
            if name not in actual:
                return f"{name} is missing"
            if actual[name][0] != size:
                return f"{name} is {actual[name][0]} bytes, {size} were written (truncated or replaced)"
            if actual[name][1] != digest:
                return f"{name} has changed since it was written (checksum mismatch)"
        return None
    for weights in path.rglob("*.safetensors"):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as e:
            return f"{weights.name} is damaged: {e}"
    return None


def intact_checkpoints(ckpt_root: Path, warn: bool = True) -> list[Path]:
    """Complete, undamaged step folders, newest first; each damaged one is named in a warning."""
    found = []
    for path in sorted(ckpt_root.glob("step-*"), reverse=True):
        if not path.is_dir() or not (path / "trainer_state.json").exists():
            continue  # unfinished writes are hidden .tmp folders; a step folder without state is not ours
        reason = checkpoint_damage(path)
        if reason is None:
            found.append(path)
        elif warn:
            warnings.warn(f"checkpoint {path} is damaged ({reason}); it is skipped", stacklevel=2)
    return found


def latest_checkpoint(ckpt_root: Path, warn: bool = True) -> Path | None:
    """The newest intact checkpoint (damaged newer ones are skipped with a warning), else None."""
    found = intact_checkpoints(ckpt_root, warn)
    return found[0] if found else None


def has_checkpoints(ckpt_root: Path) -> bool:
    """Whether any step folder (intact or not) exists: a run that must be resumed, not restarted."""
    return any(p.is_dir() for p in ckpt_root.glob("step-*"))


# ----------------------------------------------------------------------------------------------------------------
# export


def export_model(model: MultimodalMoEModel, out_dir: str | Path, extra: dict | None = None) -> Path:
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
            _replace_dir(tmp, out_dir)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise
        raise OSError(errno.EIO, f"cannot write the export: {e}", str(out_dir)) from e
    return out_dir


def _write_export(model: MultimodalMoEModel, tmp: Path, extra: dict | None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "moefuse", "version": str(EXPORT_FORMAT)})
    atomic_write_text(tmp / "config.yaml", yaml.safe_dump(to_dict(model.cfg), sort_keys=False))
    for modality, encoder in model.encoders.items():  # each encoder writes its own architecture files
        (tmp / modality).mkdir()
        encoder.save_architecture(tmp / modality)
    atomic_write_text(tmp / "export.json", dumps_json({"format": EXPORT_FORMAT, **(extra or {})}, "export.json",
                                                      indent=2))
    atomic_write_text(tmp / "README.md", model_card(model, extra))


def read_model_config(path: Path, config_type: type[ModelConfig] = ModelConfig) -> ModelConfig:
    """An export's config.yaml -> ModelConfig (or the `config_type` subclass that declares more modalities);
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


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  config_type: type[ModelConfig] = ModelConfig) -> MultimodalMoEModel:
    """Rebuild the model from an export folder: architecture from its configs, weights from safetensors. A
    damaged or mismatched folder is a ConfigError that names the file."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give the model/ folder a training run wrote")
    if not (path / "model.safetensors").is_file() or not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not an exported moefuse model (needs model.safetensors and config.yaml); "
                          f"give the model/ folder a training run wrote")
    cfg = read_model_config(path, config_type)
    try:
        model = build_model(cfg, arch_dir=path)
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
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# a run's export (the end of `moefuse train`, and `moefuse export RUN_DIR` to redo it)


def training_media(sources: list[str]) -> dict | None:
    """The `media` settings (image size and fit, sample rate, limits) the training shards were built with, from
    the first source with a dataset.json; None for shard patterns (predict then uses its defaults). Sources built
    with different settings get a warning: predict applies the first one's."""
    from moefuse.datasets import DataError, load_dataset_info

    found = []
    for spec in sources:
        try:
            info = load_dataset_info(spec)
        except DataError:
            continue  # a shard pattern: no dataset.json
        limits = {k: v for k, v in (info.get("build") or {}).items() if k in ("max_image_pixels", "max_audio_seconds")}
        if isinstance(info.get("media"), dict):
            found.append((spec, {**info["media"], **limits}))
    if not found:
        return None
    others = [spec for spec, media in found[1:] if media != found[0][1]]
    if others:
        warnings.warn(f"the training sources were built with different media settings ({found[0][0]} vs "
                      f"{', '.join(others)}); the export records {found[0][0]}'s for predict", stacklevel=2)
    return found[0][1]


def run_result(state: dict, metric: str) -> dict:
    """The summary of a run (results.json, export.json) from its trainer state."""
    keys = ("best_step", "best_metric", "samples_seen", "skipped_corrupt", "lost_samples", "skipped_other_task",
            "skipped_nonfinite")
    return {"steps": state["step"], "stop_reason": state.get("stop_reason") or "max_steps",
            "last_loss": state.get("last_loss"), "metric": metric, **{k: state.get(k) for k in keys}}


def _load_best(model: MultimodalMoEModel, ckpt_root: Path, state: dict, own: bool = True) -> int:
    """Load the best checkpoint's weights when they are not the model's own (`own`: the model holds the weights
    of the run's last step; else they are loaded from its checkpoint too); returns the step exported."""
    last, best_step = state["step"], state.get("best_step")
    step = last if best_step is None else best_step
    if step != last:
        best = ckpt_root / f"step-{step:07d}"
        reason = checkpoint_damage(best) if best.is_dir() else "it is gone"
        if reason is not None:
            warnings.warn(f"the best checkpoint {best} cannot be used ({reason}); exporting the weights of step "
                          f"{last} instead", stacklevel=2)
            step = last
    if step != last or not own:
        load_checkpoint_weights(model, ckpt_root / f"step-{step:07d}")
    return step


def export_run(model: MultimodalMoEModel, out: Path, state: dict, cfg: ExperimentConfig, own: bool = True) -> dict:
    """Export a run's best weights, calibrated on its validation split (`calibrate_run`), to out/model and write
    out/results.json; returns the result. `own`: the model holds the last step's weights (else every weight comes
    from the checkpoints: an expert-parallel run exports a full model built by `build_full_model`). A failed write
    leaves the checkpoints as they are, so `moefuse export OUT` can redo it."""
    step = _load_best(model, out / "checkpoints", state, own)
    try:  # sets each task's vote weights and temperature on the validation split, or None
        calibration = calibrate_run(model, cfg)
    except (UserError, OSError) as e:  # the validation data is gone or damaged: the weights are still worth a copy
        warnings.warn(f"the export is not calibrated (temperature 1, weights as trained): its validation data "
                      f"cannot be read: {e}", stacklevel=2)
        calibration = None
    result = run_result(state, cfg.train.metric)
    extra = {"step": step, "result": result, "final_val_metrics": state.get("last_val_metrics"),
             "calibration": calibration,
             "drop_modalities": list(cfg.data.drop_modalities), "train_shards": list(cfg.data.train_shards),
             "media": training_media(cfg.data.train_shards)}
    try:
        export_model(model, out / "model", extra)
        result.update(model_dir=str(out / "model"), final_val_metrics=state.get("last_val_metrics"))
        atomic_write_text(out / "results.json", dumps_json(result, "results.json", indent=2))
    except OSError as e:
        raise type(e)(e.errno, f"{e.strerror}; the run's checkpoints are intact: once this is fixed, redo the "
                      f"export with `moefuse export {out}`", e.filename) from e
    return result


def load_checkpoint_weights(model: MultimodalMoEModel, ckpt: Path) -> None:
    """A checkpoint's weights into a one-process model: model.safetensors (the expert shards of an expert-parallel
    run joined in), or the FSDP shards of a `train.fsdp` run."""
    if fsdp.is_sharded_checkpoint(ckpt):
        model.load_state_dict(fsdp.full_state(ckpt, model.state_dict()))
    else:
        model.load_state_dict(checkpoint_state(ckpt))


def build_full_model(cfg: ExperimentConfig) -> MultimodalMoEModel:
    """A run's model for one process, to load a checkpoint into: every expert (expert_parallel_size 1), and
    encoders without their init files (those only seed training; the checkpoint holds the weights)."""
    encoders = cfg.encoders
    encoders = replace(encoders, **{f.name: replace(getattr(encoders, f.name), init_file=None)
                                    for f in fields(encoders) if hasattr(getattr(encoders, f.name), "init_file")})
    model_cfg = cfg.model_config()
    return build_model(replace(model_cfg, encoders=encoders,
                               fusion=replace(model_cfg.fusion, expert_parallel_size=1)))


def load_run(out: Path) -> tuple[MultimodalMoEModel, dict, ExperimentConfig]:
    """A run folder -> (model with its newest intact checkpoint's weights, that trainer state, the run config)."""
    from moefuse.config import load_config

    cfg = load_config(out / "config.yaml")
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"{out / 'checkpoints'} holds no intact checkpoint to export; train (or --resume) first")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    model = build_full_model(cfg)
    try:
        load_checkpoint_weights(model, ckpt)
    except Exception as e:
        raise ConfigError(f"{ckpt / 'model.safetensors'} does not fit {out / 'config.yaml'}: {e}") from None
    return model, state, cfg


def load_inference_model(path: str | Path, device: str | torch.device = "cpu", int8: bool = False,
                         cache_encoders: list[str] | None = None) -> MultimodalMoEModel:
    """`load_exported`, then with `int8` the dynamic-int8 quantised model (CPU only), as evaluate, predict and serve
    use. `cache_encoders`: the modalities whose encoder outputs are reused for inputs seen before (None: those
    whose encoder was frozen in training, a fixed feature extractor that mostly sees repeated prompts)."""
    model = load_exported(path, device)
    if cache_encoders is None:
        cache_encoders = [m for m, enc in model.encoders.items() if enc.cfg.finetune == "frozen"]
    model.cache_encoders(cache_encoders)
    if int8:
        from moefuse.fusion.quant import quantize_int8

        model = quantize_int8(model)
    return model
