"""Shared fixtures: tiny random-init models and synthetic samples, all offline and CPU-only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_sample(rng: np.random.Generator, sid: str, task: str, target: str, *, text: str | None = None,
                question: str | None = None, image: bool = False, audio: bool = False) -> dict:
    """A decoded sample in the collate contract (see moefuse.datasets.collate)."""
    return {
        "id": sid,
        "task": task,
        "text": text,
        "question": question,
        "image": Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")) if image else None,
        "audio": rng.standard_normal(int(rng.integers(4000, 40000))).astype("float32") if audio else None,
        "target": target,
        "meta": {},
    }
