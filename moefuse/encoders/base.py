"""The one modality interface. Everything specific to a modality lives with its encoder; the collator, the
model, the export and `predict` only loop over the encoders a model has.

    EncoderConfig          a modality's config: the fine-tuning fields every encoder shares, `build(arch_dir)`,
                           `check_architecture(folder)` (its files in a model folder, checked before a build
                           reads them), `sample_fields`, the fields of a decoded sample that belong to the
                           modality, and `file_fields`, those given as files
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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from moefuse.configutil import Config, ConfigError, atomic_write_bytes, from_dict, read_json_file
from moefuse.outputs import pytree_output

Finetune = Literal["full", "frozen", "lora"]
C = TypeVar("C", bound=Config)


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
    architecture_files: ClassVar[tuple[str | tuple[str, ...], ...]] = ()
    """The files `save_architecture` writes and `build(arch_dir)` needs in the modality's folder of an export; a
    tuple in it is "one of these" (a tokenizer saved as tokenizer.json or as vocab.txt). Checked by
    `check_architecture` before the folder is handed to transformers or timm, which take a missing local folder
    for a hub id ("Repo id must be in the form ...") and a missing file for "use the defaults"."""

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
        self.check(1 <= self.lora_r <= 1024, "lora_r", f"must be in [1, 1024], got {self.lora_r}")
        self.check(0 < self.lora_alpha <= 1e6, "lora_alpha", f"must be in (0, 1e6], got {self.lora_alpha}")
        self.check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")

    @property
    def config_key(self) -> str:  # type: ignore[override]
        """`encoders.<modality>`: where every encoder config sits in the experiment config."""
        return f"encoders.{self.modality}"

    def build(self, arch_dir: Path | None = None) -> ModalityEncoder:
        """The encoder; with `arch_dir` (this modality's folder of an export) the saved architecture with random
        init, for the exported state dict to be loaded into."""
        raise NotImplementedError

    def check_architecture_files(self, arch_dir: Path) -> None:
        """ConfigError naming the missing folder or file, and the fix, when `arch_dir` (this modality's folder of
        an export) lacks what `build(arch_dir)` reads (`architecture_files`); then `check_architecture` reads them."""
        fix = ("copy the whole model folder, or write it again from its training run with `moefuse export RUN_DIR`")
        if not arch_dir.is_dir():
            raise ConfigError(f"{arch_dir} is missing: the model's {self.modality} encoder keeps its architecture in "
                              f"this folder; {fix}")
        for need in self.architecture_files:
            names = (need,) if isinstance(need, str) else need
            if not any((arch_dir / name).is_file() for name in names):
                what = arch_dir / names[0] if len(names) == 1 else f"{arch_dir}/{' or '.join(names)}"
                raise ConfigError(f"{what} is missing: the {self.modality} encoder's architecture needs it; {fix}")

    def check_architecture(self, folder: Path) -> None:
        """Check this modality's architecture files in a model folder (what `save_architecture` wrote) before
        anything is built from them: every field that sizes or shapes the encoder, by type and range, and against
        this config; a ConfigError names the file and the field. `build(arch_dir)` calls it first. The base class
        has no files to check."""


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


MAX_ARCHITECTURE_FILE = 64 << 20
"""The largest file a modality folder of a model folder may hold (a tokenizer.json of a 250k-word vocabulary is
about 20 MiB)."""


def read_architecture_file(path: Path, schema: type[C], strict: bool = False) -> tuple[C, dict]:
    """An architecture file of a model folder (JSON, read strictly: `read_json_file`) -> (its fields that `schema`
    declares, converted and range-checked by `from_dict` and the schema's `__post_init__`; the whole object).
    `strict`: a key the schema does not declare is an error too (a file moefuse alone writes); otherwise it is left
    to the library that reads the file (a transformers config carries many keys that size nothing). Every error is
    a ConfigError naming the file and the field."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the model folder is incomplete (copy the whole folder)")
    data = read_json_file(path, MAX_ARCHITECTURE_FILE)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(schema)}  # type: ignore[arg-type]
    try:
        return from_dict(schema, data if strict else {k: v for k, v in data.items() if k in known}), data
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
"""The dtypes a transformers config.json may name for an encoder's weights."""


def check_transformer_sizes(c: Any) -> None:
    """The bounds every transformer encoder's architecture file shares (a transformers BertConfig or
    Wav2Vec2Config read by `read_architecture_file` into a schema with these fields; None = not in the file, so
    transformers' default): generous for any published checkpoint (BERT-large, wav2vec2-large: 24 layers of 1024),
    tight enough that an edited file cannot make building the model allocate without end. Checked: hidden_size in
    [1, 16384], num_hidden_layers in [1, 128], num_attention_heads in [1, 256] dividing hidden_size,
    intermediate_size in [1, 65536], vocab_size in [1, 10^6], layer_norm_eps in (0, 0.1], initializer_range in
    [0, 10], hidden_act one of transformers' activations, dtype (or torch_dtype) a float type."""
    from transformers.activations import ACT2FN

    c.check_range("hidden_size", 1, 16384)
    c.check_range("num_hidden_layers", 1, 128)
    c.check_range("num_attention_heads", 1, 256)
    c.check_range("intermediate_size", 1, 65536)
    c.check_range("vocab_size", 1, 1_000_000)
    c.check_range("layer_norm_eps", 1e-30, 0.1)
    c.check_range("initializer_range", 0, 10)
    heads, width = c.num_attention_heads, c.hidden_size
    c.check(heads is None or width is None or width % heads == 0, "num_attention_heads",
            f"must divide hidden_size ({width}), got {heads}")
    c.check(c.hidden_act is None or c.hidden_act in ACT2FN, "hidden_act",
            f"must be one of transformers' activations ({', '.join(ACT2FN)}), got {c.hidden_act!r}")
    dtype = c.dtype or c.torch_dtype
    c.check(dtype is None or dtype in FLOAT_DTYPES, "dtype", f"must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")


def check_folder_files(folder: Path) -> None:
    """Every file of a modality folder is within MAX_ARCHITECTURE_FILE (checked before a library reads one)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.stat().st_size > MAX_ARCHITECTURE_FILE:
            raise ConfigError(f"{path} is {path.stat().st_size} bytes, over the {MAX_ARCHITECTURE_FILE >> 20} MiB "
                              f"limit of an architecture file: it was replaced or damaged")


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
