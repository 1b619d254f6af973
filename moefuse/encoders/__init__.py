"""Modality encoders with one interface (`base.ModalityEncoder`): `encoder(**inputs) -> EncoderOutput(tokens
[B, T, D_enc], mask [B, T])`, and everything else specific to a modality: its config (`EncoderConfig`, with the
shared fine-tuning fields), its batch preprocessing, its part of the export and how a raw input file is read."""

from moefuse.encoders.audio import AUDIO_PRESETS, AudioEncoder, AudioEncoderConfig, build_audio_encoder
from moefuse.encoders.base import EncoderConfig, EncoderOutput, ModalityEncoder, Preprocessor
from moefuse.encoders.image import IMAGE_PRESETS, ImageEncoder, ImageEncoderConfig, build_image_encoder
from moefuse.encoders.text import TEXT_PRESETS, TextEncoder, TextEncoderConfig, build_text_encoder

__all__ = [
    "AUDIO_PRESETS",
    "IMAGE_PRESETS",
    "TEXT_PRESETS",
    "AudioEncoder",
    "AudioEncoderConfig",
    "EncoderConfig",
    "EncoderOutput",
    "ImageEncoder",
    "ImageEncoderConfig",
    "ModalityEncoder",
    "Preprocessor",
    "TextEncoder",
    "TextEncoderConfig",
    "build_audio_encoder",
    "build_image_encoder",
    "build_text_encoder",
]
