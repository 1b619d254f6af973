"""How many validation samples a temperature fit needs: the evidence behind `heads.calibration_min_samples` (50).

A calibrated model is simulated: C-class logits z ~ N(0, scale^2), probabilities p = softmax(z), and each target
drawn from p itself, so the true temperature is exactly 1. For each sample count N, `fit_temperature` (the fit
training runs, moefuse/fusion/calibration.py) is run on --draws independent sets of N samples; the table gives the
share of fits that ran to a bound of the search interval [MIN_TEMPERATURE, MAX_TEMPERATURE] and the 5th, 50th and
95th percentiles of the fitted T. `--scale 3` is a model about 66 % accurate, `--scale 6` about 82 %.

    python benchmarks/calibration_samples.py [--scale 3 6] [--draws 300] [--classes 10] [--seed 0]

Seconds on a CPU; no data or model files.
"""

from __future__ import annotations

import argparse

import torch
from _bench import command_line

from moefuse.fusion.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE, fit_temperature

COUNTS = (5, 10, 20, 50, 100, 200)


def simulate(n: int, scale: float, classes: int, draws: int, gen: torch.Generator) -> tuple[float, list[float]]:
    """(share of fits at a bound, [T at the 5th, 50th, 95th percentile]) over `draws` sets of `n` samples."""
    fitted = []
    for _ in range(draws):
        probs = (torch.randn(n, classes, generator=gen) * scale).softmax(-1)  # [N, C]
        targets = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # [N], drawn from the model: T = 1 is true
        fitted.append(fit_temperature(probs, targets))
    t = torch.tensor(fitted)
    at_bound = ((t <= MIN_TEMPERATURE * 1.01) | (t >= MAX_TEMPERATURE * 0.99)).float().mean().item()
    return at_bound, torch.quantile(t, torch.tensor([0.05, 0.5, 0.95])).tolist()


def accuracy(scale: float, classes: int, gen: torch.Generator, n: int = 100_000) -> float:
    probs = (torch.randn(n, classes, generator=gen) * scale).softmax(-1)
    return (probs.argmax(-1) == torch.multinomial(probs, 1, generator=gen).squeeze(1)).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, nargs="+", default=[3.0, 6.0], help="logit scale (model confidence)")
    p.add_argument("--draws", type=int, default=300, help="independent fits per sample count")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    print("| logit scale | accuracy | N | fits at a bound | T 5 % | T 50 % | T 95 % |\n|---|---|---|---|---|---|---|")
    for scale in args.scale:
        acc = accuracy(scale, args.classes, gen)
        for n in COUNTS:
            at_bound, (low, mid, high) = simulate(n, scale, args.classes, args.draws, gen)
            print(f"| {scale:g} | {acc:.0%} | {n} | {at_bound:.0%} | {low:.2f} | {mid:.2f} | {high:.2f} |")
    print(f"\n{command_line()}")


if __name__ == "__main__":
    main()
