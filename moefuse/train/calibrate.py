"""The recipe's calibrate step: after training, fit each task's vote weights (`heads.combine: weighted`) and
temperature (Guo et al. 2017) on the validation split and set them in the model, so that the export's vote is
weighted by held-out performance and its probabilities are calibrated (`moefuse.fusion.calibration`).

Shapes: N validation samples of a task, K voters, C its classes.
"""

from __future__ import annotations

import warnings

import torch

from moefuse.config import ExperimentConfig
from moefuse.datasets import build_eval_loader
from moefuse.fusion.calibration import fit_problem, fit_temperature, fit_vote_weights, temperature_nll
from moefuse.fusion.model import MultimodalMoEModel, build_collator
from moefuse.progress import track


@torch.no_grad()
def collect_logits(model: MultimodalMoEModel, loader, progress: bool = False) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each task's per-voter logits [N, K, C], which voters voted [N, K] and target indices [N] over a loader
    (eval mode)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[tuple[torch.Tensor, ...]]] = {}
    for batch in track(loader, "calibrate", enabled=progress):
        out = model(batch)
        for task, t in out.tasks.items():
            parts.setdefault(task, []).append((t.logits.float(), t.voted, batch["labels"].index_select(0, t.rows)))
    model.train(was_training)
    return {task: tuple(torch.cat(column) for column in zip(*ps)) for task, ps in parts.items()}


@torch.no_grad()
def calibrate(model: MultimodalMoEModel, loader, progress: bool = False) -> dict[str, dict]:
    """Fit and set every task's post-hoc parameters on `loader`'s samples: the vote weights where the heads combine
    by `weighted` (stacking on held-out data, replacing those learned in training), then the temperature of the
    combined vote -> {task: {temperature, samples, nll_before, nll_after[, vote_weights]}}. A task whose samples
    cannot support a fit (`fit_problem`: too few, or no wrong answer) keeps T = 1 and its weights, with a warning
    naming it and the count, and its entry says why: {temperature: 1.0, samples, skipped}."""
    report = {}
    for task, (logits, voted, targets) in collect_logits(model, loader, progress).items():
        heads, entry = model.heads[task], {}
        problem = fit_problem(heads.combine(logits, voted)[0], targets, model.cfg.heads.calibration_min_samples)
        if problem is not None:
            warnings.warn(f"task {task!r} is not calibrated (temperature 1, vote weights as trained): {problem}",
                          stacklevel=2)
            heads.temperature.fill_(1.0)
            report[task] = {"temperature": 1.0, "samples": int((targets >= 0).sum()), "skipped": problem}
            continue
        if heads.vote_logits is not None:
            heads.vote_logits.copy_(fit_vote_weights(logits.softmax(-1), targets, voted))
            entry["vote_weights"] = heads.vote_logits.softmax(0).tolist()
        probs, _, _ = heads.combine(logits, voted)  # [N, C], before temperature scaling
        temperature = fit_temperature(probs, targets)
        heads.temperature.fill_(temperature)
        keep = targets >= 0
        report[task] = {"temperature": temperature, "samples": int(keep.sum()),
                        "nll_before": float(temperature_nll(probs[keep], targets[keep], 1.0)),
                        "nll_after": float(temperature_nll(probs[keep], targets[keep], temperature)), **entry}
    return report


def calibrate_run(model: MultimodalMoEModel, cfg: ExperimentConfig, progress: bool = True) -> dict[str, dict] | None:
    """The calibrate step of a run: on its validation split, as training validated (the same dropped
    modalities); None when the run has no validation data or `heads.calibrate` is off."""
    if not cfg.heads.calibrate or not cfg.data.val_shards:
        return None
    collator = build_collator(model, train=False, drop_modalities=cfg.data.drop_modalities)
    loader = build_eval_loader(cfg.data, collator, tasks=model.task_names, **model.decode_options())
    return calibrate(model, loader, progress=progress)


__all__ = ["calibrate", "calibrate_run", "collect_logits"]
