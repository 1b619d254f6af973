"""Training configuration (optimiser, schedule, precision, evaluation, checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from moefuse.configutil import Config
from moefuse.pretrained.export_info import LICENSE


@dataclass
class TrainConfig(Config):
    config_key: ClassVar[str] = "train"

    output_dir: str = "runs/experiment"
    """Run folder: checkpoints/, model/ (the export), metrics.jsonl, tensorboard/, routing heatmaps."""
    seed: int = 0
    """One seed for model init, data order, crops, dropout and modality dropout."""
    max_steps: int = 1000
    """Optimizer steps to train for (each step = grad_accum micro-batches)."""
    lr_encoders: float = 1e-4
    """AdamW learning rate of the encoders (low: they may be pretrained)."""
    lr_fusion: float = 5e-4
    """Learning rate of the projections, modality embeddings and the fusion stack."""
    lr_heads: float = 1e-3
    """Learning rate of the voting heads."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases, norms and embeddings)."""
    betas: list[float] | None = None
    """AdamW betas; null = (0.9, 0.999)."""
    warmup_steps: int = 50
    """Linear warmup from 0 to the peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to min_lr_ratio * peak at max_steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 = off."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision through accelerate; the MoE router always runs in fp32."""
    log_every: int = 10
    """Steps between log lines and metrics.jsonl records."""
    eval_every: int = 100
    """Steps between validations (and at the end)."""
    eval_max_batches: int | None = None
    """Cap on validation batches per evaluation; null = the whole validation set."""
    save_every: int = 100
    """Steps between resumable checkpoints (and at the end)."""
    keep_last: int = 2
    """Resumable checkpoints to keep (the best one is kept as well)."""
    metric: str = "val/mean_acc"
    """Validation metric for best-checkpoint selection and early stopping, e.g. val/digit/acc, val/mean_acc."""
    metric_mode: Literal["max", "min"] = "max"
    """Whether a larger metric is better."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement; null = never."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss stops the run naming the step, or skips that batch and counts it."""
    max_skipped_batches: int = 10
    """With nan_policy=skip, stop anyway after this many skipped batches."""
    tensorboard: bool = True
    """Also write metrics to TensorBoard under output_dir/tensorboard."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the processes with torch FSDP2 (`moefuse.train.fsdp`:
    each encoder and fusion block a unit), on CPU (gloo) or GPUs; false = DDP, every process a full replica."""
    record_sample_ids: bool = False
    """Write the ids each process trained on, per epoch, to output_dir/sample_ids/ (to audit data splitting)."""
    license: str | None = None
    """The license of the exported weights, a Hub license id (apache-2.0, mit, cc-by-4.0, other, ...): the model
    card's `license:` and export.json's; null = not stated."""

    def __post_init__(self) -> None:
        self.check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32 - 1] (numpy's seed range), got {self.seed}")
        self.check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        for name in ("lr_encoders", "lr_fusion", "lr_heads"):
            self.check(getattr(self, name) >= 0, f"{name}", f"must be >= 0, got {getattr(self, name)}")
        self.check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        self.check(self.betas is None or (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)), "betas",
                   f"must be two numbers in [0, 1), got {self.betas}")
        self.check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        self.check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        self.check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        self.check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        for name in ("log_every", "eval_every", "save_every", "keep_last"):
            self.check(getattr(self, name) >= 1, f"{name}", f"must be >= 1, got {getattr(self, name)}")
        self.check(self.eval_max_batches is None or self.eval_max_batches >= 1, "eval_max_batches",
                   f"must be null or >= 1, got {self.eval_max_batches}")
        self.check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                   "early_stopping_patience", f"must be null or >= 1, got {self.early_stopping_patience}")
        self.check(self.metric.startswith("val/"), "metric", f"must name a validation metric (val/...), "
                   f"got {self.metric!r}")
        self.check(self.max_skipped_batches >= 0, "max_skipped_batches", "must be >= 0")
        self.check(self.license is None or LICENSE.fullmatch(self.license) is not None, "license",
                   f"must be a Hub license id such as apache-2.0, mit, cc-by-4.0 or other, got {self.license!r}")
