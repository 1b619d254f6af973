"""Ensemble voting heads: per task, K classifier heads on the pooled fused representation.

Each head is trained with its own cross-entropy (an ensemble of heads on one trunk, as in multi-head
ensembles / "TreeNets", Lee et al. 2015). Votes are combined by `soft` (mean probability), `weighted`
(learned softmax weights over heads, trained on the ensemble's own NLL with head outputs detached) or
`majority` (hard vote, ties broken by the soft score). Agreement = fraction of heads that vote for the answer.

Calibration: the combined probabilities go through temperature scaling (Guo et al. 2017), p = softmax(log p_ens /
T), with one T per task, a buffer of the model fit on the validation split after training
(`moefuse.fusion.calibration.fit_temperature`, run by the training recipe's `calibrate` step). T = 1 (the default,
and what exports made before calibration load with) leaves the probabilities as they are; T never changes the
answer, only the confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from moefuse.configutil import Config
from moefuse.datasets.collate import IGNORE_INDEX


@dataclass
class HeadsConfig(Config):
    config_key: ClassVar[str] = "heads"

    num_heads: int = 3
    """K voting heads per task."""
    hidden: int = 128
    """Hidden width of each head's MLP; 0 = a linear head."""
    dropout: float = 0.1
    """Dropout inside each head (also decorrelates the heads)."""
    combine: Literal["soft", "weighted", "majority"] = "soft"
    """How votes become the answer: mean probability, learned weights, or hard majority vote."""
    calibrate: bool = True
    """Fit one temperature per task on the validation split after training (temperature scaling, Guo et al. 2017),
    stored in the export and applied by evaluate and predict; false = T = 1 (the raw ensemble probabilities)."""

    def __post_init__(self) -> None:
        self.check(self.num_heads >= 1, "num_heads", f"must be >= 1, got {self.num_heads}")
        self.check(self.hidden >= 0, "hidden", f"must be >= 0, got {self.hidden}")
        self.check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class TaskConfig(Config):
    name: str
    """Task name, as in the manifest's `task` column."""
    type: Literal["classification", "qa"] = "classification"
    """classification: predict a label; qa: pick an answer from the answer vocabulary (VQA-style)."""
    labels: list[str] | None = None
    """Label or answer vocabulary; null = taken from the training shards' dataset.json."""
    loss_weight: float = 1.0
    """Weight of this task's loss in the joint objective."""

    def __post_init__(self) -> None:
        self.check(bool(self.name), "name", "must be a non-empty string")
        self.check(self.labels is None or len(self.labels) >= 2, "labels",
                   f"needs at least 2 entries, got {self.labels}")
        self.check(self.labels is None or len(set(self.labels)) == len(self.labels), "labels", "has duplicates")
        self.check(self.loss_weight >= 0, "loss_weight", f"must be >= 0, got {self.loss_weight}")

    @property
    def config_key(self) -> str:  # type: ignore[override]
        """A task is named by its name in errors (`tasks.digit.labels`), `tasks[]` while it has none."""
        return f"tasks.{self.name}" if self.name else "tasks[]"


@dataclass
class TaskOutput:
    """One task's answer for the rows of the batch that belong to it."""

    rows: torch.Tensor  # [B_t] indices into the batch
    logits: torch.Tensor  # [B_t, K, C] per-head logits
    probs: torch.Tensor  # [B_t, C] ensemble probabilities, calibrated (temperature applied)
    uncalibrated: torch.Tensor  # [B_t, C] ensemble probabilities before temperature scaling
    prediction: torch.Tensor  # [B_t] ensemble answer (index into the vocabulary)
    head_predictions: torch.Tensor  # [B_t, K]
    agreement: torch.Tensor  # [B_t] fraction of heads voting for the ensemble answer
    loss: torch.Tensor | None = None  # scalar: sum over heads of mean CE (+ the weighted-vote NLL), if labels


class VotingHeads(nn.Module):
    """K heads -> per-head logits and the combined vote."""

    def __init__(self, d_model: int, num_classes: int, cfg: HeadsConfig):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes

        def head() -> nn.Module:
            if cfg.hidden == 0:
                return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(d_model, num_classes))
            return nn.Sequential(nn.Linear(d_model, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, num_classes))

        self.heads = nn.ModuleList(head() for _ in range(cfg.num_heads))
        self.vote_logits = nn.Parameter(torch.zeros(cfg.num_heads)) if cfg.combine == "weighted" else None
        self.register_buffer("temperature", torch.ones(()))  # T, fit after training (calibration.fit_temperature)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        state_dict.setdefault(prefix + "temperature", torch.ones(()))  # saved before calibration existed: T = 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def calibrate(self, probs: torch.Tensor) -> torch.Tensor:
        """Temperature scaling of ensemble probabilities [B, C] -> [B, C]; exactly the input at T = 1."""
        if float(self.temperature) == 1.0:
            return probs
        return (probs.clamp_min(1e-12).log() / self.temperature).softmax(-1)

    def combine(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [B, K, C] -> ensemble probs [B, C], prediction [B], per-head votes [B, K]."""
        probs = logits.float().softmax(-1)  # [B, K, C]
        votes = probs.argmax(-1)  # [B, K]
        if self.cfg.combine == "weighted":
            w = self.vote_logits.softmax(0)  # [K]
            ens = (probs * w[None, :, None]).sum(1)
        else:
            ens = probs.mean(1)  # [B, C]
        if self.cfg.combine == "majority":
            counts = F.one_hot(votes, self.num_classes).sum(1).to(ens.dtype)  # [B, C]
            pred = (counts + 0.5 * ens).argmax(-1)  # ens < 1 per class, so it only breaks ties between counts
        else:
            pred = ens.argmax(-1)
        return ens, pred, votes

    def forward(self, pooled: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor | None = None) -> TaskOutput:
        x = pooled.index_select(0, rows)  # [B_t, D]
        logits = torch.stack([h(x) for h in self.heads], dim=1)  # [B_t, K, C]
        ens, pred, votes = self.combine(logits)
        agreement = (votes == pred[:, None]).float().mean(-1)  # [B_t]
        loss = None
        if labels is not None:
            y = labels.index_select(0, rows)  # [B_t]
            valid = y != IGNORE_INDEX
            if valid.any():
                # Each head is trained with its own loss; their sum is the task loss.
                per_head = F.cross_entropy(logits[valid].flatten(0, 1).float(),
                                           y[valid].repeat_interleave(len(self.heads)), reduction="none")
                loss = per_head.view(-1, len(self.heads)).mean(0).sum()
                if self.vote_logits is not None:  # learn the vote weights on the ensemble NLL, heads detached
                    w = self.vote_logits.softmax(0)
                    mix = (logits[valid].detach().float().softmax(-1) * w[None, :, None]).sum(1)
                    loss = loss + F.nll_loss(mix.clamp_min(1e-9).log(), y[valid])
            else:
                loss = logits.sum() * 0.0  # keeps every parameter in the graph (DDP needs it)
        return TaskOutput(rows=rows, logits=logits, probs=self.calibrate(ens), uncalibrated=ens, prediction=pred,
                          head_predictions=votes, agreement=agreement, loss=loss)
