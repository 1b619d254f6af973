"""Building an ensemble folder from exported models on a split, the library part of `moefuse ensemble`: run every
member over the split once (the members' answers), cross-fit each combination rule (every figure comes from a
combiner fit on the other folds: `moefuse.fusion.ensemble_combine.cross_fit`), fit the chosen rule on all rows,
and write the folder (`moefuse.fusion.ensemble_folder`) with its card.

The figures, per task: each member's accuracy over the samples it answers and the share it answers, the best single
member (of those that answer every sample, as `metrics.best_single_voter`), and the ensemble under every rule
(accuracy and ECE), so the gain is always read beside the best member.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moefuse.configutil import ConfigError
from moefuse.datasets import make_loader
from moefuse.datasets.collate import IGNORE_INDEX
from moefuse.evaluation.loop import DATA_COUNTS, count_into, to_device
from moefuse.evaluation.metrics import best_single_voter, expected_calibration_error
from moefuse.fusion.ensemble import EnsembleModel, build_ensemble_model, media_mismatch, task_mismatch
from moefuse.fusion.ensemble_combine import (
    RULES,
    MemberAnswers,
    TaskCombiner,
    cross_fit,
    fit_combiner,
    gate_feature_names,
)
from moefuse.fusion.ensemble_folder import EnsembleConfig, check_new_folder, ensemble_card, write_ensemble_folder
from moefuse.fusion.model import MultimodalMoEModel
from moefuse.progress import track


@dataclass
class TaskAnswers:
    """Every member's answers to one task's samples of the split."""

    ids: list[str]
    answers: MemberAnswers
    targets: torch.Tensor  # [N] class index, IGNORE_INDEX when unknown


@dataclass
class EnsembleBuild:
    """What `build_ensemble` did: the config it wrote (figures included) and the data counts of the split."""

    cfg: EnsembleConfig
    out: Path
    data: dict[str, int] = field(default_factory=dict)
    best_member: dict[str, str] = field(default_factory=dict)  # task -> the best single member's name


def member_names(folders: list[Path]) -> list[str]:
    """A name per member folder: its folder name (a run's `model/`: the run's), made of name characters, numbered
    where two are the same."""
    names: list[str] = []
    for folder in folders:
        resolved = folder.resolve()
        base = resolved.parent.name if resolved.name == "model" else resolved.name
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", base).lstrip("-_.")[:70] or "member"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


@torch.no_grad()
def collect_answers(model: EnsembleModel, loader, progress: bool = True) -> tuple[dict[str, TaskAnswers], dict]:
    """Run the ensemble (every member once per sample) over a loader -> per task the members' answers, and the
    data counts (`moefuse.evaluation.loop.DATA_COUNTS`)."""
    model.eval()
    counts: dict[str, int] = dict.fromkeys(DATA_COUNTS, 0)
    parts: dict[str, list] = {}
    for batch in track(loader, "ensemble", enabled=progress):
        count_into(counts, batch)
        batch = to_device(batch, torch.device("cpu"))
        out = model(batch)
        for task, x in out.answers.items():
            rows = out.tasks[task].rows.tolist()
            parts.setdefault(task, []).append(([batch["ids"][r] for r in rows], x, batch["labels"][rows]))
    count_into(counts, getattr(loader, "tail_counts", None) or {})
    result = {}
    for task, chunks in parts.items():
        result[task] = TaskAnswers(
            ids=[i for ids, _, _ in chunks for i in ids],
            answers=MemberAnswers(*(torch.cat([getattr(x, k) for _, x, _ in chunks])
                                    for k in ("probs", "answers", "present"))),
            targets=torch.cat([y for _, _, y in chunks]))
    return result, counts


def member_scores(a: TaskAnswers) -> tuple[list[float | None], list[float]]:
    """Each member's accuracy over the samples it answers (None where it answers none; an unknown target counts
    wrong, as in the metrics) and the share of the samples it answers."""
    right = a.answers.probs.argmax(-1) == a.targets[:, None]  # [N, M]
    n = len(a.ids)
    acc, cover = [], []
    for m in range(right.shape[1]):
        mask = a.answers.answers[:, m]
        k = int(mask.sum())
        acc.append(float(right[mask, m].float().mean()) if k else None)
        cover.append(k / n)
    return acc, cover


def rule_scores(a: TaskAnswers, rule: str, folds: int, features: list[str]) -> tuple[float, float]:
    """(accuracy, ECE) of `rule`, cross-fitted over `folds`."""
    fit = lambda x, y: fit_combiner(rule, x, y, features)  # noqa: E731
    crossed = cross_fit(a.ids, a.answers, a.targets, folds, fit).combined
    correct = (crossed.prediction == a.targets).tolist()
    confidence = crossed.probs.gather(1, crossed.prediction[:, None]).squeeze(1).tolist()
    return sum(correct) / len(correct), expected_calibration_error(confidence, correct)


def load_members(folders: list[Path]) -> dict[str, MultimodalMoEModel]:
    """The member models, named (`member_names`); a folder that does not load is a ConfigError naming it, and
    members that do not answer the same tasks with the same vocabularies are refused naming the member and task."""
    members = {}
    for name, folder in zip(member_names(folders), folders):
        try:
            members[name] = MultimodalMoEModel.from_pretrained(folder)
        except ConfigError as e:
            raise ConfigError(f"member {name} ({folder}): {e}") from None
    problem = task_mismatch(members)
    if problem is not None:
        raise ConfigError(f"{problem}; every member must answer the same tasks with the same vocabularies")
    problem = media_mismatch(members)
    if problem is not None:
        raise ConfigError(problem)
    return members


def build_ensemble(folders: list[Path], shards: list[str], out: Path, split: str = "val", combine: str = "gated",
                   folds: int = 5, batch_size: int = 64, num_workers: int = 0, progress: bool = True
                   ) -> EnsembleBuild:
    """Fit an ensemble of the model folders `folders` on `split` of `shards` and write it to `out` (new or
    empty): see the module docstring."""
    if combine not in RULES:
        raise ConfigError(f"--combine must be one of {', '.join(RULES)}, got {combine!r}")
    check_new_folder(out, folders)
    members = load_members(folders)
    soft = {t.name: TaskCombiner(rule="soft") for t in next(iter(members.values())).cfg.tasks}
    model = build_ensemble_model(members, soft, folds=folds, split=split)
    loader = make_loader(shards, model.collator(), batch_size, split=split, num_workers=num_workers,
                         tasks=model.task_names, **model.decode_options())
    answers, counts = collect_answers(model, loader, progress)
    if not answers:
        found = ", ".join(f"{n} {DATA_COUNTS[k]}" for k, n in counts.items())
        raise ConfigError(f"no sample of the members' tasks ({', '.join(model.task_names)}) could be read from "
                          f"{', '.join(shards)} split {split!r} ({found})")
    features = gate_feature_names(list(model.encoders), model.member_names)
    figures: dict[str, dict[str, float | None]] = {}
    best: dict[str, str] = {}
    for task, a in answers.items():
        acc, cover = member_scores(a)
        for name, x, c in zip(model.member_names, acc, cover):
            figures.setdefault(f"member:{name}", {})[task] = x
            figures.setdefault(f"coverage:{name}", {})[task] = c
        top = best_single_voter(acc, cover)
        best[task] = next(n for n, x, c in zip(model.member_names, acc, cover) if x == top)
        figures.setdefault("best member", {})[task] = top
        for rule in RULES:
            accuracy, ece = rule_scores(a, rule, folds, features)
            figures.setdefault(f"ensemble:{rule}", {})[task] = accuracy
            figures.setdefault(f"ece:{rule}", {})[task] = ece
    final = {task: fit_combiner(combine, a.answers, a.targets, features, task=task) for task, a in answers.items()}
    for task in model.task_names:  # a task the split has no sample of: the plain mean
        final.setdefault(task, fit_combiner(combine, *_no_rows(model, task), features, task=task))
    total, shared = model.parameter_counts()
    cfg = EnsembleConfig(members=model.cfg.members, combine=combine, folds=folds, split=split,  # type: ignore[arg-type]
                         tasks=model.cfg.tasks, combiners=final, figures=figures, parameters=total,
                         parameters_deduplicated=shared)
    copies = {name: (lambda dst, src=src: shutil.copytree(src, dst)) for name, src in zip(model.member_names, folders)}
    write_ensemble_folder(out, cfg, copies, ensemble_card(cfg, out.name))
    return EnsembleBuild(cfg, out, counts, best)


def _no_rows(model: EnsembleModel, task: str) -> tuple[MemberAnswers, torch.Tensor]:
    c = len(model.cfg.tasks[model.task_names.index(task)].labels)
    m, q = len(model.member_names), len(model.encoders)
    empty = MemberAnswers(torch.zeros(0, m, c), torch.zeros(0, m, dtype=torch.bool),
                          torch.zeros(0, q, dtype=torch.bool))
    return empty, torch.full((0,), IGNORE_INDEX, dtype=torch.long)


def format_build(build: EnsembleBuild) -> str:
    """The table `moefuse ensemble` prints: each member's accuracy per task, the best member, the ensemble
    (cross-fitted) under every rule with its ECE, the stored rule marked."""
    cfg = build.cfg
    tasks = [t.name for t in cfg.tasks if t.name in build.best_member]
    width = max(24, *(len(k) + 12 for k in cfg.figures))
    lines = [f"{'model (accuracy on ' + cfg.split + ')':<{width}}" + "".join(f"{t:>7}{'':9}" for t in tasks)]

    def cell(v: float | None, extra: str = "") -> str:
        return f"{'n/a' if v is None else f'{100 * v:.1f}':>7} {extra:<8}"

    for m in cfg.members:
        cover = cfg.figures[f"coverage:{m.name}"]
        lines.append(f"{'member ' + m.name:<{width}}" + "".join(
            cell(cfg.figures[f"member:{m.name}"].get(t), "" if cover.get(t) == 1.0 else f"({100 * cover[t]:.0f}%)")
            for t in tasks))
    lines.append(f"{'best member':<{width}}" + "".join(cell(cfg.figures["best member"][t]) for t in tasks)
                 + "   (" + ", ".join(f"{t}: {build.best_member[t]}" for t in tasks) + ")")
    for rule in RULES:
        mark = " *" if rule == cfg.combine else ""
        lines.append(f"{'ensemble ' + rule + mark:<{width}}" + "".join(
            cell(cfg.figures[f"ensemble:{rule}"][t], f"e{cfg.figures[f'ece:{rule}'][t]:.3f}") for t in tasks))
    lines.append(f"ensemble figures cross-fitted over {cfg.folds} folds (e = ECE); * = the rule stored in {build.out}")
    lines.append(f"parameters: {cfg.parameters:,} in all, {cfg.parameters_deduplicated:,} with identical encoders "
                 f"shared")
    return "\n".join(line.rstrip() for line in lines)


__all__ = ["EnsembleBuild", "TaskAnswers", "build_ensemble", "collect_answers", "format_build", "load_members",
           "member_names", "member_scores", "rule_scores"]
