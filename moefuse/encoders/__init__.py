"""Modality encoders with one interface: `encoder(**inputs) -> EncoderOutput(tokens [B, T, D_enc], mask [B, T])`."""

from moefuse.encoders.audio import AUDIO_PRESETS, AudioEncoder, AudioEncoderConfig, build_audio_encoder
from moefuse.encoders.base import EncoderOutput
from moefuse.encoders.image import IMAGE_PRESETS, ImageEncoder, ImageEncoderConfig, build_image_encoder
from moefuse.encoders.text import TEXT_PRESETS, TextEncoder, TextEncoderConfig, build_text_encoder

__all__ = [
    "AUDIO_PRESETS",
    "IMAGE_PRESETS",
    "TEXT_PRESETS",
    "AudioEncoder",
    "AudioEncoderConfig",
    "EncoderOutput",
    "ImageEncoder",
    "ImageEncoderConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "build_audio_encoder",
    "build_image_encoder",
    "build_text_encoder",
]
