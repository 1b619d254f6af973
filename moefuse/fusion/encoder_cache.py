"""A memo of encoder outputs for inference: a sample whose inputs of one modality were seen before (the same
question, the same prompt) reuses that modality's tokens instead of running its encoder again.

Exact in eval mode: each encoder's output for a sample depends only on that sample's own inputs (attention masks
keep padding out; BatchNorm uses its running statistics), so a row's tokens are the same in any batch, up to the
last bits of float rounding. Keys are a hash (BLAKE2b) of the row's input tensors, trimmed to the row's real
length where its mask says so; values are the row's tokens [T_row, D_enc] and mask [T_row]. Least recently used
rows go first past `max_rows`. Never used in training (the model calls it only under `torch.no_grad` in eval).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

from moefuse.encoders.base import EncoderOutput


def _row_key(inputs: dict[str, torch.Tensor], i: int, padding: str | None) -> bytes:
    """A hash of row i of every input; with `padding` (the input that marks real positions, right-padded), each
    input that has that length is cut to the row's real part, so the same row padded to another length matches."""
    h = hashlib.blake2b(digest_size=16)
    mask = inputs[padding] if padding is not None else None
    n = int(mask[i].sum()) if mask is not None else None
    for name in sorted(inputs):
        row = inputs[name][i]
        if mask is not None and row.dim() >= 1 and row.shape[0] == mask.shape[1]:
            row = row[:n]
        row = row.contiguous()
        h.update(name.encode())
        h.update(str(tuple(row.shape)).encode())
        h.update(row.cpu().numpy().tobytes())
    return h.digest()


class EncoderCache:
    """Row-level memo of one encoder's outputs, `max_rows` rows at most; `hits` and `misses` count rows."""

    def __init__(self, max_rows: int = 4096):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.rows: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, encode: Callable[..., EncoderOutput], inputs: dict[str, torch.Tensor],
                 padding: str | None = None) -> EncoderOutput:
        """`encode(**inputs)` for the rows not seen before, the memo for the others -> EncoderOutput [B, T, D];
        `padding` names the input that marks each row's real positions (the encoder's `padding_input`)."""
        b = next(iter(inputs.values())).shape[0]
        keys = [_row_key(inputs, i, padding) for i in range(b)]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # each new key once, at its first row
        todo = sorted(i for k, i in first.items() if k not in self.rows)
        self.hits, self.misses = self.hits + b - len(todo), self.misses + len(todo)
        if todo:
            index = torch.tensor(todo, device=next(iter(inputs.values())).device)
            out = encode(**{name: x.index_select(0, index) for name, x in inputs.items()})
            for j, i in enumerate(todo):
                self.rows[keys[i]] = (out.tokens[j].clone(), out.mask[j].clone())
        for k in keys:
            self.rows.move_to_end(k)
        rows = [self.rows[k] for k in keys]
        while len(self.rows) > self.max_rows:
            self.rows.popitem(last=False)
        t = max(tok.shape[0] for tok, _ in rows)
        tokens = rows[0][0].new_zeros(b, t, rows[0][0].shape[-1])  # [B, T, D]
        mask = torch.zeros(b, t, dtype=torch.bool, device=tokens.device)  # [B, T]
        for i, (tok, m) in enumerate(rows):
            tokens[i, : tok.shape[0]], mask[i, : m.shape[0]] = tok, m
        return EncoderOutput(tokens=tokens, mask=mask)
