"""What `moefuse train` checks before it writes anything or takes a step: the run folder can be written, the tasks
and their vocabularies agree with the shards, `train.metric` will exist, and a `--resume` asks for the run's own
config. Each failure is a ConfigError (or an OSError naming the path) that says what to change.

Before all of that, the launch itself (`check_launch`, `check_process_group`): the processes a launcher started
must form one process group, else each would train alone into the same run folder."""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from moefuse.config import ExperimentConfig
from moefuse.configutil import ConfigError, load_yaml, to_dict
from moefuse.datasets import DataError, collect_tasks
from moefuse.datasets.collate import IGNORE_INDEX
from moefuse.datasets.loader import load_dataset_info
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


LAUNCH_HINT = ("start N processes with `accelerate launch --multi_gpu --num_processes N -m moefuse.train ...` "
               "(GPUs; on a machine without GPUs, gloo CPU processes; ACCELERATE_USE_CPU=1 keeps them on the CPU of a "
               "GPU machine), `accelerate launch --config_file configs/accelerate/cpu-2.yaml -m moefuse.train ...`, "
               "or `torchrun --standalone --nproc_per_node N -m moefuse.train ...`")
"""The launch commands that start processes forming one group (README.md, "Several GPUs or nodes")."""

PLUGINS = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP",
           "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
"""accelerate's engines, chosen by its launcher (`--use_deepspeed`, `--use_fsdp`, a config's distributed_type)
through these variables, which the Accelerator reads when it is built (and then imports the engine)."""

WORLD_VARS = (("WORLD_SIZE", "RANK"), ("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
              ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"))
"""How launchers tell a process the number of processes and its rank: torchrun and accelerate's multi-process
launcher (torch.distributed's env:// rendezvous), then the MPI launchers accelerate also reads."""


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r} in the environment is not an integer: unset it to train in "
                          f"one process, or {LAUNCH_HINT}") from None


def launch_world(environ: Mapping[str, str]) -> int:
    """The number of processes the launcher says this run has (1 without a launcher), after checking that its
    variables agree: a rank for the size and below it, LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE. A size left
    over from another launch, without its rank, is refused rather than guessed at."""
    world = 1
    for size_var, rank_var in WORLD_VARS:
        if size_var not in environ:
            continue
        size = _int_var(environ, size_var)
        if rank_var not in environ and size > 1:
            raise ConfigError(f"{size_var}={size} is set but {rank_var} is not: a variable left from another launch? "
                              f"Unset {size_var} to train in one process, or {LAUNCH_HINT}")
        rank = _int_var(environ, rank_var) if rank_var in environ else 0
        if size < 1 or not 0 <= rank < size:
            raise ConfigError(f"{rank_var}={rank} with {size_var}={size}: a rank must be in [0, {size_var}); "
                              f"{LAUNCH_HINT}")
        world = size
        break
    local = _int_var(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    local_rank = _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
    if not 1 <= local <= world or not 0 <= local_rank < local:
        raise ConfigError(f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local} with a world of {world} "
                          f"process(es): these must satisfy 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE; "
                          f"{LAUNCH_HINT}")
    return world


def check_launch(environ: Mapping[str, str], mixed_precision: str) -> int:
    """Before the Accelerator is built (it imports the engine accelerate's launcher chose, e.g. deepspeed): no
    accelerate engine, launcher variables that agree (`launch_world`), not accelerate's single-process launcher
    asked for several processes, and no launcher mixed precision other than train.mixed_precision (which the
    Accelerator is given, overriding the launcher's) -> the number of processes the launcher started.

    That launcher (`accelerate launch --num_processes N` without --multi_gpu on a machine without GPUs, `--cpu`,
    or a config with `use_cpu: true` or distributed_type MULTI_CPU, all without MPI) starts ONE process; it gives
    it MASTER_PORT (only when asked for several processes or machines) but no WORLD_SIZE."""
    for var, engine in PLUGINS.items():
        if environ.get(var, "false").lower() == "true":  # (what the Accelerator tests)
            raise ConfigError(
                f"{var}=true: accelerate's {engine} is not used by moefuse train (the model is sharded by moefuse "
                f"itself); set train.fsdp=true (FSDP2: parameters, gradients and AdamW state sharded, as ZeRO-3) or "
                f"fusion.expert_parallel_size=N, and {LAUNCH_HINT}")
    launched = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched not in ("no", mixed_precision):
        raise ConfigError(f"accelerate launch asks for {launched} mixed precision (--mixed_precision or its config "
                          f"file's mixed_precision) and train.mixed_precision={mixed_precision}: moefuse trains with "
                          f"train.mixed_precision; set it to {launched}, or launch with mixed precision 'no'")
    world = launch_world(environ)
    no_world = not any(size_var in environ for size_var, _ in WORLD_VARS)
    if no_world and "ACCELERATE_MIXED_PRECISION" in environ and "MASTER_PORT" in environ:
        raise ConfigError(
            f"accelerate launch started this single process though it was asked for several (MASTER_PORT="
            f"{environ['MASTER_PORT']} is set, WORLD_SIZE is not): without --multi_gpu, or with --cpu or "
            f"use_cpu, and without MPI, it starts one process. To train with several, {LAUNCH_HINT}; for one "
            f"process drop --num_processes (and unset MASTER_PORT)")
    return world


def check_process_group(world: int, num_processes: int, grouped: bool, engine: str) -> None:
    """After the Accelerator is built: the `world` processes the launcher started form one process group of that
    size (`grouped`: torch.distributed is initialised with that world size) as accelerate's `num_processes`."""
    if world > 1 and (num_processes != world or not grouped):
        raise ConfigError(
            f"the launcher started {world} processes, but accelerate set up {num_processes} "
            f"({engine}, no process group of {world}): each process would train alone into the same run folder. "
            f"{LAUNCH_HINT[0].upper()}{LAUNCH_HINT[1:]}")


def check_parallel_layout(cfg: ExperimentConfig, world: int) -> None:
    """fusion.expert_parallel_size against the processes this run was started with (the config has checked it
    against num_experts): more than one process, and a number of them it divides; train.fsdp on several
    processes, without expert parallelism or fp16."""
    n = cfg.fusion.expert_parallel_size
    if cfg.train.fsdp and world == 1:
        raise ConfigError("train.fsdp=true shards the model over several processes, and this run has one: start "
                          "2 or more with `accelerate launch --multi_gpu --num_processes 2 -m moefuse.train ...` "
                          "(or --config_file configs/accelerate/cpu-2.yaml on the CPU), or set train.fsdp=false")
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


def held_modalities(info: dict, split: str) -> Counter:
    """{modality: samples that hold it} in one split of a dataset.json (its `counts`: task -> "text+image" -> n)."""
    held: Counter = Counter()
    for combos in info.get("counts", {}).get(split, {}).values():
        for combo, n in combos.items():
            held.update({m: n for m in combo.split("+") if m})
    return held


def check_modalities(cfg: ExperimentConfig) -> None:
    """Every modality the training and validation shards hold is read by an encoder or removed by
    data.drop_modalities: otherwise the first batch that holds it stops training (the README's `encoders.audio=null`
    on audio-visual shards). Counted from each dataset.json; shard patterns without one are checked batch by batch
    by the collator, with the same advice."""
    readable = set(cfg.encoders.configured()) | set(cfg.data.drop_modalities)
    for key, split in (("train_shards", cfg.data.train_split), ("val_shards", cfg.data.val_split)):
        for spec in getattr(cfg.data, key):
            if not _is_dataset(spec):
                continue
            try:
                held = held_modalities(load_dataset_info(spec), split)
            except DataError:
                continue  # a missing or damaged dataset.json is named where the data is resolved
            unread = sorted(m for m in held if m not in readable)
            if unread:
                m, drop = unread[0], ", ".join([*cfg.data.drop_modalities, *unread])
                raise ConfigError(f"data.{key}: {spec} ({split} split) holds {held[m]} samples with {m}, but "
                                  f"encoders.{m} is null, so the model cannot read them: train without it with "
                                  f"data.drop_modalities=[{drop}], or configure encoders.{m}")


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


__all__ = ["LAUNCH_HINT", "RESUMABLE_KEYS", "check_launch", "check_metric", "check_modalities", "check_output_dir",
           "check_parallel_layout", "check_process_group", "check_resume_config", "check_training_targets",
           "held_modalities", "launch_world", "resolve_tasks"]
