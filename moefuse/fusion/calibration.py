"""Post-hoc calibration of a task's ensemble probabilities: temperature scaling (Guo et al. 2017, "On Calibration
of Modern Neural Networks").

One scalar T > 0 per task divides the log-probabilities, p_T = softmax(log p / T), and is chosen to minimise the
negative log-likelihood on held-out data (the validation split, after training). T > 1 softens over-confident
answers, T < 1 sharpens under-confident ones; the argmax, so the answer and the accuracy, never changes.

Shapes: N samples, C classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
"""The search interval of T: wide enough for any sane model, bounded so that a degenerate set cannot run off."""


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


__all__ = ["MAX_TEMPERATURE", "MIN_TEMPERATURE", "fit_temperature", "temperature_nll"]
