"""Compression and faster inference: expert pruning (moefuse/fusion/prune.py, `moefuse compress`) and the inference
runtimes (moefuse/fusion/runtime.py: the static-shape MoE, bf16, int8, torch.compile), each against the fp32
eager model on fixed inputs of tiny presets."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sample, run_cli

from moefuse.configutil import ConfigError
from moefuse.fusion import (
    EncodersConfig,
    FusionConfig,
    ModelConfig,
    MultimodalMoEModel,
    TaskConfig,
    build_collator,
    build_model,
)
from moefuse.fusion.moe import MoEConfig, SparseMoE
from moefuse.fusion.prune import LayerPlan, merge_dropped, moe_layers, prune_experts, routing_share, slice_experts
from moefuse.fusion.runtime import InferenceMoE, compile_model, prepare_inference, use_inference_moe

E, K = 6, 2


def tiny_model(num_experts: int = E, shared_expert: bool = False, encoders: dict | None = None
               ) -> MultimodalMoEModel:
    torch.manual_seed(0)
    cfg = ModelConfig(encoders=EncodersConfig(**(encoders or {})),
                      fusion=FusionConfig(d_model=32, num_heads=2, d_expert=32, num_experts=num_experts, top_k=K,
                                          shared_expert=shared_expert),
                      tasks=[TaskConfig("digit", "classification", [str(i) for i in range(10)]),
                             TaskConfig("avqa", "qa", [str(i) for i in range(19)])])
    return build_model(cfg).eval()


def fixed_batch(model: MultimodalMoEModel, n: int = 6) -> dict:
    """Both tasks, every modality mix (some samples without audio, text only on avqa)."""
    rng = np.random.default_rng(0)
    samples = [make_sample(rng, f"s{i}", "digit", "3", image=True, audio=i % 2 == 0) for i in range(n // 2)]
    samples += [make_sample(rng, f"q{i}", "avqa", "4", question="what digit is spoken " * (i + 1), image=i != 1,
                            audio=True) for i in range(n - n // 2)]
    return build_collator(model)(samples)


def outputs(model: MultimodalMoEModel, batch: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(batch)
    return {t: o.probs for t, o in out.tasks.items()}


# ---------------------------------------------------------------------------------------------------------------
# pruning


def test_a_pruned_router_is_the_full_one_renormalised_over_the_kept_experts() -> None:
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(d_model=16, d_expert=8, num_experts=E, top_k=K)).eval()
    full = copy.deepcopy(moe)
    kept = [0, 2, 3, 5]
    slice_experts(moe, kept)
    x = torch.randn(40, 16)
    with torch.no_grad():
        p_full = full(x).router_logits.softmax(-1)[:, kept]  # [N, 4]
        out = moe(x)
    p = out.router_logits.softmax(-1)
    assert p.shape == (40, 4) and moe.router.weight.shape == (4, 16) and moe.experts.w_in.shape[0] == 4
    torch.testing.assert_close(p.sum(-1), torch.ones(40))
    torch.testing.assert_close(p, p_full / p_full.sum(-1, keepdim=True))
    assert int(out.tokens_per_expert.sum()) == 40 * K  # every token still routed to K of the kept experts


def test_pruning_nothing_equals_the_full_model() -> None:
    model = tiny_model()
    full = copy.deepcopy(model)
    share = torch.rand(len(moe_layers(model)), E)
    plans = prune_experts(model, share, keep=E, merge=True)
    assert all(p.kept == list(range(E)) and not p.dropped for p in plans)
    batch = fixed_batch(model)
    for task, probs in outputs(full, batch).items():
        assert torch.equal(outputs(model, batch)[task], probs)


def test_pruning_keeps_the_most_routed_experts_and_sets_the_config() -> None:
    model = tiny_model()
    share = routing_share(torch.tensor([[[5, 0, 9, 1, 7, 3]], [[0, 8, 8, 1, 2, 6]]]))  # [L, G, E] counts
    plans = prune_experts(model, share, keep=3)
    assert [p.kept for p in plans] == [[0, 2, 4], [1, 2, 5]] and plans[1].dropped == [0, 3, 4]
    assert model.cfg.fusion.num_experts == 3 and all(m.num_experts == 3 for m in moe_layers(model))
    assert set(outputs(model, fixed_batch(model))) == {"digit", "avqa"}


def test_merging_averages_each_dropped_expert_into_its_most_similar_kept_one_by_routing_share() -> None:
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(d_model=8, d_expert=4, num_experts=3, top_k=1))
    with torch.no_grad():
        moe.experts.w_in[2] = moe.experts.w_in[1] * 2 + 0.01  # expert 2 is nearly a multiple of expert 1
        moe.experts.w_out[2] = moe.experts.w_out[1] * 2
    before = copy.deepcopy(moe.experts)
    plan = LayerPlan(kept=[0, 1], dropped=[2], share=[0.5, 0.3, 0.2])
    merge_dropped(moe, plan)
    assert plan.merged_into == {2: 1}
    torch.testing.assert_close(moe.experts.w_in[1], 0.6 * before.w_in[1] + 0.4 * before.w_in[2])
    torch.testing.assert_close(moe.experts.w_out[1], 0.6 * before.w_out[1] + 0.4 * before.w_out[2])
    assert torch.equal(moe.experts.w_in[0], before.w_in[0])


def test_compress_writes_a_pruned_model_folder_that_round_trips(fault_run: Path, fault_data: dict,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    r = run_cli("compress", "--checkpoint", str(fault_run / "model"), "--out", str(out), "--shards",
                str(fault_data["shards"]), "--keep-experts", "4", "--merge")
    assert r.returncode == 0, r.stderr
    assert "kept 4 of 8 experts" in r.stdout and "same answer as before" in r.stdout
    model = MultimodalMoEModel.from_pretrained(out)
    assert model.cfg.fusion.num_experts == 4 and all(m.experts.w_in.shape[0] == 4 for m in moe_layers(model))
    [record] = json.loads((out / "export.json").read_text())["compression"]
    assert record["split"] == "val" and record["num_experts_before"] == 8 and len(record["layers"]) == 2
    assert "media" in json.loads((out / "export.json").read_text())  # the source's media settings are kept
    card = (out / "README.md").read_text()
    assert "## Compression" in card and "keeps 4 of its 8 experts" in card and "split `val`" in card
    again = model.save_pretrained(tmp_path / "again")
    reloaded = MultimodalMoEModel.from_pretrained(again)
    assert reloaded.export_info.compression == model.export_info.compression  # the record survives a re-save
    batch = fixed_batch(model)
    for task, probs in outputs(model, batch).items():
        assert torch.equal(outputs(reloaded, batch)[task], probs)
    data = json.loads((again / "export.json").read_text())  # a tampered record is refused, naming the field
    data["compression"][0]["layers"][1]["kept"][0] = 99
    (again / "export.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"compression\[0\]\.layers\[1\]"):
        MultimodalMoEModel.from_pretrained(again)


@pytest.mark.parametrize("count", ["0", "9", "1"])  # none, more than E = 8, fewer than top_k = 2
def test_a_bad_expert_count_is_a_one_line_error(fault_run: Path, fault_data: dict, tmp_path: Path,
                                                count: str) -> None:
    r = run_cli("compress", "--checkpoint", str(fault_run / "model"), "--out", str(tmp_path / "out"), "--shards",
                str(fault_data["shards"]), "--keep-experts", count)
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("moefuse compress: error: --keep-experts must be in "
                                                             "[top_k=2, num_experts=8] for this model"), r.stderr


# ---------------------------------------------------------------------------------------------------------------
# inference runtimes


@pytest.mark.parametrize("shared_expert", [False, True])
def test_the_static_shape_moe_gives_the_eager_answers_and_routing(shared_expert: bool) -> None:
    model = tiny_model(shared_expert=shared_expert)
    fast = copy.deepcopy(model)
    use_inference_moe(fast)
    assert all(isinstance(m, InferenceMoE) for m in moe_layers(fast))
    batch = fixed_batch(model)
    with torch.no_grad():
        a, b = model(batch), fast(batch)
    for task in a.tasks:
        torch.testing.assert_close(b.tasks[task].probs, a.tasks[task].probs, rtol=1e-5, atol=1e-6)
    for la, lb in zip(a.moe_layers, b.moe_layers):
        for name in ("tokens_per_expert", "modality_expert_counts", "top_k_index"):
            assert torch.equal(getattr(la, name), getattr(lb, name)), name
        torch.testing.assert_close(lb.router_logits, la.router_logits)


@pytest.mark.parametrize("quantize, tolerance, same", [("bf16", 0.03, 0.8), ("int8", 0.05, 0.8)])
def test_quantised_weights_agree_with_fp32_within_tolerance(quantize: str, tolerance: float, same: float) -> None:
    """bf16: 8 bits of mantissa per weight; int8: 8 bits per weight and per activation. Random-init tiny models have
    near ties, so a few answers may flip; the probabilities stay close."""
    model = tiny_model()
    fast = prepare_inference(copy.deepcopy(model), quantize=quantize)
    batch = fixed_batch(model, n=12)
    with torch.no_grad():
        a, b = model(batch), fast(batch)
    agree = []
    for task in a.tasks:
        assert (b.tasks[task].probs - a.tasks[task].probs).abs().max() < tolerance
        agree += (b.tasks[task].prediction == a.tasks[task].prediction).tolist()
    assert sum(agree) / len(agree) >= same


def test_compile_model_takes_the_whole_model_through_dynamo() -> None:
    """compile_model on every encoder and fusion block, the experts as their custom op, at batch 1 and 3 (dynamic
    sizes), on torch.compile's eager backend: the graphs are captured as inductor gets them, but run eagerly, so
    this takes seconds; inductor's own kernels are checked on the MoE layer below. One encoder (image) keeps it
    short."""
    model = tiny_model(encoders={"text": None, "audio": None})
    fast = compile_model(copy.deepcopy(model), backend="eager")
    for n in (1, 3):
        rng = np.random.default_rng(n)
        batch = build_collator(model)([make_sample(rng, f"s{i}", "digit", "3", image=True) for i in range(n)])
        for task, probs in outputs(model, batch).items():
            torch.testing.assert_close(outputs(fast, batch)[task], probs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # inductor's C++ compile: about 15 s on 2 cores
def test_the_moe_layer_compiled_by_inductor_agrees_with_eager() -> None:
    """The static-shape MoE and its custom op through inductor (the shared expert is checked eagerly above)."""
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(d_model=16, d_expert=8, num_experts=E, top_k=K, num_groups=3)).eval()
    fast = InferenceMoE.of(moe)
    fast.compile(dynamic=True)
    for b, t in ((2, 7), (3, 11)):  # one dynamic graph (a batch of 1 would get a graph of its own)
        x, ids = torch.randn(b, t, 16), torch.randint(0, 3, (b, t))
        mask = torch.rand(b, t) > 0.3
        with torch.no_grad():
            want, got = moe(x, ids, mask), fast(x, ids, mask)
        torch.testing.assert_close(got.out, want.out, rtol=1e-5, atol=1e-6)
        for name in ("tokens_per_expert", "modality_expert_counts", "top_k_index"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_predict_runs_bf16_and_compiled_int8_is_refused(fault_run: Path, fault_data: dict) -> None:
    image = next((fault_data["root"] / "data").rglob("*.png"))
    ok = run_cli("predict", "--checkpoint", str(fault_run / "model"), "--task", "digit", "--image", str(image),
                 "--quantize", "bf16")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["prediction"] in [str(i) for i in range(10)]
    with pytest.raises(ConfigError, match="--quantize int8 runs eager only"):
        prepare_inference(tiny_model(), runtime="compiled", quantize="int8")
