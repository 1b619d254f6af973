"""Modality encoders with one interface (`base.ModalityEncoder`): `encoder(**inputs) -> EncoderOutput(tokens
[B, T, D_enc], mask [B, T])`, and everything else specific to a modality: its config (`EncoderConfig`, with the
shared fine-tuning fields), its batch preprocessing, its part of the export and how a raw input file is read.

Names are imported from their modules on first use (`moefuse.lazy`)."""

from moefuse.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "moefuse.encoders.audio": ["AUDIO_PRESETS", "AudioEncoder", "AudioEncoderConfig", "build_audio_encoder"],
    "moefuse.encoders.base": ["EncoderConfig", "EncoderOutput", "ModalityEncoder", "Preprocessor"],
    "moefuse.encoders.image": ["IMAGE_PRESETS", "ImageEncoder", "ImageEncoderConfig", "build_image_encoder"],
    "moefuse.encoders.text": ["TEXT_PRESETS", "TextEncoder", "TextEncoderConfig", "build_text_encoder"],
})
