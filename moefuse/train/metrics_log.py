"""Where a training run's numbers go: metrics.jsonl (one JSON object per line) and TensorBoard, and the window of
micro-batches that each train/ log record averages over."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from moefuse.configutil import dumps_json
from moefuse.errors import naming


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
        """Append {"step", "time", **record}; numbers (not booleans) go to TensorBoard as scalars too."""
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


class LogWindow:
    """The micro-batches since the last train/ record: their summed loss (zero-weight batches left out), the
    samples this process trained on, and since when."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.batches, self.samples, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float | None, samples: int) -> None:
        """One micro-batch: its loss (None for a zero-weight batch) and its sample count."""
        if loss is not None:
            self.loss += loss
            self.batches += 1
        self.samples += samples

    def mean_loss(self, accelerator=None) -> float:
        """The mean loss of the window's batches; with `accelerator`, over every process's batches (a collective:
        a process whose window holds only zero-weight batches still gets the others' mean)."""
        loss, batches = self.loss, self.batches
        if accelerator is not None and accelerator.num_processes > 1:
            total = accelerator.reduce(torch.tensor([loss, float(batches)], device=accelerator.device), "sum")
            loss, batches = total[0].item(), int(total[1].item())
        return loss / max(1, batches)

    def samples_per_s(self, world_size: int) -> float:
        """Samples per second over every process (each is assumed to train as many as this one)."""
        return self.samples * world_size / max(time.perf_counter() - self.start, 1e-9)


__all__ = ["LogWindow", "MetricsLog"]
