"""The recipe's calibrate step: after training, fit each task's temperature (Guo et al. 2017) on the validation
split and set it in the model, so that the export's probabilities are calibrated (`moefuse.fusion.calibration`).

Shapes: N validation samples of a task, C its classes.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from moefuse.config import ExperimentConfig
from moefuse.datasets import build_eval_loader
from moefuse.fusion.calibration import fit_temperature, temperature_nll
from moefuse.fusion.model import MultimodalMoEModel, build_collator


@torch.no_grad()
def collect_probs(model: MultimodalMoEModel, loader, progress: bool = False) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each task's uncalibrated ensemble probabilities [N, C] and target indices [N] over a loader (eval mode)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for batch in tqdm(loader, desc="calibrate", disable=not progress, leave=False):
        out = model(batch)
        for task, t in out.tasks.items():
            parts.setdefault(task, []).append((t.uncalibrated.float(), batch["labels"].index_select(0, t.rows)))
    model.train(was_training)
    return {task: (torch.cat([p for p, _ in ps]), torch.cat([y for _, y in ps])) for task, ps in parts.items()}


def calibrate(model: MultimodalMoEModel, loader, progress: bool = False) -> dict[str, dict]:
    """Fit and set every task's temperature on `loader`'s samples -> {task: {temperature, samples, nll_before,
    nll_after}}; a task without validation samples keeps T = 1."""
    report = {}
    for task, (probs, targets) in collect_probs(model, loader, progress).items():
        temperature = fit_temperature(probs, targets)
        model.heads[task].temperature.fill_(temperature)
        keep = targets >= 0
        report[task] = {"temperature": temperature, "samples": int(keep.sum()),
                        "nll_before": float(temperature_nll(probs[keep], targets[keep], 1.0)),
                        "nll_after": float(temperature_nll(probs[keep], targets[keep], temperature))}
    return report


def calibrate_run(model: MultimodalMoEModel, cfg: ExperimentConfig) -> dict[str, dict] | None:
    """The calibrate step of a run: on its validation split, as training validated (the same dropped
    modalities); None when the run has no validation data or `heads.calibrate` is off."""
    if not cfg.heads.calibrate or not cfg.data.val_shards:
        return None
    collator = build_collator(model, train=False, drop_modalities=cfg.data.drop_modalities)
    loader = build_eval_loader(cfg.data, collator, tasks=model.task_names, **model.decode_options())
    return calibrate(model, loader, progress=True)


__all__ = ["calibrate", "calibrate_run", "collect_probs"]
