"""Expert parallelism and sharded training on 2 and 4 gloo CPU processes.

The layer cases run tests/distributed_worker.py under torchrun: the expert-parallel SparseMoE must equal the
single-process layer on the same global batch (outputs, router losses, summed routing stats, gradients after the
data-parallel and expert reductions) within 1e-5. The training cases run `moefuse train` under accelerate launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_worker(case: str, world: int, ep_size: int, tmp_path: Path) -> dict:
    out = tmp_path / f"{case}-{world}-{ep_size}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(WORKER), case, str(ep_size), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("case", "world", "ep_size"), [("dense", 2, 2), ("dense", 4, 4), ("dense", 4, 2),
                                                        ("empty", 2, 2), ("empty", 4, 4)])
def test_expert_parallel_layer_equals_single_process(case: str, world: int, ep_size: int, tmp_path: Path) -> None:
    diffs = run_worker(case, world, ep_size, tmp_path)
    counts = {k: diffs.pop(k) for k in ("tokens_per_expert", "modality_expert_counts", "expert_1_tokens")}
    assert counts["tokens_per_expert"] == 0 and counts["modality_expert_counts"] == 0
    if case == "empty":
        assert counts["expert_1_tokens"] == 0  # the case really has an expert without tokens
    assert {"grad/experts.w_in", "grad/router.weight", "x_grad", "aux_loss"} <= set(diffs)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, f"{worst} differs by {diffs[worst]:.3g}: {diffs}"


# ----------------------------------------------------------------------------------------------------------------
# `moefuse train` with expert parallelism


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from moefuse.datasets import BuildOptions, build_shards, make_demo_data

    root = tmp_path_factory.mktemp("demo")
    manifest = make_demo_data(root / "data", count=120, seed=0, progress=False)
    build_shards(manifest, root / "shards", BuildOptions(maxcount=30, progress=False))
    return root / "shards"


def launch(shards: Path, out: Path, world: int, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(world),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "moefuse", "train",
           str(REPO / "configs" / "tiny.yaml"), f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]",
           f"train.output_dir={out}", "data.batch_size=8", "encoders.audio.max_seconds=0.5", "train.tensorboard=false",
           "train.log_every=1", "train.warmup_steps=4", "train.eval_every=3", "train.save_every=3",
           "train.eval_max_batches=2", "train.schedule=constant",
           # transformers runs every wav2vec2 layer under FSDP whatever LayerDrop draws: every run here without it
           "encoders.audio.layerdrop=0", *overrides, *(["--resume"] if resume else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**ENV, "ACCELERATE_USE_CPU": "1"},
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def ddp_losses(shards: Path, tmp_path_factory) -> dict[int, float]:
    """The reference: 6 steps of plain DDP on 2 processes."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch(shards, out, 2, "train.max_steps=6")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the schedule counts optimizer steps, not steps times processes: with warmup 4, after step s the factor is
    # (s + 1) / 4 (accelerate's own stepping, twice a step on 2 processes, gave (2s + 1) / 4: 0.75 at step 1)
    lr = {r["step"]: r["lr/fusion"] for r in rows if "lr/fusion" in r}
    assert [lr[s] for s in (1, 2, 3, 6)] == pytest.approx([5e-4, 7.5e-4, 1e-3, 1e-3])
    return train_losses(out)


def check_resume(shards: Path, tmp_path: Path, uninterrupted: dict[int, float], *overrides: str) -> None:
    """Interrupted after the step-3 checkpoint and resumed (a constant schedule: the learning rate does not
    depend on max_steps): the uninterrupted run's losses."""
    part = tmp_path / "part"
    launch(shards, part, 2, "train.max_steps=3", *overrides)
    launch(shards, part, 2, "train.max_steps=6", *overrides, resume=True)
    resumed = train_losses(part)
    assert all(resumed[s] == pytest.approx(uninterrupted[s], rel=1e-4) for s in (4, 5, 6)), (uninterrupted, resumed)


def check_export(out: Path, expected: dict) -> None:
    """The export is the full model (all E experts), loaded by one process with no distributed setup, with the
    weights `expected` (name -> tensor) of its best checkpoint."""
    import torch

    from moefuse.fusion.model import MultimodalMoEModel

    model = MultimodalMoEModel.from_pretrained(out / "model")
    assert model.cfg.fusion.expert_parallel_size == 1
    assert model.fusion.blocks[0].ffn.experts.w_in.shape[0] == model.cfg.fusion.num_experts == 8
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def best_checkpoint(out: Path) -> Path:
    return out / "checkpoints" / f"step-{json.loads((out / 'model' / 'export.json').read_text())['step']:07d}"


@pytest.mark.slow
def test_expert_parallel_training_resume_and_export(shards: Path, ddp_losses: dict, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    ep = tmp_path / "ep"
    launch(shards, ep, 2, "train.max_steps=6", "fusion.expert_parallel_size=2")
    assert sorted(p.name for p in (ep / "checkpoints" / "step-0000006").glob("experts-*")) == [
        "experts-ep000-of-002.safetensors", "experts-ep001-of-002.safetensors"]
    # EP=2 trains the same model as DDP: equal at step 1; later the router losses over the global batch (not
    # each rank's) and the clipping norm make them drift apart slowly
    mine = train_losses(ep)
    assert mine[1] == pytest.approx(ddp_losses[1], rel=1e-4)
    assert all(mine[s] == pytest.approx(ddp_losses[s], rel=0.05) for s in ddp_losses), (ddp_losses, mine)
    check_resume(shards, tmp_path, mine, "fusion.expert_parallel_size=2")
    name = "fusion.blocks.0.ffn.experts.w_in"
    halves = [load_file(str(best_checkpoint(ep) / f"experts-ep{j:03d}-of-002.safetensors")) for j in (0, 1)]
    check_export(ep, {name: torch.cat([h[name] for h in halves])})


@pytest.mark.slow
def test_fsdp_training_matches_ddp_resumes_and_exports(shards: Path, ddp_losses: dict, tmp_path: Path) -> None:
    from moefuse.train.checkpoint import load_run
    from moefuse.train.fsdp import full_state

    out = tmp_path / "fsdp"
    launch(shards, out, 2, "train.max_steps=6", "train.fsdp=true")
    assert (out / "checkpoints" / "step-0000006" / "fsdp").is_dir()
    assert not (out / "checkpoints" / "step-0000006" / "model.safetensors").exists()  # no full copy per step
    mine = train_losses(out)
    assert all(mine[s] == pytest.approx(ddp_losses[s], rel=1e-4) for s in ddp_losses), (ddp_losses, mine)
    check_resume(shards, tmp_path, mine, "train.fsdp=true")
    model, _, _ = load_run(out)  # the newest checkpoint, by one process
    weights = full_state(best_checkpoint(out), model.state_dict())
    check_export(out, {k: v for k, v in weights.items() if not k.startswith("heads.")})  # (heads: calibrated)


def test_expert_parallel_benchmark_counts_the_exchange() -> None:
    """benchmarks/expert_parallel.py --quick on 2 processes: EP=2 sends tokens and all-reduces no expert
    gradient; EP=1 sends no token and all-reduces all of them."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "expert_parallel.py"), "--quick", "--world", "2"],
                          capture_output=True, text=True, timeout=180, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")}
    assert float(rows["1"][4]) == 0 and float(rows["1"][5]) > 0
    assert float(rows["2"][4]) > 0 and float(rows["2"][5]) == 0
    assert int(rows["2"][0]) * 2 == int(rows["1"][0])  # experts per rank
