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
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moefuse.config import ExperimentConfig, load_config, save_config
from moefuse.configutil import ConfigError, atomic_write_text
from moefuse.datasets import DataError, build_eval_loader, build_train_loader, collect_tasks
from moefuse.fusion.heads import TaskConfig
from moefuse.fusion.model import ROUTING_ROWS, MultimodalMoEModel, build_collator, build_model
from moefuse.train.checkpoint import export_model, latest_checkpoint, save_checkpoint
from moefuse.train.metrics import compute_metrics, records_from_output
from moefuse.train.plots import draw_routing_heatmap, save_png_atomic

# ----------------------------------------------------------------------------------------------------------------
# helpers


def resolve_tasks(cfg: ExperimentConfig) -> list[TaskConfig]:
    """Tasks with vocabularies: from the config where given, else from the training shards' dataset.json."""
    needs_data = not cfg.tasks or any(t.labels is None for t in cfg.tasks)
    found = collect_tasks(cfg.data.train_shards) if needs_data else {}
    wanted = cfg.tasks or [TaskConfig(name=n, type=v["type"]) for n, v in found.items()]
    tasks = []
    for t in wanted:
        if t.labels is None:
            if t.name not in found:
                raise ConfigError(f"tasks: task {t.name!r} is not in the training shards (they have: "
                                  f"{', '.join(found) or 'none'})")
            if found[t.name]["type"] != t.type:
                raise ConfigError(f"tasks.{t.name}.type is {t.type} but the shards hold it as {found[t.name]['type']}")
            t = replace(t, labels=list(found[t.name]["vocabulary"]))
        tasks.append(t)
    if not tasks:
        raise ConfigError("tasks: none configured and none found in data.train_shards")
    return tasks


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


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = {kk: vv.to(device) if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()}
        else:
            out[k] = v
    return out


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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def evaluate_loader(model: MultimodalMoEModel, loader, device: torch.device, max_batches: int | None = None,
                    progress: bool = False) -> tuple[list[dict], dict]:
    """Run the model over a loader -> per-sample records and routing stats (summed over batches)."""
    model.eval()
    records: list[dict] = []
    counts = None
    dropped = routed = skipped = 0
    vocab = {t.name: list(t.labels) for t in model.cfg.tasks}
    for i, batch in enumerate(tqdm(loader, desc="evaluate", disable=not progress, leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        skipped += int(batch.get("skipped", 0))
        batch = to_device(batch, device)
        out = model(batch)
        records += records_from_output(batch, out, vocab)
        if out.modality_expert_counts is not None:
            c = out.modality_expert_counts.cpu()
            counts = c if counts is None else counts + c
        dropped += int(out.dropped_tokens)
        routed += int(out.routed_tokens)
    model.train()
    return records, {"modality_expert_counts": counts, "dropped_tokens": dropped, "routed_tokens": routed,
                     "skipped_corrupt": skipped}


def routing_summary(stats: dict) -> dict:
    out = {"dropped_fraction": stats["dropped_tokens"] / max(1, stats["routed_tokens"])}
    counts = stats["modality_expert_counts"]
    if counts is not None:
        total = counts.sum(0)  # [M, E] over layers
        for m, name in enumerate(ROUTING_ROWS):
            if total[m].sum() > 0:
                out[f"expert_load/{name}"] = (total[m] / total[m].sum()).round(decimals=4).tolist()
    return out


# ----------------------------------------------------------------------------------------------------------------
# the recipe


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
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is empty: give the folder build-shards wrote (or shard URLs)")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"training on {accelerator.device} with {world} process{'es' if world > 1 else ''} "
              f"({accelerator.distributed_type.value}, mixed precision {accelerator.mixed_precision})")
        if not resume and latest_checkpoint(ckpt_root) is not None:
            raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose "
                              f"another train.output_dir")
    set_seed(t.seed)
    tasks = resolve_tasks(cfg)
    cfg = replace(cfg, tasks=tasks)
    if main:
        save_config(cfg, out / "config.yaml")
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

    audio_rate = raw_model.encoders["audio"].sample_rate if "audio" in raw_model.encoders else None
    loader = build_train_loader(d, train_collator, rank=rank, world_size=world, seed=t.seed,
                                audio_sample_rate=audio_rate)

    def val_loader():
        return build_eval_loader(d, eval_collator, rank=rank, world_size=world, audio_sample_rate=audio_rate)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples_seen": 0, "best_metric": None,
             "best_step": None, "evals_without_improvement": 0, "skipped_nonfinite": 0, "skipped_corrupt": 0,
             "last_loss": None}
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise ConfigError(f"--resume: no complete checkpoint under {ckpt_root}")
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if main:
            print(f"resumed from {ckpt} at step {state['step']} (epoch {state['epoch']}, "
                  f"batch {state['batches_in_epoch']})")
    log = MetricsLog(out, t.tensorboard, main)
    vocabularies = {tk.name: list(tk.labels) for tk in tasks}
    task_types = {tk.name: tk.type for tk in tasks}

    def validate(step: int) -> dict | None:
        if not d.val_shards:
            return None
        records, stats = evaluate_loader(raw_model, val_loader(), accelerator.device, t.eval_max_batches)
        records = gather_object(records)
        all_stats = gather_object([stats])
        if not main:
            return None
        counts = [s["modality_expert_counts"] for s in all_stats if s["modality_expert_counts"] is not None]
        merged = {"modality_expert_counts": sum(counts) if counts else None,
                  "dropped_tokens": sum(s["dropped_tokens"] for s in all_stats),
                  "routed_tokens": sum(s["routed_tokens"] for s in all_stats),
                  "skipped_corrupt": sum(s["skipped_corrupt"] for s in all_stats)}
        metrics = {f"val/{k}": v for k, v in compute_metrics(records, vocabularies, task_types)["metrics"].items()}
        routing = routing_summary(merged)
        metrics["val/dropped_fraction"] = routing.pop("dropped_fraction")
        metrics["val/skipped_corrupt"] = merged["skipped_corrupt"]
        log.write(step, {**metrics, **{f"val/{k}": v for k, v in routing.items()}})
        if merged["modality_expert_counts"] is not None:
            img = draw_routing_heatmap(merged["modality_expert_counts"], list(ROUTING_ROWS), f"step {step}")
            save_png_atomic(img, out / "routing" / f"step-{step:07d}.png")
            save_png_atomic(img, out / "routing_heatmap.png")
        return metrics

    def improved(value: float) -> bool:
        best = state["best_metric"]
        return best is None or (value > best if t.metric_mode == "max" else value < best)

    model.train()
    bar = tqdm(total=t.max_steps, initial=state["step"], desc="train", disable=not main, dynamic_ncols=True)
    window_loss, window_batches, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
    last_metrics: dict | None = None
    stop_reason = "max_steps"
    done = False
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
                if batches_this_epoch == 0 and skip == 0:
                    raise DataError(f"the training data yielded no batch in epoch {epoch} "
                                    f"({', '.join(d.train_shards)}, split {d.train_split!r}): is the split empty, "
                                    f"or every sample corrupt ({state['skipped_corrupt']} skipped)?")
                break
            batches_this_epoch += 1
            weight = 1.0
            if batch is None:
                batch, weight = last_batch, 0.0
            else:
                state["batches_in_epoch"] += 1
                state["skipped_corrupt"] += int(batch.get("skipped", 0))
                if t.record_sample_ids:
                    ids_file = out / "sample_ids" / f"epoch{epoch:04d}-rank{rank:03d}.txt"
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
                          "train/epoch": epoch, "train/skipped_corrupt": state["skipped_corrupt"],
                          "train/skipped_nonfinite": state["skipped_nonfinite"]}
                for g in optimizer.param_groups:
                    record[f"lr/{g['name']}"] = g["lr"]
                log.write(step, record)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}", sps=f"{sps:.0f}")
                window_loss, window_batches, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
            is_best = False
            if step % t.eval_every == 0 or step == t.max_steps:
                metrics = validate(step)
                value = None
                if main and metrics is not None:
                    last_metrics = metrics
                    if t.metric not in metrics:
                        raise ConfigError(f"train.metric={t.metric!r} is not computed; available: "
                                          f"{', '.join(sorted(k for k in metrics if not k.startswith('val/expert')))}")
                    value = metrics[t.metric]
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
                        stop_reason = (f"early stopping: no improvement of {t.metric} in "
                                       f"{t.early_stopping_patience} evals")
                        done = True
            if step % t.save_every == 0 or step == t.max_steps or is_best or done:
                save_checkpoint(accelerator, ckpt_root, step, state, t.keep_last, is_best)
            if stop_after is not None and step >= stop_after:
                bar.close()
                log.close()
                return {"stopped_after": step, "last_loss": state["last_loss"]}
            if step >= t.max_steps:
                done = True
            if done:
                break
        if done:
            break
        state["epoch"] += 1
        state["batches_in_epoch"] = 0
    bar.close()

    # Export the best checkpoint's weights (the last ones when there was no validation).
    result = {"steps": state["step"], "stop_reason": stop_reason, "last_loss": state["last_loss"],
              "best_step": state["best_step"], "best_metric": state["best_metric"], "metric": t.metric,
              "samples_seen": state["samples_seen"], "skipped_corrupt": state["skipped_corrupt"],
              "skipped_nonfinite": state["skipped_nonfinite"]}
    accelerator.wait_for_everyone()
    if main:
        if state["best_step"] is not None and state["best_step"] != state["step"]:
            from safetensors.torch import load_file

            best_dir = ckpt_root / f"step-{state['best_step']:07d}"
            raw_model.load_state_dict(load_file(str(best_dir / "model.safetensors")))
        export_model(raw_model, out / "model", {"step": state["best_step"] or state["step"], "result": result,
                                                "final_val_metrics": last_metrics,
                                                "drop_modalities": list(d.drop_modalities),
                                                "train_shards": list(d.train_shards)})
        result["model_dir"] = str(out / "model")
        result["final_val_metrics"] = last_metrics
        atomic_write_text(out / "results.json", json.dumps(result, indent=2))
        print(f"done: {stop_reason}; exported {out / 'model'}; metrics in {out / 'metrics.jsonl'}")
    log.close()
    accelerator.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moefuse train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fusion.num_experts=16 train.max_steps=50")
    parser.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its latest "
                        "complete checkpoint")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume)
    except (ConfigError, DataError, FloatingPointError, FileNotFoundError) as e:
        print(f"moefuse train: error: {e}", file=sys.stderr)
        return 2
    return 0
