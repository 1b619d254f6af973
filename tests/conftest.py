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


# ---------------------------------------------------------------------------------------------------------------
# A small trained run shared by the fault tests (tests/test_faults_*.py): demo shards and a 2-step tiny model.
# Tests that damage something copy it first (`copy_run`, `copy_model`).

TINY = REPO / "configs" / "tiny.yaml"


def run_overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]", f"train.output_dir={out}",
            "data.batch_size=16", "encoders.audio.max_seconds=0.5", "train.tensorboard=false",
            "train.warmup_steps=1", "train.max_steps=2", "train.eval_every=2", "train.save_every=1",
            "train.keep_last=3",
            "heads.calibration_min_samples=5",  # the demo shards' 6 validation samples per task: still calibrated
            *extra]


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory) -> dict:
    from moefuse.datasets import BuildOptions, build_shards, make_demo_data

    root = tmp_path_factory.mktemp("faults")
    manifest = make_demo_data(root / "data", count=120, seed=0, progress=False)
    build_shards(manifest, root / "shards", BuildOptions(maxcount=20, progress=False))
    return {"root": root, "manifest": manifest, "shards": root / "shards"}


@pytest.fixture(scope="session")
def fault_run(fault_data: dict) -> Path:
    from moefuse.config import load_config
    from moefuse.train.recipe import train

    out = fault_data["root"] / "run"
    train(load_config(TINY, run_overrides(fault_data["shards"], out)))
    return out


@pytest.fixture
def copy_run(fault_run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(fault_run, tmp_path / "run"))


@pytest.fixture
def copy_model(fault_run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(fault_run / "model", tmp_path / "model"))


def run_cli(*args: str, fsize: int | None = None, timeout: int = 120):
    """`moefuse ARGS` in a child process (optionally with RLIMIT_FSIZE = fsize bytes and SIGXFSZ ignored, so that
    writing past it fails with EFBIG like a full disk) -> CompletedProcess with text stdout/stderr."""
    import resource
    import signal
    import subprocess
    import sys

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "moefuse.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env, preexec_fn=limit if fsize is not None else None)
