"""A training run's checkpoints, and its export (the model folder of `moefuse.pretrained.folder`).

Resumable checkpoints (accelerate `save_state`: model, optimizer, scheduler, RNG; plus `trainer_state.json` with
the step and data position, and `checksums.json` with every file's size and sha256) are written into a hidden temp
folder and renamed into place, so a crash mid-write never leaves a broken checkpoint; `latest` and `best` are
pointer files replaced atomically. A checkpoint damaged later (a truncated file) is skipped with a warning and
the newest intact one is used instead.

`export_run` writes the run's best weights, calibrated on its validation split, as a model folder;
`load_run` reads a run's newest checkpoint back into a one-process model (`moefuse export`).
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from moefuse.configutil import ConfigError, atomic_write_text, dumps_json, replace_dir, sha256_file
from moefuse.errors import UserError, naming
from moefuse.fusion.model import MultimodalMoEModel, build_model
from moefuse.pretrained.export_info import MediaInfo
from moefuse.pretrained.folder import export_model
from moefuse.train import fsdp
from moefuse.train.calibrate import calibrate_run
from moefuse.train.distill import distillation_record
from moefuse.train.expert_checkpoint import checkpoint_state

if TYPE_CHECKING:
    from moefuse.config import ExperimentConfig

CHECKSUMS = "checksums.json"  # {file: [size, sha256]} of a checkpoint, checked before it is resumed


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
                replace_dir(tmp, final)
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
        if isinstance(info.get("media"), dict):  # the settings a model folder records (MediaInfo's fields)
            media = {k: v for k, v in {**info["media"], **limits}.items() if k in MediaInfo.__dataclass_fields__}
            found.append((spec, media))
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


def export_run(model: MultimodalMoEModel, out: Path, state: dict, cfg: ExperimentConfig, own: bool = True,
               progress: bool = True) -> dict:
    """Export a run's best weights, calibrated on its validation split (`calibrate_run`), to out/model and write
    out/results.json; returns the result. `own`: the model holds the last step's weights (else every weight comes
    from the checkpoints: an expert-parallel run exports a full model built by `build_full_model`). A failed write
    leaves the checkpoints as they are, so `moefuse export OUT` can redo it."""
    step = _load_best(model, out / "checkpoints", state, own)
    try:  # sets each task's vote weights and temperature on the validation split, or None
        calibration = calibrate_run(model, cfg, progress)
    except (UserError, OSError) as e:  # the validation data is gone or damaged: the weights are still worth a copy
        warnings.warn(f"the export is not calibrated (temperature 1, weights as trained): its validation data "
                      f"cannot be read: {e}", stacklevel=2)
        calibration = None
    result = run_result(state, cfg.train.metric)
    extra = {"step": step, "result": result, "final_val_metrics": state.get("last_val_metrics"),
             "calibration": calibration,
             "drop_modalities": list(cfg.data.drop_modalities), "train_shards": list(cfg.data.train_shards),
             "media": training_media(cfg.data.train_shards), "license": cfg.train.license,
             "distillation": distillation_record(cfg.distill, state)}
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
