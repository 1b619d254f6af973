"""Post-hoc fits of a task's ensemble on held-out data: the voters' weights (stacking, Wolpert 1992; Breiman 1996,
"Stacked Regressions": a convex combination of the members chosen on data they were not trained on) and
temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One scalar T > 0 per task divides the log-probabilities, p_T = softmax(log p / T), and is chosen to minimise the
negative log-likelihood on held-out data (the validation split, after training). T > 1 softens over-confident
answers, T < 1 sharpens under-confident ones; the argmax, so the answer and the accuracy, never changes.

The voters' weights w = softmax(v) minimise the NLL of the mixture sum_k w_k p_k; the uniform start is the soft
vote, and a voter that is worse than the others everywhere ends with a small weight.

Shapes: N samples, K voters, C classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The search interval of T (MIN_TEMPERATURE, MAX_TEMPERATURE): wide enough for any sane model, bounded so that a
# degenerate set cannot run off. The model folder format owns it: a folder's temperatures are checked against it.
from moefuse.pretrained.export_info import MAX_TEMPERATURE, MIN_TEMPERATURE


def fit_problem(probs: torch.Tensor, targets: torch.Tensor, min_samples: int) -> str | None:
    """Why `probs` [N, C] and `targets` [N] cannot support a fit of T (or of vote weights), or None when they can:
    fewer than `min_samples` usable samples (the fitted T strays far from the truth and often runs to a bound of
    its search; see HeadsConfig.calibration_min_samples), or not one wrong answer among them (then the NLL falls
    all the way as T -> 0, so the fit is the lower bound, which would make every answer near-certain)."""
    keep = (targets >= 0) & probs.isfinite().all(-1)
    n = int(keep.sum())
    if n < min_samples:
        return f"only {n} validation samples, fewer than the {min_samples} a fit needs (heads.calibration_min_samples)"
    if bool((probs[keep].argmax(-1) == targets[keep]).all()):
        return f"all {n} validation answers are right, so the fit has no error to calibrate against"
    return None


def temperature_nll(probs: torch.Tensor, targets: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Mean NLL of temperature-scaled probabilities [N, C] against target indices [N]."""
    log_p = probs.double().clamp_min(1e-12).log()
    return F.cross_entropy(log_p / temperature, targets)


def fit_temperature(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises the NLL of `probs` [N, C] (ensemble
    probabilities before scaling) on `targets` [N] (class indices; negative ones, and rows that are not finite, are
    ignored); 1.0 when no sample is left. The NLL is convex in 1 / T, so a bounded scalar search over log T
    (scipy's Brent method) finds the minimum without tuning."""
    from scipy.optimize import minimize_scalar

    keep = (targets >= 0) & probs.isfinite().all(-1)  # a sample without a target, or a non-finite output
    probs, targets = probs[keep], targets[keep]
    if targets.numel() == 0:
        return 1.0
    log_p = probs.double().clamp_min(1e-12).log()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(log_p / math.exp(log_t), targets))

    found = minimize_scalar(nll, bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)), method="bounded",
                            options={"xatol": 1e-4})
    return math.exp(found.x)


def mixture_nll(head_probs: torch.Tensor, targets: torch.Tensor, vote_logits: torch.Tensor,
                voted: torch.Tensor | None = None) -> torch.Tensor:
    """Mean NLL of the weighted vote sum_k softmax(v)_k p_k of per-voter probabilities [N, K, C] on targets [N],
    the weights renormalised over the voters that voted ([N, K] bool; default all)."""
    w = vote_logits.softmax(0)[None, :]  # [1, K]
    if voted is not None:
        w = w * voted.to(w.dtype)
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)  # [N, K]
    mix = (head_probs * w[..., None]).sum(1)  # [N, C]
    return F.nll_loss(mix.clamp_min(1e-12).log(), targets)


def fit_vote_weights(head_probs: torch.Tensor, targets: torch.Tensor, voted: torch.Tensor | None = None,
                     steps: int = 100) -> torch.Tensor:
    """Vote logits v [K] whose weights softmax(v) minimise the held-out NLL of the weighted vote of `head_probs`
    [N, K, C] on `targets` [N] (negative ones and non-finite rows ignored), abstaining voters ([N, K] `voted`
    False) left out of each sample's vote; zeros (the soft vote) when no sample is left. The mixture NLL is convex
    in the weights, so L-BFGS from the uniform start finds the optimum."""
    keep = (targets >= 0) & head_probs.isfinite().all(-1).all(-1)
    head_probs, targets = head_probs[keep].double(), targets[keep]
    voted = None if voted is None else voted[keep]
    v = torch.zeros(head_probs.shape[1], dtype=torch.float64, requires_grad=True)
    if targets.numel() == 0:
        return v.detach().float()
    opt = torch.optim.LBFGS([v], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = mixture_nll(head_probs, targets, v, voted)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return v.detach().float()


__all__ = ["MAX_TEMPERATURE", "MIN_TEMPERATURE", "fit_problem", "fit_temperature", "fit_vote_weights", "mixture_nll",
           "temperature_nll"]
