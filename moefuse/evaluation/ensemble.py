"""Building an ensemble folder from exported models on a split, the library part of `moefuse ensemble`: run every
member over the split once as it is and once with each modality removed (`fit_drops`: the members' answers under
each condition), cross-fit each combination rule on all those rows together (every figure comes from a combiner fit
on the other folds, and the copies of a sample share its fold: `moefuse.fusion.ensemble_combine.cross_fit`), fit
the chosen rule on all rows, and write the folder (`moefuse.fusion.ensemble_folder`) with its card.

Why the copies: a gate learns whom to trust from the rows it is fit on. Fit on the split as it is, it never sees a
sample without the audio when every sample has it, and cannot learn that the image specialist should then answer
(Jacobs et al. 1991's gate is only as good as the inputs it was trained on); the removed-modality copies are the
inputs `evaluate --drop` will give it. The temperature, though, is fit on the split as it is alone: one temperature
per task cannot suit both a full sample and a copy that lost what the answer needs (an avqa question without its
text), and fit on both it leaves the full samples under-confident (measured on AV-digits: avqa ECE 0.30 instead of
the members' 0.03-0.04); the copies' calibration is reported for what it is.

The figures, per task: each member's accuracy over the samples it answers and the share it answers, the best single
member (of those that answer every sample, as `metrics.best_single_voter`), and the ensemble under every rule
(accuracy and ECE), so the gain is always read beside the best member.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moefuse.configutil import ConfigError
from moefuse.datasets import make_loader
from moefuse.datasets.collate import IGNORE_INDEX
from moefuse.datasets.corruption import Corruption
from moefuse.evaluation.loop import DATA_COUNTS, count_into, to_device
from moefuse.evaluation.metrics import best_single_voter, error_detection_auroc, expected_calibration_error
from moefuse.fusion.ensemble import EnsembleModel, build_ensemble_model, task_mismatch
from moefuse.fusion.ensemble_combine import (
    RULES,
    MemberAnswers,
    TaskCombiner,
    cross_fit,
    fit_combiner,
    gate_feature_names,
)
from moefuse.fusion.ensemble_folder import (
    FULL,
    EnsembleConfig,
    check_new_folder,
    condition_figures,
    ensemble_card,
    figure_key,
    removed,
    write_ensemble_folder,
)
from moefuse.fusion.model import MultimodalMoEModel
from moefuse.progress import track


@dataclass
class TaskAnswers:
    """Every member's answers to one task's samples of the split."""

    ids: list[str]
    answers: MemberAnswers
    targets: torch.Tensor  # [N] class index, IGNORE_INDEX when unknown
    conditions: list[str] = field(default_factory=list)  # [N] the condition each row was read under
    qtypes: list[str] = field(default_factory=list)  # [N] the sample's meta.qtype ("" where it has none)


@dataclass
class RuleScore:
    """A combination rule's cross-fitted figures under one condition."""

    accuracy: float
    ece: float
    auroc: float | None  # of the confidence for wrong answers; None where every answer is right (or wrong)
    by_qtype: dict[str, float] = field(default_factory=dict)  # accuracy per meta.qtype, where samples carry one


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
def collect_answers(model: EnsembleModel, loader, progress: bool = True, condition: str = FULL
                    ) -> tuple[dict[str, TaskAnswers], dict]:
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
            parts.setdefault(task, []).append(([batch["ids"][r] for r in rows], x, batch["labels"][rows],
                                               [str(batch["meta"][r].get("qtype", "")) for r in rows]))
    count_into(counts, getattr(loader, "tail_counts", None) or {})
    result = {}
    for task, chunks in parts.items():
        result[task] = TaskAnswers(
            ids=[i for ids, *_ in chunks for i in ids],
            answers=MemberAnswers(*(torch.cat([getattr(x, k) for _, x, *_ in chunks])
                                    for k in ("probs", "answers", "present"))),
            targets=torch.cat([y for _, _, y, _ in chunks]), qtypes=[q for *_, qs in chunks for q in qs])
        result[task].conditions = [condition] * len(result[task].ids)
        result[task].answers.calibrate = torch.full((len(result[task].ids),), condition == FULL)
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


def rule_scores(a: TaskAnswers, rule: str, folds: int, features: list[str],
                scored_only: set[str] = frozenset()) -> dict[str, RuleScore]:
    """{condition: figures} of `rule`, cross-fitted over `folds` on the rows of every condition not in
    `scored_only` together (the copies of a sample share its fold: `fold_of` hashes the id), scored per condition
    (and per question type, where the samples carry meta.qtype)."""
    fit = lambda x, y: fit_combiner(rule, x, y, features)  # noqa: E731
    mask = [c not in scored_only for c in a.conditions]
    crossed = cross_fit(a.ids, a.answers, a.targets, folds, fit, mask).combined
    correct = (crossed.prediction == a.targets).tolist()
    confidence = crossed.probs.gather(1, crossed.prediction[:, None]).squeeze(1).tolist()
    scores = {}
    for condition in dict.fromkeys(a.conditions):
        rows = [i for i, c in enumerate(a.conditions) if c == condition]
        right, conf = [correct[i] for i in rows], [confidence[i] for i in rows]
        by_qtype: dict[str, list[bool]] = {}
        for i in rows:
            if a.qtypes and a.qtypes[i]:
                by_qtype.setdefault(a.qtypes[i], []).append(correct[i])
        scores[condition] = RuleScore(sum(right) / len(right), expected_calibration_error(conf, right),
                                      error_detection_auroc([-c for c in conf], [not r for r in right]),
                                      {q: sum(v) / len(v) for q, v in sorted(by_qtype.items())})
    return scores


def score_members(names: list[str], by_condition: dict[str, dict[str, TaskAnswers]], task: str,
                  figures: dict[str, dict[str, float | None]]) -> str:
    """Each member's accuracy and coverage on `task` under every condition, into `figures` -> the best single
    member's name (under full inputs)."""
    best = ""
    for condition, answers in by_condition.items():
        acc, cover = member_scores(answers[task])
        for name, x, c in zip(names, acc, cover):
            figures.setdefault(figure_key("member", name, condition), {})[task] = x
            figures.setdefault(figure_key("coverage", name, condition), {})[task] = c
        top = best_single_voter(acc, cover)
        figures.setdefault(figure_key("best member", "", condition), {})[task] = top
        if condition == FULL:
            best = next(n for n, x, c in zip(names, acc, cover) if x == top)
    return best


def collect_conditions(model: EnsembleModel, conditions: dict[str, dict], shards: list[str], split: str,
                       batch_size: int, num_workers: int, progress: bool
                       ) -> tuple[dict[str, dict[str, TaskAnswers]], dict[str, int]]:
    """The members' answers under each condition ({name: collator options}; the first is the split as it is) ->
    ({condition: {task: answers}}, the data counts of the split as it is); a split without a sample of the
    members' tasks is a ConfigError saying what was found."""
    by_condition: dict[str, dict[str, TaskAnswers]] = {}
    counts: dict[str, int] = {}
    for condition, options in conditions.items():
        loader = make_loader(shards, model.collator(**options), batch_size, split=split, num_workers=num_workers,
                             tasks=model.task_names, **model.decode_options())
        by_condition[condition], found = collect_answers(model, loader, progress, condition)
        counts = counts or found
        if not by_condition[condition]:
            found = ", ".join(f"{n} {DATA_COUNTS[k]}" for k, n in counts.items())
            raise ConfigError(f"no sample of the members' tasks ({', '.join(model.task_names)}) could be read from "
                              f"{', '.join(shards)} split {split!r} ({found})")
    return by_condition, counts


def fit_drops(model: EnsembleModel, fit_drop: list[str] | None) -> list[str]:
    """The modalities removed in turn from copies of the split for fitting, checked against the ensemble's."""
    if fit_drop is None:
        return list(model.encoders) if len(model.encoders) > 1 else []
    unknown = [m for m in fit_drop if m not in model.encoders]
    if unknown:
        raise ConfigError(f"--fit-drop: {unknown[0]!r} is not a modality the members read "
                          f"({', '.join(model.encoders)})")
    return list(dict.fromkeys(fit_drop))


def concat_answers(parts: list[TaskAnswers]) -> TaskAnswers:
    """The rows of several conditions' answers to one task, one after another."""
    return TaskAnswers(ids=[i for p in parts for i in p.ids],
                       answers=MemberAnswers(*(torch.cat([getattr(p.answers, k) for p in parts])
                                               for k in ("probs", "answers", "present", "calibrate"))),
                       targets=torch.cat([p.targets for p in parts]),
                       conditions=[c for p in parts for c in p.conditions],
                       qtypes=[q for p in parts for q in (p.qtypes or [""] * len(p.ids))])


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
    return members  # media settings that differ: refused by EnsembleModel itself (media_mismatch)


def build_ensemble(folders: list[Path], shards: list[str], out: Path, split: str = "val", combine: str = "gated",
                   folds: int = 5, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                   fit_drop: list[str] | None = None, score_corrupt: Sequence[Corruption] = ()) -> EnsembleBuild:
    """Fit an ensemble of the model folders `folders` on `split` of `shards` and write it to `out` (new or
    empty): see the module docstring. `fit_drop`: the modalities removed in turn from copies of the split's samples
    for fitting (None: each of the ensemble's modalities when it reads two or more; []: the split as it is).
    `score_corrupt`: corruptions (`evaluate --corrupt`) under which the cross-fitted combiners are also scored,
    never fit on."""
    if combine not in RULES:
        raise ConfigError(f"--combine must be one of {', '.join(RULES)}, got {combine!r}")
    check_new_folder(out, folders)
    members = load_members(folders)
    soft = {t.name: TaskCombiner(rule="soft") for t in next(iter(members.values())).cfg.tasks}
    model = build_ensemble_model(members, soft, folds=folds, split=split)
    drops = fit_drops(model, fit_drop)
    conditions = {FULL: {}, **{removed(m): {"drop_modalities": [m]} for m in drops},
                  **{str(c): {"corrupt": [c]} for c in score_corrupt}}
    by_condition, counts = collect_conditions(model, conditions, shards, split, batch_size, num_workers, progress)
    scored_only = {str(c) for c in score_corrupt}
    features = gate_feature_names(list(model.encoders), model.member_names)
    figures: dict[str, dict[str, float | None]] = {}
    best: dict[str, str] = {}
    answers = {task: concat_answers([c[task] for c in by_condition.values()]) for task in by_condition[FULL]}
    for task, a in answers.items():
        best[task] = score_members(model.member_names, by_condition, task, figures)
        for rule in RULES:
            for condition, score in rule_scores(a, rule, folds, features, scored_only).items():
                figures.setdefault(figure_key("ensemble", rule, condition), {})[task] = score.accuracy
                figures.setdefault(figure_key("ece", rule, condition), {})[task] = score.ece
                figures.setdefault(figure_key("auroc", rule, condition), {})[task] = score.auroc
                for qtype, accuracy in score.by_qtype.items() if condition == FULL else ():
                    figures.setdefault(figure_key("qtype", f"{rule}:{qtype}", condition), {})[task] = accuracy
    answers = {task: concat_answers([c[task] for name, c in by_condition.items() if name not in scored_only])
               for task in by_condition[FULL]}  # the final combiner: fit on every row the folds fit on
    final = {task: fit_combiner(combine, a.answers, a.targets, features, task=task) for task, a in answers.items()}
    for task in model.task_names:  # a task the split has no sample of: the plain mean
        final.setdefault(task, fit_combiner(combine, *_no_rows(model, task), features, task=task))
    total, shared = model.parameter_counts()
    cfg = EnsembleConfig(members=model.cfg.members, combine=combine, folds=folds, split=split,  # type: ignore[arg-type]
                         fit_drops=drops, scored_corruptions=sorted(scored_only), tasks=model.cfg.tasks,
                         combiners=final, figures=figures, parameters=total, parameters_deduplicated=shared)
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
    """The tables `moefuse ensemble` prints, one per condition (the split as it is, then each modality removed):
    each member's accuracy per task, the best member, the ensemble (cross-fitted) under every rule with its ECE, the
    stored rule marked."""
    cfg = build.cfg
    tasks = [t.name for t in cfg.tasks if t.name in build.best_member]
    width = max(24, *(len(k.split(" @ ")[0]) + 12 for k in cfg.figures))

    def cell(v: float | None, extra: str = "") -> str:
        return f"{'n/a' if v is None else f'{100 * v:.1f}':>7} {extra:<8}"

    lines = []
    for condition in [FULL, *map(removed, cfg.fit_drops), *cfg.scored_corruptions]:
        f = condition_figures(cfg.figures, condition)
        title = f"model (accuracy on {cfg.split}" + ("" if condition == FULL else f", {condition}") + ")"
        lines += ["" if lines else None, f"{title:<{width}}" + "".join(f"{t:>7}{'':9}" for t in tasks)]
        for m in cfg.members:
            cover = f[f"coverage:{m.name}"]
            lines.append(f"{'member ' + m.name:<{width}}" + "".join(
                cell(f[f"member:{m.name}"].get(t), "" if cover.get(t) == 1.0 else f"({100 * cover[t]:.0f}%)")
                for t in tasks))
        lines.append(f"{'best member':<{width}}" + "".join(cell(f["best member"][t]) for t in tasks)
                     + ("   (" + ", ".join(f"{t}: {build.best_member[t]}" for t in tasks) + ")"
                        if condition == FULL else ""))
        for rule in RULES:
            mark = " *" if rule == cfg.combine else ""
            lines.append(f"{'ensemble ' + rule + mark:<{width}}" + "".join(
                cell(f[f"ensemble:{rule}"][t], f"e{f[f'ece:{rule}'][t]:.3f}") for t in tasks))
    fitted = "the split as it is" + "".join(f", and with {m} removed" for m in cfg.fit_drops) + (
        f" (scored, never fit, under {', '.join(cfg.scored_corruptions)})" if cfg.scored_corruptions else "")
    lines.append(f"ensemble figures cross-fitted over {cfg.folds} folds (e = ECE), the combiner fit on {fitted}; "
                 f"* = the rule stored in {build.out}")
    lines.append(f"parameters: {cfg.parameters:,} in all, {cfg.parameters_deduplicated:,} with identical encoders "
                 f"shared")
    return "\n".join(line.rstrip() for line in lines if line is not None)


__all__ = ["EnsembleBuild", "RuleScore", "TaskAnswers", "build_ensemble", "collect_answers", "collect_conditions",
           "concat_answers", "fit_drops", "format_build", "load_members", "member_names", "member_scores",
           "rule_scores", "score_members"]
