"""Loader augmentation (encoders.<modality>.augment): off in evaluation, reproducible from the seed and epoch in
training, different between epochs, drawn without touching the model's RNG; SpecAugment masks; config errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_sample

from moefuse.config import load_config
from moefuse.configutil import ConfigError
from moefuse.encoders import AudioEncoderConfig, ImageEncoderConfig, build_audio_encoder, build_image_encoder
from moefuse.encoders.audio_augment import AudioAugmentConfig, add_noise, apply_spec_masks, perturb_waveform
from moefuse.encoders.image import ImageAugmentConfig
from moefuse.fusion.model import EncodersConfig, ModelConfig, TaskConfig, build_collator, build_model

AUDIO_AUG = AudioAugmentConfig(speed=(0.8, 1.2), gain_db=6.0, noise_snr_db=(5.0, 20.0), noise_prob=1.0,
                               time_masks=2, time_mask_frames=5, freq_masks=2, freq_mask_bins=6)
IMAGE_AUG = ImageAugmentConfig(scale=(0.6, 1.0), ratio=(0.8, 1.25), rand_augment="rand-m7-n2", erase_prob=0.5)


def samples(n: int = 6) -> list[dict]:
    rng = np.random.default_rng(0)
    return [make_sample(rng, f"s{i}", "digit", "1", image=True, audio=True) for i in range(n)]


@pytest.fixture(scope="module")
def model():
    return build_model(model_config(IMAGE_AUG, AUDIO_AUG))


def model_config(image: ImageAugmentConfig, audio: AudioAugmentConfig) -> ModelConfig:
    encoders = EncodersConfig(text=None, image=ImageEncoderConfig(augment=image),
                              audio=AudioEncoderConfig(max_seconds=0.5, frontend="logmel", augment=audio))
    return ModelConfig(encoders=encoders, tasks=[TaskConfig("digit", "classification", [str(i) for i in range(10)])])


def batch(model, train: bool, epoch: int, seed: int = 0) -> dict:
    collator = build_collator(model, train=train, seed=seed)
    collator.set_epoch(epoch)
    return collator(samples())["inputs"]


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])


def test_training_batches_are_reproducible_from_seed_and_epoch(model) -> None:
    assert same(batch(model, True, 3), batch(model, True, 3))
    for other in (batch(model, True, 4), batch(model, True, 3, seed=1)):  # another epoch, another seed
        assert not torch.equal(other["image"]["pixel_values"], batch(model, True, 3)["image"]["pixel_values"])
        assert not torch.equal(other["audio"]["input_values"], batch(model, True, 3)["audio"]["input_values"])


def test_evaluation_is_never_augmented(model) -> None:
    plain = build_model(model_config(ImageAugmentConfig(), AudioAugmentConfig()))
    evaluated = batch(model, False, 0)
    assert same(evaluated, batch(model, False, 7))  # no draw at all: every epoch the same
    assert same(evaluated, batch(plain, False, 0))  # and the same as a model without augmentation
    assert set(evaluated["audio"]) == {"input_values", "sample_mask"}  # no SpecAugment masks
    assert not same(evaluated, {m: {k: v for k, v in batch(model, True, 0)[m].items() if k in evaluated[m]}
                                for m in evaluated})


def test_augmentation_leaves_the_global_rngs_alone(model) -> None:
    def seed() -> None:
        torch.manual_seed(5)
        random.seed(5)
        np.random.seed(5)

    seed()
    batch(model, True, 0)
    after = (torch.rand(3), random.random(), np.random.random())
    seed()
    assert torch.equal(after[0], torch.rand(3)) and after[1:] == (random.random(), np.random.random())


def test_speed_changes_the_length_and_noise_has_its_snr() -> None:
    wav = np.sin(np.linspace(0, 400, 16000)).astype(np.float32)
    fast = perturb_waveform(wav, AudioAugmentConfig(speed=(1.25, 1.25)), 16000, random.Random(0))
    assert abs(len(fast) - 16000 / 1.25) <= 2
    noisy = add_noise(wav, 10.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(wav ** 2) / np.mean((noisy - wav) ** 2))
    assert abs(snr - 10.0) < 0.3
    loud = perturb_waveform(wav * 0.9, AudioAugmentConfig(gain_db=30.0), 16000, random.Random(1))
    assert np.abs(loud).max() <= 1.0


def test_spec_masks_blank_only_real_frames_and_are_applied(model) -> None:
    inputs = batch(model, True, 0)["audio"]
    time_keep, freq_keep = inputs["spec_time_keep"], inputs["spec_freq_keep"]  # [B, F], [B, C]
    assert time_keep.shape[1] == 24 and freq_keep.shape[1] == 64  # 0.5 s at 20 ms frames; 64 mel bands
    assert (~time_keep).any() and (~freq_keep).any()
    assert ((~time_keep).sum(1) <= 10).all() and ((~freq_keep).sum(1) <= 12).all()  # 2 masks of <= 5 / <= 6
    features = torch.randn(2, 64, 24)
    masked = apply_spec_masks(features, time_keep[:2], freq_keep[:2])
    keep = time_keep[:2, None, :] & freq_keep[:2, :, None]
    assert torch.equal(masked[keep], features[keep]) and not torch.equal(masked, features)
    out = model.encoders["audio"](**inputs)  # the encoder takes the masks as inputs
    assert out.tokens.shape[:2] == out.mask.shape


@pytest.mark.parametrize("override, key", [
    ("encoders.audio.augment.freq_masks=2", "encoders.audio.augment.freq_masks"),  # tiny.yaml's audio is conv
    ("encoders.audio.augment.speed=[1.2,0.9]", "encoders.audio.augment.speed"),
    ("encoders.audio.augment.noise_prob=2", "encoders.audio.augment.noise_prob"),
    ("encoders.image.augment.rand_augment=rnd-m3", "encoders.image.augment.rand_augment"),
    ("encoders.image.augment.scale=[0.0,1.0]", "encoders.image.augment.scale"),
    ("encoders.image.augment.colour=0.4", "encoders.image.augment.colour"),
])
def test_bad_augmentation_names_its_key(override: str, key: str) -> None:
    from conftest import TINY

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_augmentation_from_yaml_reaches_the_preprocessors() -> None:
    from conftest import TINY

    cfg = load_config(TINY, ["encoders.image.augment.scale=[0.5,1.0]", "encoders.audio.augment.time_masks=1"])
    assert cfg.encoders.image.augment.scale == (0.5, 1.0)
    image, audio = build_image_encoder(cfg.encoders.image), build_audio_encoder(cfg.encoders.audio)
    assert image.preprocessor(train=True).random and not image.preprocessor(train=False).random
    assert audio.preprocessor(train=True).augment.time_masks == 1
    assert audio.preprocessor(train=False).augment is None
    assert not ImageEncoderConfig().augment.active and not AudioEncoderConfig().augment.masks_active


@pytest.mark.parametrize("policy", ["rand-m10-n3-mstd101", "rand-m10-n3-mstd101-inc1"])
def test_rand_augment_survives_every_magnitude(policy: str) -> None:
    """mstd > 100 draws magnitudes uniformly in [0, 10]: every operation at every strength (timm's own posterize
    keeps 0 bits at low magnitudes, which Pillow refuses)."""
    pre = build_image_encoder(ImageEncoderConfig(augment=ImageAugmentConfig(rand_augment=policy))).preprocessor(True)
    images = samples(8)
    rng = random.Random(0)
    for _ in range(25):
        assert pre(images, rng)["pixel_values"].shape == (8, 3, 32, 32)


def test_augmentation_by_task_leaves_the_other_tasks_clean() -> None:
    """augment.tasks=[digit]: digit samples are augmented, avqa samples get the evaluation inputs (no crop, speed,
    noise or masks; their clips are shorter than max_seconds, so there is nothing to crop at random either)."""
    from dataclasses import replace

    tasks = [TaskConfig("digit", "classification", [str(i) for i in range(10)]), TaskConfig("avqa", "qa", ["1", "2"])]
    cfg = replace(model_config(replace(IMAGE_AUG, tasks=["digit"]), replace(AUDIO_AUG, tasks=["digit"])), tasks=tasks)
    model = build_model(cfg)
    rng = np.random.default_rng(1)
    rows = [make_sample(rng, f"s{i}", task, "1", image=True, audio=True) for i, task in
            enumerate(["digit", "avqa"] * 3)]
    for r in rows:
        r["audio"] = r["audio"][:6000]  # shorter than max_seconds (8000 samples)
    trained = build_collator(model, train=True)(rows)["inputs"]
    clean = build_collator(model, train=False)(rows)["inputs"]
    digit, avqa = [0, 2, 4], [1, 3, 5]
    for m, key in (("image", "pixel_values"), ("audio", "input_values")):
        assert torch.equal(trained[m][key][avqa], clean[m][key][avqa]), m
        assert not torch.equal(trained[m][key][digit], clean[m][key][digit]), m
    assert trained["audio"]["spec_time_keep"][avqa].all() and trained["audio"]["spec_freq_keep"][avqa].all()
    assert not trained["audio"]["spec_freq_keep"][digit].all()
    with pytest.raises(ConfigError, match=r"encoders\.image\.augment\.tasks: 'sum' is not a task"):
        replace(cfg, encoders=replace(cfg.encoders, image=replace(cfg.encoders.image,
                                                                  augment=replace(IMAGE_AUG, tasks=["sum"]))))
