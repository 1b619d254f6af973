"""The training recipe behind `moefuse train`: `train(cfg)` runs a `TrainRecipe`, whose methods are its steps.

Top to bottom: setup (load the checked config with the tasks' vocabularies from the shards' dataset.json, build
the model, AdamW with per-part learning rates and a warmup+decay schedule, stream shards: each process reads its
own split, no rank-0 dispatch; restore a checkpoint on --resume) -> train (the epoch loop, one step per
micro-batch: gradient accumulation, clipping and mixed precision) -> validate periodically (per task and per
head, routing heatmap), best selection and early stopping -> atomic resumable checkpoints -> export a
self-contained model folder. With a `distill:` teacher, setup also runs the teacher once over the training split,
and each step adds the distillation term to the loss (`moefuse.train.distill`, Hinton et al. 2015).

Batches mix tasks: the loaders interleave samples of every task, and the loss is the sum over the tasks present
(each task's loss summed over its voting heads, times its loss_weight) plus the MoE auxiliary losses.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from moefuse.config import ExperimentConfig, save_config
from moefuse.configutil import ConfigError
from moefuse.datasets import DataError, build_eval_loader, build_train_loader
from moefuse.errors import naming
from moefuse.evaluation.loop import DATA_COUNTS, evaluate_loader, merge_stats, routing_summary, to_device
from moefuse.evaluation.metrics import compute_metrics
from moefuse.evaluation.plots import save_routing_heatmap
from moefuse.fusion import expert_parallel
from moefuse.fusion.model import ModelOutput, MultimodalMoEModel, build_collator, build_model
from moefuse.progress import progress, write
from moefuse.train import expert_checkpoint, fsdp
from moefuse.train.checkpoint import (
    build_full_model,
    export_run,
    has_checkpoints,
    intact_checkpoints,
    run_result,
    save_checkpoint,
)
from moefuse.train.config import TrainConfig
from moefuse.train.distill import (
    DistilledOutput,
    TeacherTargets,
    check_teacher_folder,
    distilled_output,
    distilled_tasks,
    load_teacher,
    teacher_pass,
)
from moefuse.train.metrics_log import LogWindow, MetricsLog
from moefuse.train.optim import build_optimizer, build_scheduler
from moefuse.train.preflight import (
    check_launch,
    check_metric,
    check_modalities,
    check_output_dir,
    check_parallel_layout,
    check_process_group,
    check_resume_config,
    check_training_targets,
    resolve_tasks,
)
from moefuse.train.state import TrainerState, preserved_rng


def train(cfg: ExperimentConfig, resume: bool = False, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train, validate, checkpoint and export; returns the final summary (also written to results.json).

    `stop_after` ends the run right after the checkpoint of that step, as if killed (for resume tests).
    `progress`: a bar on a terminal, a line per interval in a log (`moefuse.progress`); False for none."""
    return TrainRecipe(cfg, resume=resume, stop_after=stop_after, show_progress=progress).run()


def prepare_run(cfg: ExperimentConfig, resume: bool, main: bool) -> ExperimentConfig:
    """Everything checked before anything is written: checkpoints vs --resume, the tasks and their vocabularies
    (and the model config that names them), train.metric, distill.teacher a folder, on resume that the config is
    the run's own, and last the run folder, created only then. Then config.yaml."""
    out = Path(cfg.train.output_dir)
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is empty: give the folder build-shards wrote (or shard URLs)")
    ckpt_root = out / "checkpoints"
    if not resume and has_checkpoints(ckpt_root):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose "
                          f"another train.output_dir")
    if resume and not has_checkpoints(ckpt_root):
        raise ConfigError(f"--resume: no checkpoint under {ckpt_root}; start the run without --resume")
    tasks = resolve_tasks(cfg)
    check_metric(cfg, tasks)
    check_modalities(cfg)
    check_teacher_folder(cfg.distill)
    cfg = replace(cfg, tasks=tasks)
    if resume:
        check_resume_config(out, cfg)
    if main:
        check_output_dir(out)
        save_config(cfg, out / "config.yaml")
    return cfg


class TrainRecipe:
    """One training run, as named steps: `run` = `setup` -> `train` (epochs of `train_step`s, each optimizer step
    ending in `end_step`: `log_step`, `validate_and_select`, `checkpoint`) -> `export`.

    Every process runs the same steps in the same order (the collectives - gathers, the checkpoint's barriers -
    stay in step); printing, logging and the export happen on the main process only. The RNG draws are in a
    fixed order (seed, model init, data), so that a resumed run replays the uninterrupted one exactly."""

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, stop_after: int | None = None,
                 show_progress: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.stop_after = stop_after
        self.show_progress = show_progress  # the progress of training and calibration (`moefuse.progress`)
        self.out = Path(cfg.train.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.state = TrainerState()
        self.done_because: str | None = None  # on resume: why the restored run has nothing left to train
        self.stopped = False  # stop_after ended the run
        self.ep: expert_parallel.ExpertParallel | None = None  # this rank's expert-parallel groups (N > 1)
        self.last_batch: dict | None = None  # the latest training batch: validation's filler (`evaluate_loader`)
        self.targets: TeacherTargets | None = None  # the teacher's answers on every training sample (distill:)
        self.missing_rows = 0  # this process's training rows without a teacher target, since setup

    @property
    def t(self) -> TrainConfig:
        return self.cfg.train

    def run(self) -> dict:
        """setup -> train -> export; -> the run's summary ({"stopped_after", "last_loss"} when stop_after hit)."""
        self.setup()
        self.train()
        if self.stopped:  # as if killed: no export
            self.log.close()
            return {"stopped_after": self.state.step, "last_loss": self.state.last_loss}
        return self.export()

    # ------------------------------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        """The accelerator, the checked config (`prepare_run`), the seed, model and optimiser, the loaders, the
        restored state on resume, and the metrics log."""
        from accelerate.utils import set_seed

        self.setup_accelerator()
        self.cfg = prepare_run(self.cfg, self.resume, self.main)
        if self.main:
            acc = self.accelerator
            print(f"training on {acc.device} with {self.world} process{'es' if self.world > 1 else ''} "
                  f"({acc.distributed_type.value}, mixed precision {acc.mixed_precision})")
        set_seed(self.t.seed)
        self.setup_model()
        self.setup_data()
        self.state = self.restore() if self.resume else TrainerState()
        self.done_because = self.state.finished_because(self.t.max_steps) if self.resume else None
        if self.done_because is None:  # (a finished run is only exported again: no teacher needed)
            self.setup_teacher()
        if self.done_because is not None and self.main:
            print(f"the run in {self.out} has already finished at step {self.state.step}: {self.done_because}; "
                  f"nothing to train, its model is exported again")
        self.log = MetricsLog(self.out, self.t.tensorboard, self.main)

    def setup_accelerator(self) -> None:
        """accelerate's Accelerator (mixed precision, gradient accumulation); this process's rank and the world.

        The launch is checked first (`check_launch`: no accelerate engine, launcher variables that agree; the
        sharding options against its number of processes) and the process group after (`check_process_group`).
        Processes launched on a machine without an accelerator run on the CPU (gloo): accelerate would otherwise
        make each of them a separate one-process run unless ACCELERATE_USE_CPU=1 is set."""
        from accelerate import Accelerator, DistributedDataParallelKwargs

        world = check_launch(os.environ, self.t.mixed_precision)
        check_parallel_layout(self.cfg, world)
        self.accelerator = Accelerator(
            cpu=world > 1 and not torch.accelerator.is_available(),
            mixed_precision=self.t.mixed_precision,
            gradient_accumulation_steps=self.t.grad_accum,
            # The schedule counts optimizer steps (`train_step` steps it): accelerate's own stepping would advance
            # it once per process per step, finishing warmup and decay N times too early on N processes.
            step_scheduler_with_optimizer=False,
            # A batch may lack a modality or a task entirely; their parameters then get no gradient this step.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        dist = torch.distributed
        grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() == world
        check_process_group(world, self.accelerator.num_processes, grouped, self.accelerator.distributed_type.value)
        self.main = self.accelerator.is_main_process
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes

    def setup_model(self) -> None:
        """The model (its experts sharded when expert-parallel, or all of it under train.fsdp), its training and
        evaluation collators, AdamW and the schedule, prepared by accelerate (DDP) unless FSDP-sharded."""
        cfg, t = self.cfg, self.t
        model = build_model(cfg.model_config())
        self.train_collator = build_collator(model, train=True, seed=t.seed, drop_modalities=cfg.data.drop_modalities)
        self.eval_collator = build_collator(model, train=False, seed=t.seed, drop_modalities=cfg.data.drop_modalities)
        if cfg.fusion.expert_parallel_size > 1:
            self.shard_experts(model)
        if t.fsdp:  # sharded by the recipe, not wrapped by accelerate (whose FSDP plugin needs accelerators)
            fsdp.shard_model(model.to(self.accelerator.device))
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        if t.fsdp:
            self.model = self.raw_model = model
            self.optimizer, self.scheduler = optimizer, scheduler
            return
        # The loaders are NOT passed to accelerate.prepare: each process streams its own shard split (webdataset
        # split by rank/worker), which avoids accelerate's rank-0 dispatch of iterable datasets (accelerate#3547).
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.raw_model: MultimodalMoEModel = self.accelerator.unwrap_model(self.model)

    def shard_experts(self, model: MultimodalMoEModel) -> None:
        """Expert parallelism: keep this rank's experts, and keep DDP off them (`reduce_expert_grads` reduces
        them over their replicas instead)."""
        from torch.nn.parallel import DistributedDataParallel

        self.ep = expert_parallel.init_expert_parallel(self.cfg.fusion.expert_parallel_size)
        expert_parallel.shard_experts(model, self.ep)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, expert_parallel.expert_param_names(model))

    def setup_data(self) -> None:
        """This process's training loader, and the validation loader (None without data.val_shards)."""
        d, t, rank, world, raw_model = self.cfg.data, self.t, self.rank, self.world, self.raw_model
        names = [tk.name for tk in self.cfg.tasks]
        decode = raw_model.decode_options()  # e.g. the audio encoder's sample rate, for the shards' decoding
        self.loader = build_train_loader(d, self.train_collator, rank=rank, world_size=world, seed=t.seed,
                                         tasks=names, **decode)
        # Built now, so that a missing or broken validation set stops the run before its first step.
        self.val_loader = build_eval_loader(d, self.eval_collator, rank=rank, world_size=world,
                                            tasks=names, **decode) if d.val_shards else None

    def setup_teacher(self) -> None:
        """Distillation (`moefuse.train.distill`), nothing without distill.teacher: the teacher loaded (every file
        checked), its tasks checked against the student's, run once over the training split (each process its
        part, gathered to every process; the RNG untouched), and freed. Its answers are `self.targets`."""
        from accelerate.utils import gather_object

        d, acc = self.cfg.distill, self.accelerator
        if d.teacher is None:
            return
        with preserved_rng():
            teacher = load_teacher(d, acc.device)
            tasks = distilled_tasks(d, teacher.cfg.tasks, self.cfg.tasks)
            data = replace(self.cfg.data, eval_batch_size=d.batch_size)
            loader = build_eval_loader(data, teacher.collator(train=False), sources=data.train_shards,
                                       split=data.train_split, rank=self.rank, world_size=self.world, tasks=tasks,
                                       **teacher.decode_options())
            parts = teacher_pass(teacher, loader, tasks, acc.device, progress=self.main and self.show_progress)
        del teacher, loader
        if acc.device.type == "cuda":
            torch.cuda.empty_cache()
        self.targets = TeacherTargets.from_parts(gather_object(parts))
        done = self.state.distillation or {}
        self.state.distillation = {"tasks": tasks, "samples": self.targets.samples,
                                   "missing_rows": done.get("missing_rows", 0)}
        if self.main:
            print(f"distillation: teacher {d.teacher} answered {self.targets.samples} training samples once "
                  f"({', '.join(tasks)}; {self.targets.nbytes / 2**20:.1f} MiB of targets); temperature "
                  f"{d.temperature:g}, weight {d.weight:g}")

    def restore(self) -> TrainerState:
        """Load the newest intact checkpoint (damaged or unloadable ones are skipped with a warning) -> its
        state; the model, optimizer, scheduler and RNG states are restored in place."""
        for ckpt in intact_checkpoints(self.ckpt_root):
            expert_checkpoint.check_layout(ckpt, self.cfg.fusion.expert_parallel_size)
            try:
                self.accelerator.load_state(str(ckpt))
                if self.ep is not None:
                    expert_checkpoint.load_expert_shard(ckpt, self.raw_model, self.optimizer, self.ep)
                if self.t.fsdp:
                    fsdp.load_sharded(ckpt, self.model, self.optimizer, self.scheduler)
                state = TrainerState.from_dict(json.loads((ckpt / "trainer_state.json").read_text()))
            except Exception as e:
                warnings.warn(f"checkpoint {ckpt} cannot be loaded ({type(e).__name__}: {e}); trying an earlier "
                              f"one", stacklevel=2)
                continue
            if self.main:
                print(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch}, "
                      f"batch {state.batches_in_epoch})")
            return state
        raise ConfigError(f"--resume: every checkpoint under {self.ckpt_root} is damaged; start a new run in "
                          f"another train.output_dir")

    # ------------------------------------------------------------------------------------------------------------
    # train: the epoch loop -> a step per micro-batch

    def train(self) -> None:
        """Epochs until max_steps, early stopping or stop_after (nothing on a finished run), with a progress bar.
        A resumed run starts in the saved epoch, at the saved batch."""
        self.model.train()
        self.bar = progress(self.t.max_steps, "train", "step", initial=min(self.state.step, self.t.max_steps),
                            enabled=self.main and self.show_progress)
        self.window = LogWindow()
        done = self.done_because is not None
        while not done:
            done = self.train_epoch()
            if not done:
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
        self.bar.close()

    def train_epoch(self) -> bool:
        """One pass over this process's training data -> whether the run ends in it (done, or stop_after).

        Every process must take part in each step: the epoch ends when all are out of data, and meanwhile an
        exhausted process runs its last batch again with zero weight (its collectives stay in step)."""
        epoch, skip = self.state.epoch, self.state.batches_in_epoch
        iterator, last_batch = self.epoch_batches(epoch, skip)
        batches_this_epoch = 0
        while True:
            batch = next(iterator, None)
            if not self.any_process_has_data(batch):
                self.end_of_data(epoch, batches_this_epoch, skip)
                return False
            batches_this_epoch += 1
            weight = 1.0
            if batch is None:
                batch, weight = last_batch, 0.0
            else:
                self.take_batch(batch, epoch)
            last_batch = self.last_batch = batch
            output = self.train_step(batch, weight, epoch)
            if output is not None and self.accelerator.sync_gradients and self.end_step(output, epoch):
                return True

    def epoch_batches(self, epoch: int, skip: int) -> tuple[Iterator[dict], dict | None]:
        """The epoch's batches, fast-forwarded past the `skip` a resumed run already trained on -> (the rest, the
        last batch skipped: what a process out of data runs again with zero weight, as the uninterrupted run)."""
        self.train_collator.set_epoch(epoch)
        self.loader.set_epoch(epoch)  # shard order and shuffle are a function of (seed, epoch): resumable
        last = None
        with preserved_rng(enabled=skip > 0):  # the checkpoint's RNG state already includes these draws
            iterator = iter(self.loader)
            for _ in range(skip):
                last = next(iterator, None) or last
        return iterator, last

    def any_process_has_data(self, batch: dict | None) -> bool:
        """Whether this or any other process got a batch (a collective: every process asks together)."""
        has = torch.tensor([0.0 if batch is None else 1.0], device=self.accelerator.device)
        return self.accelerator.gather(has).max().item() > 0

    def end_of_data(self, epoch: int, batches_this_epoch: int, skip: int) -> None:
        """Every process is out of data: count the loader's tail; an epoch that yielded no batch is a DataError."""
        self.state.add_counts(self.loader.tail_counts or {})
        if batches_this_epoch == 0 and skip == 0:
            d = self.cfg.data
            seen = ", ".join(f"{n} {DATA_COUNTS[k]}" for k, n in self.state.data_counts().items())
            raise DataError(f"the training data yielded no batch in epoch {epoch} ({', '.join(d.train_shards)}, "
                            f"split {d.train_split!r}): is the split empty, or every sample unusable ({seen})?")

    def take_batch(self, batch: dict, epoch: int) -> None:
        """A new batch of this process: advance the data position, count it, check its targets, record its ids."""
        self.state.batches_in_epoch += 1
        self.state.add_counts(batch)
        check_training_targets(batch)
        if self.t.record_sample_ids:
            ids_file = self.out / "sample_ids" / f"epoch{epoch:04d}-rank{self.rank:03d}.txt"
            with naming(ids_file):
                ids_file.parent.mkdir(parents=True, exist_ok=True)
                with open(ids_file, "a", encoding="utf-8") as f:
                    f.write("".join(f"{i}\n" for i in batch["ids"]))

    def train_step(self, batch: dict, weight: float, epoch: int) -> ModelOutput | None:
        """Forward and backward of one micro-batch (gradient accumulation: the optimizer steps, after clipping,
        when accelerate syncs the gradients) -> the output, or None when its loss was not finite (skipped)."""
        acc = self.accelerator
        batch = to_device(batch, acc.device)
        with acc.accumulate(self.model):
            with acc.autocast():  # (a model accelerate prepared autocasts itself; an FSDP-sharded one does not)
                output = self.model(batch)
            if self.targets is not None:
                output = self.distill(batch, output, weight)
            if self.skip_nonfinite(output, epoch):
                return None
            acc.backward(output.loss * weight)
            if acc.sync_gradients:  # the last micro-batch of a step
                self.reduce_and_clip()
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        n = len(batch["ids"]) if weight else 0
        self.state.samples_seen += n
        self.window.add(output.loss.item() if weight else None, n)
        return output

    def distill(self, batch: dict, output: ModelOutput, weight: float) -> DistilledOutput:
        """The distillation step: the loss with the teacher's soft targets mixed in (`distilled_output`); rows
        without a target are counted (zero-weight filler batches are not)."""
        out = distilled_output(output, batch["ids"], self.targets, self.cfg.distill, self.cfg.tasks)
        if weight:
            self.missing_rows += out.missing_rows
        return out

    def sync_distill_counts(self) -> None:
        """The run's count of training rows without a teacher target, over every process, into the trainer state
        (a collective: every process calls it, from `log_step` and `checkpoint`)."""
        s, acc = self.state, self.accelerator
        if s.distillation is None:
            return
        mine = torch.tensor([float(self.missing_rows)], device=acc.device)
        total = int(acc.reduce(mine, "sum").item()) if self.world > 1 else self.missing_rows
        s.distillation["missing_rows"] = s.distillation.get("missing_rows", 0) + total
        self.missing_rows = 0

    def reduce_and_clip(self) -> None:
        """Before the optimizer step: the expert gradients reduced over their replicas (expert parallelism; DDP
        has reduced the rest), then clipping by the whole model's gradient norm (train.max_grad_norm)."""
        acc, max_norm = self.accelerator, self.t.max_grad_norm
        if self.ep is None:
            if max_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), max_norm)
            return
        expert_parallel.reduce_expert_grads(self.raw_model, self.ep)
        if max_norm > 0:
            acc.unscale_gradients()
            experts = [p for e in expert_parallel.expert_modules(self.raw_model) for p in e.parameters()]
            expert_parallel.clip_grad_norm_(self.raw_model.parameters(), experts, max_norm, self.ep)

    def skip_nonfinite(self, output: ModelOutput, epoch: int) -> bool:
        """The NaN policy, when any process's loss is not finite: a FloatingPointError with nan_policy=stop or
        past max_skipped_batches; else the batch is skipped and counted -> True. False for a finite loss."""
        acc, s, t = self.accelerator, self.state, self.t
        finite = torch.tensor([1.0 if torch.isfinite(output.loss).all() else 0.0], device=acc.device)
        if acc.gather(finite).min().item() != 0:
            return False
        where = f"step {s.step + 1} (epoch {epoch}, batch {s.batches_in_epoch})"
        if t.nan_policy == "stop" or s.skipped_nonfinite >= t.max_skipped_batches:
            raise FloatingPointError(
                f"non-finite loss at {where}: task_loss={output.task_loss}, aux_loss={output.aux_loss}"
                f"; no checkpoint written for it. Lower the learning rates, check the data, or set "
                f"train.nan_policy=skip")
        s.skipped_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.main:
            write(f"skipping batch with non-finite loss at {where} ({s.skipped_nonfinite} skipped so far)")
        return True

    def end_step(self, output: ModelOutput, epoch: int) -> bool:
        """After an optimizer step: count it, log, validate and select, checkpoint -> whether the run ends here
        (max_steps, early stopping, or stop_after right after this step's checkpoint)."""
        s, t = self.state, self.t
        s.step += 1
        s.last_loss = output.loss.item()
        self.bar.update(1)
        if s.step % t.log_every == 0 or s.step == t.max_steps:
            self.log_step(output, epoch)
        is_best = done = False
        if self.val_loader is not None and (s.step % t.eval_every == 0 or s.step == t.max_steps):
            is_best, done = self.validate_and_select()
        if s.step >= t.max_steps:
            done = True
            s.stop_reason = s.stop_reason or "max_steps"
        if s.step % t.save_every == 0 or is_best or done:
            self.checkpoint(is_best)
        self.stopped = self.stop_after is not None and s.step >= self.stop_after
        return done or self.stopped

    # ------------------------------------------------------------------------------------------------------------
    # logging

    def log_step(self, output: ModelOutput, epoch: int) -> None:
        """A train/ record (losses averaged over the window, throughput, data counts, learning rates) to
        metrics.jsonl / TensorBoard and the progress bar; a new window starts."""
        s, w = self.state, self.window
        sps = w.samples_per_s(self.world)
        record = {"train/loss": w.mean_loss(self.accelerator), "train/task_loss": output.task_loss.item(),
                  "train/aux_loss": output.aux_loss.item(), "train/balance_loss": output.balance_loss.item(),
                  "train/z_loss": output.z_loss.item(), "train/samples_per_s": sps,
                  "train/epoch": epoch, "train/skipped_nonfinite": s.skipped_nonfinite,
                  **{f"train/{k}": v for k, v in s.data_counts().items()}}
        if isinstance(output, DistilledOutput):
            self.sync_distill_counts()
            record["train/distill_loss"] = output.distill_loss.item()
            record["train/distill_missing_rows"] = s.distillation["missing_rows"]
        for g in self.optimizer.param_groups:
            record[f"lr/{g['name']}"] = g["lr"]
        if self.accelerator.device.type == "cuda":  # this process's high-water mark so far
            record["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        self.log.write(s.step, record)
        self.bar.set_postfix(loss=f"{record['train/loss']:.4f}", sps=f"{sps:.0f}")
        w.reset()

    # ------------------------------------------------------------------------------------------------------------
    # validate and select

    def validate(self) -> dict | None:
        """Validation on every process, metrics on the main one (logged, routing heatmap); None elsewhere."""
        from accelerate.utils import gather_object

        step, acc, cfg = self.state.step, self.accelerator, self.cfg
        records, stats = evaluate_loader(self.raw_model, self.val_loader, acc.device, self.t.eval_max_batches,
                                         in_step=self.ep is not None or self.t.fsdp, filler=self.last_batch)
        records = gather_object(records)
        all_stats = gather_object([stats])
        if not acc.is_main_process:
            return None
        merged = merge_stats(all_stats)
        vocabularies = {tk.name: list(tk.labels) for tk in cfg.tasks}
        task_types = {tk.name: tk.type for tk in cfg.tasks}
        metrics = {f"val/{k}": v for k, v in compute_metrics(records, vocabularies, task_types)["metrics"].items()}
        routing = routing_summary(merged)
        metrics["val/dropped_fraction"] = routing.pop("dropped_fraction")
        metrics.update({f"val/{k}": merged[k] for k in DATA_COUNTS})
        self.log.write(step, {**metrics, **{f"val/{k}": v for k, v in routing.items()}})
        if merged["modality_expert_counts"] is not None:
            save_routing_heatmap(merged["modality_expert_counts"], merged["routing_rows"], f"step {step}",
                                 [self.out / "routing" / f"step-{step:07d}.png", self.out / "routing_heatmap.png"])
        return metrics

    def validate_and_select(self) -> tuple[bool, bool]:
        """`validate`, then best selection on train.metric (the main process's value, on every process) and
        early stopping -> (this step is the best so far, early stopping ends the run)."""
        from accelerate.utils import gather_object

        s, t = self.state, self.t
        with preserved_rng():  # training draws the same numbers however often it is validated
            metrics = self.validate()
        value = None
        if self.main and metrics is not None:
            s.last_val_metrics = metrics
            value = metrics.get(t.metric)
            if value is None:
                write(f"step {s.step}: {t.metric} was not computed (the validation data has no sample "
                           f"of its task); best-checkpoint selection skips this validation")
            write(f"step {s.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())
                                                      if k.endswith("/acc") or k == t.metric))
        value = gather_object([value])[0]  # main's value, on every process
        if value is None:
            return False, False
        is_best = s.best_metric is None or (value > s.best_metric if t.metric_mode == "max" else value < s.best_metric)
        if is_best:
            s.best_metric, s.best_step, s.evals_without_improvement = value, s.step, 0
        else:
            s.evals_without_improvement += 1
        stop = bool(t.early_stopping_patience) and s.evals_without_improvement >= t.early_stopping_patience
        if stop:
            s.stop_reason = f"early stopping: no improvement of {t.metric} in {t.early_stopping_patience} evals"
        return is_best, stop

    # ------------------------------------------------------------------------------------------------------------
    # checkpoint and export

    def checkpoint(self, is_best: bool) -> None:
        """A resumable checkpoint of this step (accelerate state + trainer_state.json), written atomically."""
        def write_shards(folder: Path) -> None:  # the state accelerate's save_state does not hold
            if self.ep is not None:
                expert_checkpoint.save_expert_shard(folder, self.raw_model, self.optimizer, self.ep)
            if self.t.fsdp:
                fsdp.save_sharded(folder, self.model, self.optimizer, self.scheduler, self.main)

        self.sync_distill_counts()
        save_checkpoint(self.accelerator, self.ckpt_root, self.state.step, self.state.to_dict(), self.t.keep_last,
                        is_best, write_shards if self.ep is not None or self.t.fsdp else None)

    def export(self) -> dict:
        """The best checkpoint's weights to out/model and results.json (main process) -> the run's summary."""
        acc, s, out = self.accelerator, self.state, self.out
        acc.wait_for_everyone()
        result = None
        sharded = self.ep is not None or self.t.fsdp
        if self.main:  # the best checkpoint's weights (all of them from its shards when this process has a part)
            model = build_full_model(self.cfg).to(acc.device) if sharded else self.raw_model
            result = export_run(model, out, s.to_dict(), self.cfg, own=not sharded, progress=self.show_progress)
            print(f"done: {result['stop_reason']}; exported {out / 'model'}; metrics in {out / 'metrics.jsonl'}")
            data = ", ".join(f"{n} {DATA_COUNTS[k]}" for k, n in s.data_counts().items() if n)
            if data:
                print(f"data: {data} (see the warnings above, and results.json)")
        self.log.close()
        acc.wait_for_everyone()
        return result if result is not None else run_result(s.to_dict(), self.t.metric)


__all__ = ["TrainRecipe", "prepare_run", "train"]
