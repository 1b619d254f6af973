"""Image encoder: a timm Vision Transformer (Dosovitskiy et al. 2021); its patch tokens plus CLS are the tokens.

Optionally the patch embedding is replaced by a small stack of 3x3 stride-2 convolutions (`conv_stem`, "Early
convolutions help transformers see better", Xiao et al. 2021): from random init on a few thousand images it learns
much faster than the linear patch embedding (see benchmarks/avdigits/NOTES.md).

Pretrained weights load only from a local file through timm's `pretrained_cfg_overlay=dict(file=...)`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS, rand_augment_transform
from timm.layers import HybridEmbed
from torch import nn
from torchvision import transforms

from moefuse.configutil import Config, ConfigError, atomic_write_text, to_dict
from moefuse.datasets.media import MAX_IMAGE_SIZE, check_file, image_in_memory, normalise_image, open_image
from moefuse.encoders.base import (
    AugmentConfig,
    EncoderConfig,
    EncoderOutput,
    ModalityEncoder,
    apply_finetune,
    check_folder_files,
    load_init_file,
    read_architecture_file,
    seeded_global_rngs,
)

# Presets are `timm.create_model` arguments. tiny/small are random init sized for 2 CPU cores; vit_* are the
# standard timm architectures, pretrained when `checkpoint_file` points at their weights.
IMAGE_PRESETS: dict[str, dict] = {
    "tiny": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    "small": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=128, depth=4,
                  num_heads=4),
    "vit_tiny": dict(model_name="vit_tiny_patch16_224"),
    "vit_small": dict(model_name="vit_small_patch16_224"),
    "vit_base": dict(model_name="vit_base_patch16_224"),
}


@dataclass
class ImageAugmentConfig(AugmentConfig):
    """`encoders.image.augment`: timm's training transform (`create_transform(is_training=True)`), used by the
    training loader only and seeded from the run's seed. The defaults change nothing (the eval transform is used)."""

    config_key = "encoders.image.augment"

    scale: tuple[float, float] = (1.0, 1.0)
    """Random resized crop (Szegedy et al. 2015): the share of the image area each crop keeps is drawn from this
    range before it is resized back to the input size; (1, 1) with ratio (1, 1) = no crop."""
    ratio: tuple[float, float] = (1.0, 1.0)
    """Range of the crop's aspect ratio (width / height)."""
    rand_augment: str | None = None
    """A timm RandAugment policy (Cubuk et al. 2020), e.g. rand-m6-n2-mstd0.5: n random operations (rotate, shear,
    translate, contrast, ...) of magnitude m out of 10 per image; None = off."""
    hflip: float = 0.0
    """Probability of a horizontal flip (0 by default: a flipped digit is another glyph)."""
    erase_prob: float = 0.0
    """Probability of random erasing (Zhong et al. 2020): a random rectangle of the normalised image is blanked."""

    def __post_init__(self) -> None:
        for name, lo_min, hi_max in (("scale", 0.05, 1.0), ("ratio", 0.25, 4.0)):
            lo, hi = getattr(self, name)
            self.check(lo_min <= lo <= hi <= hi_max, name, f"must be [low, high] with {lo_min} <= low <= high <= "
                       f"{hi_max}, got {list(getattr(self, name))}")
        if self.rand_augment is not None:
            try:
                rand_augment(self.rand_augment, {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5)})
            except Exception as e:  # timm raises AssertionError or ValueError on a bad policy string
                self.check(False, "rand_augment", f"{self.rand_augment!r} is not a timm RandAugment policy ({e}); "
                           f"write it as rand-m<magnitude>-n<ops>, e.g. rand-m6-n2-mstd0.5")
        for name in ("hflip", "erase_prob"):
            self.check(0.0 <= getattr(self, name) <= 1.0, name, f"must be in [0, 1], got {getattr(self, name)}")
        super().__post_init__()

    @property
    def active(self) -> bool:
        return (self.scale, self.ratio) != ((1.0, 1.0), (1.0, 1.0)) or self.rand_augment is not None \
            or self.hflip > 0 or self.erase_prob > 0

    def transform(self, data_config: dict) -> Callable:
        """timm's training transform for a model with this `data_config` (input size, mean, std, interpolation):
        crop and flips, then RandAugment, then to tensor, normalise and erasing."""
        primary, _, final = create_transform(**data_config, is_training=True, separate=True, scale=self.scale,
                                             ratio=self.ratio, hflip=self.hflip, vflip=0.0, color_jitter=None,
                                             re_prob=self.erase_prob)
        middle = [] if self.rand_augment is None else [rand_augment(self.rand_augment, data_config)]
        return transforms.Compose([*primary.transforms, *middle, *final.transforms])


def rand_augment(policy: str, data_config: dict) -> Callable:
    """timm's RandAugment for `policy`, with the hyper-parameters timm's transform factory gives it, on timm's
    operations with one change: posterize keeps 4 to 8 bits (timm's default posterize keeps 0 to 4, and Pillow
    >= 10 refuses 0 bits, which low magnitudes give)."""
    increasing = "inc1" in policy.split("-")
    ops = [("PosterizeOriginal" if op.startswith("Posterize") else op)
           for op in (_RAND_INCREASING_TRANSFORMS if increasing else _RAND_TRANSFORMS)]
    size = data_config["input_size"][-1]
    hparams = dict(translate_const=int(size * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in
                                                                    data_config["mean"]))
    return rand_augment_transform(policy, hparams, transforms=ops)


@dataclass
class ImageEncoderConfig(EncoderConfig):
    modality = "image"
    sample_fields = ("image",)
    file_fields = ("image",)
    architecture_files = ("data_config.json",)

    preset: str = "tiny"
    """One of IMAGE_PRESETS (tiny | small | vit_tiny | vit_small | vit_base)."""
    model_name: str | None = None
    """Any timm model name, overriding the preset's (its other arguments are kept)."""
    checkpoint_file: str | None = None
    """Local weights (.safetensors/.pth/.bin) for the timm model; None = random init."""
    image_size: int | None = None
    """Input resolution override (timm `img_size`); None = the preset's."""
    conv_stem: list[int] = field(default_factory=list)
    """Output channels of 3x3 stride-2 conv layers (BatchNorm, ReLU) that replace the patch embedding; each halves
    the grid, so [16, 32, 64] on 32 px gives 4x4 tokens. [] = timm's linear patch embedding. Random init only."""
    init_file: str | None = None
    """Safetensors weights of this exact ViT (same preset, conv_stem) to start from, e.g. after per-modality
    pretraining (benchmarks/avdigits/probe_encoders.py --save); None = random init or checkpoint_file."""
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])
    """Names of the ViT linear layers that get adapters."""
    augment: ImageAugmentConfig = field(default_factory=ImageAugmentConfig)
    """Training-time augmentation (random resized crop, RandAugment, flips, erasing) through timm's transform
    factory; off in evaluation. The defaults change nothing."""

    def __post_init__(self) -> None:
        self.check(self.preset in IMAGE_PRESETS, "preset",
                   f"unknown image preset {self.preset!r}; choose one of {', '.join(IMAGE_PRESETS)}")
        self.check_range("image_size", 8, MAX_IMAGE_SIZE)
        self.check(len(self.conv_stem) <= 8 and all(isinstance(c, int) and 1 <= c <= 4096 for c in self.conv_stem),
                   "conv_stem", f"must be at most 8 channel counts in [1, 4096], got {self.conv_stem}")
        self.check(not (self.conv_stem and self.checkpoint_file), "conv_stem",
                   "a conv stem replaces the pretrained patch embedding; set conv_stem: [] or drop checkpoint_file")
        self.check(not (self.init_file and self.checkpoint_file), "init_file",
                   "checkpoint_file and init_file both give the starting weights; set only one")
        super().__post_init__()

    def build(self, arch_dir: Path | None = None) -> ImageEncoder:
        return build_image_encoder(self, arch_dir)

    def check_architecture(self, folder: Path) -> None:
        """image/data_config.json (`DataConfigFile`) and every file's size."""
        check_folder_files(folder)
        read_data_config(folder / "data_config.json")


@dataclass
class ImagePreprocessor:
    """PIL images -> pixel_values [B, 3, H, W] through a timm transform (the eval one, or in training the configured
    augmentation, whose random draws come from the batch's `rng`); zeros where absent."""

    transform: Callable
    input_size: tuple[int, int, int]  # (3, H, W)
    random: bool = False
    augment: ImageAugmentConfig | None = None  # in training: which samples `transform` (augmenting) is for
    clean: Callable | None = None  # the transform of the samples the augmentation skips

    def present(self, sample: dict) -> bool:
        return sample.get("image") is not None

    def add_noise(self, sample: dict, snr_db: float, rng: random.Random) -> dict:
        """The sample with white noise at `snr_db` dB below the image's pixel variance, clipped to the pixel range
        (`moefuse evaluate --corrupt image:noise:DB`)."""
        pixels = np.asarray(sample["image"], dtype=np.float32) / 255.0  # [H, W, 3]
        power = float(pixels.var()) or 1e-4  # a blank image still gets noise
        noise = np.random.default_rng(rng.getrandbits(64)).standard_normal(pixels.shape) * math.sqrt(
            power / 10 ** (snr_db / 10))
        noisy = np.clip((pixels + noise) * 255.0, 0, 255).round().astype(np.uint8)
        return {**sample, "image": Image.fromarray(noisy, mode="RGB")}

    def _transform(self, sample: dict) -> Callable:
        skip = self.augment is not None and self.clean is not None and not self.augment.applies(sample)
        return self.clean if skip else self.transform

    def __call__(self, samples: Sequence[dict], rng: random.Random) -> dict[str, torch.Tensor]:
        with seeded_global_rngs(rng if self.random else None):  # timm draws from python's and torch's RNGs
            images = [self._transform(s)(s["image"]) if self.present(s) else torch.zeros(self.input_size)
                      for s in samples]
        return {"pixel_values": torch.stack(images)}  # [B, 3, H, W]


class ImageEncoder(ModalityEncoder):
    """timm ViT -> tokens [B, 1 + P, D_enc] (CLS/prefix tokens then P patches); every token is real."""

    def __init__(self, cfg: ImageEncoderConfig, vit: nn.Module, data_config: dict):
        super().__init__()
        self.cfg, self.vit, self.data_config = cfg, vit, data_config
        self.out_dim = vit.num_features
        # timm's eval transform: resize, centre crop, to tensor, normalise with the model's mean/std.
        self.transform: Callable = create_transform(**data_config, is_training=False)

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        expected = self.data_config["input_size"]
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != tuple(expected):
            raise ValueError(f"image encoder expects pixel_values [B, {', '.join(map(str, expected))}], "
                             f"got {tuple(pixel_values.shape)}")
        tokens = self.vit.forward_features(pixel_values)  # [B, 1 + P, D_enc]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # [B, 1 + P]
        return EncoderOutput(tokens=tokens, mask=mask)

    def preprocessor(self, train: bool) -> ImagePreprocessor:
        """The eval transform, or in training the configured augmentation (when it does anything)."""
        size = tuple(self.data_config["input_size"])
        if train and self.cfg.augment.active:
            return ImagePreprocessor(self.cfg.augment.transform(self.data_config), size, random=True,
                                     augment=self.cfg.augment, clean=self.transform)
        return ImagePreprocessor(self.transform, size)

    def save_architecture(self, folder: Path) -> None:
        """data_config.json: timm's preprocessing (input size, mean, std) the model was trained with."""
        atomic_write_text(folder / "data_config.json", json.dumps(self.data_config, indent=2))

    def example_input(self, field: str, size: int = 1) -> np.ndarray:
        """A made-up RGB image (a grey ramp; larger for size 2, fitted to the encoder's input as any image is), for
        the warm-up of a compiled model."""
        side = 16 * size
        return np.broadcast_to(np.linspace(0, 255, side, dtype=np.uint8)[:, None, None], (side, side, 3)).copy()

    def read_input(self, field: str, value: Any, media: dict) -> Any:
        """An image file (or a PIL image, or an array) -> RGB, fitted to the square the shards were built with
        (`media` image_size and image_fit; without them, the encoder's input size, padded)."""
        if isinstance(value, (str, os.PathLike)):
            check_file(Path(value), field, media["max_file_bytes"])
            image = open_image(Path(value), media["max_image_pixels"])
        else:
            image = image_in_memory(value, field, media["max_image_pixels"])
        size = media.get("image_size") or self.data_config["input_size"][-1]
        return normalise_image(image, size, media.get("image_fit") or "pad")


def conv_stem(channels: list[int], in_chans: int = 3) -> nn.Sequential:
    """3x3 stride-2 conv + BatchNorm + ReLU per entry of `channels` (Xiao et al. 2021): [B, C, H, W] ->
    [B, channels[-1], H / 2^n, W / 2^n]; timm's HybridEmbed then projects each position to the ViT width."""
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(in_chans, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        in_chans = c
    return nn.Sequential(*layers)


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
"""timm's eval-transform interpolations (`timm.data.transforms.str_to_interp_mode`)."""


@dataclass
class DataConfigFile(Config):
    """An export's image/data_config.json: timm's preprocessing of the model (`resolve_model_data_config`), which
    the eval transform is built from. Written by moefuse alone, so every key must be one of these."""

    input_size: list[int] = field(default_factory=list)
    """[C, H, W], each in [1, MAX_IMAGE_SIZE] (the encoder's own input size, checked when it is built)."""
    mean: list[float] = field(default_factory=list)
    """Three finite numbers."""
    std: list[float] = field(default_factory=list)
    """Three positive finite numbers."""
    interpolation: str | None = None
    """One of INTERPOLATIONS."""
    crop_pct: float | None = None
    """In [0.5, 1]: the eval transform resizes to size / crop_pct, then crops to size."""
    crop_mode: str | None = None
    """center, squash or border."""

    def __post_init__(self) -> None:
        size = self.input_size
        self.check(len(size) == 3 and all(1 <= x <= MAX_IMAGE_SIZE for x in size), "input_size",
                   f"must be three integers [3, H, W] with H, W in [1, {MAX_IMAGE_SIZE}], got {size}")
        self.check(len(self.mean) == 3 and all(math.isfinite(x) for x in self.mean), "mean",
                   f"must be three finite numbers, got {self.mean}")
        self.check(len(self.std) == 3 and all(math.isfinite(x) and x > 0 for x in self.std), "std",
                   f"must be three positive numbers, got {self.std}")
        self.check(self.interpolation in (None, *INTERPOLATIONS), "interpolation",
                   f"must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        self.check_range("crop_pct", 0.5, 1.0)
        self.check(self.crop_mode in (None, "center", "squash", "border"), "crop_mode",
                   f"must be center, squash or border, got {self.crop_mode!r}")


def read_data_config(path: Path) -> dict:
    """An export's image/data_config.json (timm preprocessing), checked (`DataConfigFile`): a ConfigError names the
    file and key. Keys the file leaves out are not returned (the encoder's own resolved values stay)."""
    saved, _ = read_architecture_file(path, DataConfigFile, strict=True)
    return {k: v for k, v in to_dict(saved).items() if v is not None}


def build_image_encoder(cfg: ImageEncoderConfig, arch_dir: str | Path | None = None) -> ImageEncoder:
    """Build from the preset; with `arch_dir` (an exported model's image/ folder) skip the pretrained file and
    build the same architecture with random init, for a state dict to be loaded into."""
    if arch_dir is not None:
        cfg.check_architecture(Path(arch_dir))
        cfg = replace(cfg, checkpoint_file=None, init_file=None)
        saved = read_data_config(Path(arch_dir) / "data_config.json")
    kwargs = dict(IMAGE_PRESETS[cfg.preset])
    name = cfg.model_name or kwargs.pop("model_name")
    kwargs.pop("model_name", None)
    if cfg.image_size is not None:
        kwargs["img_size"] = cfg.image_size
    pretrained = cfg.checkpoint_file is not None
    if pretrained:
        path = Path(cfg.checkpoint_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"{cfg.key('checkpoint_file')}: {path} does not exist or is not a file")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
    if cfg.conv_stem:  # patch_size 1: every position of the stem's output grid is one token
        kwargs.update(embed_layer=functools.partial(HybridEmbed, backbone=conv_stem(cfg.conv_stem)), patch_size=1)
    try:
        vit = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError for unknown model names
        raise ConfigError(f"{cfg.config_key}: timm cannot build {name!r}: {e}") from None
    data_config = resolve_model_data_config(vit)
    img_size = getattr(getattr(vit, "patch_embed", None), "img_size", None)
    if img_size is not None:  # the pretrained cfg keeps 224 even when img_size is overridden
        data_config["input_size"] = (3, *img_size)
    if not pretrained:
        data_config["crop_pct"] = 1.0  # images are normalised at shard build time: resize, do not crop
    if arch_dir is not None:
        if tuple(saved["input_size"]) != tuple(data_config["input_size"]):
            raise ConfigError(f"{Path(arch_dir) / 'data_config.json'}: input_size {list(saved['input_size'])} does "
                              f"not match the image encoder's {list(data_config['input_size'])}; the file was edited "
                              f"or comes from another model")
        data_config.update(saved, input_size=tuple(saved["input_size"]), mean=tuple(saved["mean"]),
                           std=tuple(saved["std"]))  # the preprocessing the model was trained with
    if cfg.init_file is not None:
        load_init_file(vit, cfg.init_file, cfg.key("init_file"))
    return ImageEncoder(cfg, apply_finetune(vit, cfg), data_config)
