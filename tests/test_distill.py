"""Knowledge distillation in training (`moefuse.train.distill`, Hinton et al. 2015): the loss against values computed
by hand, the teacher run once per sample (not per epoch), a distilled `moefuse train` whose export records its
teacher, and a bad teacher refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, run_cli, run_overrides

from moefuse.cli import main as cli
from moefuse.config import load_config
from moefuse.configutil import ConfigError
from moefuse.fusion.heads import TaskConfig, TaskOutput
from moefuse.fusion.model import ModelOutput, MultimodalMoEModel
from moefuse.pretrained.export_info import export_info, read_export_record
from moefuse.train.distill import (
    DistillConfig,
    TargetPart,
    TeacherTargets,
    distillation_loss,
    distilled_output,
    distilled_tasks,
)


def softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def soften(probs: list[float], t: float) -> list[float]:
    return softmax([math.log(p) / t for p in probs])


LOGITS = [[[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]],  # row 0: voter 0, voter 1
          [[0.5, 0.5, 0.0], [3.0, 0.0, 0.0]]]  # row 1: voter 1 abstains (its modality is absent)
VOTED = [[True, True], [True, False]]
TEACHER = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]


def test_distillation_loss_by_hand() -> None:
    """T^2 * KL(teacher_T || voter_T), averaged over the rows each voter votes on, summed over voters."""
    t = 2.0
    kls = [[kl(soften(TEACHER[r], t), softmax([z / t for z in LOGITS[r][k]])) for k in range(2)] for r in range(2)]
    by_hand = t * t * ((kls[0][0] + kls[1][0]) / 2 + kls[0][1])  # voter 1 voted on row 0 only
    got = distillation_loss(torch.tensor(LOGITS), torch.tensor(VOTED), torch.tensor(TEACHER).log(), t)
    assert got.item() == pytest.approx(by_hand, rel=1e-5)
    assert by_hand > 0.05  # (the rows are far from their targets: a loss that could not tell would be ~0)


def fake_output(tasks: dict[str, TaskOutput], aux: float) -> ModelOutput:
    fields = dict.fromkeys(ModelOutput.__dataclass_fields__)
    return ModelOutput(**{**fields, "tasks": tasks, "aux_loss": torch.tensor(aux)})


def task_output(rows: list[int], logits: list, voted: list, ce: float) -> TaskOutput:
    fields = dict.fromkeys(TaskOutput.__dataclass_fields__)
    return TaskOutput(**{**fields, "rows": torch.tensor(rows), "logits": torch.tensor(logits),
                         "voted": torch.tensor(voted), "loss": torch.tensor(ce)})


def test_the_training_loss_mixes_labels_and_teacher_by_hand() -> None:
    """loss = sum_t w_t * ((1 - alpha s) CE_t + alpha s KD_t) + aux; s = the share of the task's rows with a teacher
    target. Here digit has two rows (ids a, c), the teacher answered a only; avqa has none: CE alone."""
    t, alpha = 3.0, 0.75
    teacher = TeacherTargets.from_parts([TargetPart("digit", ["a"], np.log(np.array([TEACHER[0]], np.float16)))])
    output = fake_output({"digit": task_output([0, 2], LOGITS, VOTED, ce=1.5),
                          "avqa": task_output([1], [LOGITS[0]], [VOTED[0]], ce=0.4)}, aux=0.25)
    tasks = [TaskConfig("digit", labels=["0", "1", "2"], loss_weight=2.0), TaskConfig("avqa", labels=["x", "y", "z"])]
    got = distilled_output(output, ["a", "b", "c"], teacher, DistillConfig(teacher="t", temperature=t, weight=alpha),
                           tasks)
    kd = t * t * sum(kl(soften(TEACHER[0], t), softmax([z / t for z in LOGITS[0][k]])) for k in range(2))  # row a
    s = 1 / 2
    assert got.loss.item() == pytest.approx(2.0 * ((1 - alpha * s) * 1.5 + alpha * s * kd) + 0.4 + 0.25, rel=1e-3)
    assert got.distill_loss.item() == pytest.approx(2.0 * kd, rel=1e-3)
    assert (got.distilled_rows, got.missing_rows) == (1, 1)  # c: no teacher target, counted
    assert got.task_loss is None and got.tasks is output.tasks  # the rest of the output as it was


def test_a_task_whose_vocabulary_differs_is_refused_naming_it_and_the_teacher() -> None:
    student = [TaskConfig("digit", labels=["0", "1"]), TaskConfig("avqa", labels=["a", "b"])]
    cfg = DistillConfig(teacher="runs/ens")
    assert distilled_tasks(cfg, [TaskConfig("digit", labels=["0", "1"])], student) == ["digit"]  # the shared one
    with pytest.raises(ConfigError, match=r"task 'digit' of runs/ens .*\(answer 0 is '1', the student's '0'\)"):
        distilled_tasks(cfg, [TaskConfig("digit", labels=["1", "0"])], student)
    with pytest.raises(ConfigError, match=r"distill.tasks: the teacher runs/ens has no task 'avqa'"):
        distilled_tasks(DistillConfig(teacher="runs/ens", tasks=["avqa"]), [TaskConfig("digit", labels=["0", "1"])],
                        student)


@pytest.mark.parametrize(("override", "says"), [
    ("distill.temperature=0", "distill.temperature: must be in (0, 100.0]"),
    ("distill.weight=1.5", "distill.weight: must be in [0.0, 1.0]"),
    ("distill.tasks=[]", "distill.tasks: must name distinct tasks"),
    ("distill.batch_size=0", "distill.batch_size: must be in [1, "),
])
def test_distill_config_is_checked(override: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert says in str(e.value)


def test_export_json_refuses_a_bad_distillation_record() -> None:
    good = {"teacher": "runs/ens", "temperature": 2.0, "weight": 0.5, "tasks": ["digit"], "samples": 10,
            "missing_rows": 0}
    assert export_info({"distillation": good}).distillation.temperature == 2.0
    with pytest.raises(ConfigError, match=r"export.json: distillation.weight: must be in \[0.0, 1.0\]"):
        export_info({"distillation": {**good, "weight": 2}})
    with pytest.raises(ConfigError, match=r"unknown config key distillation.alpha"):
        export_info({"distillation": {**good, "alpha": 0.5}})


def test_the_teacher_answers_each_sample_once_not_once_per_epoch(fault_run: Path, fault_data: dict, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Two batches per epoch and 4 steps: the student sees every sample twice, the teacher each once (a forward
    hook on the teacher records the ids of every batch it runs). One sample's answer is then lost on purpose: its
    rows train on the labels alone and are counted, each time the student sees it."""
    import moefuse.fusion.loading as loading
    import moefuse.train.recipe as recipe

    real, answered = loading.load_inference_model, []

    def counted(path, **options):
        model = real(path, **options)
        model.register_forward_pre_hook(lambda module, args: answered.extend(args[0]["ids"]))
        return model

    real_pass = recipe.teacher_pass

    def losing_one(*args, **options) -> list[TargetPart]:
        parts = real_pass(*args, **options)
        first = parts[0]
        parts[0] = TargetPart(first.task, first.ids[1:], first.log_probs[1:])
        lost.append(first.ids[0])
        return parts

    lost: list[str] = []
    monkeypatch.setattr(loading, "load_inference_model", counted)
    monkeypatch.setattr(recipe, "teacher_pass", losing_one)
    out = tmp_path / "student"
    recipe.train(load_config(TINY, run_overrides(
        fault_data["shards"], out, f"distill.teacher={fault_run / 'model'}", "distill.batch_size=40",
        "data.batch_size=48", "data.val_shards=[]", "train.max_steps=4", "train.record_sample_ids=true")),
        progress=False)
    epochs = sorted((out / "sample_ids").glob("epoch*.txt"))
    trained = Counter(i for f in epochs for i in f.read_text().split())
    assert len(epochs) >= 2 and min(trained.values()) >= 2  # every training sample seen in two epochs
    assert Counter(answered) == Counter(set(answered))  # the teacher answered each sample once
    assert set(answered) == set(trained)
    record = read_export_record(out / "model").distillation
    assert record.samples == len(trained) - 1 and record.missing_rows == trained[lost[0]] >= 2
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/distill_missing_rows"] for r in logged if "train/loss" in r][-1] == record.missing_rows


def test_a_distilled_train_through_the_cli_records_its_teacher(fault_run: Path, fault_data: dict,
                                                                tmp_path: Path) -> None:
    out, teacher = tmp_path / "student", fault_run / "model"
    done = run_cli("train", str(TINY), *run_overrides(
        fault_data["shards"], out, f"distill.teacher={teacher}", "distill.temperature=3", "distill.weight=0.7",
        "train.log_every=1", "data.val_shards=[]"), timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"distillation: teacher {teacher} answered" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert len(steps) == 2 and all(r["train/distill_loss"] > 0 and "train/task_loss" in r for r in steps)
    assert all(r["train/distill_missing_rows"] == 0 for r in steps)
    info = json.loads((out / "model" / "export.json").read_text())["distillation"]
    assert info == {"teacher": str(teacher), "temperature": 3.0, "weight": 0.7, "tasks": ["avqa", "digit"],
                    "samples": info["samples"], "missing_rows": 0} and info["samples"] > 0
    card = (out / "model" / "README.md").read_text()
    assert "## Distillation" in card and f"`{teacher}`" in card and "T = 3" in card
    assert read_export_record(out / "model").distillation.weight == 0.7  # the student folder loads its record
    MultimodalMoEModel.from_pretrained(out / "model").save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "export.json").read_text())["distillation"] == info  # kept on re-save
    assert cli(["export", str(out)]) == 0  # `moefuse export` redoes the export from the run: the record too
    assert json.loads((out / "model" / "export.json").read_text())["distillation"] == info


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moefuse train: error: "), err
    return err


def test_a_missing_teacher_is_one_line_before_the_run_folder_exists(fault_data: dict, tmp_path: Path,
                                                                   capsys) -> None:
    assert cli(["train", str(TINY), *run_overrides(fault_data["shards"], tmp_path / "run",
                                                   f"distill.teacher={tmp_path / 'nowhere'}")]) == 2
    err = one_line_error(capsys)
    assert f"distill.teacher: {tmp_path / 'nowhere'} does not exist" in err
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_model_is_one_line(fault_data: dict, tmp_path: Path, capsys) -> None:
    assert cli(["train", str(TINY), *run_overrides(fault_data["shards"], tmp_path / "run",
                                                   f"distill.teacher={fault_data['shards']}")]) == 2
    err = one_line_error(capsys)
    assert f"distill.teacher: {fault_data['shards']} is not a model folder" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_teacher_with_another_vocabulary_is_one_line_naming_the_task(fault_run: Path, fault_data: dict,
                                                                       tmp_path: Path, capsys) -> None:
    """A teacher whose digit answers are in another order (same count: the folder itself loads) is refused."""
    teacher = Path(shutil.copytree(fault_run / "model", tmp_path / "teacher"))
    for name, load, dump in (("config.yaml", yaml.safe_load, lambda d: yaml.safe_dump(d, sort_keys=False)),
                             ("config.json", json.loads, json.dumps)):
        data = load((teacher / name).read_text())
        digit = next(t for t in data["tasks"] if t["name"] == "digit")
        digit["labels"] = digit["labels"][::-1]
        (teacher / name).write_text(dump(data))
    assert cli(["train", str(TINY), *run_overrides(fault_data["shards"], tmp_path / "run",
                                                   f"distill.teacher={teacher}")]) == 2
    err = one_line_error(capsys)
    assert f"task 'digit' of {teacher} has another vocabulary" in err
