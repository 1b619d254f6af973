"""`moefuse train CONFIG.yaml [key.sub=value ...] [--resume]`, also `accelerate launch -m moefuse.train ...`.

The recipe, top to bottom: load the config -> fill task vocabularies from the shards' dataset.json -> build the
model, AdamW with per-part learning rates and a warmup+decay schedule -> stream shards (each process reads its
own split: no rank-0 dispatch) -> train with gradient accumulation, clipping and mixed precision -> validate
periodically (per task and per head, routing heatmap) -> atomic resumable checkpoints, best selection and early
stopping -> export a self-contained model folder.

Batches mix tasks: the loaders interleave samples of every task, and the loss is the sum over the tasks present
(each task's loss summed over its voting heads, times its loss_weight) plus the MoE auxiliary losses.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moefuse.config import ExperimentConfig, load_config, save_config
from moefuse.configutil import ConfigError, dumps_json
from moefuse.datasets import DataError, build_eval_loader, build_train_loader
from moefuse.errors import command, naming
from moefuse.fusion.model import ROUTING_ROWS, MultimodalMoEModel, build_collator, build_model
from moefuse.train.checkpoint import export_run, has_checkpoints, intact_checkpoints, run_result, save_checkpoint
from moefuse.train.evaluation import (
    DATA_COUNTS,
    count_into,
    evaluate_loader,
    merge_stats,
    routing_summary,
    to_device,
)
from moefuse.train.metrics import compute_metrics
from moefuse.train.plots import draw_routing_heatmap, save_png_atomic
from moefuse.train.preflight import (
    check_metric,
    check_output_dir,
    check_resume_config,
    check_training_targets,
    resolve_tasks,
)

# ----------------------------------------------------------------------------------------------------------------
# helpers


def param_groups(model: MultimodalMoEModel, cfg: ExperimentConfig) -> list[dict]:
    """Encoders / fusion (projections, embeddings, stack) / heads, each with its learning rate; no weight decay
    on biases, norms and embeddings (the usual AdamW practice, e.g. nanoGPT)."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "encoders" if name.startswith("encoders.") else "heads" if name.startswith("heads.") else "fusion"
        decay = p.dim() >= 2 and "embed" not in name and "fusion_token" not in name
        groups.setdefault((part, decay), []).append(p)
    lr = {"encoders": cfg.train.lr_encoders, "fusion": cfg.train.lr_fusion, "heads": cfg.train.lr_heads}
    return [{"params": ps, "lr": lr[part], "weight_decay": cfg.train.weight_decay if decay else 0.0, "name": part}
            for (part, decay), ps in sorted(groups.items())]


def lr_lambda(cfg: ExperimentConfig):
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return f


@contextmanager
def preserved_rng(enabled: bool = True):
    """Restore the torch, numpy and Python RNG states on exit: replaying data on resume (creating a DataLoader
    iterator draws a base seed from torch's RNG) must not shift the RNG the checkpoint restored."""
    if not enabled:
        yield
        return
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class MetricsLog:
    """metrics.jsonl (appended, one JSON object per line) and TensorBoard, main process only."""

    def __init__(self, out: Path, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        with naming(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(dumps_json({"step": step, "time": time.time(), **record}, f"{self.path} step {step}") + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------
# the recipe


def new_state() -> dict:
    """The trainer state saved in every checkpoint (trainer_state.json)."""
    return {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples_seen": 0, "best_metric": None,
            "best_step": None, "evals_without_improvement": 0, "skipped_nonfinite": 0, "last_loss": None,
            "stop_reason": None, "last_val_metrics": None, **dict.fromkeys(DATA_COUNTS, 0)}


def prepare_run(cfg: ExperimentConfig, resume: bool, main: bool) -> ExperimentConfig:
    """Everything checked before anything is written: the run folder, checkpoints vs --resume, the tasks and
    their vocabularies, train.metric, and on resume that the config is the run's own. Then config.yaml."""
    out = Path(cfg.train.output_dir)
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is empty: give the folder build-shards wrote (or shard URLs)")
    if main:
        check_output_dir(out)
    ckpt_root = out / "checkpoints"
    if not resume and has_checkpoints(ckpt_root):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose "
                          f"another train.output_dir")
    if resume and not has_checkpoints(ckpt_root):
        raise ConfigError(f"--resume: no checkpoint under {ckpt_root}; start the run without --resume")
    tasks = resolve_tasks(cfg)
    check_metric(cfg, tasks)
    cfg = replace(cfg, tasks=tasks)
    if resume:
        check_resume_config(out, cfg)
    if main:
        save_config(cfg, out / "config.yaml")
    return cfg


def restore(accelerator, ckpt_root: Path) -> dict:
    """Load the newest intact checkpoint (damaged or unloadable ones are skipped with a warning) -> its state."""
    for ckpt in intact_checkpoints(ckpt_root):
        try:
            accelerator.load_state(str(ckpt))
            state = {**new_state(), **json.loads((ckpt / "trainer_state.json").read_text())}
        except Exception as e:
            warnings.warn(f"checkpoint {ckpt} cannot be loaded ({type(e).__name__}: {e}); trying an earlier one",
                          stacklevel=2)
            continue
        if accelerator.is_main_process:
            print(f"resumed from {ckpt} at step {state['step']} (epoch {state['epoch']}, "
                  f"batch {state['batches_in_epoch']})")
        return state
    raise ConfigError(f"--resume: every checkpoint under {ckpt_root} is damaged; start a new run in another "
                      f"train.output_dir")


def finished(state: dict, max_steps: int) -> str | None:
    """Why a restored run has nothing left to train (None when it has)."""
    if state["stop_reason"] and state["stop_reason"].startswith("early stopping"):
        return state["stop_reason"]
    if state["step"] >= max_steps:
        return f"it reached train.max_steps={max_steps} (raise it to train longer)"
    return None


def validate(model: MultimodalMoEModel, loader, cfg: ExperimentConfig, accelerator, step: int, log,
             out: Path) -> dict | None:
    """Validation on every process, metrics on the main one (logged, routing heatmap); None elsewhere."""
    from accelerate.utils import gather_object

    records, stats = evaluate_loader(model, loader, accelerator.device, cfg.train.eval_max_batches)
    records = gather_object(records)
    all_stats = gather_object([stats])
    if not accelerator.is_main_process:
        return None
    merged = merge_stats(all_stats)
    vocabularies = {tk.name: list(tk.labels) for tk in cfg.tasks}
    task_types = {tk.name: tk.type for tk in cfg.tasks}
    metrics = {f"val/{k}": v for k, v in compute_metrics(records, vocabularies, task_types)["metrics"].items()}
    routing = routing_summary(merged)
    metrics["val/dropped_fraction"] = routing.pop("dropped_fraction")
    metrics.update({f"val/{k}": merged[k] for k in DATA_COUNTS})
    log.write(step, {**metrics, **{f"val/{k}": v for k, v in routing.items()}})
    if merged["modality_expert_counts"] is not None:
        img = draw_routing_heatmap(merged["modality_expert_counts"], list(ROUTING_ROWS), f"step {step}")
        save_png_atomic(img, out / "routing" / f"step-{step:07d}.png")
        save_png_atomic(img, out / "routing_heatmap.png")
    return metrics


def train(cfg: ExperimentConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train, validate, checkpoint and export; returns the final summary (also written to results.json).

    `stop_after` ends the run right after the checkpoint of that step, as if killed (for resume tests)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import gather_object, set_seed

    t = cfg.train
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        # A batch may lack a modality or a task entirely; their parameters then get no gradient this step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(t.output_dir)
    ckpt_root = out / "checkpoints"
    cfg = prepare_run(cfg, resume, main)
    if main:
        print(f"training on {accelerator.device} with {world} process{'es' if world > 1 else ''} "
              f"({accelerator.distributed_type.value}, mixed precision {accelerator.mixed_precision})")
    set_seed(t.seed)
    tasks = cfg.tasks
    model = build_model(cfg.model_config())
    train_collator = build_collator(model, train=True, seed=t.seed, drop_modalities=cfg.data.drop_modalities)
    eval_collator = build_collator(model, train=False, seed=t.seed, drop_modalities=cfg.data.drop_modalities)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=tuple(t.betas or (0.9, 0.999)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # The loaders are NOT passed to accelerate.prepare: each process streams its own shard split (webdataset
    # split by rank/worker), which avoids accelerate's rank-0 dispatch of iterable datasets (accelerate#3547).
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model: MultimodalMoEModel = accelerator.unwrap_model(model)
    d = cfg.data
    names = [tk.name for tk in tasks]
    audio_rate = raw_model.encoders["audio"].sample_rate if "audio" in raw_model.encoders else None
    loader = build_train_loader(d, train_collator, rank=rank, world_size=world, seed=t.seed,
                                audio_sample_rate=audio_rate, tasks=names)
    # Built now, so that a missing or broken validation set stops the run before its first step.
    val_loader = build_eval_loader(d, eval_collator, rank=rank, world_size=world, audio_sample_rate=audio_rate,
                                   tasks=names) if d.val_shards else None

    state = restore(accelerator, ckpt_root) if resume else new_state()
    done_because = finished(state, t.max_steps) if resume else None
    if done_because is not None and main:
        print(f"the run in {out} has already finished at step {state['step']}: {done_because}; nothing to "
              f"train, its model is exported again")
    log = MetricsLog(out, t.tensorboard, main)

    def improved(value: float) -> bool:
        best = state["best_metric"]
        return best is None or (value > best if t.metric_mode == "max" else value < best)

    model.train()
    bar = tqdm(total=t.max_steps, initial=min(state["step"], t.max_steps), desc="train", disable=not main,
               dynamic_ncols=True)
    window_loss, window_batches, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
    done = done_because is not None
    while not done:
        epoch = state["epoch"]
        train_collator.set_epoch(epoch)
        loader.set_epoch(epoch)  # shard order and shuffle are a function of (seed, epoch): resumable
        skip = state["batches_in_epoch"]  # resume: fast-forward to the saved data position
        with preserved_rng(enabled=skip > 0):  # the checkpoint's RNG state already includes these draws
            iterator = iter(loader)
            for _ in range(skip):
                next(iterator, None)
        last_batch = None
        batches_this_epoch = 0
        while True:
            batch = next(iterator, None)
            # Every process must take part in each step; stop the epoch when all are out of data, and let an
            # exhausted process run its last batch with zero weight meanwhile (its collectives stay in step).
            has = torch.tensor([0.0 if batch is None else 1.0], device=accelerator.device)
            any_left = accelerator.gather(has).max().item() > 0
            if not any_left:
                count_into(state, loader.tail_counts or {})
                if batches_this_epoch == 0 and skip == 0:
                    seen = ", ".join(f"{state[k]} {v}" for k, v in DATA_COUNTS.items())
                    raise DataError(f"the training data yielded no batch in epoch {epoch} "
                                    f"({', '.join(d.train_shards)}, split {d.train_split!r}): is the split empty, "
                                    f"or every sample unusable ({seen})?")
                break
            batches_this_epoch += 1
            weight = 1.0
            if batch is None:
                batch, weight = last_batch, 0.0
            else:
                state["batches_in_epoch"] += 1
                count_into(state, batch)
                check_training_targets(batch)
                if t.record_sample_ids:
                    ids_file = out / "sample_ids" / f"epoch{epoch:04d}-rank{rank:03d}.txt"
                    with naming(ids_file):
                        ids_file.parent.mkdir(parents=True, exist_ok=True)
                        with open(ids_file, "a", encoding="utf-8") as f:
                            f.write("".join(f"{i}\n" for i in batch["ids"]))
            last_batch = batch
            batch = to_device(batch, accelerator.device)
            with accelerator.accumulate(model):
                output = model(batch)
                loss = output.loss
                finite = torch.tensor([1.0 if torch.isfinite(loss).all() else 0.0], device=accelerator.device)
                if accelerator.gather(finite).min().item() == 0:
                    where = f"step {state['step'] + 1} (epoch {epoch}, batch {state['batches_in_epoch']})"
                    if t.nan_policy == "stop" or state["skipped_nonfinite"] >= t.max_skipped_batches:
                        raise FloatingPointError(
                            f"non-finite loss at {where}: task_loss={output.task_loss}, aux_loss={output.aux_loss}"
                            f"; no checkpoint written for it. Lower the learning rates, check the data, or set "
                            f"train.nan_policy=skip")
                    state["skipped_nonfinite"] += 1
                    optimizer.zero_grad(set_to_none=True)
                    if main:
                        tqdm.write(f"skipping batch with non-finite loss at {where} "
                                   f"({state['skipped_nonfinite']} skipped so far)")
                    continue
                accelerator.backward(loss * weight)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            n = len(batch["ids"]) if weight else 0
            state["samples_seen"] += n
            if weight:
                window_loss += loss.item()
                window_batches += 1
            window_samples += n
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            step = state["step"]
            state["last_loss"] = loss.item()
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                sps = window_samples * world / max(elapsed, 1e-9)
                record = {"train/loss": window_loss / max(1, window_batches),
                          "train/task_loss": output.task_loss.item(),
                          "train/aux_loss": output.aux_loss.item(), "train/balance_loss": output.balance_loss.item(),
                          "train/z_loss": output.z_loss.item(), "train/samples_per_s": sps,
                          "train/epoch": epoch, "train/skipped_nonfinite": state["skipped_nonfinite"],
                          **{f"train/{k}": state[k] for k in DATA_COUNTS}}
                for g in optimizer.param_groups:
                    record[f"lr/{g['name']}"] = g["lr"]
                log.write(step, record)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}", sps=f"{sps:.0f}")
                window_loss, window_batches, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
            is_best = False
            if val_loader is not None and (step % t.eval_every == 0 or step == t.max_steps):
                metrics = validate(raw_model, val_loader, cfg, accelerator, step, log, out)
                value = None
                if main and metrics is not None:
                    state["last_val_metrics"] = metrics
                    value = metrics.get(t.metric)
                    if value is None:
                        tqdm.write(f"step {step}: {t.metric} was not computed (the validation data has no sample "
                                   f"of its task); best-checkpoint selection skips this validation")
                    tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())
                                                             if k.endswith("/acc") or k == t.metric))
                value = gather_object([value])[0]  # main's value, on every process
                if value is not None:
                    if improved(value):
                        state.update(best_metric=value, best_step=step, evals_without_improvement=0)
                        is_best = True
                    else:
                        state["evals_without_improvement"] += 1
                    if t.early_stopping_patience and state["evals_without_improvement"] >= t.early_stopping_patience:
                        state["stop_reason"] = (f"early stopping: no improvement of {t.metric} in "
                                                f"{t.early_stopping_patience} evals")
                        done = True
            if step >= t.max_steps:
                done = True
                state["stop_reason"] = state["stop_reason"] or "max_steps"
            if step % t.save_every == 0 or is_best or done:
                save_checkpoint(accelerator, ckpt_root, step, state, t.keep_last, is_best)
            if stop_after is not None and step >= stop_after:
                bar.close()
                log.close()
                return {"stopped_after": step, "last_loss": state["last_loss"]}
            if done:
                break
        if done:
            break
        state["epoch"] += 1
        state["batches_in_epoch"] = 0
    bar.close()

    accelerator.wait_for_everyone()
    result = None
    if main:
        result = export_run(raw_model, out, state, cfg)  # the best checkpoint's weights
        print(f"done: {result['stop_reason']}; exported {out / 'model'}; metrics in {out / 'metrics.jsonl'}")
        data = ", ".join(f"{state[k]} {v}" for k, v in DATA_COUNTS.items() if state[k])
        if data:
            print(f"data: {data} (see the warnings above, and results.json)")
    log.close()
    accelerator.wait_for_everyone()
    return result if result is not None else run_result(state, t.metric)


@command("moefuse train")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moefuse train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fusion.num_experts=16 train.max_steps=50")
    parser.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its newest "
                        "intact checkpoint (a finished run is only exported again)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg, resume=args.resume)
    except FloatingPointError as e:
        print(f"moefuse train: error: {e}", file=sys.stderr)
        return 2
    return 0
