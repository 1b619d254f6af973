"""Typed module outputs (dataclasses) registered as pytree nodes.

torch finds the tensors inside a module's output by pytree flattening: FSDP2 hooks each of them to gather its
unit's sharded parameters again before their backward. A dataclass it cannot flatten hides them, and the
backward then meets freed parameters. Every output that leaves an FSDP unit (`moefuse.train.fsdp.shard_model`:
an encoder, a fusion block) is declared with `@pytree_output` after `@dataclass`.
"""

from __future__ import annotations

from typing import TypeVar

import torch.utils._pytree as pytree

T = TypeVar("T")


def pytree_output(cls: type[T]) -> type[T]:
    """Register the dataclass `cls` as a pytree node (all its fields are children); returns it."""
    pytree.register_dataclass(cls)
    return cls


__all__ = ["pytree_output"]
