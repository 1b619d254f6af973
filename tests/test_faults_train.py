"""Faults met by `moefuse train` (and `moefuse export`, which redoes its last step), through the CLI: everything
that can be checked is checked before the first step, nothing half-written is left, nothing computed is lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, run_cli, run_overrides

from moefuse.cli import main as cli
from moefuse.fusion.model import MultimodalMoEModel


def train_cli(shards: Path, out: Path, *extra: str, resume: bool = False) -> int:
    return cli(["train", str(TINY), *run_overrides(shards, out, *extra), *(["--resume"] if resume else [])])


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


def test_output_dir_is_a_file(fault_data: dict, tmp_path: Path, capsys) -> None:
    (tmp_path / "run").write_text("mine")
    assert train_cli(fault_data["shards"], tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run") in err and "is a file" in err
    assert (tmp_path / "run").read_text() == "mine"


def test_output_dir_under_a_file(fault_data: dict, tmp_path: Path, capsys) -> None:
    (tmp_path / "blocker").write_text("mine")
    assert train_cli(fault_data["shards"], tmp_path / "blocker" / "run") == 2
    assert str(tmp_path / "blocker") in capsys.readouterr().err


@pytest.mark.parametrize("metric", ["val/digit/f1", "val/speech/acc", "val/avqa/macro_f1", "val/digit/head7_acc"])
def test_metric_that_will_not_exist_stops_before_anything_is_written(fault_data: dict, tmp_path: Path, capsys,
                                                                      metric: str) -> None:
    assert train_cli(fault_data["shards"], tmp_path / "run", f"train.metric={metric}") == 2
    err = capsys.readouterr().err
    assert metric in err and "val/mean_acc" in err  # names the bad one and the choices
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_task_subset_trains_and_counts_the_other_tasks(fault_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train_cli(fault_data["shards"], out, "tasks=[{name: avqa, type: qa}]", "train.metric=val/avqa/acc") == 0
    result = json.loads((out / "results.json").read_text())
    assert result["skipped_other_task"] > 0
    assert [t.name for t in MultimodalMoEModel.from_pretrained(out / "model").cfg.tasks] == ["avqa"]


def test_configured_vocabulary_lacking_a_training_target_is_refused(fault_data: dict, tmp_path: Path,
                                                                    capsys) -> None:
    labels = "[" + ", ".join(f"'{d}'" for d in range(9)) + "]"  # no "9"
    code = train_cli(fault_data["shards"], tmp_path / "run", f"tasks=[{{name: digit, type: classification, "
                     f"labels: {labels}}}]", "train.metric=val/digit/acc")
    assert code == 2
    err = capsys.readouterr().err
    assert "tasks.digit.labels" in err and "'9'" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_training_target_outside_the_vocabulary_is_an_error(fault_data: dict, tmp_path: Path, capsys) -> None:
    """Shard patterns carry no dataset.json, so the vocabulary is checked batch by batch: never ignored labels."""
    pattern = str(fault_data["shards"] / "train-{000000..000004}.tar")
    labels = "[" + ", ".join(f"'{d}'" for d in range(5)) + "]"
    code = cli(["train", str(TINY), *run_overrides(fault_data["shards"], tmp_path / "run"),
                f"data.train_shards=['{pattern}']", "data.val_shards=[]",
                f"tasks=[{{name: digit, type: classification, labels: {labels}}}]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not in the task's vocabulary" in err and "training sample" in err
    assert not (tmp_path / "run" / "model").exists()


def test_missing_validation_set_stops_before_the_first_step(fault_data: dict, tmp_path: Path, capsys) -> None:
    code = train_cli(fault_data["shards"], tmp_path / "run", f"data.val_shards=[{tmp_path / 'nowhere'}]")
    assert code == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_utf8_config(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(TINY.read_bytes().replace(b"# The demo", b"# The d\xe9mo"))
    assert cli(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "UTF-8" in err


def test_resume_with_another_config_changes_nothing(copy_run: Path, fault_data: dict, capsys) -> None:
    before = {p: p.read_bytes() for p in copy_run.rglob("*") if p.is_file()}
    assert train_cli(fault_data["shards"], copy_run, "fusion.num_experts=4", resume=True) == 2
    err = capsys.readouterr().err
    assert "fusion.num_experts" in err and "saved 8" in err
    after = {p: p.read_bytes() for p in copy_run.rglob("*") if p.is_file()}
    assert after == before


def test_resume_of_a_finished_run_does_not_train_past_max_steps(copy_run: Path, fault_data: dict, capsys) -> None:
    (copy_run / "model").rename(copy_run / "old-model")
    assert train_cli(fault_data["shards"], copy_run, resume=True) == 0
    out = capsys.readouterr().out
    assert "already finished at step 2" in out
    assert json.loads((copy_run / "results.json").read_text())["steps"] == 2
    assert sorted(p.name for p in (copy_run / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002"]
    assert MultimodalMoEModel.from_pretrained(copy_run / "model").cfg.tasks  # exported again


def test_resume_falls_back_from_a_damaged_newest_checkpoint(copy_run: Path, fault_data: dict) -> None:
    weights = copy_run / "checkpoints" / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="step-0000002 is damaged"):
        assert train_cli(fault_data["shards"], copy_run, "train.max_steps=3", resume=True) == 0
    result = json.loads((copy_run / "results.json").read_text())
    assert result["steps"] == 3  # resumed at step 1, trained steps 2 and 3


def test_full_disk_during_a_checkpoint_leaves_no_temp_and_keeps_config(fault_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_cli("train", str(TINY), *run_overrides(fault_data["shards"], out), fsize=200_000)
    assert done.returncode == 2, done.stderr
    no_traceback(done.stderr)
    assert "moefuse train: error:" in done.stderr and str(out / "checkpoints") in done.stderr
    assert ".tmp" not in done.stderr  # the error names the checkpoint, not the temp folder that is gone
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert (out / "config.yaml").is_file()


def test_failed_export_is_redone_with_moefuse_export(fault_data: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "model").write_text("a file in the way")
    assert train_cli(fault_data["shards"], out) == 2
    err = capsys.readouterr().err
    assert str(out / "model") in err and f"moefuse export {out}" in err
    assert not [p for p in out.iterdir() if p.name.startswith(".model")]
    (out / "model").unlink()
    assert cli(["export", str(out)]) == 0
    model = MultimodalMoEModel.from_pretrained(out / "model")
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert json.loads((out / "model" / "export.json").read_text())["step"] in (1, 2)
    assert model.task_names == ["avqa", "digit"]


def test_export_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert cli(["export", str(tmp_path)]) == 2
    assert "not a training run folder" in capsys.readouterr().err


def test_export_ignores_a_damaged_best_checkpoint(copy_run: Path) -> None:
    state = json.loads((copy_run / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    best = copy_run / "checkpoints" / f"step-{state['best_step']:07d}"
    if state["best_step"] == 2:  # make step 1 the best, then damage it
        state["best_step"] = 1
        (copy_run / "checkpoints" / "step-0000002" / "trainer_state.json").write_text(json.dumps(state))
        best = copy_run / "checkpoints" / "step-0000001"
        sums = copy_run / "checkpoints" / "step-0000002" / "checksums.json"
        sums.unlink()  # trainer_state.json was edited on purpose; keep step 2 loadable
    (best / "model.safetensors").write_bytes(b"\0" * 10)
    shutil.rmtree(copy_run / "model")
    with pytest.warns(UserWarning, match="cannot be used"):
        assert cli(["export", str(copy_run)]) == 0
    assert json.loads((copy_run / "model" / "export.json").read_text())["step"] == 2


def test_export_without_its_validation_data_still_exports_uncalibrated(copy_run: Path) -> None:
    """`moefuse export` of a run whose validation shards are gone: the weights are exported (T = 1), with a
    warning naming the cause, and export.json says there was no calibration."""
    config = copy_run / "config.yaml"
    config.write_text(config.read_text().replace("val_shards:\n  - ", f"val_shards:\n  - {copy_run / 'gone'}\n  - ", 1))
    assert str(copy_run / "gone") in config.read_text()
    shutil.rmtree(copy_run / "model")
    with pytest.warns(UserWarning, match="not calibrated.*gone"):
        assert cli(["export", str(copy_run)]) == 0
    assert json.loads((copy_run / "model" / "export.json").read_text())["calibration"] is None
    heads = MultimodalMoEModel.from_pretrained(copy_run / "model").heads
    assert all(float(h.temperature) == 1.0 for h in heads.values())


def test_python_m_moefuse_train_reports_errors_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "moefuse", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "missing.yaml" in done.stderr
    no_traceback(done.stderr)


def test_full_disk_during_moefuse_export_keeps_the_old_export(copy_run: Path) -> None:
    before = (copy_run / "model" / "model.safetensors").read_bytes()
    done = run_cli("export", str(copy_run), fsize=200_000)
    assert done.returncode == 2, done.stderr
    no_traceback(done.stderr)
    assert "moefuse export: error:" in done.stderr and str(copy_run / "model") in done.stderr
    assert ".tmp" not in done.stderr  # the error names the export folder, not the temp folder that is gone
    assert not [p for p in copy_run.iterdir() if p.name.startswith(".model")]
    assert (copy_run / "model" / "model.safetensors").read_bytes() == before


def test_metric_names_are_exactly_what_validation_computes() -> None:
    """train.metric is checked against metric_names before the first step; it must list compute_metrics' keys."""
    from moefuse.evaluation.metrics import compute_metrics, metric_names

    types = {"digit": "classification", "avqa": "qa"}
    vocab = {"digit": ["0", "1"], "avqa": ["yes", "no", "3"]}
    records = [{"task": t, "target_index": 0, "prediction_index": 1, "probability": 0.6, "agreement": 0.5,
                "head_correct": [True, False, False], "modalities": "image", "meta": {}} for t in types]
    computed = compute_metrics(records, vocab, types)["metrics"]
    assert sorted(computed) == sorted(metric_names(types, num_heads=3))


# ----------------------------------------------------------------------------------------------------------------
# start-up config errors (expert-parallel layouts, augmentation tasks, layerdrop): refused before anything is
# written


@pytest.mark.parametrize(("override", "expected"), [
    ("fusion.expert_parallel_size=2", "needs 2 or a multiple of 2 processes, this run has one"),
    ("fusion.expert_parallel_size=3", "3 must divide num_experts=8"),
    ("fusion.expert_parallel_size=0", "must be >= 1"),
    ("encoders.image.augment.tasks=[sum]", "encoders.image.augment.tasks: 'sum' is not a task of this model"),
    ("encoders.audio.augment.tasks=[]", "encoders.audio.augment.tasks: must name a task"),
    ("encoders.audio.layerdrop=1.5", "encoders.audio.layerdrop: must be null or in [0, 1)"),
])
def test_start_up_config_errors_name_the_key_and_write_nothing(fault_data: dict, tmp_path: Path, override: str,
                                                               expected: str, capsys) -> None:
    """Expert-parallel layouts, augmentation tasks and layerdrop: refused before the run folder exists."""
    assert train_cli(fault_data["shards"], tmp_path / "run", override) == 2
    err = capsys.readouterr().err
    assert expected in err and override.split("=")[0] in err, err
    no_traceback(err)
    assert not (tmp_path / "run").exists()


def test_expert_parallel_size_must_divide_the_processes() -> None:
    from moefuse.config import load_config
    from moefuse.configutil import ConfigError
    from moefuse.train.preflight import check_parallel_layout

    cfg = load_config(TINY, ["fusion.expert_parallel_size=2"])
    check_parallel_layout(cfg, 4)
    with pytest.raises(ConfigError, match=r"must divide the number of processes \(3\): start 2 processes"):
        check_parallel_layout(cfg, 3)
    with pytest.raises(ConfigError, match="train.fsdp with fusion.expert_parallel_size=2"):
        check_parallel_layout(load_config(TINY, ["fusion.expert_parallel_size=2", "train.fsdp=true"]), 2)
    with pytest.raises(ConfigError, match="train.fsdp with train.mixed_precision=fp16"):
        check_parallel_layout(load_config(TINY, ["train.fsdp=true", "train.mixed_precision=fp16"]), 2)
    check_parallel_layout(load_config(TINY, ["train.fsdp=true", "train.mixed_precision=bf16"]), 2)


def test_checkpoint_of_another_expert_layout_is_refused(tmp_path: Path) -> None:
    from moefuse.configutil import ConfigError
    from moefuse.train.expert_checkpoint import check_layout

    ckpt = tmp_path / "step-0000004"
    ckpt.mkdir()
    check_layout(ckpt, 1)  # no shards: a run without expert parallelism
    with pytest.raises(ConfigError, match="saved with fusion.expert_parallel_size=1, this run has 2"):
        check_layout(ckpt, 2)
    for j in (0, 1):
        (ckpt / f"experts-ep{j:03d}-of-002.safetensors").write_bytes(b"")
    check_layout(ckpt, 2)
    for size in (1, 4):
        with pytest.raises(ConfigError, match=f"saved with fusion.expert_parallel_size=2, this run has {size}"):
            check_layout(ckpt, size)
    (ckpt / "experts-ep001-of-002.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"lacks the expert shards of EP ranks \[1\]"):
        check_layout(ckpt, 2)


# ----------------------------------------------------------------------------------------------------------------
# modalities the model cannot read: refused at start-up, naming the encoder and data.drop_modalities


@pytest.mark.parametrize(("overrides", "named"), [
    (["encoders.audio=null"], ["encoders.audio is null", "data.drop_modalities=[audio]"]),  # the README's example
    (["encoders.image=null", "encoders.text=null"], ["encoders.image is null", "data.drop_modalities=[image, text]"]),
    (["encoders.audio=null", "data.drop_modalities=[image]"],
     ["encoders.audio", "data.drop_modalities=[image, audio]"]),
    (["data.drop_modalities=[audio, text, image]"], ["data.drop_modalities", "keep at least one"]),
])
def test_shards_holding_a_modality_the_model_cannot_read_are_refused_at_start(fault_data: dict, tmp_path: Path,
                                                                              overrides: list[str],
                                                                              named: list[str], capsys) -> None:
    """A model without an audio encoder on shards with audio was a ValueError traceback at the first batch that
    never said data.drop_modalities; now one line before the run folder exists (counted from dataset.json)."""
    assert train_cli(fault_data["shards"], tmp_path / "run", *overrides) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moefuse train: error: "), err
    assert all(n in err for n in named), err
    assert not (tmp_path / "run").exists()


def test_model_without_an_encoder_trains_with_the_fix_and_evaluate_names_drop(fault_data: dict, tmp_path: Path,
                                                                               capsys) -> None:
    """The fix the error gives works: `encoders.audio=null data.drop_modalities=[audio]` trains and evaluates (audio
    dropped by default, from export.json); `evaluate --drop` with nothing dropped hands it audio again: one line
    naming `--drop audio`; dropping both modalities it reads is refused."""
    out, shards = tmp_path / "run", fault_data["shards"]
    assert train_cli(shards, out, "encoders.audio=null", "data.drop_modalities=[audio]") == 0
    evaluate = ["evaluate", "--checkpoint", str(out / "model"), "--shards", str(shards)]
    assert cli(evaluate) == 0
    capsys.readouterr()
    for drop, says in ([[], ["has audio but the model has no audio encoder", "--drop audio"]],
                       [["image", "text"], ["dropping text, image", "removes every modality the model reads"]]):
        assert cli([*evaluate, "--drop", *drop]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("moefuse evaluate: error: "), err
        assert all(s in errors[0] for s in says), errors[0]
        no_traceback(err)
