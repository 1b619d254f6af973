"""A model folder others can load: save_pretrained / from_pretrained round-trip the outputs, nothing is pickled,
and every export carries a model card that says what the model does and how it was measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import make_sample

from moefuse.fusion import FusionConfig, ModelConfig, MultimodalMoEModel, TaskConfig, build_collator, build_model


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(fusion=FusionConfig(d_model=64, num_heads=2, d_expert=64, num_experts=4),
                      tasks=[TaskConfig("digit", "classification", [str(i) for i in range(10)])])
    model = build_model(cfg).eval()
    folder = model.save_pretrained(tmp_path / "model")
    loaded = MultimodalMoEModel.from_pretrained(folder)
    rng = np.random.default_rng(0)
    batch = build_collator(model)([make_sample(rng, f"s{i}", "digit", "3", image=True, audio=i % 2 == 0)
                                   for i in range(4)])
    with torch.no_grad():
        assert torch.equal(model(batch).tasks["digit"].probs, loaded(batch).tasks["digit"].probs)
    names = {p.name for p in folder.rglob("*") if p.is_file()}
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}  # no pickle anywhere
    card = (folder / "README.md").read_text()
    assert "| digit | classification |" in card and "No training record" in card


def test_a_runs_export_card_has_its_metrics_calibration_and_limits(fault_run: Path) -> None:
    card = (fault_run / "model" / "README.md").read_text()
    for part in ("## Tasks", "| avqa | qa |", "## Inputs", "## Calibration", "temperature", "## Validation metrics",
                 "val/mean_acc", "## Training data", "## Intended use and limits"):
        assert part in card, part


# ---------------------------------------------------------------------------------------------------------------
# The Hub-style folder (config.json with model_type, model.safetensors, a card with YAML metadata) and a round trip
# that keeps everything that decides an answer.


def read_card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_a_runs_export_is_a_hub_style_folder(fault_run: Path) -> None:
    import json
    import os

    import yaml

    folder = fault_run / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("model_type") == "moefuse" and config.pop("architectures") == ["MultimodalMoEModel"]
    assert isinstance(config.pop("moefuse_version"), str)
    assert config == yaml.safe_load((folder / "config.yaml").read_text())  # the same config, both files
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
    assert modes["model.safetensors"] == 0o666 & ~umask, modes  # readable like any other file
    assert set(modes.values()) == {0o666 & ~umask}, modes
    card = read_card(folder)
    metrics = json.loads((folder / "export.json").read_text())["final_val_metrics"]
    assert card.data.library_name == "moefuse"
    assert {"moefuse", "multimodal", "mixture-of-experts", "text", "image", "audio"} <= set(card.data.tags)
    values = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("digit", "accuracy")] == metrics["val/digit/acc"]
    assert values[("avqa", "exact_match")] == metrics["val/avqa/exact_match"]
    assert all(r.dataset_split == "validation" for r in card.data.eval_results)
    assert card.data.license is None  # none was set


def _predict(folder: Path, image: Path, capsys) -> dict:
    import json

    from moefuse.cli import main as cli

    assert cli(["predict", "--checkpoint", str(folder), "--task", "digit", "--image", str(image)]) == 0
    return json.loads(capsys.readouterr().out)


def test_save_pretrained_keeps_what_decides_an_answer(copy_model: Path, tmp_path: Path, capsys) -> None:
    """Loaded and saved again, a folder keeps its media settings (so raw files are prepared the same way and the
    predictions are equal), its calibration (weights and report), metrics and card; the license set on saving is
    added. The control: the same folder without its media settings predicts otherwise."""
    import json

    from PIL import Image

    info = json.loads((copy_model / "export.json").read_text())
    info["media"]["image_fit"] = "crop"  # a setting that changes how a raw file becomes the model's input
    (copy_model / "export.json").write_text(json.dumps(info))
    image = tmp_path / "wide.png"
    wide = Image.new("RGB", (96, 24), (250, 250, 250))
    wide.paste((10, 10, 240), (0, 0, 30, 24))
    wide.paste((240, 20, 10), (66, 0, 96, 24))
    wide.save(image)

    model = MultimodalMoEModel.from_pretrained(copy_model)
    resaved = model.save_pretrained(tmp_path / "resaved", license="mit")
    again = json.loads((resaved / "export.json").read_text())
    assert again == {**info, "license": "mit", "datasets": []}
    loaded = MultimodalMoEModel.from_pretrained(resaved)
    for task in model.task_names:
        assert torch.equal(loaded.heads[task].temperature, model.heads[task].temperature)
    assert _predict(resaved, image, capsys) == _predict(copy_model, image, capsys)

    before, after = read_card(copy_model), read_card(resaved)
    assert after.data.license == "mit"
    assert [(r.task_name, r.metric_type, r.metric_value) for r in after.data.eval_results] == \
        [(r.task_name, r.metric_type, r.metric_value) for r in before.data.eval_results]
    section = before.text.split("## Calibration")[1].split("##")[0]
    assert "temperature" in section and section == after.text.split("## Calibration")[1].split("##")[0]

    del info["media"]  # the control: predict's defaults (pad) instead of the recorded crop
    (copy_model / "export.json").write_text(json.dumps(info))
    assert _predict(copy_model, image, capsys)["top5"] != _predict(resaved, image, capsys)["top5"]


def test_config_json_alone_or_config_yaml_alone_loads(copy_model: Path, tmp_path: Path) -> None:
    """config.json is enough (a Hub folder whose config.yaml was left out), and so is config.yaml (a folder
    written before config.json existed); both give the model of both."""
    import shutil

    full = MultimodalMoEModel.from_pretrained(copy_model).state_dict()
    json_only = Path(shutil.copytree(copy_model, tmp_path / "json_only"))
    (json_only / "config.yaml").unlink()
    (copy_model / "config.json").unlink()
    for folder in (json_only, copy_model):
        state = MultimodalMoEModel.from_pretrained(folder).state_dict()
        assert all(torch.equal(state[k], v) for k, v in full.items())


def test_license_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    import pytest

    from moefuse.configutil import ConfigError

    torch.manual_seed(0)
    model = build_model(ModelConfig(fusion=FusionConfig(d_model=64, num_heads=2, d_expert=64, num_experts=4),
                                    tasks=[TaskConfig("digit", "classification", ["0", "1"])]))
    with pytest.raises(ConfigError, match="license: must be a Hub license id"):
        model.save_pretrained(tmp_path / "model", license="MIT License")
    assert not (tmp_path / "model").exists()
    with pytest.raises(ConfigError, match="datasets: must be Hub dataset ids"):
        model.save_pretrained(tmp_path / "model", datasets=["not a dataset id!"])
    folder = model.save_pretrained(tmp_path / "model", license="cc-by-4.0", datasets=["owner/avdigits"])
    card = read_card(folder)
    assert card.data.license == "cc-by-4.0" and card.data.datasets == ["owner/avdigits"]


def test_the_model_is_a_hub_mixin(tmp_path: Path, monkeypatch) -> None:
    """huggingface_hub's ModelHubMixin contract: its `_from_pretrained` hook loads a folder, `save_pretrained`
    returns the folder and never pushes unless asked, `push_to_hub` is the mixin's (not called here: no Hub)."""
    import huggingface_hub
    from huggingface_hub import ModelHubMixin

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest_fail("pushed"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(fusion=FusionConfig(d_model=64, num_heads=2, d_expert=64, num_experts=4),
                                    tasks=[TaskConfig("digit", "classification", ["0", "1"])]))
    assert isinstance(model, ModelHubMixin)
    folder = model.save_pretrained(tmp_path / "model")
    loaded = MultimodalMoEModel._from_pretrained(model_id=str(folder), revision=None, cache_dir=None,
                                                 force_download=False, local_files_only=True, token=None)
    assert isinstance(loaded, MultimodalMoEModel) and not loaded.training
    assert loaded.export_info is not None and loaded.export_info.license is None


def pytest_fail(message: str) -> None:
    import pytest

    pytest.fail(message)


def test_train_license_reaches_the_card(copy_run: Path, capsys) -> None:
    """train.license (in the run's config) is the export's license: `moefuse export` redoes the folder with it."""
    import yaml

    from moefuse.cli import main as cli

    config = yaml.safe_load((copy_run / "config.yaml").read_text())
    config["train"]["license"] = "apache-2.0"
    (copy_run / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli(["export", str(copy_run)]) == 0
    assert read_card(copy_run / "model").data.license == "apache-2.0"
    assert MultimodalMoEModel.from_pretrained(copy_run / "model").export_info.license == "apache-2.0"
