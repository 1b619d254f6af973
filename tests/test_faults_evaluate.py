"""Faults met by `moefuse evaluate`, through the CLI: the report is never lost, optional statistics print as n/a,
damaged model folders and shards are named, lost and skipped samples are counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moefuse.cli import main as cli
from moefuse.evaluation.report import format_summary


def evaluate_cli(model: Path, shards: Path, *extra: str) -> int:
    return cli(["evaluate", "--checkpoint", str(model), "--shards", str(shards), "--batch-size", "32", *extra])


def edit_weights(model: Path, edit) -> None:
    state = load_file(str(model / "model.safetensors"))
    edit(state)
    save_file(state, str(model / "model.safetensors"))


def split_heads(state: dict) -> None:
    """Head h votes for class h of every task, whatever the input: no sample is ever unanimous."""
    for key in [k for k in state if k.startswith("heads.") and k.endswith(".bias")]:
        head = int(key.split(".heads.")[1].split(".")[0])
        weight = state[key[: -len("bias")] + "weight"]
        if weight.shape[0] != weight.shape[1]:  # the output layer [C, hidden]
            weight.zero_()
            state[key].zero_()
            state[key][head] = 100.0


def test_no_unanimous_sample_prints_na_and_writes_the_report(copy_model: Path, fault_data: dict, tmp_path: Path,
                                                             capsys) -> None:
    edit_weights(copy_model, split_heads)
    report = tmp_path / "report.json"
    assert evaluate_cli(copy_model, fault_data["shards"], "--json", str(report)) == 0
    out = capsys.readouterr().out
    assert "n/a when unanimous" in out
    data = json.loads(report.read_text())
    assert data["tasks"]["digit"]["agreement_vs_correctness"]["accuracy_when_unanimous"] is None


@pytest.mark.parametrize("missing", ["accuracy_when_unanimous", "accuracy_when_split", "unanimous_fraction",
                                     "accuracy"])
def test_every_optional_statistic_prints_as_na(missing: str) -> None:
    task = {"type": "classification", "samples": 3, "accuracy": 0.5, "macro_f1": None,
            "best_single_head_accuracy": 0.5, "ece": None, "unseen_targets": 0,
            "agreement_vs_correctness": {"accuracy_when_unanimous": 0.5, "accuracy_when_split": 0.5,
                                         "unanimous_fraction": 0.5},
            "accuracy_by_modalities": {"image": {"accuracy": None, "samples": 0}}, "accuracy_by_qtype": {}}
    if missing in task:
        task[missing] = None
    else:
        task["agreement_vs_correctness"][missing] = None
    assert "n/a" in format_summary({"tasks": {"t": task}})


def test_report_path_is_a_folder_keeps_the_report(fault_run: Path, fault_data: dict, tmp_path: Path,
                                                  capsys) -> None:
    (tmp_path / "report.json").mkdir()
    assert evaluate_cli(fault_run / "model", fault_data["shards"], "--json", str(tmp_path / "report.json")) == 1
    captured = capsys.readouterr()
    assert str(tmp_path / "report.json") in captured.err and "Traceback" not in captured.err
    start = captured.out.index("{")
    report, _ = json.JSONDecoder().raw_decode(captured.out[start:])  # the report, on stdout instead
    assert "digit" in report["tasks"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_heatmap_under_a_file_still_writes_the_report(fault_run: Path, fault_data: dict, tmp_path: Path,
                                                      capsys) -> None:
    (tmp_path / "blocker").write_text("x")
    report = tmp_path / "report.json"
    code = evaluate_cli(fault_run / "model", fault_data["shards"], "--json", str(report), "--heatmap",
                        str(tmp_path / "blocker" / "map.png"))
    assert code == 1
    assert str(tmp_path / "blocker") in capsys.readouterr().err
    assert json.loads(report.read_text())["errors"]


@pytest.mark.parametrize("where", ["/sys/map.png", "/proc/map.png", "/proc/self/map.png"])
def test_heatmap_that_cannot_be_created_names_its_own_path(fault_run: Path, fault_data: dict, where: str,
                                                           capsys) -> None:
    """A folder that takes no new file (sysfs, procfs refuse even root): the error names the heatmap path the user
    gave, not the temporary file the atomic write went through (`/sys/.map.png.k3j2x9.tmp`)."""
    if not Path(where).parent.is_dir():
        pytest.skip(f"no {Path(where).parent} here")
    assert evaluate_cli(fault_run / "model", fault_data["shards"], "--heatmap", where) == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "heatmap" in line)
    assert f"the heatmap was not written: {where}: " in line and ".tmp" not in line, line


def test_heatmap_with_the_longest_file_name_is_written(fault_run: Path, fault_data: dict, tmp_path: Path) -> None:
    """A 250-character name (the file system takes 255) is written: its temp file's name is cut to fit."""
    heatmap = tmp_path / ("h" * 246 + ".png")
    assert evaluate_cli(fault_run / "model", fault_data["shards"], "--heatmap", str(heatmap)) == 0
    assert heatmap.read_bytes().startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == [heatmap.name]


@pytest.mark.parametrize("size", ["0", "-1"])
def test_batch_size_must_be_positive(fault_run: Path, fault_data: dict, size: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        evaluate_cli(fault_run / "model", fault_data["shards"], "--batch-size", size)
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err


def damage(model: Path, how: str) -> Path:
    """Damage one file of an export; returns the file a good error names."""
    cfg = model / "config.yaml"
    if how == "truncated weights":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 3])
        return model / "model.safetensors"
    if how == "config is a list":
        cfg.write_text("- 1\n- 2\n")
        return cfg
    if how == "python tag":
        cfg.write_text("!!python/object/apply:os.system ['echo hacked']\n")
        return cfg
    if how == "width edited":
        data = yaml.safe_load(cfg.read_text())
        data["fusion"]["d_model"] = 96
        cfg.write_text(yaml.safe_dump(data))
        return model / "model.safetensors"
    if how == "absurd input_size":
        dc = json.loads((model / "image" / "data_config.json").read_text())
        dc["input_size"] = [3, 100000, 100000]
        (model / "image" / "data_config.json").write_text(json.dumps(dc))
        return model / "image" / "data_config.json"
    if how == "text config garbage":
        (model / "text" / "config.json").write_text("{not json")
        return model / "text"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated weights", "config is a list", "python tag", "width edited",
                                 "absurd input_size", "text config garbage"])
def test_damaged_model_folder_names_the_file(copy_model: Path, fault_data: dict, how: str, capsys) -> None:
    named = damage(copy_model, how)
    assert evaluate_cli(copy_model, fault_data["shards"]) == 2
    err = capsys.readouterr().err
    assert str(named) in err and "Traceback" not in err, err


def test_non_finite_model_writes_valid_json(copy_model: Path, fault_data: dict, tmp_path: Path) -> None:
    def poison(state: dict) -> None:
        for k in state:
            if k.startswith("heads."):
                state[k] = torch.full_like(state[k], float("nan"))

    edit_weights(copy_model, poison)
    report = tmp_path / "report.json"
    with pytest.warns(UserWarning, match="non-finite"):
        evaluate_cli(copy_model, fault_data["shards"], "--json", str(report))
    data = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert data["non_finite_outputs"] > 0


def test_lost_shard_is_counted_in_samples(fault_run: Path, fault_data: dict, tmp_path: Path, capsys) -> None:
    shards = Path(shutil.copytree(fault_data["shards"], tmp_path / "shards"))
    info = json.loads((shards / "dataset.json").read_text())
    first = info["splits"]["train"]["shards"][0]
    (shards / first["name"]).unlink()
    report = tmp_path / "report.json"
    assert evaluate_cli(fault_run / "model", shards, "--json", str(report), "--split", "train") == 0
    data = json.loads(report.read_text())["data"]
    assert data["lost_samples"] == first["samples"]
    assert f"{first['samples']} samples lost" in capsys.readouterr().out


def test_model_with_fewer_tasks_counts_the_other_samples(fault_run: Path, fault_data: dict, tmp_path: Path) -> None:
    from conftest import TINY, run_overrides

    from moefuse.config import load_config
    from moefuse.train.recipe import train

    out = tmp_path / "run"
    train(load_config(TINY, run_overrides(fault_data["shards"], out, "tasks=[{name: digit, type: classification}]",
                                          "train.metric=val/digit/acc", "train.max_steps=1", "train.eval_every=1")))
    report = tmp_path / "report.json"
    assert evaluate_cli(out / "model", fault_data["shards"], "--json", str(report)) == 0
    data = json.loads(report.read_text())
    assert list(data["tasks"]) == ["digit"] and data["data"]["skipped_other_task"] > 0


@pytest.mark.parametrize("drop", [["text", "image", "audio"], ["audio", "image", "text", "audio"]])
def test_dropping_every_modality_is_refused(fault_run: Path, fault_data: dict, drop: list[str], capsys) -> None:
    """`--drop` of every modality the model reads leaves no input: one line, nothing evaluated."""
    assert evaluate_cli(fault_run / "model", fault_data["shards"], "--drop", *drop) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("moefuse evaluate: error: dropping text, image, audio (--drop, data.drop_modalities) removes every "
                   "modality the model reads, so no sample would have an input: keep at least one"), err
