"""Training, resume, evaluate, predict and the 2-process accelerate run, on small demo shards (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefuse.commands.predict import main as predict_main
from moefuse.config import load_config
from moefuse.configutil import ConfigError
from moefuse.datasets import BuildOptions, build_shards, make_demo_data, read_manifest
from moefuse.evaluation.report import evaluate
from moefuse.fusion.loading import load_inference_model as load_model
from moefuse.fusion.model import MultimodalMoEModel
from moefuse.inference.predict import load_media_sample, predict_samples
from moefuse.train.checkpoint import latest_checkpoint
from moefuse.train.recipe import train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    manifest = make_demo_data(root / "data", count=200, seed=0, progress=False)
    # 30 samples a shard: 6 train shards of unequal size, so 2 ranks get different amounts of data.
    build_shards(manifest, root / "shards", BuildOptions(maxcount=30, progress=False))
    return {"root": root, "manifest": manifest, "shards": root / "shards"}


def cfg_for(demo: dict, out: Path, *extra: str):
    return load_config(TINY, [f"data.train_shards=[{demo['shards']}]", f"data.val_shards=[{demo['shards']}]",
                              f"train.output_dir={out}", "data.batch_size=16", "encoders.audio.max_seconds=0.5",
                              "train.log_every=1", "train.tensorboard=false", "train.warmup_steps=2", *extra])


def test_two_training_steps(demo: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(cfg_for(demo, out, "train.max_steps=2", "train.eval_every=2", "train.save_every=2"))
    assert result["steps"] == 2 and result["last_loss"] == pytest.approx(result["last_loss"])  # finite
    assert torch.isfinite(torch.tensor(result["last_loss"]))
    for name in ("config.yaml", "metrics.jsonl", "results.json", "routing_heatmap.png", "model/model.safetensors",
                 "model/config.yaml", "model/text/tokenizer.json", "checkpoints/latest", "checkpoints/best"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/mean_acc" in r]
    assert val and "val/digit/macro_f1" in val[-1] and "val/avqa/exact_match" in val[-1]
    assert "val/expert_load/image" in val[-1] and "val/dropped_fraction" in val[-1]
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg_for(demo, out, "train.max_steps=2"))


def test_resume_reaches_the_uninterrupted_result(demo: dict, tmp_path: Path) -> None:
    args = ("train.max_steps=6", "train.eval_every=3", "train.save_every=3", "fusion.modality_dropout=0.3",
            "train.seed=3")
    full = train(cfg_for(demo, tmp_path / "full", *args))
    stopped = train(cfg_for(demo, tmp_path / "resumed", *args), stop_after=3)
    assert stopped["stopped_after"] == 3
    # a crash in the middle of writing the next checkpoint leaves only a hidden temp folder behind
    (tmp_path / "resumed" / "checkpoints" / ".tmp-step-0000006").mkdir()
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-0000003"
    resumed = train(cfg_for(demo, tmp_path / "resumed", *args), resume=True)
    assert resumed["steps"] == full["steps"] == 6
    assert resumed["last_loss"] == pytest.approx(full["last_loss"], rel=1e-5, abs=1e-6)
    a = MultimodalMoEModel.from_pretrained(tmp_path / "full" / "model").state_dict()
    b = MultimodalMoEModel.from_pretrained(tmp_path / "resumed" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def trained(demo: dict, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    train(cfg_for(demo, out, "train.max_steps=4", "train.eval_every=4", "train.save_every=4"))
    return out / "model"


def test_evaluate_report(demo: dict, trained: Path, tmp_path: Path) -> None:
    report = evaluate(trained, [str(demo["shards"])], split="val", heatmap=tmp_path / "h.png", progress=False)
    digit = report["tasks"]["digit"]
    assert digit["samples"] == sum(1 for r in read_manifest(demo["manifest"]) if r.split == "val" and r.task == "digit")
    for key in ("per_class", "confusion_matrix", "ece", "best_single_head_accuracy", "agreement_vs_correctness",
                "accuracy_by_modalities"):
        assert key in digit
    assert sum(map(sum, digit["confusion_matrix"]["matrix"])) == digit["samples"]
    assert "accuracy_by_qtype" in report["tasks"]["avqa"]
    assert (tmp_path / "h.png").stat().st_size > 0


def test_predict_with_missing_modalities(demo: dict, trained: Path, tmp_path: Path) -> None:
    model = load_model(trained)
    rows = [r for r in read_manifest(demo["manifest"]) if r.split == "test" and not r.errors]
    qa = next(r for r in rows if r.type == "qa" and r.image and r.audio)
    samples = [
        load_media_sample(model, "full", qa.task, question=qa.question, image=qa.image, audio=qa.audio),
        load_media_sample(model, "no-audio", qa.task, question=qa.question, image=qa.image),
        load_media_sample(model, "text-only", "digit", text="this is the number seven"),
    ]
    preds = predict_samples(model, samples)
    assert [p["id"] for p in preds] == ["full", "no-audio", "text-only"]
    for p in preds:
        assert len(p["top5"]) == 5 and len(p["votes"]) == 3 and 0 <= p["agreement"] <= 1
    assert set(preds[0]["routing"]) == {"text", "image", "audio", "fusion"}
    assert "audio" not in preds[1]["routing"] and set(preds[2]["routing"]) == {"text", "fusion"}
    # the CLI: a manifest in, JSON Lines out; int8 runs too
    out = tmp_path / "preds.jsonl"
    assert predict_main(["--checkpoint", str(trained), "--manifest", str(demo["manifest"]), "--out", str(out),
                         "--int8"]) == 0
    assert len(out.read_text().splitlines()) == len(read_manifest(demo["manifest"]))


def test_predict_and_evaluate_errors(demo: dict, trained: Path, tmp_path: Path, capsys) -> None:
    assert predict_main(["--checkpoint", str(trained), "--task", "nope", "--text", "x"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(trained), "--task", "digit", "--image", str(tmp_path / "no.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(tmp_path), "--task", "digit", "--text", "x"]) == 2
    assert "not an exported moefuse model" in capsys.readouterr().err
    with pytest.raises(Exception, match="does not exist|no .* split"):
        evaluate(trained, [str(tmp_path / "missing-shards-{000..001}.tar")], progress=False)


def test_nonfinite_loss_stops_or_skips(demo: dict, tmp_path: Path, monkeypatch) -> None:
    real_forward = MultimodalMoEModel.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = real_forward(self, batch)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MultimodalMoEModel, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        train(cfg_for(demo, tmp_path / "stop", "train.max_steps=3", "train.save_every=1"))
    ckpts = sorted(p.name for p in (tmp_path / "stop" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000001"]  # nothing written for the poisoned step
    calls["n"] = 0
    result = train(cfg_for(demo, tmp_path / "skip", "train.max_steps=3", "train.nan_policy=skip"))
    assert result["skipped_nonfinite"] == 1 and result["steps"] == 3


@pytest.mark.slow
def test_accelerate_two_processes_see_every_sample_once(demo: dict, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    train_ids = {r.id for r in read_manifest(demo["manifest"]) if r.split == "train"}
    steps_per_epoch = -(-len(train_ids) // 2 // 16)  # enough steps to finish epoch 0
    # `--cpu --num_processes 2` would start ONE process unless MPI is set up (accelerate's multi-CPU path runs
    # mpirun); `--multi_gpu` on a machine without GPUs starts 2 torch-elastic processes on gloo, on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "moefuse", "train", str(TINY),
           f"data.train_shards=[{demo['shards']}]", f"data.val_shards=[{demo['shards']}]", f"train.output_dir={out}",
           "data.batch_size=16", "encoders.audio.max_seconds=0.5", "train.tensorboard=false",
           f"train.max_steps={steps_per_epoch + 2}", "train.eval_every=100", "train.record_sample_ids=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [(out / "sample_ids" / f"epoch0000-rank{r:03d}.txt").read_text().split() for r in (0, 1)]
    assert not set(seen[0]) & set(seen[1])  # disjoint across ranks
    assert sorted(seen[0] + seen[1]) == sorted(train_ids)  # every sample exactly once
    assert (out / "model" / "model.safetensors").exists()
    assert "2 processes" in proc.stdout + proc.stderr


def test_validation_does_not_change_training(demo: dict, tmp_path: Path) -> None:
    """Validation draws no number the training would: the losses are those of a run never validated."""
    def losses(out: Path) -> list[float]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    every = tmp_path / "every"
    train(cfg_for(demo, every, "train.max_steps=3", "train.eval_every=1", "train.eval_max_batches=1"))
    never = tmp_path / "never"
    train(cfg_for(demo, never, "train.max_steps=3", "train.eval_every=100"))
    assert len(losses(every)) == 3 and losses(every) == losses(never)
