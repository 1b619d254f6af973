"""The whole model: modality subsets, masking of absent modalities, fusion kinds, learning, golden values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import make_sample

from moefuse.configutil import ConfigError
from moefuse.fusion import EncodersConfig, FusionConfig, ModelConfig, TaskConfig, build_collator, build_model

DIGITS = [str(i) for i in range(10)]


def tiny_cfg(**fusion) -> ModelConfig:
    return ModelConfig(fusion=FusionConfig(d_model=64, num_heads=2, d_expert=64, num_experts=4, **fusion),
                       tasks=[TaskConfig("digit", "classification", DIGITS),
                              TaskConfig("avqa", "qa", ["yes", "no", *DIGITS])])


SUBSETS = [s for n in (1, 2, 3) for s in itertools.combinations(("text", "image", "audio"), n)]


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_modality_subset_runs(subset: tuple[str, ...], rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    collate = build_collator(model)
    samples = [make_sample(rng, f"s{i}", "digit", "3", text="three" if "text" in subset else None,
                           image="image" in subset, audio="audio" in subset) for i in range(3)]
    out = model(collate(samples))
    assert out.tasks["digit"].probs.shape == (3, 10)
    assert torch.isfinite(out.loss)
    real_mods = set(out.modality_ids[out.token_mask].tolist())
    assert real_mods == {3} | {("text", "image", "audio").index(m) for m in subset}


@pytest.mark.parametrize("pooling", ["cls", "mean", "modality"])
def test_absent_modality_adds_no_tokens(pooling: str, rng: np.random.Generator) -> None:
    """A sample without audio gets the same answer whatever sits in the (masked) audio slot of the batch."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(pooling=pooling)).eval()
    collate = build_collator(model)
    with_audio = make_sample(rng, "a", "digit", "1", image=True, audio=True)
    no_audio = make_sample(rng, "b", "digit", "2", image=True)
    alone = model(collate([no_audio])).tasks["digit"].probs
    mixed = collate([with_audio, no_audio])
    audio = mixed["inputs"]["audio"]["input_values"]
    audio[1] = torch.randn_like(audio[1]) * 100  # garbage where the sample has no audio
    together = model(mixed).tasks["digit"].probs[1:]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind, pooling", [("moe", "cls"), ("dense", "cls"), ("concat", "cls"), ("moe", "modality")])
def test_fusion_kinds_learn_a_fixed_batch(kind: str, pooling: str, rng: np.random.Generator) -> None:
    """A tiny model overfits one fixed batch: the loss falls by more than half."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(kind=kind, dropout=0.0, pooling=pooling))
    collate = build_collator(model)
    samples = [make_sample(rng, f"s{i}", "digit", str(i % 10), text=f"number {i % 10}", image=True, audio=i % 2 == 0)
               for i in range(8)]
    samples += [make_sample(rng, f"q{i}", "avqa", "yes" if i % 2 else "no", question="same?", image=True)
                for i in range(4)]
    batch = collate(samples)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.task_loss.item())
    assert losses[-1] < losses[0] / 2, losses


def test_moe_and_dense_have_equal_active_compute() -> None:
    moe = build_model(tiny_cfg(kind="moe"))
    dense = build_model(tiny_cfg(kind="dense"))
    ffn_moe = moe.fusion.blocks[0].ffn.experts
    per_expert = ffn_moe.w_in[0].numel() + ffn_moe.w_out[0].numel()
    ffn_dense = dense.fusion.blocks[0].ffn
    assert sum(p.numel() for p in ffn_dense.parameters()) == 2 * per_expert  # top_k = 2 experts per token


def test_gradients_reach_router_experts_and_encoders(rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    batch = build_collator(model)([make_sample(rng, f"s{i}", "digit", "4", text="four", image=True, audio=True)
                                   for i in range(4)])
    model(batch).loss.backward()
    block = model.fusion.blocks[0].ffn
    for name, p in [("router", block.router.weight), ("experts", block.experts.w_in),
                    ("text", model.encoders["text"].bert.embeddings.word_embeddings.weight),
                    ("image", model.encoders["image"].vit.patch_embed.proj.weight),
                    ("audio", model.encoders["audio"].wav2vec2.feature_projection.projection.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_modality_dropout_never_drops_everything() -> None:
    model = build_model(tiny_cfg(modality_dropout=0.9)).train()
    present = {m: torch.tensor([True, False, True, True]) for m in ("text", "image", "audio")}
    present["image"] = torch.tensor([False, False, True, False])
    present["text"][1] = False
    present["audio"][1] = True
    for _ in range(20):
        kept = model._drop_modalities(present, torch.zeros(4, dtype=torch.long))
        stacked = torch.stack(list(kept.values()), 1)
        assert stacked.any(1).all()
        assert not (stacked & ~torch.stack(list(present.values()), 1)).any()  # never adds a modality


def test_modality_dropout_per_modality_drops_only_the_named_ones() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(modality_dropout={"image": 0.5, "audio": 0.5})).train()
    present = {m: torch.ones(400, dtype=torch.bool) for m in ("text", "image", "audio")}
    kept = model._drop_modalities(present, torch.zeros(400, dtype=torch.long))
    assert kept["text"].all()  # not named: never dropped
    for m in ("image", "audio"):
        assert 0.4 < 1 - kept[m].float().mean() < 0.6
    only_digit = build_model(tiny_cfg(modality_dropout=0.5, modality_dropout_tasks=["digit"])).train()
    task_index = torch.arange(400) % 2  # digit, avqa, digit, ...
    kept = only_digit._drop_modalities(present, task_index)
    stacked = torch.stack(list(kept.values()), 1)  # [B, M]
    assert stacked[1::2].all() and not stacked[0::2].all()  # avqa samples keep everything
    with pytest.raises(ConfigError, match=r"fusion\.modality_dropout_tasks.*'sum' is not a task"):
        tiny_cfg(modality_dropout_tasks=["sum"])
    with pytest.raises(ConfigError, match=r"fusion\.modality_dropout.*'smell' is not a modality"):
        tiny_cfg(modality_dropout={"smell": 0.1})
    with pytest.raises(ConfigError, match=r"fusion\.modality_dropout.*\[0, 1\)"):
        tiny_cfg(modality_dropout={"image": 1.0})


def test_missing_encoder_is_a_clear_error(rng: np.random.Generator) -> None:
    cfg = tiny_cfg()
    cfg.encoders = EncodersConfig(audio=None)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="no audio encoder"):
        build_collator(model)([make_sample(rng, "x", "digit", "1", audio=True)])
    with pytest.raises(ConfigError, match="labels"):
        build_model(ModelConfig(tasks=[TaskConfig("t", "classification")]))
    with pytest.raises(ConfigError, match="at least one"):
        EncodersConfig(text=None, image=None, audio=None)
    with pytest.raises(ValueError, match="not one of the model's tasks"):
        build_collator(model)([make_sample(rng, "x", "nope", "1", image=True)])


def test_golden_values(rng: np.random.Generator) -> None:
    """Fixed seed -> fixed numbers for the whole model (init, routing, heads)."""
    torch.manual_seed(42)
    model = build_model(tiny_cfg()).eval()
    g = np.random.default_rng(7)
    batch = build_collator(model)([make_sample(g, "a", "digit", "5", text="five", image=True, audio=True),
                                   make_sample(g, "b", "avqa", "yes", question="same?", audio=True)])
    out = model(batch)
    got = [round(v, 5) for v in out.tasks["digit"].probs[0, :4].tolist()]
    assert got == pytest.approx(GOLDEN_DIGIT_PROBS, abs=2e-4)
    assert out.tokens_per_expert.tolist() == GOLDEN_TOKENS_PER_EXPERT


GOLDEN_DIGIT_PROBS = [0.08409, 0.08146, 0.09746, 0.10951]
GOLDEN_TOKENS_PER_EXPERT = [[3, 183, 25, 187], [52, 184, 159, 3]]


def test_conv_stem_and_logmel_export_round_trip(rng: np.random.Generator, tmp_path) -> None:
    """The non-default encoder front ends (image conv stem, audio log-mel) survive export -> load_exported."""
    from moefuse.encoders import AudioEncoderConfig, ImageEncoderConfig
    from moefuse.fusion.model import MultimodalMoEModel
    from moefuse.pretrained.folder import export_model

    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.encoders = EncodersConfig(image=ImageEncoderConfig(conv_stem=[8, 16, 32]),
                                  audio=AudioEncoderConfig(frontend="logmel", max_seconds=0.5))
    model = build_model(cfg)
    model.train()
    samples = [make_sample(rng, f"s{i}", "digit", str(i), image=True, audio=True) for i in range(4)]
    batch = build_collator(model)(samples)
    model(batch)  # one training-mode pass moves the BatchNorm running statistics away from their init
    model.eval()
    loaded = MultimodalMoEModel.from_pretrained(export_model(model, tmp_path / "model"))
    assert type(loaded.encoders["audio"].wav2vec2.feature_extractor).__name__ == "LogMelFrontEnd"
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).tasks["digit"].probs, model(batch).tasks["digit"].probs)
