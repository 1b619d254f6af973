"""Audio encoder: transformers Wav2Vec2Model (Baevski et al. 2020) on raw 16 kHz waveforms.

Waveforms are normalised per utterance over their real samples (zero mean, unit variance, as
Wav2Vec2FeatureExtractor does); the frame mask follows from the sample mask through the conv stack's lengths.

With `frontend: logmel` the conv feature encoder is replaced by a log-mel spectrogram (the classic speech features,
e.g. Davis & Mermelstein 1980; as in the Conformer/AST family of models) at the same 20 ms frame rate, and only the
wav2vec2 transformer is trained. From random init on a few thousand utterances it learns spoken digits far better
and about 4x faster than the raw-waveform conv stack (see benchmarks/avdigits/NOTES.md).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchaudio
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from moefuse.configutil import Config, ConfigError
from moefuse.datasets.media import audio_in_memory, check_file, load_audio
from moefuse.encoders.audio_augment import (
    AudioAugmentConfig,
    add_noise,
    apply_spec_masks,
    draw_spec_masks,
    perturb_waveform,
)
from moefuse.encoders.base import (
    EncoderConfig,
    EncoderOutput,
    ModalityEncoder,
    apply_finetune,
    check_folder_files,
    check_transformer_sizes,
    load_init_file,
    read_architecture_file,
)

# tiny/small: random init; 5 conv layers with total stride 320 (50 frames/s, like wav2vec2-base) but 32 channels.
AUDIO_PRESETS: dict[str, dict] = {
    "tiny": dict(source="config", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 conv_dim=(32, 32, 32, 32, 32), conv_stride=(5, 4, 4, 2, 2), conv_kernel=(10, 8, 4, 4, 2),
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, apply_spec_augment=False,
                 feat_extract_norm="layer", do_stable_layer_norm=True),
    "small": dict(source="config", hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=256, conv_dim=(64, 64, 64, 64, 64), conv_stride=(5, 4, 4, 2, 2),
                  conv_kernel=(10, 8, 4, 4, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                  apply_spec_augment=False, feat_extract_norm="layer", do_stable_layer_norm=True),
    "local": dict(source="folder"),
}


@dataclass
class Wav2Vec2Architecture(Config):
    """The fields of an export's audio/config.json (a transformers Wav2Vec2Config) that size or change the encoder;
    a field the file leaves out takes transformers' default. Bounds: `check_transformer_sizes`, and the fields
    below."""

    model_type: str | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    hidden_act: str | None = None
    layer_norm_eps: float | None = None
    initializer_range: float | None = None
    conv_dim: list[int] | None = None
    """Channels of the feature encoder's conv layers, each in [1, 8192]; 1 to 16 layers."""
    conv_stride: list[int] | None = None
    """Their strides, each in [1, 1024], as many as conv_dim."""
    conv_kernel: list[int] | None = None
    """Their kernels, each in [1, 8192], as many as conv_dim."""
    num_feat_extract_layers: int | None = None
    """len(conv_dim)."""
    conv_bias: bool | None = None
    feat_extract_norm: str | None = None
    """group or layer."""
    feat_extract_activation: str | None = None
    do_stable_layer_norm: bool | None = None
    num_conv_pos_embeddings: int | None = None
    """Kernel of the positional convolution, in [1, 1024]."""
    num_conv_pos_embedding_groups: int | None = None
    """Its groups, in [1, 1024], dividing hidden_size."""
    hidden_dropout: float | None = None
    activation_dropout: float | None = None
    attention_dropout: float | None = None
    feat_proj_dropout: float | None = None
    layerdrop: float | None = None
    apply_spec_augment: bool | None = None
    add_adapter: bool | None = None
    num_adapter_layers: int | None = None
    """In [0, 16]."""
    adapter_kernel_size: int | None = None
    adapter_stride: int | None = None
    output_hidden_size: int | None = None
    dtype: str | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        self.check(self.model_type in (None, "wav2vec2"), "model_type", f"must be wav2vec2, got {self.model_type!r}")
        check_transformer_sizes(self)
        convs = [(n, getattr(self, n), hi) for n, hi in (("conv_dim", 8192), ("conv_stride", 1024),
                                                         ("conv_kernel", 8192))]
        for name, values, high in convs:
            self.check(values is None or (1 <= len(values) <= 16 and all(1 <= v <= high for v in values)), name,
                       f"must be 1 to 16 integers in [1, {high}], got {values}")
        lengths = {len(v) for _, v, _ in convs if v is not None}
        self.check(len(lengths) <= 1, "conv_kernel", "conv_dim, conv_stride and conv_kernel must be as long")
        self.check(self.num_feat_extract_layers is None or self.conv_dim is None
                   or self.num_feat_extract_layers == len(self.conv_dim), "num_feat_extract_layers",
                   f"must be len(conv_dim), got {self.num_feat_extract_layers}")
        self.check(self.feat_extract_norm in (None, "group", "layer"), "feat_extract_norm",
                   f"must be group or layer, got {self.feat_extract_norm!r}")
        self.check_range("num_conv_pos_embeddings", 1, 1024)
        self.check_range("num_conv_pos_embedding_groups", 1, 1024)
        groups, width = self.num_conv_pos_embedding_groups, self.hidden_size
        self.check(groups is None or width is None or width % groups == 0, "num_conv_pos_embedding_groups",
                   f"must divide hidden_size ({width}), got {groups}")
        for name in ("hidden_dropout", "activation_dropout", "attention_dropout", "feat_proj_dropout", "layerdrop"):
            self.check_range(name, 0, 0.999)
        self.check_range("num_adapter_layers", 0, 16)
        self.check_range("adapter_kernel_size", 1, 64)
        self.check_range("adapter_stride", 1, 64)
        self.check_range("output_hidden_size", 1, 16384)


def feature_frames(samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Frames the wav2vec2 feature encoder makes of `samples` (each conv layer: (L - kernel) // stride + 1)."""
    for k, st in zip(kernels, strides):
        samples = (samples - k) // st + 1
    return samples


@dataclass
class AudioEncoderConfig(EncoderConfig):
    modality = "audio"
    sample_fields = ("audio",)
    file_fields = ("audio",)
    architecture_files = ("config.json",)

    preset: str = "tiny"
    """One of AUDIO_PRESETS: tiny | small (random init) or local (`path`, a saved Wav2Vec2 checkpoint)."""
    path: str | None = None
    """Local folder with a Wav2Vec2 config.json and weights (preset `local`)."""
    sample_rate: int = 16000
    """Rate the model expects; other rates are resampled (soxr) when media are loaded."""
    max_seconds: float = 2.0
    """Longer clips are cropped (random crop in training, from the start in evaluation); shorter are padded."""
    frontend: Literal["conv", "logmel"] = "conv"
    """conv: wav2vec2's conv feature encoder on the waveform; logmel: log-mel spectrogram frames (40 ms windows
    every 20 ms) in its place. logmel needs a random-init preset (tiny | small)."""
    mel_bins: int = 64
    """Mel bands per frame for frontend logmel."""
    init_file: str | None = None
    """Safetensors weights of this exact wav2vec2 (same preset, frontend, mel_bins) to start from, e.g. after
    per-modality pretraining (benchmarks/avdigits/probe_encoders.py --save); None = the preset's weights."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names of the wav2vec2 attention projections that get adapters."""
    augment: AudioAugmentConfig = field(default_factory=AudioAugmentConfig)
    """Training-time augmentation (speed, gain, noise, SpecAugment masks), drawn in the loader from the run's seed;
    off in evaluation. The defaults change nothing."""
    layerdrop: float | None = None
    """Probability of skipping each transformer layer in training (LayerDrop, Fan et al. 2019); None = the preset's
    or checkpoint's (0.1 for tiny and small). Under train.fsdp transformers runs every layer whatever it draws (the
    ranks must gather the same units), so DDP and FSDP train the same model only with layerdrop 0."""

    def __post_init__(self) -> None:
        self.check(self.preset in AUDIO_PRESETS, "preset",
                   f"unknown audio preset {self.preset!r}; choose one of {', '.join(AUDIO_PRESETS)}")
        if self.preset == "local":
            self.check(self.path is not None, "path", "preset 'local' needs path: a local wav2vec2 folder")
        self.check_range("sample_rate", 1000, 384_000)
        self.check(self.frontend in ("conv", "logmel"), "frontend",
                   f"must be conv or logmel, got {self.frontend!r}")
        self.check(not (self.frontend == "logmel" and self.preset == "local"), "frontend",
                   "a pretrained wav2vec2 (preset local) expects its own conv features; use frontend: conv")
        self.check(8 <= self.mel_bins <= 256, "mel_bins", f"must be in [8, 256], got {self.mel_bins}")
        self.check(self.layerdrop is None or 0.0 <= self.layerdrop < 1.0, "layerdrop",
                   f"must be null or in [0, 1), got {self.layerdrop}")
        self.check(0.1 <= self.max_seconds <= 60, "max_seconds", f"must be in [0.1, 60], got "
                   f"{self.max_seconds}")
        self.check(self.augment.freq_masks == 0 or self.frontend == "logmel", "augment.freq_masks",
                   "frequency masks blank mel bands: they need frontend: logmel (or set freq_masks: 0)")
        self.check(self.augment.freq_masks == 0 or self.augment.freq_mask_bins <= self.mel_bins,
                   "augment.freq_mask_bins", f"must be <= mel_bins ({self.mel_bins}), got "
                   f"{self.augment.freq_mask_bins}")
        super().__post_init__()

    @property
    def max_samples(self) -> int:
        return int(round(self.max_seconds * self.sample_rate))

    def build(self, arch_dir: Path | None = None) -> AudioEncoder:
        return build_audio_encoder(self, arch_dir)

    def check_architecture(self, folder: Path) -> None:
        """audio/config.json (`Wav2Vec2Architecture`) and every file's size; the conv feature encoder must make at
        least one frame of a clip of max_seconds (a longer receptive field fails on every clip)."""
        check_folder_files(folder)
        arch, _ = read_architecture_file(folder / "config.json", Wav2Vec2Architecture)
        default = Wav2Vec2Config()
        kernels, strides = arch.conv_kernel or default.conv_kernel, arch.conv_stride or default.conv_stride
        if feature_frames(self.max_samples, kernels, strides) < 1:
            raise ConfigError(f"{folder / 'config.json'}: conv_kernel: the feature encoder (kernels {list(kernels)}, "
                              f"strides {list(strides)}) makes no frame of a {self.max_seconds} s clip at "
                              f"{self.sample_rate} Hz ({self.key('max_seconds')} in config.yaml)")


class LogMelFrontEnd(nn.Module):
    """Waveform [B, S] -> log-mel frames [B, n_mels, F], a drop-in for Wav2Vec2FeatureEncoder. No centring or
    padding, so F = 1 + (S - window) // hop, exactly the length of a conv layer with kernel `window` and stride
    `hop`: the Wav2Vec2Config describes it that way and its length helpers give the right frame mask."""

    def __init__(self, sample_rate: int, window: int, hop: int, n_mels: int):
        super().__init__()
        with torch.device("cpu"):  # a fixed filterbank, computed with .item(): on CPU even in a meta-device build
            self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=window, hop_length=hop, n_mels=n_mels,
                                                            center=False)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input_values.device.type, enabled=False):  # the STFT wants float32
            return torch.log(self.mel(input_values.float()) + 1e-6)  # [B, n_mels, F]

    def _freeze_parameters(self) -> None:  # called by Wav2Vec2Model.freeze_feature_encoder; nothing to freeze
        pass


def logmel_geometry(cfg: AudioEncoderConfig) -> dict:
    """Wav2Vec2Config fields that describe the log-mel front end as one conv layer (kernel = window, stride = hop)."""
    hop = cfg.sample_rate // 50  # 20 ms, wav2vec2's frame rate
    return dict(conv_dim=(cfg.mel_bins,), conv_kernel=(2 * hop,), conv_stride=(hop,))


@dataclass
class AudioPreprocessor:
    """Waveforms -> input_values [B, S] and sample_mask [B, S], S = max_samples: longer clips are cropped (at a
    random offset in training, from the start otherwise), shorter ones zero-padded; zeros where absent. With
    `augment` (training only), each clip is perturbed first and, when it has masks, spec_time_keep [B, F] and
    spec_freq_keep [B, C] are added for the encoder's frames (F frames of C channels at S samples)."""

    max_samples: int
    random_crop: bool
    augment: AudioAugmentConfig | None = None
    sample_rate: int = 16000
    frames: int = 0
    channels: int = 0

    def present(self, sample: dict) -> bool:
        return sample.get("audio") is not None

    def add_noise(self, sample: dict, snr_db: float, rng: random.Random) -> dict:
        """The sample with white noise at `snr_db` dB on its audio (`moefuse evaluate --corrupt audio:noise:DB`)."""
        wav = np.asarray(sample["audio"], dtype=np.float32).reshape(-1)
        return {**sample, "audio": add_noise(wav, snr_db, np.random.default_rng(rng.getrandbits(64)))}

    def __call__(self, samples: Sequence[dict], rng: random.Random) -> dict[str, torch.Tensor]:
        n = self.max_samples
        audio = torch.zeros(len(samples), n)  # [B, S]
        mask = torch.zeros(len(samples), n, dtype=torch.bool)  # [B, S]
        for i, s in enumerate(samples):
            wav = s.get("audio")
            if wav is None or len(wav) == 0:
                continue
            wav = np.asarray(wav, dtype=np.float32).reshape(-1)
            if self.augment is not None and self.augment.waveform_active and self.augment.applies(s):
                wav = perturb_waveform(wav, self.augment, self.sample_rate, rng)
            start = rng.randint(0, len(wav) - n) if (self.random_crop and len(wav) > n) else 0
            clip = torch.from_numpy(wav[start : start + n].copy())
            audio[i, : len(clip)] = clip
            mask[i, : len(clip)] = True
        out = {"input_values": audio, "sample_mask": mask}
        if self.augment is not None and self.augment.masks_active:
            real = [int(self.frames * int(m.sum()) / n) for m in mask]  # frames holding audio, per clip
            masks = draw_spec_masks(self.augment, real, self.frames, self.channels, rng)
            for i, s in enumerate(samples):
                if not self.augment.applies(s):  # drawn all the same: every sample's draws stay where they were
                    masks["spec_time_keep"][i] = True
                    masks["spec_freq_keep"][i] = True
            out.update(masks)
        return out


class AudioEncoder(ModalityEncoder):
    """Wav2Vec2Model -> frame tokens [B, F, D_enc] and the frame mask [B, F]."""

    padding_input = "sample_mask"

    def __init__(self, cfg: AudioEncoderConfig, wav2vec2: Wav2Vec2Model):
        super().__init__()
        self.cfg, self.wav2vec2 = cfg, wav2vec2
        self.out_dim = wav2vec2.config.hidden_size
        self.sample_rate = cfg.sample_rate
        # Models with group-norm feature extractors (wav2vec2-base) were trained on zero-padded input without an
        # attention mask; HF's processor passes the mask only for layer-norm ones. Do the same.
        self.pass_mask = wav2vec2.config.feat_extract_norm == "layer"

    def forward(self, input_values: torch.Tensor, sample_mask: torch.Tensor, spec_time_keep: torch.Tensor | None = None,
                spec_freq_keep: torch.Tensor | None = None) -> EncoderOutput:
        if input_values.dim() != 2 or sample_mask.shape != input_values.shape:
            raise ValueError(f"audio encoder expects input_values [B, S] and sample_mask [B, S], got "
                             f"{tuple(input_values.shape)} and {tuple(sample_mask.shape)}")
        m = sample_mask.to(input_values.dtype)
        n = m.sum(-1, keepdim=True).clamp_min(1.0)  # [B, 1]
        mean = (input_values * m).sum(-1, keepdim=True) / n
        var = ((input_values - mean).square() * m).sum(-1, keepdim=True) / n
        x = (input_values - mean) / torch.sqrt(var + 1e-7) * m  # [B, S], padding stays 0
        hook = None
        if spec_time_keep is not None and spec_freq_keep is not None:  # training batches with SpecAugment masks
            hook = self.wav2vec2.feature_extractor.register_forward_hook(
                lambda module, args, frames: apply_spec_masks(frames, spec_time_keep, spec_freq_keep))
        try:
            out = self.wav2vec2(x, attention_mask=sample_mask.long() if self.pass_mask else None)
        finally:
            if hook is not None:
                hook.remove()
        frames = out.last_hidden_state  # [B, F, D_enc]
        lengths = self.wav2vec2._get_feat_extract_output_lengths(sample_mask.sum(-1))  # [B]
        frame_mask = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]  # [B, F]
        return EncoderOutput(tokens=frames, mask=frame_mask)

    def preprocessor(self, train: bool) -> AudioPreprocessor:
        """Random crops and the configured augmentation in training; neither in evaluation."""
        frames = int(self.wav2vec2._get_feat_extract_output_lengths(torch.tensor(self.cfg.max_samples)))
        return AudioPreprocessor(self.cfg.max_samples, random_crop=train, augment=self.cfg.augment if train else None,
                                 sample_rate=self.sample_rate, frames=frames,
                                 channels=self.wav2vec2.config.conv_dim[-1])

    def save_architecture(self, folder: Path) -> None:
        """wav2vec2's config.json."""
        self.wav2vec2.config.save_pretrained(folder)

    def example_input(self, field: str, size: int = 1) -> tuple[np.ndarray, int]:
        """A made-up recording at the encoder's rate (a quiet tone, 0.4 s for size 1, 0.8 s for size 2), for the
        warm-up of a compiled model."""
        t = np.arange(int(0.4 * size * self.sample_rate)) / self.sample_rate
        return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), self.sample_rate

    def read_input(self, field: str, value: Any, media: dict) -> Any:
        """An audio file (or an array at the encoder's rate, or (array, its rate)) -> mono float32 at the encoder's
        rate (soxr), within the shards' length limit."""
        if not isinstance(value, (str, os.PathLike)):
            return audio_in_memory(value, field, self.sample_rate, media["max_audio_seconds"])
        check_file(Path(value), field, media["max_file_bytes"])
        return load_audio(Path(value), self.sample_rate, media["max_audio_seconds"])

    def decode_options(self) -> dict:
        return {"audio_sample_rate": self.sample_rate}  # shards are resampled to the encoder's rate on load


def build_audio_encoder(cfg: AudioEncoderConfig, arch_dir: str | Path | None = None) -> AudioEncoder:
    """Build from the preset; with `arch_dir` (an exported model's audio/ folder holding config.json) build the
    same architecture with random init, for a state dict to be loaded into."""
    preset = AUDIO_PRESETS[cfg.preset]
    if arch_dir is not None:
        cfg.check_architecture(Path(arch_dir))
        model = Wav2Vec2Model(Wav2Vec2Config.from_pretrained(arch_dir, local_files_only=True))
    elif preset["source"] == "config":
        kwargs = {k: v for k, v in preset.items() if k != "source"}
        if cfg.frontend == "logmel":
            kwargs.update(logmel_geometry(cfg))
        model = Wav2Vec2Model(Wav2Vec2Config(**kwargs))
    else:
        folder = Path(cfg.path).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{cfg.key('path')}: no wav2vec2 checkpoint at {folder} (config.json missing)")
        model = Wav2Vec2Model.from_pretrained(folder, local_files_only=True)
    if cfg.frontend == "logmel":
        geometry = logmel_geometry(cfg)
        if tuple(model.config.conv_kernel) != geometry["conv_kernel"]:
            raise ConfigError(f"{cfg.config_key}: the saved wav2vec2 in {arch_dir} was not built for frontend logmel "
                              f"at {cfg.sample_rate} Hz (conv_kernel {model.config.conv_kernel})")
        model.feature_extractor = LogMelFrontEnd(cfg.sample_rate, geometry["conv_kernel"][0],
                                                 geometry["conv_stride"][0], cfg.mel_bins)
    if cfg.layerdrop is not None:
        model.config.layerdrop = cfg.layerdrop  # read by the encoder at every training forward
    if cfg.init_file is not None and arch_dir is None:  # an export's own weights are loaded over it anyway
        load_init_file(model, cfg.init_file, cfg.key("init_file"))
    return AudioEncoder(cfg, apply_finetune(model, cfg))
