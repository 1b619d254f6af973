"""The ensemble folder: what `moefuse ensemble` writes and `EnsembleModel.from_pretrained`, `evaluate`, `predict`
and `serve` load.

    ensemble.json       the ensemble's config (EnsembleConfig, strict JSON): its members and their sub-folders, the
                        combination rule, the folds it was cross-fitted with, the tasks with their vocabularies, the
                        fitted combiner of each task (weights, gate coefficients, temperature), the figures on the
                        split it was built on and its cost. Its presence is what makes a folder an ensemble.
    members/NAME/       each member: a whole model folder (`moefuse.pretrained.folder`), loadable on its own
    README.md           the model card: members, their figures beside the ensemble's, the combiner, the cost

Written as a model folder is: in a temp folder beside the target, renamed into place when complete (a failed
write leaves nothing). Read with every field checked: a damaged or edited ensemble.json is a ConfigError naming the
file and the field.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from moefuse.configutil import (
    Config,
    ConfigError,
    atomic_write_text,
    dumps_json,
    from_dict,
    read_json_file,
    replace_dir,
    to_dict,
)
from moefuse.errors import naming
from moefuse.fusion.ensemble_combine import RULES, Rule, TaskCombiner
from moefuse.fusion.heads import TaskConfig

ENSEMBLE_JSON = "ensemble.json"
ENSEMBLE_FORMAT = 1
MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
MAX_MEMBERS = 64


@dataclass
class MemberEntry(Config):
    """One member of the ensemble."""

    name: str
    """How reports name the member (its voter name); letters, digits, `_`, `.`, `-`."""
    folder: str = ""
    """Its model folder inside the ensemble folder: members/NAME."""
    parameters: int = 0
    """Its parameter count."""

    def __post_init__(self) -> None:
        self.check(bool(MEMBER_NAME.fullmatch(self.name or "")), "name",
                   f"must be 1-80 letters, digits, _, . or -, starting with a letter or digit, got {self.name!r}")
        self.check(self.folder == f"members/{self.name}", "folder",
                   f"must be members/{self.name} (a member lives inside the ensemble folder), got {self.folder!r}")
        self.check(self.parameters >= 0, "parameters", f"must be >= 0, got {self.parameters}")


@dataclass
class EnsembleConfig(Config):
    """The whole of ensemble.json."""

    format: int = ENSEMBLE_FORMAT
    """The ensemble folder format."""
    members: list[MemberEntry] = field(default_factory=list)
    """The members, in voter order."""
    combine: Rule = "soft"
    """The combination rule every task's combiner uses."""
    folds: int = 5
    """Folds of the cross-fitting its figures come from."""
    split: str = "val"
    """The split the combiner was fit on."""
    fit_drops: list[str] = field(default_factory=list)
    """Modalities removed in turn from copies of the split's samples, fit on beside the split as it is (so that the
    gate learns who to trust without each one); [] = the split as it is."""
    scored_corruptions: list[str] = field(default_factory=list)
    """Corruptions (`evaluate --corrupt` spellings) under which the cross-fitted combiners were scored, never fit."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """The tasks with their vocabularies (every member's, the same)."""
    combiners: dict[str, TaskCombiner] = field(default_factory=dict)
    """Per task, the combiner fit on all rows of the split."""
    figures: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """Accuracy per task on the split: `member:NAME` (over the samples it answers), `coverage:NAME` (the share it
    answers), `best member`; for each rule, cross-fitted, `ensemble:RULE`, `ece:RULE` and `auroc:RULE` (of the
    confidence for wrong answers), and `qtype:RULE:QTYPE` (accuracy per question type, meta.qtype, under full inputs
    only, where the samples carry one); the same with ` @ MODALITY removed` for each of fit_drops and
    ` @ CORRUPTION` for each of scored_corruptions."""
    parameters: int = 0
    """Parameters of all members together."""
    parameters_deduplicated: int = 0
    """Parameters once encoders with identical weights are shared."""

    config_key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.check(self.format == ENSEMBLE_FORMAT, "format", f"{self.format} is not an ensemble format this moefuse "
                   f"reads ({ENSEMBLE_FORMAT})")
        names = [m.name for m in self.members]
        self.check(1 <= len(names) <= MAX_MEMBERS, "members", f"1 to {MAX_MEMBERS} members, got {len(names)}")
        self.check(len(set(names)) == len(names), "members", f"member names must be unique, got {names}")
        self.check(self.combine in RULES, "combine", f"must be one of {', '.join(RULES)}, got {self.combine!r}")
        self.check(2 <= self.folds <= 100, "folds", f"must be in [2, 100], got {self.folds}")
        tasks = [t.name for t in self.tasks]
        self.check(bool(tasks) and len(set(tasks)) == len(tasks), "tasks", f"distinct task names, got {tasks}")
        self.check(all(t.labels for t in self.tasks), "tasks", "every task needs its vocabulary (labels)")
        self.check(sorted(self.combiners) == sorted(tasks), "combiners",
                   f"one combiner per task ({', '.join(tasks)}), got {', '.join(self.combiners) or 'none'}")
        for task, c in self.combiners.items():
            self.check(c.task in ("", task), f"combiners.{task}.task", f"must be {task!r}, got {c.task!r}")
            self.check(c.rule == self.combine, f"combiners.{task}.rule", f"must be the ensemble's rule "
                       f"{self.combine!r}, got {c.rule!r}")
            count = c.members()
            self.check(count is None or count == len(names), f"combiners.{task}",
                       f"parameters for {count} members, but the ensemble has {len(names)}")
        self.check(self.parameters >= 0 and 0 <= self.parameters_deduplicated <= max(self.parameters, 0),
                   "parameters_deduplicated", "must be in [0, parameters]")


FULL = "full"
"""The condition of the split as it is (EnsembleConfig.figures keys without a condition)."""


def removed(modality: str) -> str:
    """The condition name of the split with `modality` removed from every sample."""
    return f"{modality} removed"


def figure_key(kind: str, name: str, condition: str) -> str:
    """A key of EnsembleConfig.figures: `KIND:NAME` (or `KIND` without a name) under full inputs, with
    ` @ CONDITION` otherwise."""
    key = f"{kind}:{name}" if name else kind
    return key if condition == FULL else f"{key} @ {condition}"


def condition_figures(figures: dict[str, dict[str, float | None]], condition: str
                      ) -> dict[str, dict[str, float | None]]:
    """The figures of one condition, under their keys without the condition."""
    if condition == FULL:
        return {k: v for k, v in figures.items() if " @ " not in k}
    suffix = f" @ {condition}"
    return {k[: -len(suffix)]: v for k, v in figures.items() if k.endswith(suffix)}


def is_ensemble_folder(path: str | Path) -> bool:
    """Whether `path` is an ensemble folder (it holds ensemble.json)."""
    return (Path(path) / ENSEMBLE_JSON).is_file()


def read_ensemble_config(path: str | Path) -> EnsembleConfig:
    """ensemble.json of an ensemble folder, every field checked; a ConfigError names the file and the field."""
    where = Path(path) / ENSEMBLE_JSON
    data = read_json_file(where, 16 << 20)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object (the ensemble config), got {type(data).__name__}")
    try:
        cfg = from_dict(EnsembleConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # a value of the right type that a check cannot even compare
        raise ConfigError(f"{where}: {str(e)[:300]}") from None
    for m in cfg.members:
        if not (Path(path) / m.folder).is_dir():
            raise ConfigError(f"{where}: members.{m.name}.folder: {Path(path) / m.folder} is missing; the ensemble "
                              f"folder is incomplete (copy it again, or build it again with moefuse ensemble)")
    return cfg


def check_new_folder(out: Path, sources: list[Path]) -> None:
    """The ensemble goes into a new or empty folder, never over a member or anything a user has (nothing is
    deleted); a ConfigError says which."""
    resolved = out.resolve()
    for src in sources:
        s = src.resolve()
        if resolved == s or s in resolved.parents or resolved in s.parents:
            raise ConfigError(f"--out {out} is (or holds, or is inside) the member folder {src}; choose a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder (nothing is overwritten)")


def write_ensemble_folder(out: str | Path, cfg: EnsembleConfig, members: dict[str, Callable[[Path], object]],
                          card: str) -> Path:
    """Write the ensemble folder atomically: each member's folder by `members[name](folder)` (a copy, or
    `save_pretrained`), ensemble.json and README.md into a temp folder beside `out`, then renamed into place. `out`
    must be new, empty or an earlier ensemble folder (replaced); a failed write leaves nothing and raises an OSError
    naming the folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not is_ensemble_folder(out):
        raise ConfigError(f"{out} exists and is not an ensemble folder; write the ensemble into a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with naming(out, temp=tmp):
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "members").mkdir(parents=True)
            for entry in cfg.members:
                members[entry.name](tmp / entry.folder)
            atomic_write_text(tmp / ENSEMBLE_JSON, dumps_json(to_dict(cfg), ENSEMBLE_JSON, indent=2))
            atomic_write_text(tmp / "README.md", card)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            replace_dir(tmp, out)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, ConfigError)):
            raise
        raise OSError(errno.EIO, f"cannot write the ensemble: {e}", str(out)) from e
    return out


def ensemble_card(cfg: EnsembleConfig, name: str) -> str:
    """The ensemble's model card: what it is, its members and their figures beside the ensemble's (cross-fitted),
    the combiner and the cost."""
    tasks = [t.name for t in cfg.tasks]
    lines = ["---", "library_name: moefuse", "tags: [moefuse, multimodal, ensemble]", "---", "",
             f"# {name}", "",
             f"An ensemble of {len(cfg.members)} moefuse models (`members/`), combined per task by the `{cfg.combine}` "
             f"rule, fit on the `{cfg.split}` split and cross-fitted over {cfg.folds} folds: every ensemble figure "
             f"below comes from samples its combiner was not fit on. Load it with `EnsembleModel.from_pretrained` or "
             f"give the folder to `moefuse evaluate`, `predict` or `serve`.", "",
             f"## Accuracy on `{cfg.split}`", "", "| model | " + " | ".join(tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    lines += _figure_rows(cfg, FULL, tasks)
    for m in cfg.fit_drops:
        lines += ["", f"### With {m} removed from every sample (cross-fitted, the combiner fit on such copies too)", "",
                  "| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        lines += _figure_rows(cfg, removed(m), tasks)
    for c in cfg.scored_corruptions:
        lines += ["", f"### Under {c} (cross-fitted; the combiner never saw corrupted inputs)", "",
                  "| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        lines += _figure_rows(cfg, c, tasks)
    lines += _qtype_rows(cfg, tasks)
    lines += ["", "A member's accuracy is over the samples it answers (a member without any of a sample's "
              "modalities abstains); its share of them:", ""]
    for m in cfg.members:
        cover = cfg.figures.get(f"coverage:{m.name}", {})
        lines.append(f"- `{m.name}` ({m.parameters:,} parameters): " + ", ".join(
            f"{t} {_pct(cover.get(t))}" for t in tasks))
    lines += ["", "## Combiner", ""]
    for task, c in cfg.combiners.items():
        what = "no parameters"
        if c.rule == "weighted":
            what = "weights " + ", ".join(f"{m.name} {w:.3f}" for m, w in zip(cfg.members, c.weights or []))
        elif c.rule == "gated":
            what = f"a logistic-regression gate on {len(c.gate_features or [])} features"
        lines.append(f"- {task}: `{c.rule}`, {what}; temperature {c.temperature:.3f} ({c.samples} samples)")
    lines += ["", "## Cost", "", f"{cfg.parameters:,} parameters in all; {cfg.parameters_deduplicated:,} once "
              f"encoders with identical weights are shared (each such encoder runs once per sample). Every member "
              f"runs on every sample it can answer.", ""]
    return "\n".join(lines)


def _figure_rows(cfg: EnsembleConfig, condition: str, tasks: list[str]) -> list[str]:
    """The card's table rows of one condition: members, best member, the ensemble under every rule."""
    lines = []
    for key, row in condition_figures(cfg.figures, condition).items():
        if key.startswith(("coverage:", "ece:", "auroc:", "qtype:")):
            continue
        label = key.replace("member:", "member ").replace("ensemble:", "ensemble, ")
        if key == f"ensemble:{cfg.combine}":
            label += " (this folder)"
        lines.append(f"| {label} | " + " | ".join(_pct(row.get(t)) for t in tasks) + " |")
    return lines


def _qtype_rows(cfg: EnsembleConfig, tasks: list[str]) -> list[str]:
    """The card's accuracy per question type (meta.qtype) of this folder's rule, under full inputs; none without."""
    prefix = f"qtype:{cfg.combine}:"
    rows = {k[len(prefix):]: v for k, v in condition_figures(cfg.figures, FULL).items() if k.startswith(prefix)}
    if not rows:
        return []
    return ["", f"### By question type (`{cfg.combine}`, cross-fitted, the split as it is)", "",
            "| question type | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks),
            *(f"| {q} | " + " | ".join(_pct(v.get(t)) for t in tasks) + " |" for q, v in rows.items())]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


__all__ = ["ENSEMBLE_JSON", "FULL", "EnsembleConfig", "MemberEntry", "check_new_folder", "condition_figures",
           "ensemble_card", "figure_key", "is_ensemble_folder", "read_ensemble_config", "removed",
           "write_ensemble_folder"]
