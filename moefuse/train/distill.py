"""Knowledge distillation in training (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):
the `distill:` section of the experiment config, the teacher pass, and the loss.

A teacher is any model folder that `load_inference_model` loads (a training run's model/ folder, an ensemble
folder) and that answers some of the student's tasks with the same vocabularies. Before training it runs ONCE over
the training split (its own collator with train=False, eval mode, no grad: clean inputs, no augmentation, no
modality dropout), and each sample's per-task log-probabilities are kept in memory, keyed by (task, sample id):
`TeacherTargets`, one float16 array [N_t, C_t] per task and an id -> row index. Memory: 2 bytes per answer per
sample for the arrays plus about 100-150 bytes per sample for the index (Python strings and dict slots), e.g.
100 000 samples of a 10-answer task take 2 MB + ~15 MB. Every epoch reads these; the teacher never runs again, so
distillation costs one inference pass of the teacher, not one per epoch.

The loss, per task t of a batch with n rows, m of them with a teacher target (share s = m / n):

    KD_t   = sum over the student's voters k of the mean, over the rows with a target that k votes on, of
             T^2 * KL(softmax(log p_teacher / T) || softmax(z_k / T))
    loss_t = (1 - alpha * s) * CE_t + alpha * s * KD_t
    loss   = sum over tasks of loss_weight_t * loss_t + the MoE auxiliary losses

CE_t is the model's own task loss (each voter's cross-entropy, summed over voters), so KD_t is on its scale. With a
target for every row (s = 1) this is Hinton's alpha * T^2 * KL + (1 - alpha) * CE; rows without one (a sample the
teacher pass did not see) fall back to the labels: their share of the batch keeps the cross-entropy's full weight,
and they are counted (`missing_rows`, in the step log and export.json). T^2 keeps the soft targets' gradients on
the scale of the hard ones' whatever T is (Hinton et al. 2015, section 2).

Robustness: the student trains as its config says, with modality dropout (fusion.modality_dropout, on the tasks
fusion.modality_dropout_tasks allows), while its targets are the teacher's answers on the FULL sample. A student
that lost a modality learns to answer as the teacher does with every modality: that is how the teacher's
robustness (an ensemble with specialists) moves into one model. The teacher's collator takes every modality of the
data, so a teacher must read each modality the training shards hold.

Several processes (accelerate): each runs the teacher on its 1/N of the training split (the evaluation split by
rank: every sample once), and the parts are gathered to every process (`TeacherTargets.from_parts`), so each
holds every sample's targets, whatever samples its training loader hands it in any epoch. The teacher is loaded on
each process's device and freed after the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from moefuse.configutil import Config, ConfigError
from moefuse.fusion.heads import TaskConfig
from moefuse.fusion.model import ModelOutput
from moefuse.pretrained.export_info import MAX_DISTILL_TEMPERATURE
from moefuse.progress import track

LOG_FLOOR = -60.0
"""The smallest log-probability kept (float16 holds it; e^-60 is no weight at any temperature up to the maximum)."""


@dataclass
class DistillConfig(Config):
    """The `distill:` section: train on a teacher's soft targets as well as the labels (Hinton et al. 2015)."""

    config_key: ClassVar[str] = "distill"

    teacher: str | None = None
    """The teacher's model folder (a training run's model/ folder or an ensemble folder: anything `moefuse evaluate`
    loads); null = no distillation, the labels alone."""
    temperature: float = 2.0
    """Softmax temperature T of teacher and student in the distillation term: above 1 it softens the teacher's
    answers, so that its ranking of the wrong answers is learnt too; the term is scaled by T^2."""
    weight: float = 0.5
    """alpha in [0, 1]: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels), per task; 1 = the
    teacher's soft targets alone, 0 = the labels alone (the teacher pass still runs)."""
    tasks: list[str] | None = None
    """The tasks to distil; null = every task the teacher and the student share. A task whose vocabulary differs
    between them is refused, naming it and the teacher."""
    batch_size: int = 64
    """Samples per batch of the teacher pass, per process."""

    def __post_init__(self) -> None:
        self.check(self.teacher is None or self.teacher.strip() != "", "teacher",
                   "must be a model folder, or null for no distillation")
        self.check(0 < self.temperature <= MAX_DISTILL_TEMPERATURE, "temperature",
                   f"must be in (0, {MAX_DISTILL_TEMPERATURE}], got {self.temperature}")
        self.check_range("weight", 0.0, 1.0)
        self.check_range("batch_size", 1, 1 << 20)
        names = self.tasks
        self.check(names is None or (bool(names) and all(names) and len(set(names)) == len(names)), "tasks",
                   f"must name distinct tasks, or be null for every task teacher and student share; got {names}")


# ------------------------------------------------------------------------------------------------------------------
# the teacher: checked, loaded, run once


def check_teacher_folder(cfg: DistillConfig) -> None:
    """Before anything is written: distill.teacher is a folder (what is in it is checked when it is loaded)."""
    if cfg.teacher is None:
        return
    path = Path(cfg.teacher)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ConfigError(f"distill.teacher: {path} {what}; give a model folder (a training run's model/ folder or "
                          f"an ensemble folder), or distill.teacher=null to train without a teacher")


def load_teacher(cfg: DistillConfig, device: str | torch.device) -> Any:
    """The teacher, loaded as evaluate loads a model folder (every file checked); a folder that is not a model is a
    ConfigError naming distill.teacher."""
    from moefuse.fusion.loading import load_inference_model

    check_teacher_folder(cfg)
    device = torch.device(device)
    if device.type == "cpu":  # accelerate's CPU processes are on "cpu:0", which safetensors does not take
        device = torch.device("cpu")
    try:
        teacher = load_inference_model(cfg.teacher, device=device)
    except ConfigError as e:
        raise ConfigError(f"distill.teacher: {cfg.teacher} is not a model folder moefuse loads: {e}") from None
    return teacher


def _vocabulary_difference(theirs: list[str], ours: list[str]) -> str:
    if len(theirs) != len(ours):
        return f"{len(theirs)} answers against the student's {len(ours)}"
    i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
    return f"answer {i} is {theirs[i]!r}, the student's {ours[i]!r}"


def distilled_tasks(cfg: DistillConfig, teacher_tasks: list[TaskConfig], student_tasks: list[TaskConfig]
                    ) -> list[str]:
    """The tasks to distil (distill.tasks, or every task both answer), each with the same vocabulary, in the same
    order, for teacher and student; anything else is a ConfigError naming the task and the teacher."""
    theirs = {t.name: list(t.labels or []) for t in teacher_tasks}
    ours = {t.name: list(t.labels or []) for t in student_tasks}
    wanted = cfg.tasks if cfg.tasks is not None else [n for n in ours if n in theirs]
    if not wanted:
        raise ConfigError(f"distill.teacher: {cfg.teacher} answers none of the student's tasks (it answers "
                          f"{', '.join(theirs)}; the student trains {', '.join(ours)})")
    for name in wanted:
        if name not in ours:
            raise ConfigError(f"distill.tasks: {name!r} is not a task the student trains ({', '.join(ours)})")
        if name not in theirs:
            raise ConfigError(f"distill.tasks: the teacher {cfg.teacher} has no task {name!r} (it answers "
                              f"{', '.join(theirs)})")
        if theirs[name] != ours[name]:
            raise ConfigError(f"distill.teacher: task {name!r} of {cfg.teacher} has another vocabulary than the "
                              f"student's ({_vocabulary_difference(theirs[name], ours[name])}); distil only tasks "
                              f"with the same answers in the same order (distill.tasks=[...])")
    return list(wanted)


@dataclass
class TargetPart:
    """The teacher's answers on some samples of one task (what one process computed)."""

    task: str
    ids: list[str]
    log_probs: np.ndarray  # [n, C] float16: the teacher's log-probabilities at T = 1


@torch.no_grad()
def teacher_pass(teacher: Any, loader: Any, tasks: list[str], device: str | torch.device,
                 progress: bool = False) -> list[TargetPart]:
    """Run the teacher once over `loader` (eval mode, no grad) -> its log-probabilities per task, one part per
    batch and task. Uses only the model surface evaluate uses: forward(batch).tasks[name].rows and .probs."""
    from moefuse.evaluation.loop import to_device

    if isinstance(teacher, torch.nn.Module):
        teacher.eval()  # (no dropout, no modality dropout)
    parts = []
    for batch in track(loader, "teacher", enabled=progress):
        out = teacher(to_device(batch, device))
        for name in tasks:
            task = out.tasks.get(name)
            if task is None or task.rows.numel() == 0:
                continue
            log_probs = task.probs.float().clamp_min(1e-38).log().clamp_min(LOG_FLOOR)  # [B_t, C]
            parts.append(TargetPart(name, [batch["ids"][i] for i in task.rows.tolist()],
                                    log_probs.cpu().numpy().astype(np.float16)))
    return parts


# ------------------------------------------------------------------------------------------------------------------
# the targets, held in memory


@dataclass
class TargetLookup:
    """A batch's teacher targets for one task's rows."""

    log_probs: torch.Tensor  # [n, C] float32, zeros where not found
    found: torch.Tensor  # [n] bool


@dataclass
class TeacherTargets:
    """Every training sample's teacher log-probabilities: per task an id -> row index and a float16 array [N_t, C]."""

    index: dict[str, dict[str, int]]
    log_probs: dict[str, np.ndarray]

    @classmethod
    def from_parts(cls, parts: list[TargetPart]) -> TeacherTargets:
        """The parts of every batch (and every process, gathered) joined; an id seen twice keeps its last row."""
        index: dict[str, dict[str, int]] = {}
        arrays: dict[str, list[np.ndarray]] = {}
        for p in parts:
            rows = index.setdefault(p.task, {})
            chunks = arrays.setdefault(p.task, [])
            start = sum(len(c) for c in chunks)
            rows.update({sid: start + i for i, sid in enumerate(p.ids)})
            chunks.append(p.log_probs)
        return cls(index, {t: np.concatenate(c) for t, c in arrays.items()})

    @property
    def samples(self) -> int:
        """Samples with a target (over every task)."""
        return sum(len(rows) for rows in self.index.values())

    @property
    def nbytes(self) -> int:
        """The arrays' size in bytes (the index is about 100-150 bytes more per sample)."""
        return sum(a.nbytes for a in self.log_probs.values())

    def lookup(self, task: str, ids: list[str], device: str | torch.device = "cpu") -> TargetLookup:
        """The targets of `ids` (one task's rows of a batch), zeros and found=False where the teacher has none."""
        rows = self.index.get(task, {})
        at = [rows.get(sid, -1) for sid in ids]
        found = torch.tensor([i >= 0 for i in at], dtype=torch.bool)
        table = self.log_probs.get(task)
        if table is None or not found.any():
            width = 0 if table is None else table.shape[1]
            return TargetLookup(torch.zeros(len(ids), width, device=device), found.to(device))
        picked = torch.from_numpy(table[[max(i, 0) for i in at]].astype(np.float32))  # [n, C]
        picked[~found] = 0.0
        return TargetLookup(picked.to(device), found.to(device))


# ------------------------------------------------------------------------------------------------------------------
# the loss


def distillation_loss(logits: torch.Tensor, voted: torch.Tensor, teacher_log_probs: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(log p_teacher / T) || softmax(z / T)) of each voter, averaged over the rows it votes on and
    summed over voters, as the task's cross-entropy is (`VotingHeads.loss`). logits [N, K, C], voted [N, K] bool,
    teacher_log_probs [N, C] (the teacher's log-probabilities at T = 1) -> a scalar."""
    t = float(temperature)
    target = (teacher_log_probs.float() / t).log_softmax(-1)[:, None, :]  # [N, 1, C]
    student = (logits.float() / t).log_softmax(-1)  # [N, K, C]
    kl = F.kl_div(student, target.expand_as(student), reduction="none", log_target=True).sum(-1)  # [N, K]
    v = voted.float()
    per_voter = (kl * v).sum(0) / v.sum(0).clamp_min(1.0)  # [K]
    return t * t * per_voter.sum()


def mix_losses(ce: torch.Tensor, kd: torch.Tensor, weight: float, share: float) -> torch.Tensor:
    """One task's loss: (1 - alpha * s) * CE + alpha * s * KD, s the share of its rows with a teacher target."""
    w = weight * share
    return (1.0 - w) * ce + w * kd


@dataclass
class DistilledOutput(ModelOutput):
    """The model's output with the distillation term: `loss` is the distilled total, `task_loss` stays the labels'
    cross-entropy."""

    distill_loss: torch.Tensor | None = None  # sum over tasks of loss_weight * KD_t (T^2 * KL), for the log
    distilled_rows: int = 0  # rows trained on a teacher target
    missing_rows: int = 0  # rows of distilled tasks without one (trained on the labels alone)


def distilled_output(output: ModelOutput, ids: list[str], targets: TeacherTargets, cfg: DistillConfig,
                     tasks: list[TaskConfig]) -> DistilledOutput:
    """The distillation step of one micro-batch: each task's loss mixed with its distillation term (see the
    module docstring), on the rows the teacher answered; the other tasks keep their cross-entropy."""
    weights = {t.name: t.loss_weight for t in tasks}
    total = kd_total = None
    distilled = missing = 0
    for name, out in output.tasks.items():
        if out.loss is None:
            continue
        loss = out.loss
        if name in targets.index and out.rows.numel():
            got = targets.lookup(name, [ids[i] for i in out.rows.tolist()], out.logits.device)
            m = int(got.found.sum())
            distilled, missing = distilled + m, missing + len(got.found) - m
            if m:
                kd = distillation_loss(out.logits[got.found], out.voted[got.found], got.log_probs[got.found],
                                       cfg.temperature)
                loss = mix_losses(out.loss, kd, cfg.weight, m / len(got.found))
                kd_total = weights[name] * kd if kd_total is None else kd_total + weights[name] * kd
        total = weights[name] * loss if total is None else total + weights[name] * loss
    fields = {k: getattr(output, k) for k in output.__dataclass_fields__}
    if total is not None:
        fields["loss"] = total + output.aux_loss
    return DistilledOutput(**fields, distill_loss=kd_total if kd_total is not None else output.aux_loss.new_zeros(()),
                           distilled_rows=distilled, missing_rows=missing)


# ------------------------------------------------------------------------------------------------------------------
# the record


def distillation_record(cfg: DistillConfig, state: dict) -> dict | None:
    """export.json's `distillation` (`DistillationInfo`): the teacher and settings, the distilled tasks and the
    counts the run kept in its trainer state; None without a teacher."""
    done = state.get("distillation")
    if cfg.teacher is None or not done:
        return None
    return {"teacher": cfg.teacher, "temperature": cfg.temperature, "weight": cfg.weight, "tasks": done["tasks"],
            "samples": done["samples"], "missing_rows": done["missing_rows"]}


__all__ = ["DistillConfig", "DistilledOutput", "TargetLookup", "TargetPart", "TeacherTargets",
           "check_teacher_folder", "distillation_loss", "distillation_record", "distilled_output", "distilled_tasks",
           "load_teacher", "mix_losses", "teacher_pass"]
