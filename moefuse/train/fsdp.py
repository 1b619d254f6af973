"""Fully sharded data parallelism (`train.fsdp: true`): torch FSDP2 `fully_shard` (Zhao et al. 2023, "PyTorch
FSDP"), applied by the recipe, on gloo CPU processes and on GPUs alike.

accelerate's FSDP plugin runs only on accelerators (on CPU it falls back to DDP without a word), so the recipe
shards the model itself and leaves accelerate the rest (processes, mixed precision, RNG states):

* `shard_model`: each encoder, each fusion block, then the whole model (projections, embeddings, heads) become
  FSDP units; every parameter is a DTensor sharded over all ranks, gathered for its unit's forward and backward.
* Checkpoints: the model and AdamW state through torch.distributed.checkpoint (DCP), each rank writing its
  shards to `<checkpoint>/fsdp/`, and the LR schedule in `fsdp_scheduler.bin`. On resume every rank reads its
  shards back; DCP reshards, so the number of processes may change.
* `full_state`: one process reads a checkpoint's shards into the full model (no process group): the export,
  `moefuse export` and `moefuse evaluate` never need a distributed setup.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FSDP_DIR = "fsdp"  # the DCP folder of a checkpoint
SCHEDULER_FILE = "fsdp_scheduler.bin"


def shard_model(model: nn.Module) -> None:
    """FSDP2 units, innermost first: each encoder and each fusion block, then the model (in place)."""
    from torch.distributed.fsdp import fully_shard

    for encoder in model.encoders.values():
        fully_shard(encoder)
    for block in getattr(model.fusion, "blocks", []):
        fully_shard(block)
    fully_shard(model)


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, main: bool) -> None:
    """Every rank's model and optimizer shards into folder/fsdp (a collective), the schedule from the main one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / FSDP_DIR))
    if main:
        torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """The inverse of `save_sharded`, on every rank (in place)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # initialises the AdamW state to load into
    where = str(folder / FSDP_DIR)
    dcp.load({"model": model_state}, checkpoint_id=where)  # every weight must be there
    # A parameter that never had a gradient (e.g. wav2vec2's masked_spec_embed without SpecAugment) has no AdamW
    # state in the checkpoint; it keeps the zero state initialised here, which no step reads.
    optim = {"optim": optim_state}
    dcp.load(optim, checkpoint_id=where, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim["optim"])
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / FSDP_DIR).is_dir()


def full_state(folder: Path, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's full model weights, read by one process into `template` (a full model's
    state_dict, filled in place and returned)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": template}, checkpoint_id=str(folder / FSDP_DIR), no_dist=True)
    return template


__all__ = ["full_state", "is_sharded_checkpoint", "load_sharded", "save_sharded", "shard_model"]
