"""The modality interface is real: a toy fourth modality (a short multichannel sensor series with a 1-D conv
encoder) is added by subclassing, with no change to the fusion stack, the heads, the model's forward, the
collator, the export or the trainer's helpers. And shared code never names a modality."""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_sample
from torch import nn

from moefuse.configutil import atomic_write_text
from moefuse.encoders import EncoderConfig, EncoderOutput, ModalityEncoder
from moefuse.encoders.base import apply_finetune
from moefuse.fusion import EncodersConfig, FusionConfig, ModelConfig, TaskConfig, build_collator, build_model
from moefuse.fusion.model import MultimodalMoEModel
from moefuse.inference.predict import load_media_sample, routing_per_sample
from moefuse.inference.records import records_from_output
from moefuse.pretrained.folder import export_model

REPO = Path(__file__).resolve().parents[1]
DIGITS = [str(i) for i in range(10)]


@dataclass
class SensorEncoderConfig(EncoderConfig):
    modality = "sensor"
    sample_fields = ("sensor",)

    channels: int = 3
    """Channels of the series."""
    length: int = 32
    """Steps per series (longer ones are cut, shorter ones zero-padded)."""
    width: int = 16
    """Token width D_enc."""
    lora_targets: list[str] = field(default_factory=lambda: ["proj"])

    def __post_init__(self) -> None:
        self.check(self.length % 4 == 0, "length", f"must be a multiple of 4, got {self.length}")
        super().__post_init__()

    def build(self, arch_dir: Path | None = None) -> SensorEncoder:
        if arch_dir is not None:  # what save_architecture wrote must match the config
            saved = json.loads((arch_dir / "sensor.json").read_text())
            self.check(saved == {"channels": self.channels, "width": self.width}, "width", "export mismatch")
        return SensorEncoder(self)


@dataclass
class SensorPreprocessor:
    channels: int
    length: int

    def present(self, sample: dict) -> bool:
        return sample.get("sensor") is not None

    def __call__(self, samples: Sequence[dict], rng: random.Random) -> dict[str, torch.Tensor]:
        series = torch.zeros(len(samples), self.channels, self.length)  # [B, C, T]
        for i, s in enumerate(samples):
            if self.present(s):
                x = torch.as_tensor(np.asarray(s["sensor"], dtype=np.float32))[:, : self.length]
                series[i, :, : x.shape[1]] = x
        return {"series": series}


class SensorEncoder(ModalityEncoder):
    """Conv1d with stride 4 -> one token per 4 steps: [B, C, T] -> [B, T / 4, D_enc]."""

    def __init__(self, cfg: SensorEncoderConfig):
        super().__init__()
        self.cfg, self.out_dim = cfg, cfg.width
        self.conv = nn.Conv1d(cfg.channels, cfg.width, kernel_size=4, stride=4)
        self.proj = apply_finetune(nn.Sequential(nn.Linear(cfg.width, cfg.width)), cfg)

    def forward(self, series: torch.Tensor) -> EncoderOutput:
        tokens = self.proj(self.conv(series).transpose(1, 2))  # [B, T / 4, D_enc]
        return EncoderOutput(tokens=tokens, mask=torch.ones(tokens.shape[:2], dtype=torch.bool))

    def preprocessor(self, train: bool) -> SensorPreprocessor:
        return SensorPreprocessor(self.cfg.channels, self.cfg.length)

    def save_architecture(self, folder: Path) -> None:
        atomic_write_text(folder / "sensor.json", json.dumps({"channels": self.cfg.channels, "width": self.cfg.width}))

    def read_input(self, field: str, value: Any, media: dict) -> Any:
        return np.load(value)  # a .npy file [C, T]


@dataclass
class WithSensor(EncodersConfig):
    sensor: SensorEncoderConfig | None = field(default_factory=SensorEncoderConfig)
    """The toy sensor modality."""


@dataclass
class SensorModelConfig(ModelConfig):
    encoders: WithSensor = field(default_factory=WithSensor)
    """Text, image, audio and sensor encoders."""


def sensor_model(**encoders: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = SensorModelConfig(encoders=WithSensor(**encoders),
                            fusion=FusionConfig(d_model=32, num_heads=2, d_expert=32, num_experts=4, dropout=0.0),
                            tasks=[TaskConfig("digit", "classification", DIGITS)])
    return build_model(cfg)


def sensor_sample(rng: np.random.Generator, sid: str, target: str, *, image: bool = False) -> dict:
    sample = make_sample(rng, sid, "digit", target, image=image)
    return {**sample, "sensor": rng.standard_normal((3, int(rng.integers(20, 40)))).astype("float32")}


def test_a_fourth_modality_is_fused_routed_and_learned(rng: np.random.Generator) -> None:
    model = sensor_model(audio=None)
    assert model.routing_rows == ["text", "image", "audio", "sensor", "fusion"]
    collate = build_collator(model)
    samples = [sensor_sample(rng, f"s{i}", str(i % 10), image=i % 2 == 0) for i in range(8)]
    samples.append(make_sample(rng, "no-sensor", "digit", "1", text="one"))
    batch = collate(samples)
    assert batch["present"]["sensor"].tolist() == [True] * 8 + [False]
    out = model(batch)
    sensor_id, fusion_id = model.modalities.index("sensor"), len(model.modalities)
    real = out.modality_ids[out.token_mask]
    assert set(real.tolist()) == {0, 1, sensor_id, fusion_id}
    assert not (out.modality_ids[8][out.token_mask[8]] == sensor_id).any()  # the sample without it adds no tokens
    assert out.modality_expert_counts.shape[1] == len(model.routing_rows)
    assert out.modality_expert_counts[:, sensor_id].sum() > 0  # sensor tokens were routed to experts

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        assert model.encoders["sensor"].conv.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses


def test_a_fourth_modality_exports_loads_and_predicts(rng: np.random.Generator, tmp_path: Path) -> None:
    model = sensor_model(text=None, image=None, audio=None).eval()
    samples = [sensor_sample(rng, f"s{i}", str(i)) for i in range(3)]
    batch = build_collator(model)(samples)
    with torch.no_grad():
        expected = model(batch).tasks["digit"].probs
    export_model(model, tmp_path / "model")
    assert (tmp_path / "model" / "sensor" / "sensor.json").is_file()  # the encoder wrote its own part
    loaded = MultimodalMoEModel.from_pretrained(tmp_path / "model", config_type=SensorModelConfig)
    with torch.no_grad():
        out = loaded(build_collator(loaded)(samples))
    torch.testing.assert_close(out.tasks["digit"].probs, expected)
    records = records_from_output(batch, out, {"digit": DIGITS})
    assert {r["modalities"] for r in records} == {"sensor"}
    assert set(routing_per_sample(out, loaded.routing_rows)[0]) == {"sensor", "fusion"}

    np.save(tmp_path / "x.npy", samples[0]["sensor"])
    sample = load_media_sample(loaded, "from-file", "digit", sensor=tmp_path / "x.npy")
    np.testing.assert_array_equal(sample["sensor"], samples[0]["sensor"])
    with pytest.raises(ValueError, match="has sensor but the model has no sensor encoder"):
        build_collator(sensor_model(sensor=None))([samples[0]])


def test_dropping_a_modality_clears_all_its_fields(rng: np.random.Generator) -> None:
    model = sensor_model()
    samples = [sensor_sample(rng, "a", "1", image=True), make_sample(rng, "q", "digit", "2", question="which?")]
    batch = build_collator(model, drop_modalities=["sensor", "text"])(samples)
    assert not batch["present"]["sensor"].any() and not batch["present"]["text"].any()
    assert batch["present"]["image"].tolist() == [True, False]
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        build_collator(model, drop_modalities=["smell"])


SHARED = ["moefuse/fusion/model.py", "moefuse/fusion/stack.py", "moefuse/fusion/heads.py", "moefuse/fusion/moe.py",
          "moefuse/datasets/collate.py", "moefuse/evaluation/metrics.py", "moefuse/evaluation/loop.py",
          "moefuse/commands/evaluate.py", "moefuse/commands/predict.py", "moefuse/train/checkpoint.py",
          "moefuse/pretrained/folder.py", "moefuse/evaluation/report.py", "moefuse/inference/predict.py",
          "moefuse/inference/server.py", "moefuse/commands/serve.py", "moefuse/inference/batcher.py",
          "moefuse/datasets/corruption.py"]


@pytest.mark.parametrize("path", SHARED)
def test_shared_code_never_names_a_modality(path: str) -> None:
    """No string literal "text", "image" or "audio" outside docstrings and messages' prose: shared code loops."""
    tree = ast.parse((REPO / path).read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    named = [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings
             and n.value in ("text", "image", "audio")]
    assert not named, f"{path} branches on modality names at {named}"
