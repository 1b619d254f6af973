"""The inference cache of encoder outputs: the same answers as without it, however rows are padded and batched;
bounded; never used in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_sample

from moefuse.configutil import ConfigError
from moefuse.fusion import FusionConfig, ModelConfig, TaskConfig, build_collator, build_model
from moefuse.fusion.encoder_cache import EncoderCache

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(fusion=FusionConfig(d_model=64, num_heads=2, d_expert=64, num_experts=4),
                      tasks=[TaskConfig("avqa", "qa", ["yes", "no", *DIGITS])])
    return build_model(cfg).eval()


def batches(rng: np.random.Generator) -> list[list[dict]]:
    q = ["what digit is written?", "is the spoken digit larger than the written one?", "sum?"]
    one = [make_sample(rng, f"a{i}", "avqa", "3", question=q[i % 3], image=True, audio=True) for i in range(5)]
    # the same questions again, in other batches with other padding lengths and other media
    two = [make_sample(rng, f"b{i}", "avqa", "3", question=q[(i + 1) % 3], image=True) for i in range(4)]
    return [one, two, [two[1]]]  # the last alone: "sum?" padded to 4 tokens, not 12


def test_cached_answers_equal_uncached_ones(model) -> None:
    rng = np.random.default_rng(0)
    collator = build_collator(model)
    plain = []
    with torch.no_grad():
        model.cache_encoders([])
        for b in batches(rng):
            plain.append(model(collator(b)).tasks["avqa"].probs)
        model.cache_encoders(["text", "image"])
        rng = np.random.default_rng(0)
        for b, expected in zip(batches(rng), plain):
            torch.testing.assert_close(model(collator(b)).tasks["avqa"].probs, expected, rtol=1e-5, atol=1e-6)
    text = model.encoder_caches["text"]
    assert text.misses == 3 and text.hits == 5 + 4 + 1 - 3  # three distinct questions, each encoded once
    model.cache_encoders([])


def test_the_cache_is_bounded_and_off_in_training(model) -> None:
    cache = EncoderCache(max_rows=2)
    calls = []

    def encode(x: torch.Tensor):
        from moefuse.encoders.base import EncoderOutput

        calls.append(len(x))
        return EncoderOutput(tokens=x[:, :, None].float(), mask=torch.ones_like(x, dtype=torch.bool))

    for rows in ([[1, 2], [3, 4]], [[5, 6]], [[1, 2]]):
        cache(encode, {"x": torch.tensor(rows)})
    assert len(cache.rows) == 2 and calls == [2, 1, 1]  # [1, 2] was evicted by [5, 6], so computed again
    model.cache_encoders(["text"])
    model.train()
    try:
        with torch.no_grad():
            model(build_collator(model)([make_sample(np.random.default_rng(1), "t", "avqa", "3", question="q?")]))
        assert model.encoder_caches["text"].hits + model.encoder_caches["text"].misses == 0
    finally:
        model.eval()
        model.cache_encoders([])
    with pytest.raises(ConfigError, match="cannot cache 'smell'"):
        model.cache_encoders(["smell"])
