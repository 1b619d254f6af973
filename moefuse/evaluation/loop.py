"""Running a model over a shard loader: per-sample records, routing statistics and the data counts (corrupt,
lost and other-task samples), shared by validation during training and `moefuse evaluate`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moefuse.fusion.model import MultimodalMoEModel
from moefuse.inference.records import records_from_output
from moefuse.progress import track

# loader batch key -> its name in stats and results (every loader batch carries the three batch keys); then
# each results name -> what it counts, for messages.
DATA_COUNT_KEYS = {"skipped": "skipped_corrupt", "lost": "lost_samples", "other_task": "skipped_other_task"}
DATA_COUNTS = {"skipped_corrupt": "corrupt samples skipped",
               "lost_samples": "samples lost from missing or truncated shards",
               "skipped_other_task": "samples of tasks the model does not have skipped"}


def count_into(total: dict, batch_or_counts: dict) -> None:
    """Add the data counts of one batch (or of a loader's `tail_counts`) to `total`, under their results names."""
    for key, name in DATA_COUNT_KEYS.items():
        total[name] = total.get(name, 0) + int(batch_or_counts.get(key, 0))


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor (in nested dicts too: `present`, `inputs`) on `device`."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    return out


def _in_step(loader, device: torch.device) -> Iterator[dict | None]:
    """The loader's batches, then None while any other process still has one (a collective on the default group,
    once per step): every process steps together, as sharded models need (their forward is a collective)."""
    import torch.distributed as dist

    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        has = torch.tensor([0.0 if batch is None else 1.0], device=device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        if has.item() == 0:
            return
        yield batch


@torch.no_grad()
def evaluate_loader(model: MultimodalMoEModel, loader, device: torch.device, max_batches: int | None = None,
                    progress: bool = False, in_step: bool = False, filler: dict | None = None
                    ) -> tuple[list[dict], dict]:
    """Run the model over a loader -> per-sample records, and stats: routing counts summed over batches and the
    data counts (DATA_COUNTS), the loader's tail counts included when the whole loader was read.

    `in_step` (a sharded model: expert-parallel or FSDP): all processes step together; one out of data runs its
    last batch again, or `filler` (any batch of its own, e.g. a training one) when it had none, uncounted."""
    model.eval()
    records: list[dict] = []
    stats: dict = {"modality_expert_counts": None, "routing_rows": list(model.routing_rows), "dropped_tokens": 0,
                   "routed_tokens": 0, **dict.fromkeys(DATA_COUNTS, 0)}
    vocab = {t.name: list(t.labels) for t in model.cfg.tasks}
    finished, last = True, None
    batches = _in_step(loader, device) if in_step else loader
    for i, batch in enumerate(track(batches, "evaluate", enabled=progress)):
        if max_batches is not None and i >= max_batches:
            finished = False
            break
        if batch is None:  # this process is out of data, others are not: its forward still takes part
            spare = last if last is not None else filler
            if spare is None:
                raise RuntimeError("evaluate_loader(in_step=True): this process has no batch to step with; "
                                   "pass filler")
            model(to_device(spare, device))
            continue
        last = batch
        count_into(stats, batch)
        batch = to_device(batch, device)
        out = model(batch)
        records += records_from_output(batch, out, vocab)
        if out.modality_expert_counts is not None:
            c = out.modality_expert_counts.cpu()
            stats["modality_expert_counts"] = c if stats["modality_expert_counts"] is None else \
                stats["modality_expert_counts"] + c
        stats["dropped_tokens"] += int(out.dropped_tokens)
        stats["routed_tokens"] += int(out.routed_tokens)
    if finished:
        count_into(stats, getattr(loader, "tail_counts", None) or {})
    model.train()
    return records, stats


def merge_stats(all_stats: list[dict]) -> dict:
    """Stats of several processes (gathered) -> one: routing counts and data counts summed."""
    counts = [s["modality_expert_counts"] for s in all_stats if s["modality_expert_counts"] is not None]
    merged = {"modality_expert_counts": sum(counts) if counts else None, "routing_rows": all_stats[0]["routing_rows"],
              "dropped_tokens": sum(s["dropped_tokens"] for s in all_stats),
              "routed_tokens": sum(s["routed_tokens"] for s in all_stats)}
    return {**merged, **{k: sum(s[k] for s in all_stats) for k in DATA_COUNTS}}


def routing_summary(stats: dict) -> dict:
    out = {"dropped_fraction": stats["dropped_tokens"] / max(1, stats["routed_tokens"])}
    counts = stats["modality_expert_counts"]
    if counts is not None:
        total = counts.sum(0)  # [M, E] over layers
        for m, name in enumerate(stats["routing_rows"]):
            if total[m].sum() > 0:
                out[f"expert_load/{name}"] = (total[m] / total[m].sum()).round(decimals=4).tolist()
    return out


__all__ = ["DATA_COUNTS", "count_into", "evaluate_loader", "merge_stats", "routing_summary",
           "to_device"]
