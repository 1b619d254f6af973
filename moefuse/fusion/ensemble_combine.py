"""How an ensemble of whole models turns its members' answers into one: the combination rules, their fits on
held-out rows, temperature scaling of the result, and cross-fitting (every reported figure comes from a combiner
that was not fit on the sample it scores).

Members are whole models that differ in initialisation, data, modalities or architecture (deep ensembles,
Lakshminarayanan et al. 2017). Each answers with its own calibrated probabilities; a member that has none of a
sample's modalities abstains on it and takes no part in its combination. The rules:

- `soft`: the mean of the answering members' probabilities.
- `majority`: the plurality vote of the answering members' answers, ties broken by the soft probabilities (the
  output probabilities are the soft ones, as for the voting heads).
- `weighted`: stacking (Wolpert 1992): per-task member weights w (w >= 0, sum 1), renormalised over the answering
  members, on calibrated log-probabilities, p = softmax(sum_m w_m log p_m) (a log-linear pool); w minimises the
  NLL of held-out rows (L-BFGS on w = softmax(v)).
- `gated`: a gate chooses among the members per input (the original mixture of experts, Jacobs et al. 1991):
  p = sum_m g_m p_m, g = softmax over the answering members of a multinomial logistic regression
  (scikit-learn) on the sample's features: which modalities it has, and per member its calibrated confidence
  (max probability), its normalised entropy and whether it answers (an abstaining member: confidence 0, entropy 1,
  answers 0). The gate is trained on soft targets, each member's responsibility for the true class,
  r_m = a_m p_m(y) / sum_k a_k p_k(y) (the posterior of the expert in Jordan & Jacobs 1994's EM view of a mixture
  of experts; a = answers), so it learns where each member is right, and confidently so: a specialist takes over
  where the generalist's modality is missing. Soft targets are fit as scikit-learn's weighted multinomial loss,
  each row repeated once per member with its responsibility as sample weight (the same cross-entropy).

Then one temperature per task (Guo et al. 2017; `moefuse.fusion.calibration.fit_temperature`) scales the combined
probabilities; it is fit on the same rows as the combiner, after it.

Cross-fitting: rows go to k folds by a hash of the sample id (the same sample, the same fold, on any machine); the
rows of fold f are scored by a combiner and temperature fit on the other folds. The combiner stored with an
ensemble is fit the same way on all rows.

Shapes: N samples, M members, C classes, Q modalities, F gate features.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from moefuse.configutil import Config
from moefuse.fusion.calibration import fit_problem, fit_temperature
from moefuse.pretrained.export_info import MAX_TEMPERATURE, MIN_TEMPERATURE

Rule = Literal["soft", "majority", "weighted", "gated"]
RULES: tuple[str, ...] = ("soft", "majority", "weighted", "gated")
MIN_TEMPERATURE_SAMPLES = 50
"""Fewest rows a temperature is fit on (as heads.calibration_min_samples): with fewer, T = 1."""
GATE_C = 1.0
"""Inverse L2 strength of the gate's logistic regression (scikit-learn's default)."""
ABSENT_CONFIDENCE, ABSENT_ENTROPY = 0.0, 1.0
"""The gate features of a member that abstains (with its answer bit 0)."""


@dataclass
class TaskCombiner(Config):
    """A fitted combiner of one task: its rule, its parameters and its temperature, as stored in ensemble.json."""

    rule: Rule = "soft"
    """soft, majority, weighted (stacking weights) or gated (a logistic-regression gate)."""
    temperature: float = 1.0
    """Temperature of the combined probabilities, fit by NLL (1 = none)."""
    weights: list[float] | None = None
    """`weighted`: one weight per member, >= 0, summing to 1."""
    gate_features: list[str] | None = None
    """`gated`: the gate's input features, in order (has:MODALITY, then conf/entropy/answers:MEMBER)."""
    gate_coef: list[list[float]] | None = None
    """`gated`: the gate's coefficients [M members][F features]."""
    gate_intercept: list[float] | None = None
    """`gated`: the gate's intercepts [M members]."""
    samples: int = 0
    """Rows with a target the combiner was fit on."""
    task: str = ""
    """The task it combines (names it in errors: `combiners.digit.temperature`)."""

    @property
    def config_key(self) -> str:  # type: ignore[override]
        return f"combiners.{self.task}" if self.task else "combiner"

    def __post_init__(self) -> None:
        self.check(MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE, "temperature",
                   f"must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {self.temperature}")
        self.check(self.samples >= 0, "samples", f"must be >= 0, got {self.samples}")
        if self.rule == "weighted":
            w = self.weights
            self.check(w is not None and len(w) >= 1, "weights", "a weighted combiner needs one weight per member")
            self.check(all(math.isfinite(x) and x >= 0 for x in w), "weights", f"must be finite and >= 0, got {w}")
            self.check(abs(sum(w) - 1.0) < 1e-4, "weights", f"must sum to 1, got {sum(w):.6f}")
        if self.rule == "gated":
            coef, icpt, names = self.gate_coef, self.gate_intercept, self.gate_features
            self.check(coef is not None and icpt is not None and names is not None, "gate_coef",
                       "a gated combiner needs gate_features, gate_coef and gate_intercept")
            self.check(len(coef) == len(icpt) >= 1, "gate_intercept",
                       f"one intercept per row of gate_coef ({len(coef)}), got {len(icpt)}")
            self.check(all(len(row) == len(names) for row in coef), "gate_coef",
                       f"each row must have one coefficient per gate feature ({len(names)})")
            values = [x for row in coef for x in row] + list(icpt)
            self.check(all(math.isfinite(x) for x in values), "gate_coef", "must be finite numbers")

    def members(self) -> int | None:
        """How many members the parameters are for (None for the rules without parameters)."""
        if self.rule == "weighted":
            return len(self.weights or [])
        if self.rule == "gated":
            return len(self.gate_intercept or [])
        return None


@dataclass
class MemberAnswers:
    """The members' answers to one task's samples: what every rule combines."""

    probs: torch.Tensor  # [N, M, C] each member's calibrated probabilities (anything where it abstains)
    answers: torch.Tensor  # [N, M] bool: the member has one of the sample's modalities
    present: torch.Tensor  # [N, Q] bool: the sample's modalities (the ensemble's modality order)
    calibrate: torch.Tensor | None = None  # [N] bool: the rows the temperature is fit on (None: every row)

    def rows(self, index: torch.Tensor) -> MemberAnswers:
        return MemberAnswers(self.probs[index], self.answers[index], self.present[index],
                             None if self.calibrate is None else self.calibrate[index])


@dataclass
class Combined:
    """A combination's result for N samples."""

    probs: torch.Tensor  # [N, C] calibrated (temperature applied)
    uncalibrated: torch.Tensor  # [N, C]
    prediction: torch.Tensor  # [N]
    member_weights: torch.Tensor  # [N, M] each member's share of the answer (0 where it abstains)


def answering(answers: torch.Tensor) -> torch.Tensor:
    """[N, M] bool -> the members that take part in each sample: those that answer, or all of them for a sample no
    member answers (no better guess exists)."""
    none = ~answers.any(1, keepdim=True)
    return answers | none


def _normalise(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


def gate_feature_names(modalities: list[str], members: list[str]) -> list[str]:
    return [f"has:{m}" for m in modalities] + [f"{k}:{name}" for name in members
                                               for k in ("conf", "entropy", "answers")]


def gate_features(x: MemberAnswers) -> torch.Tensor:
    """[N, Q + 3M] gate inputs: the modalities present, then per member its confidence, normalised entropy and
    answer bit (the fixed fillers where it abstains)."""
    p = x.probs.double().clamp_min(1e-12)  # [N, M, C]
    conf = p.max(-1).values  # [N, M]
    entropy = -(p * p.log()).sum(-1) / math.log(max(p.shape[-1], 2))  # [N, M] in [0, 1]
    a = x.answers
    conf = torch.where(a, conf, torch.full_like(conf, ABSENT_CONFIDENCE))
    entropy = torch.where(a, entropy, torch.full_like(entropy, ABSENT_ENTROPY))
    per_member = torch.stack([conf, entropy, a.double()], -1).flatten(1)  # [N, 3M]
    return torch.cat([x.present.double(), per_member], 1)


def member_weights(c: TaskCombiner, x: MemberAnswers) -> torch.Tensor:
    """[N, M] each member's weight in each sample's combination (rows sum to 1, 0 for abstaining members)."""
    a = answering(x.answers).double()
    if c.rule == "weighted":
        return _normalise(torch.tensor(c.weights, dtype=torch.float64)[None, :] * a)
    if c.rule == "gated":
        coef = torch.tensor(c.gate_coef, dtype=torch.float64)  # [M, F]
        logits = gate_features(x) @ coef.T + torch.tensor(c.gate_intercept, dtype=torch.float64)  # [N, M]
        return logits.masked_fill(a == 0, -math.inf).softmax(-1)
    return _normalise(a)


def combine(c: TaskCombiner, x: MemberAnswers) -> Combined:
    """The members' answers -> the combined answer, by the combiner's rule and temperature."""
    w = member_weights(c, x)  # [N, M]
    p = x.probs.double().clamp_min(1e-12)  # [N, M, C]
    if c.rule == "weighted":  # log-linear pool
        mix = (w[..., None] * p.log()).sum(1).softmax(-1)
    else:  # soft, majority (whose probabilities are the soft ones), gated: a mixture
        mix = (w[..., None] * p).sum(1)
    if c.rule == "majority":
        hits = F.one_hot(p.argmax(-1), p.shape[-1]).double() * answering(x.answers)[..., None]  # [N, M, C]
        prediction = (hits.sum(1) + 0.5 * mix).argmax(-1)  # mix < 1 per class: it breaks ties only
    else:
        prediction = mix.argmax(-1)
    calibrated = mix if c.temperature == 1.0 else (mix.log() / c.temperature).softmax(-1)
    return Combined(calibrated.float(), mix.float(), prediction, w.float())


# ----------------------------------------------------------------------------------------------------------------
# fits


def _known(targets: torch.Tensor) -> torch.Tensor:
    return (targets >= 0).nonzero().squeeze(1)


def fit_weights(x: MemberAnswers, targets: torch.Tensor, steps: int = 100) -> list[float]:
    """Stacking weights w [M] (>= 0, sum 1) minimising the NLL of softmax(sum_m w_m log p_m) (w renormalised over
    each sample's answering members) on the rows with a target; uniform without any. Convex in the log-linear pool's
    weights, searched by L-BFGS over w = softmax(v) from the uniform start."""
    keep = _known(targets)
    m = x.probs.shape[1]
    if keep.numel() == 0:
        return [1.0 / m] * m
    logp = x.probs[keep].double().clamp_min(1e-12).log()  # [N, M, C]
    a = answering(x.answers[keep]).double()
    y = targets[keep]
    v = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = _normalise(v.softmax(0)[None, :] * a)
        loss = F.cross_entropy((w[..., None] * logp).sum(1), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = v.detach().softmax(0)
    return [float(u) for u in w / w.sum()]


def fit_gate(x: MemberAnswers, targets: torch.Tensor, feature_names: list[str]) -> tuple[list[list[float]],
                                                                                          list[float]]:
    """The gate's (coefficients [M, F], intercepts [M]): scikit-learn's multinomial logistic regression on the gate
    features, fit to each member's responsibility for the true class (see the module docstring). A member that is
    never responsible gets a very low intercept; with one responsible member only, the gate is constant."""
    from sklearn.linear_model import LogisticRegression

    keep = _known(targets)
    m = x.probs.shape[1]
    n_features = len(feature_names)
    zeros = [[0.0] * n_features for _ in range(m)]
    if keep.numel() == 0:
        return zeros, [0.0] * m
    rows = x.rows(keep)
    feats = gate_features(rows).numpy()  # [N, F]
    y = targets[keep]
    truth = rows.probs.double().clamp_min(1e-12).gather(2, y[:, None, None].expand(-1, m, 1)).squeeze(2)  # [N, M]
    resp = _normalise(truth * answering(rows.answers).double()).numpy()  # [N, M]
    classes = [k for k in range(m) if resp[:, k].sum() > 1e-9]
    if len(classes) < 2:
        return zeros, [0.0 if k in classes else -30.0 for k in range(m)]
    n = feats.shape[0]
    big_x = np.repeat(feats, len(classes), axis=0)  # each row once per member
    big_y = np.tile(np.array(classes), n)
    weight = resp[:, classes].reshape(-1)
    gate = LogisticRegression(C=GATE_C, max_iter=1000)
    gate.fit(big_x, big_y, sample_weight=weight)
    coef, icpt = [list(r) for r in zeros], [-30.0] * m
    if len(gate.classes_) == 2:  # scikit-learn's binary model: one row, class 1 against class 0 (whose logit is 0)
        a, b = (int(k) for k in gate.classes_)
        icpt[a] = 0.0
        coef[b], icpt[b] = [float(v) for v in gate.coef_[0]], float(gate.intercept_[0])
        return coef, icpt
    for row, k in enumerate(gate.classes_):
        coef[int(k)] = [float(v) for v in gate.coef_[row]]
        icpt[int(k)] = float(gate.intercept_[row])
    return coef, icpt


def fit_combiner(rule: str, x: MemberAnswers, targets: torch.Tensor, feature_names: list[str],
                 min_temperature_samples: int = MIN_TEMPERATURE_SAMPLES, task: str = "") -> TaskCombiner:
    """A combiner of `rule` fit on these rows (those with a target, >= 0), then its temperature on its own combined
    probabilities of the same rows, or of those `x.calibrate` marks (T = 1 when `fit_problem` finds too few rows or
    no error)."""
    samples = int(_known(targets).numel())
    if rule == "weighted":
        c = TaskCombiner(rule="weighted", weights=fit_weights(x, targets), samples=samples, task=task)
    elif rule == "gated":
        coef, icpt = fit_gate(x, targets, feature_names)
        c = TaskCombiner(rule="gated", gate_features=list(feature_names), gate_coef=coef, gate_intercept=icpt,
                         samples=samples, task=task)
    elif rule in ("soft", "majority"):
        c = TaskCombiner(rule=rule, samples=samples, task=task)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown combination rule {rule!r}; use one of {', '.join(RULES)}")
    mix = combine(c, x).uncalibrated
    if x.calibrate is not None:  # e.g. only the split as it is, not its copies with a modality removed
        mix, targets = mix[x.calibrate], targets[x.calibrate]
    if fit_problem(mix, targets, min_temperature_samples) is None:
        c.temperature = min(max(fit_temperature(mix, targets), MIN_TEMPERATURE), MAX_TEMPERATURE)
    return c


# ----------------------------------------------------------------------------------------------------------------
# cross-fitting


def fold_of(sample_id: str, folds: int) -> int:
    """The fold of a sample: a hash (BLAKE2b) of its id, so the same sample lands in the same fold on any machine
    and in any order."""
    digest = hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % folds


@dataclass
class CrossFit:
    """Out-of-fold answers of one rule on one task, and the bookkeeping that shows it."""

    combined: Combined  # every row, each from the combiner of its fold
    fold: list[int]  # [N] each row's fold
    fit_rows: list[list[int]] = field(default_factory=list)  # per fold: the rows its combiner was fit on
    scored_rows: list[list[int]] = field(default_factory=list)  # per fold: the rows it scored
    combiners: list[TaskCombiner] = field(default_factory=list)  # per fold


Fit = Callable[[MemberAnswers, torch.Tensor], TaskCombiner]


def cross_fit(ids: list[str], x: MemberAnswers, targets: torch.Tensor, folds: int, fit: Fit,
              fit_mask: list[bool] | None = None) -> CrossFit:
    """Score every row with the combiner `fit(answers, targets)` returns on the rows of the other folds; with
    `fit_mask`, only the rows it marks True are ever fit on (the others, e.g. corrupted copies, are scored only)."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    fold = [fold_of(i, folds) for i in ids]
    n, c = x.probs.shape[0], x.probs.shape[-1]
    out = Combined(torch.zeros(n, c), torch.zeros(n, c), torch.zeros(n, dtype=torch.long),
                   torch.zeros(n, x.probs.shape[1]))
    result = CrossFit(out, fold)
    for f in range(folds):
        scored = [i for i in range(n) if fold[i] == f]
        train = [i for i in range(n) if fold[i] != f and (fit_mask is None or fit_mask[i])]
        combiner = fit(x.rows(torch.tensor(train, dtype=torch.long)), targets[train])
        result.fit_rows.append(train)
        result.scored_rows.append(scored)
        result.combiners.append(combiner)
        if not scored:
            continue
        index = torch.tensor(scored, dtype=torch.long)
        part = combine(combiner, x.rows(index))
        out.probs[index], out.uncalibrated[index] = part.probs, part.uncalibrated
        out.prediction[index], out.member_weights[index] = part.prediction, part.member_weights
    return result


__all__ = ["RULES", "Combined", "CrossFit", "MemberAnswers", "TaskCombiner", "combine", "cross_fit", "fit_combiner",
           "fit_gate", "fit_weights", "fold_of", "gate_feature_names", "gate_features", "member_weights"]
