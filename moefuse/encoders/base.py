"""The one modality interface. Everything specific to a modality lives with its encoder; the collator, the
model, the export and `predict` only loop over the encoders a model has.

    EncoderConfig          a modality's config: the fine-tuning fields every encoder shares, `build(arch_dir)`,
                           `sample_fields`, the fields of a decoded sample that belong to the modality, and
                           `file_fields`, those given as files
    ModalityEncoder        `encoder(**inputs) -> EncoderOutput(tokens [B, T, D_enc], mask [B, T])`, plus
        .preprocessor(train)     a picklable `Preprocessor` that turns B decoded samples into those inputs
        .save_architecture(dir)  its part of an exported model folder (weights are in model.safetensors)
        .read_input(field, v, media)  a user's raw input for `predict` (a file path, a string) -> a sample value
        .decode_options()        keyword arguments for the shard loader's decoding (e.g. the audio sample rate)

Also the `init_file` weights an encoder can start from (e.g. written by a per-modality pretraining run).
To add a modality: an EncoderConfig subclass, a ModalityEncoder subclass with its Preprocessor, and a field in
`moefuse.fusion.model.EncodersConfig` (tests/test_modality_interface.py does this for a toy sensor modality).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from torch import nn

from moefuse.configutil import Config, ConfigError, atomic_write_bytes
from moefuse.outputs import pytree_output

Finetune = Literal["full", "frozen", "lora"]


@pytree_output
@dataclass
class EncoderOutput:
    """Tokens of one modality for a batch."""

    tokens: torch.Tensor  # [B, T, D_enc]
    mask: torch.Tensor  # [B, T] bool, True = real token


@dataclass
class AugmentConfig(Config):
    """What every encoder's `augment:` section holds beside its own operations: the tasks it applies to."""

    tasks: list[str] | None = None
    """The tasks whose training samples are augmented; None = every task. E.g. [digit]: the encoders learn from
    augmented digits while the composite avqa questions (the sum of a seen and a heard digit) stay clean."""

    def __post_init__(self) -> None:
        self.check(self.tasks is None or len(self.tasks) > 0, "tasks", "must name a task, or be null (every task)")

    def applies(self, sample: dict) -> bool:
        """Whether this training sample is augmented (its task is one of `tasks`)."""
        return self.tasks is None or sample.get("task") in self.tasks


@dataclass
class EncoderConfig(Config):
    """What every encoder config carries: how its weights are fine-tuned. Subclasses add their modality's fields,
    set `modality` and `sample_fields`, and implement `build`."""

    modality: ClassVar[str] = ""
    """The modality's name: its key in `encoders:`, in batches and in the export folder."""
    sample_fields: ClassVar[tuple[str, ...]] = ()
    """Fields of a decoded sample that belong to this modality (dropping the modality clears them)."""
    file_fields: ClassVar[tuple[str, ...]] = ()
    """Those of sample_fields whose raw input is a file (a path for `predict`, an upload for `serve`); the others
    are text."""

    finetune: Finetune = "full"
    """full: train all weights; frozen: no gradients; lora: train peft LoRA adapters only."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_targets: list[str] = field(default_factory=list)
    """Names of the linear layers that get adapters (each encoder sets its own default)."""

    def __post_init__(self) -> None:
        self.check(self.finetune in ("full", "frozen", "lora"), "finetune",
                   f"must be full, frozen or lora, got {self.finetune!r}")
        self.check(self.lora_r >= 1, "lora_r", f"must be >= 1, got {self.lora_r}")
        self.check(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        self.check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")

    @property
    def config_key(self) -> str:  # type: ignore[override]
        """`encoders.<modality>`: where every encoder config sits in the experiment config."""
        return f"encoders.{self.modality}"

    def build(self, arch_dir: Path | None = None) -> ModalityEncoder:
        """The encoder; with `arch_dir` (this modality's folder of an export) the saved architecture with random
        init, for the exported state dict to be loaded into."""
        raise NotImplementedError


class Preprocessor(Protocol):
    """Decoded samples -> the encoder's keyword inputs for all B samples (zeros where a sample lacks the
    modality). Runs in DataLoader workers, so it must pickle: it holds a tokenizer or a transform, never the
    encoder's weights."""

    def present(self, sample: dict) -> bool:
        """Whether the sample has this modality."""
        ...

    def __call__(self, samples: Sequence[dict], rng: random.Random) -> dict[str, torch.Tensor]:
        """B samples -> {input name: tensor [B, ...]}; `rng` is the epoch's RNG for random crops in training."""
        ...


class ModalityEncoder(nn.Module):
    """Base of every modality encoder: `forward(**inputs) -> EncoderOutput`, and what is specific to the
    modality outside the forward (see the module docstring). `out_dim` is D_enc."""

    cfg: EncoderConfig
    out_dim: int
    padding_input: ClassVar[str | None] = None
    """The input that marks each sample's real positions when a batch is right-padded (e.g. attention_mask), or
    None when every input has a fixed size; the inference cache of encoder outputs cuts rows to it."""

    @property
    def modality(self) -> str:
        return self.cfg.modality

    def preprocessor(self, train: bool) -> Preprocessor:
        raise NotImplementedError

    def save_architecture(self, folder: Path) -> None:
        """Write what `cfg.build(arch_dir=folder)` needs to rebuild this architecture (no weights)."""

    def read_input(self, field: str, value: Any, media: dict) -> Any:
        """A user's raw input for `field` (e.g. a file path given to `predict`) -> the decoded sample's value,
        prepared as the shard builder prepared training data (`media`: the settings the shards were built with,
        read from the export)."""
        return value

    def decode_options(self) -> dict:
        """Keyword arguments for the shard loader's decoding of this modality."""
        return {}

    def example_input(self, field: str, size: int = 1) -> Any:
        """A made-up raw input for `field` that `read_input` takes (what a compiled model is warmed up with at
        load, before any request); `size` 1 or 2 asks for a small or a larger one, so that the warm-up sees two
        sizes. None: this encoder offers none, and the warm-up leaves the modality out."""
        return None


@contextmanager
def seeded_global_rngs(rng: random.Random | None) -> Iterator[None]:
    """Within the block, python's, numpy's and torch's global RNGs (what timm and torchvision transforms draw from)
    are seeded from `rng` (the loader's epoch RNG), and restored after it: augmentation is a function of the run's
    seed, epoch and worker alone, and draws nothing from the RNGs the model's dropout and the rest use.
    None: do nothing."""
    if rng is None:
        yield
        return
    state, np_state = random.getstate(), np.random.get_state()
    seed = rng.getrandbits(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


def apply_finetune(model: nn.Module, cfg: EncoderConfig) -> nn.Module:
    """Full: train everything. Frozen: no gradients. LoRA (Hu et al. 2021): inject peft adapters into the
    `cfg.lora_targets` linear layers and train only those."""
    if cfg.finetune == "full":
        return model
    if cfg.finetune == "frozen":
        model.requires_grad_(False)
        return model
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets)
    model = inject_adapter_in_model(lora, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def save_init_file(module: nn.Module, path: str | Path) -> None:
    """Write `module`'s state dict as safetensors, atomically (temp file, then rename), for `init_file`."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in module.state_dict().items()}))


def load_init_file(module: nn.Module, path: str, key: str) -> None:
    """Load a state dict written by `save_init_file` for exactly this architecture; anything else is an error
    that names the file and the config field `key`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: {file} does not exist or is not a file; write it first (for AV-digits: "
                          f"benchmarks/avdigits/probe_encoders.py --save) or set {key}: null")
    try:
        state = load_file(str(file))
    except SafetensorError as e:  # a file in another format
        raise ConfigError(f"{key}: {file} is not a safetensors file ({e}); point it at one written by "
                          f"save_init_file (probe_encoders.py --save)") from None
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        raise ConfigError(f"{key}: {file} does not fit this encoder: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ConfigError(f"{key}: {file} was written for another architecture (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); it must come from the same preset, conv_stem and frontend")
