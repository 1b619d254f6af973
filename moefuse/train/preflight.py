"""What `moefuse train` checks before it writes anything or takes a step: the run folder can be written, the tasks
and their vocabularies agree with the shards, `train.metric` will exist, and a `--resume` asks for the run's own
config. Each failure is a ConfigError (or an OSError naming the path) that says what to change."""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from moefuse.config import ExperimentConfig
from moefuse.configutil import ConfigError, load_yaml, to_dict
from moefuse.datasets import DataError, collect_tasks
from moefuse.datasets.collate import IGNORE_INDEX
from moefuse.errors import naming
from moefuse.evaluation.loop import DATA_COUNTS
from moefuse.evaluation.metrics import metric_names
from moefuse.fusion.heads import TaskConfig

RESUMABLE_KEYS = ("train.output_dir", "train.max_steps", "train.eval_every", "train.save_every", "train.log_every",
                  "train.keep_last", "train.early_stopping_patience", "train.tensorboard", "train.eval_max_batches",
                  "train.record_sample_ids", "train.license", "data.num_workers", "data.eval_batch_size",
                  "data.val_shards", "data.val_split")
"""Config keys a `--resume` may change (where the run folder is now, how long to train, how to validate, log and
keep checkpoints, the export's license); any other difference from the run's saved config.yaml is refused before
anything is written."""


def check_parallel_layout(cfg: ExperimentConfig, world: int) -> None:
    """fusion.expert_parallel_size against the processes this run was started with (the config has checked it
    against num_experts): more than one process, and a number of them it divides; train.fsdp without expert
    parallelism or fp16."""
    n = cfg.fusion.expert_parallel_size
    if n > 1 and world == 1:
        raise ConfigError(f"fusion.expert_parallel_size={n} needs {n} or a multiple of {n} processes, this run has "
                          f"one: start it with `accelerate launch --multi_gpu --num_processes {n} -m moefuse train "
                          f"...`, or set fusion.expert_parallel_size=1")
    if world % n:
        raise ConfigError(f"fusion.expert_parallel_size={n} must divide the number of processes ({world}): start "
                          f"{n * max(1, world // n)} processes, or choose a size that divides {world}")
    if cfg.train.fsdp and n > 1:
        raise ConfigError(f"train.fsdp with fusion.expert_parallel_size={n}: the two do not combine yet; shard the "
                          f"experts (expert_parallel_size) or everything (fsdp), not both")
    if cfg.train.fsdp and cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.fsdp with train.mixed_precision=fp16: use bf16 (or no), which needs no loss "
                          "scaling of sharded gradients")


def check_output_dir(out: Path) -> None:
    """The run folder is a folder this process can write to (created if needed); else an OSError naming it."""
    with naming(out):
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "train.output_dir is a file, not a folder", str(out))
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
        finally:
            probe.unlink(missing_ok=True)


def _is_dataset(spec: str) -> bool:
    return spec.endswith("dataset.json") or Path(spec).is_dir()


def resolve_tasks(cfg: ExperimentConfig) -> list[TaskConfig]:
    """Tasks with vocabularies: from the config where given, else from the training shards' dataset.json. A
    configured vocabulary must hold every target the shards list for its task (else training would ignore them).
    A `tasks:` list may name a subset of the shards' tasks: the loader then skips (and counts) the others."""
    needs_data = not cfg.tasks or any(t.labels is None for t in cfg.tasks)
    try:
        found = collect_tasks(cfg.data.train_shards)
    except DataError:
        if needs_data or any(_is_dataset(s) for s in cfg.data.train_shards):
            raise
        found = {}  # shard patterns without dataset.json: targets are checked batch by batch instead
    wanted = cfg.tasks or [TaskConfig(name=n, type=v["type"]) for n, v in found.items()]
    tasks = []
    for t in wanted:
        if t.name not in found:
            if t.labels is None:
                raise ConfigError(f"tasks: task {t.name!r} is not in the training shards (they have: "
                                  f"{', '.join(found) or 'none'})")
        elif found[t.name]["type"] != t.type:
            raise ConfigError(f"{t.key('type')} is {t.type} but the shards hold it as {found[t.name]['type']}")
        elif t.labels is None:
            t = replace(t, labels=list(found[t.name]["vocabulary"]))
        else:
            lacking = [v for v in found[t.name]["vocabulary"] if v not in set(t.labels)]
            if lacking:
                raise ConfigError(f"{t.key('labels')} lacks {len(lacking)} target(s) the training shards hold "
                                  f"({', '.join(map(repr, lacking[:10]))}); add them, or leave labels out to take "
                                  f"the vocabulary from the shards")
        tasks.append(t)
    if not tasks:
        raise ConfigError("tasks: none configured and none found in data.train_shards")
    return tasks


def check_metric(cfg: ExperimentConfig, tasks: list[TaskConfig]) -> None:
    """`train.metric` names a metric validation will compute; early stopping needs validation data."""
    t = cfg.train
    if not cfg.data.val_shards:
        if t.early_stopping_patience is not None:
            raise ConfigError("train.early_stopping_patience needs validation data: set data.val_shards, or "
                              "early_stopping_patience: null")
        return
    names = [f"val/{n}" for n in metric_names({tk.name: tk.type for tk in tasks}, cfg.heads.num_heads)]
    names += ["val/dropped_fraction", *(f"val/{k}" for k in DATA_COUNTS)]  # what validate() adds
    if t.metric not in names:
        raise ConfigError(f"train.metric={t.metric!r} will not be computed for these tasks; choose one of "
                          f"{', '.join(names)}")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def check_resume_config(out: Path, cfg: ExperimentConfig) -> None:
    """A resume must ask for the run's saved config (RESUMABLE_KEYS aside), checked before anything is written."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {saved_path} is missing, so the run's config is unknown; start a new run "
                          f"in another train.output_dir")
    saved, requested = _flat(load_yaml(saved_path)), _flat(to_dict(cfg))
    differ = sorted(k for k in set(saved) | set(requested)
                    if saved.get(k) != requested.get(k) and k not in RESUMABLE_KEYS)
    if differ:
        shown = "; ".join(f"{k}: saved {saved.get(k)!r}, requested {requested.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"--resume: the requested config differs from the run's {saved_path} ({shown}"
                          f"{f'; and {len(differ) - 5} more' if len(differ) > 5 else ''}); resume with the saved "
                          f"config (`moefuse train {saved_path} --resume`), or start a new run in another "
                          f"train.output_dir. Only {', '.join(RESUMABLE_KEYS)} may change on resume")


def check_training_targets(batch: dict) -> None:
    """Every training target is in its task's vocabulary: one outside it would be silently ignored by the loss."""
    for sid, task, target, label in zip(batch["ids"], batch["tasks"], batch["targets"], batch["labels"].tolist()):
        if label == IGNORE_INDEX:
            what = "no target" if target is None else f"target {target!r}, which is not in the task's vocabulary"
            raise DataError(f"training sample {sid!r} of task {task!r} has {what}; fix the data, or give "
                            f"tasks.{task}.labels that include it (validation and test samples outside the "
                            f"vocabulary are counted instead)")


__all__ = ["RESUMABLE_KEYS", "check_metric", "check_output_dir", "check_parallel_layout", "check_resume_config",
           "check_training_targets", "resolve_tasks"]
