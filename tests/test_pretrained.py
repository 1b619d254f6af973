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
