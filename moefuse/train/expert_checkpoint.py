"""Checkpoints of an expert-parallel run (`fusion.expert_parallel_size` N > 1).

accelerate's `save_state` writes the main process's model and optimizer, which hold the main rank's E / N
experts only. Beside them, rank j of the first EP group writes its own experts and their AdamW moments to
`experts-ep{j}-of-{N}.safetensors` (the other groups hold copies). On resume every rank loads accelerate's files,
then overwrites its experts and their moments with its own file. The checkpoint folder must be on a file system
all ranks see (as accelerate's own checkpoints assume).

`checkpoint_state` joins model.safetensors and the N files into the full model's weights (all E experts): the
export, `moefuse export` and a single-process load never need a distributed setup.

A run resumes with the N it was saved with (any number of EP groups): another N is refused at start-up, as is a
checkpoint of a run without expert parallelism resumed with it, and the reverse.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moefuse.configutil import ConfigError
from moefuse.fusion.expert_parallel import ExpertParallel, expert_param_names

SHARD_RE = re.compile(r"experts-ep(\d+)-of-(\d+)\.safetensors")
MOMENTS = ("exp_avg", "exp_avg_sq", "step")  # the AdamW state of a parameter


def shard_file(folder: Path, ep_rank: int, size: int) -> Path:
    return folder / f"experts-ep{ep_rank:03d}-of-{size:03d}.safetensors"


def _optimizer_state(optimizer) -> dict:
    """The torch optimizer's per-parameter state (under accelerate's AcceleratedOptimizer wrapper, if any)."""
    return getattr(optimizer, "optimizer", optimizer).state


def save_expert_shard(folder: Path, model: nn.Module, optimizer, ep: ExpertParallel) -> None:
    """This rank's experts and their optimizer state into the checkpoint folder (first EP group only)."""
    if ep.replica != 0:
        return
    params, state = dict(model.named_parameters()), _optimizer_state(optimizer)
    tensors = {}
    for name in expert_param_names(model):
        tensors[name] = params[name].detach().cpu().contiguous()
        for key, value in state.get(params[name], {}).items():
            if key in MOMENTS:
                tensors[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, str(shard_file(folder, ep.rank, ep.size)),
              metadata={"expert_parallel_size": str(ep.size), "ep_rank": str(ep.rank)})


def saved_layout(folder: Path) -> int:
    """The expert-parallel size a checkpoint was written with (1: no expert shards in it)."""
    sizes = {int(m.group(2)) for p in folder.glob("experts-ep*-of-*.safetensors") if (m := SHARD_RE.fullmatch(p.name))}
    if len(sizes) > 1:
        raise ConfigError(f"{folder} mixes expert shards of expert_parallel_size {sorted(sizes)}: it is damaged")
    return sizes.pop() if sizes else 1


def check_layout(folder: Path, size: int) -> None:
    """A clear error, before anything is loaded, when the checkpoint was saved with another expert layout."""
    saved = saved_layout(folder)
    if saved != size:
        raise ConfigError(f"--resume: checkpoint {folder} was saved with fusion.expert_parallel_size={saved}, this run "
                          f"has {size}; resume with {saved} (and a number of processes it divides), or start a new "
                          f"run from its export")
    missing = [j for j in range(size) if not shard_file(folder, j, size).is_file()] if size > 1 else []
    if missing:
        raise ConfigError(f"--resume: checkpoint {folder} lacks the expert shards of EP ranks {missing}")


def load_expert_shard(folder: Path, model: nn.Module, optimizer, ep: ExpertParallel) -> None:
    """After accelerate's load_state: this rank's experts and their optimizer state from its shard file."""
    saved = load_file(str(shard_file(folder, ep.rank, ep.size)))
    params, state = dict(model.named_parameters()), _optimizer_state(optimizer)
    with torch.no_grad():
        for name in expert_param_names(model):
            params[name].copy_(saved[name])
            for key in MOMENTS:
                if f"{name}.{key}" in saved and key in state.get(params[name], {}):
                    value = state[params[name]][key]
                    state[params[name]][key] = saved[f"{name}.{key}"].to(value.device, value.dtype)


def checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's full model weights: model.safetensors, with every expert tensor joined from the N shard
    files (concatenated along the expert dimension) when the run was expert-parallel."""
    state = load_file(str(folder / "model.safetensors"))
    size = saved_layout(folder)
    if size == 1:
        return state
    check_layout(folder, size)
    shards = [load_file(str(shard_file(folder, j, size))) for j in range(size)]
    for name in [k for k in shards[0] if k in state]:  # the expert weights (not their moments)
        state[name] = torch.cat([s[name] for s in shards], dim=0)  # [E / N, ...] x N -> [E, ...]
    return state


__all__ = ["check_layout", "checkpoint_state", "load_expert_shard", "save_expert_shard", "saved_layout"]
