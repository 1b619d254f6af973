"""Ensemble voting heads: per task, K classifier heads on the pooled fused representation.

Each head is trained with its own cross-entropy (an ensemble of heads on one trunk, as in multi-head
ensembles / "TreeNets", Lee et al. 2015). Votes are combined by `soft` (mean probability), `weighted`
(softmax weights over heads: learned in training on the ensemble's own NLL with head outputs detached, then
refit on the validation split after training, stacking on held-out data: `calibration.fit_vote_weights`) or
`majority` (hard vote, ties broken by the soft score). Agreement = fraction of the voting heads that chose the
answer.

Voters that can make different errors (the ensemble literature's members differ in their inputs, their data or
their training): `views` gives voters their own view of the fused sequence (the model builds the features, see
`MultimodalMoEModel.voter_inputs`), and a voter whose modality a sample lacks abstains: it takes no part in that
sample's vote, agreement, loss or weights. `bagging` is online bagging (Oza & Russell 2001): each voter weights
each training sample's loss by its own Poisson(1) draw, as if trained on its own bootstrap replicate.

Calibration: the combined probabilities go through temperature scaling (Guo et al. 2017), p = softmax(log p_ens /
T), with one T per task, a buffer of the model fit on the validation split after training
(`moefuse.fusion.calibration.fit_temperature`, run by the training recipe's `calibrate` step). T = 1 (the default,
and what exports made before calibration load with) leaves the probabilities as they are; T never changes the
answer, only the confidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """Voters per task on the pooled fused representation (fusion.pooling); they never abstain."""
    views: list[str] = field(default_factory=list)
    """Further voters, one per entry, each on its own view of the fused sequence: `cls` (the fusion token's
    output), `mean` (the masked mean of all fused tokens), a modality name (the masked mean of that modality's
    fused tokens; the voter abstains on samples without the modality) or `modalities` (one such voter per modality
    of the model). [] = only the num_heads pooled voters (voters that differ only in their initialisation)."""
    hidden: int = 128
    """Hidden width of each head's MLP; 0 = a linear head."""
    dropout: float = 0.1
    """Dropout inside each head (also decorrelates the heads)."""
    bagging: bool = False
    """Online bagging (Oza & Russell 2001): in training each voter weights each sample's loss by its own Poisson(1)
    draw, so the voters learn from different bootstrap replicates of the data stream."""
    combine: Literal["soft", "weighted", "majority"] = "soft"
    """How votes become the answer: mean probability, weights (learned in training, refit on the validation split
    after training), or hard majority vote."""
    calibrate: bool = True
    """Fit one temperature per task on the validation split after training (temperature scaling, Guo et al. 2017),
    stored in the export and applied by evaluate and predict; false = T = 1 (the raw ensemble probabilities)."""
    calibration_min_samples: int = 50
    """Fewest validation samples of a task (with a target) that its temperature and vote weights are fit on; a task
    with fewer keeps T = 1 and the weights as trained, with a warning and a note in export.json and the model card.
    50: in a simulation of a calibrated 10-class model (true T = 1, accuracy 66-82 %), fits on 5-10 samples ran to
    a bound of T in up to 29 % of draws, fits on 50 never did and 90 % of them fell within T in [0.64, 1.34]
    (benchmarks/calibration_samples.py)."""

    def __post_init__(self) -> None:
        self.check_range("num_heads", 1, 64)
        self.check(self.calibration_min_samples >= 1, "calibration_min_samples",
                   f"must be >= 1, got {self.calibration_min_samples}")
        self.check_range("hidden", 0, 65536)
        self.check(len(self.views) <= 64, "views", f"at most 64 voters, got {len(self.views)}")
        self.check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        self.check(all(isinstance(v, str) and v for v in self.views), "views",
                   f"must list view names (cls, mean, modalities or a modality), got {self.views}")


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
        self.check(self.labels is None or len(self.labels) <= 1_000_000, "labels",
                   f"at most 1000000 entries, got {len(self.labels or [])}")
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
    logits: torch.Tensor  # [B_t, K, C] per-voter logits
    voted: torch.Tensor  # [B_t, K] bool: the voters that voted (a modality voter abstains without its modality)
    probs: torch.Tensor  # [B_t, C] ensemble probabilities, calibrated (temperature applied)
    uncalibrated: torch.Tensor  # [B_t, C] ensemble probabilities before temperature scaling
    prediction: torch.Tensor  # [B_t] ensemble answer (index into the vocabulary)
    head_predictions: torch.Tensor  # [B_t, K] each voter's answer, -1 where it abstained
    agreement: torch.Tensor  # [B_t] fraction of the voting voters that chose the ensemble answer
    loss: torch.Tensor | None = None  # scalar: sum over voters of mean CE (+ the weighted-vote NLL), if labels


def poisson_bag_weights(rows: int, voters: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Online bagging (Oza & Russell 2001): each voter counts each sample k ~ Poisson(1) times, [rows, voters],
    drawn from torch's global RNG (so a run's draws follow from its seed) and independent between voters."""
    return torch.poisson(torch.ones(rows, voters, device=device))


class VotingHeads(nn.Module):
    """K voters -> per-voter logits and the combined vote. Each voter reads its own features ([B, K, D]: a view of
    the fused sequence) or all read the same ([B, D]); `voted` [B, K] says which voters vote for which sample."""

    def __init__(self, d_model: int, num_classes: int, cfg: HeadsConfig, num_voters: int | None = None):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        k = cfg.num_heads if num_voters is None else num_voters

        def head() -> nn.Module:
            if cfg.hidden == 0:
                return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(d_model, num_classes))
            return nn.Sequential(nn.Linear(d_model, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, num_classes))

        self.heads = nn.ModuleList(head() for _ in range(k))
        self.vote_logits = nn.Parameter(torch.zeros(k)) if cfg.combine == "weighted" else None
        self.register_buffer("temperature", torch.ones(()))  # T, fit after training (calibration.fit_temperature)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        state_dict.setdefault(prefix + "temperature", torch.ones(()))  # saved before calibration existed: T = 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def calibrate(self, probs: torch.Tensor) -> torch.Tensor:
        """Temperature scaling of ensemble probabilities [B, C] -> [B, C]; exactly the input at T = 1."""
        if float(self.temperature) == 1.0:
            return probs
        return (probs.clamp_min(1e-12).log() / self.temperature).softmax(-1)

    def vote_weights(self, voted: torch.Tensor | None) -> torch.Tensor | None:
        """Each voter's share of the vote, [B, K] (rows sum to 1, 0 where a voter abstains) or [1, K] when every
        voter votes; None for the plain mean (every voter votes, equal weights)."""
        everyone = voted is None or bool(voted.all())
        if self.vote_logits is None:
            if everyone:
                return None
            w = voted.float()
        else:
            w = self.vote_logits.softmax(0)[None, :]  # [1, K]
            if everyone:
                return w
            w = w * voted.float()
        return w / w.sum(1, keepdim=True).clamp_min(1e-12)

    def combine(self, logits: torch.Tensor, voted: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [B, K, C] (and which voters vote, [B, K]; default all) -> ensemble probs [B, C], prediction [B],
        per-voter votes [B, K] (-1 where a voter abstains). Abstaining voters take no part in any combination."""
        probs = logits.float().softmax(-1)  # [B, K, C]
        votes = probs.argmax(-1)  # [B, K]
        w = self.vote_weights(voted)
        ens = probs.mean(1) if w is None else (probs * w[..., None]).sum(1)  # [B, C]
        if self.cfg.combine == "majority":
            hits = F.one_hot(votes, self.num_classes)  # [B, K, C]
            if voted is not None:
                hits = hits * voted[..., None]
            pred = (hits.sum(1).to(ens.dtype) + 0.5 * ens).argmax(-1)  # ens < 1 per class: it only breaks ties
        else:
            pred = ens.argmax(-1)
        return ens, pred, votes if voted is None else votes.masked_fill(~voted, -1)

    def loss(self, logits: torch.Tensor, voted: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each voter's own mean cross-entropy over the samples it votes on (weighted by its Poisson(1) bag counts
        with `bagging`, in training), summed over voters; plus the weighted vote's NLL for `combine: weighted`
        (vote weights only: the voters' outputs are detached). logits [N, K, C], voted [N, K], y [N]."""
        k = logits.shape[1]
        per_voter = F.cross_entropy(logits.flatten(0, 1).float(), y.repeat_interleave(k),
                                    reduction="none").view(-1, k)  # [N, K]
        bagged = self.cfg.bagging and self.training
        if bool(voted.all()) and not bagged:
            loss = per_voter.mean(0).sum()
        else:
            count = voted.float() * (poisson_bag_weights(*voted.shape, device=voted.device) if bagged else 1.0)
            loss = ((per_voter * count).sum(0) / voted.float().sum(0).clamp_min(1.0)).sum()
        if self.vote_logits is not None:
            w = self.vote_weights(voted)
            mix = (logits.detach().float().softmax(-1) * w[..., None]).sum(1)
            loss = loss + F.nll_loss(mix.clamp_min(1e-9).log(), y)
        return loss

    def forward(self, features: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor | None = None,
                voted: torch.Tensor | None = None) -> TaskOutput:
        """features [B, D] (every voter reads the same) or [B, K, D]; rows [B_t] the task's rows; labels [B];
        voted [B, K] bool (default: every voter votes on every sample)."""
        x = features.index_select(0, rows)  # [B_t, D] or [B_t, K, D]
        per_voter = x.unbind(1) if x.dim() == 3 else [x] * len(self.heads)
        logits = torch.stack([h(v) for h, v in zip(self.heads, per_voter)], dim=1)  # [B_t, K, C]
        v = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device) if voted is None \
            else voted.index_select(0, rows)  # [B_t, K]
        ens, pred, votes = self.combine(logits, v)
        agreement = ((votes == pred[:, None]).float().sum(-1) / v.float().sum(-1)) if voted is not None \
            else (votes == pred[:, None]).float().mean(-1)  # [B_t]
        loss = None
        if labels is not None:
            y = labels.index_select(0, rows)  # [B_t]
            valid = y != IGNORE_INDEX
            if valid.any():
                loss = self.loss(logits[valid], v[valid], y[valid])
            else:
                loss = logits.sum() * 0.0  # keeps every parameter in the graph (DDP needs it)
        return TaskOutput(rows=rows, logits=logits, voted=v, probs=self.calibrate(ens), uncalibrated=ens,
                          prediction=pred, head_predictions=votes, agreement=agreement, loss=loss)
