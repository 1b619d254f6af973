"""export.json of a model folder, typed and checked: the settings that decide an answer (`media`, the raw-file
preparation `predict` and `serve` apply; `drop_modalities`), the run's record (step, result, validation metrics,
calibration, training shards) and what the model card's metadata needs (license, datasets).

The file is read strictly (`read_json_file`: UTF-8, no NaN, no key twice) into `ExportInfo` with `from_dict`
(every key known, every value of its type) and each record checks its ranges, so a hand-edited file fails when the
folder is loaded, naming `export.json` and the dotted field, before anything is built. An export checks what it
writes the same way: a folder moefuse writes is one it loads. `from_pretrained` keeps the record on the model
(`model.export_info`) and `save_pretrained` writes it back, so a re-saved model prepares raw files, and describes
itself, as the original did.

Bounds (each a ConfigError naming the field when crossed):

    format              an integer in [1, EXPORT_FORMAT] (a newer folder needs a newer moefuse)
    step                null or an integer in [0, 10^12]
    result              steps, best_step (<= steps), samples_seen and the skipped/lost counts: integers in
                        [0, 10^12]; last_loss, best_metric: finite numbers; stop_reason, metric: short strings
    final_val_metrics   {name: finite number or null}, at most 100000 names of at most 200 characters
    calibration         {task: {temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE], samples >= 0, nll_before and
                        nll_after finite and >= 0 or null, vote_weights: null or numbers in [0, 1] summing to 1}}
    drop_modalities     distinct non-empty names (the model class checks that each is one of its modalities)
    train_shards        at most 100000 paths of at most 4096 characters
    media               image_size in [8, MAX_IMAGE_SIZE]; image_fit pad | crop; image_format png | jpg;
                        sample_rate in [1000, 384000] Hz; max_image_pixels in [1, 10^9]; max_audio_seconds in
                        (0, 86400]; max_file_bytes in [1, 2^40]; audio_format, audio_subtype: short strings
    license             null or a Hub license id (lower case letters, digits, `.`, `-`, `+`; e.g. apache-2.0)
    datasets            Hub dataset ids (`name` or `owner/name`), at most 100
    compression         what `moefuse compress` did, oldest first, at most 100 records: weights_dtype float32 |
                        bfloat16; expert counts and top_k in [0, 10^6]; per pruned layer the kept and dropped
                        expert ids (distinct, < num_experts_before) and their routing shares in [0, 1];
                        accuracies and same_answer in [0, 1]
    distillation        null, or what the model was distilled from (`moefuse.train.distill`): teacher a path of 1
                        to 4096 characters, temperature in (0, MAX_DISTILL_TEMPERATURE], weight in [0, 1], tasks
                        distinct non-empty names (at most 1000), samples and missing_rows in [0, 10^12]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moefuse.configutil import Config, ConfigError, from_dict, read_json_file, to_dict
from moefuse.datasets.media import MAX_IMAGE_SIZE, ImageFit, ImageFormat

EXPORT_FORMAT = 1
"""The model folder format this moefuse writes and the newest it reads."""

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
"""The temperatures a model folder may hold: the search interval of `moefuse.fusion.calibration.fit_temperature`,
wide enough for any sane model, bounded so that a degenerate set cannot run off."""

MAX_DISTILL_TEMPERATURE = 100.0
"""The highest distillation temperature (`distill.temperature`, export.json's `distillation.temperature`)."""

MAX_COUNT = 10**12
MAX_TEXT = 4096
MAX_ENTRIES = 100_000
LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
DATASET = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


@dataclass
class MediaInfo(Config):
    """`media`: the settings the training shards were built with, which `predict` and `serve` apply to raw files.
    A field that is not set takes predict's default (`moefuse.inference.predict.DEFAULT_MEDIA`)."""

    config_key = "media"

    image_size: int | None = None
    """Side of the square that images were fitted to."""
    image_fit: ImageFit | None = None
    """How they were fitted: pad (letterbox) or crop (centre crop)."""
    image_format: ImageFormat | None = None
    """How the shards stored them."""
    sample_rate: int | None = None
    """Audio rate of the shards, Hz."""
    audio_format: str | None = None
    """How the shards stored audio (flac)."""
    audio_subtype: str | None = None
    """Its sample format (PCM_16)."""
    max_image_pixels: int | None = None
    """Largest image (width x height) a raw file may have."""
    max_audio_seconds: float | None = None
    """Longest raw audio file, seconds."""
    max_file_bytes: int | None = None
    """Largest raw file."""

    def __post_init__(self) -> None:
        self.check_range("image_size", 8, MAX_IMAGE_SIZE)
        self.check_range("sample_rate", 1000, 384_000)
        self.check_range("max_image_pixels", 1, 10**9)
        self.check_range("max_audio_seconds", 1e-3, 86_400)
        self.check_range("max_file_bytes", 1, 2**40)
        for name in ("audio_format", "audio_subtype"):
            value = getattr(self, name)
            self.check(value is None or 0 < len(value) <= 32, name, "must be a short name (at most 32 characters)")

    def settings(self) -> dict:
        """The fields that are set, as `predict` takes them."""
        return {k: v for k, v in to_dict(self).items() if v is not None}


@dataclass
class RunResult(Config):
    """`result`: the summary of the training run that wrote the folder (results.json holds the same)."""

    config_key = "result"

    steps: int | None = None
    stop_reason: str | None = None
    last_loss: float | None = None
    metric: str | None = None
    best_step: int | None = None
    best_metric: float | None = None
    samples_seen: int | None = None
    skipped_corrupt: int | None = None
    lost_samples: int | None = None
    skipped_other_task: int | None = None
    skipped_nonfinite: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "best_step", "samples_seen", "skipped_corrupt", "lost_samples", "skipped_other_task",
                     "skipped_nonfinite"):
            self.check_range(name, 0, MAX_COUNT)
        for name in ("last_loss", "best_metric"):
            value = getattr(self, name)
            self.check(value is None or math.isfinite(value), name, f"must be a finite number or null, got {value}")
        self.check(self.best_step is None or self.steps is None or self.best_step <= self.steps, "best_step",
                   f"must be <= steps ({self.steps}), got {self.best_step}")
        for name in ("stop_reason", "metric"):
            value = getattr(self, name)
            self.check(value is None or len(value) <= 200, name, "must be at most 200 characters")


@dataclass
class TaskCalibration(Config):
    """One task's entry of `calibration`: what the post-hoc fit set (`moefuse.fusion.calibration`)."""

    temperature: float = 1.0
    samples: int = 0
    nll_before: float | None = None
    nll_after: float | None = None
    vote_weights: list[float] | None = None
    skipped: str | None = None
    """Why no fit was made (too few samples, none wrong): the task keeps temperature 1 and its trained weights."""

    def check_values(self, key: str) -> None:
        """Ranges, naming `key` (calibration.<task>) in the error."""
        t = self.temperature
        ok = math.isfinite(t) and MIN_TEMPERATURE * (1 - 1e-9) <= t <= MAX_TEMPERATURE * (1 + 1e-9)
        if not ok:
            raise ConfigError(f"{key}.temperature: must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t}")
        if not 0 <= self.samples <= MAX_COUNT:
            raise ConfigError(f"{key}.samples: must be in [0, {MAX_COUNT}], got {self.samples}")
        if self.skipped is not None and (len(self.skipped) > 1000 or t != 1.0):
            raise ConfigError(f"{key}.skipped: a task not calibrated keeps temperature 1 and says why in at most 1000 "
                              f"characters")
        for name in ("nll_before", "nll_after"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}.{name}: must be a finite number >= 0 or null, got {value}")
        w = self.vote_weights
        if w is not None and not (w and all(math.isfinite(x) and 0 <= x <= 1 for x in w)
                                  and abs(sum(w) - 1) <= 1e-4):
            raise ConfigError(f"{key}.vote_weights: must be numbers in [0, 1] that sum to 1, got {w[:10]}")


@dataclass
class PrunedLayer(Config):
    """One MoE layer's entry of a compression record (`moefuse.fusion.prune.LayerPlan`)."""

    kept: list[int] = field(default_factory=list)
    """The experts kept, by their original ids (the new id is the position in this list)."""
    dropped: list[int] = field(default_factory=list)
    """The experts removed."""
    share: list[float] = field(default_factory=list)
    """Every original expert's routing share on the calibration split."""
    merged_into: dict[str, int] = field(default_factory=dict)
    """Dropped expert -> the kept expert it was merged into (with merging)."""


@dataclass
class CompressionInfo(Config):
    """One entry of `compression`: what `moefuse compress` did, on which data, and the accuracy before and after
    (`moefuse.evaluation.compress`)."""

    method: str = ""
    """What was done, with the papers it follows."""
    weights_dtype: str = "float32"
    """How the weight matrices are stored: float32 or bfloat16."""
    source: str = ""
    """The model folder that was compressed."""
    shards: list[str] = field(default_factory=list)
    """The calibration data."""
    split: str = "val"
    """Its split."""
    samples: int = 0
    """Calibration samples read."""
    num_experts_before: int = 0
    """Experts per MoE layer before (0: no MoE layer)."""
    num_experts_after: int = 0
    """Experts per MoE layer after."""
    top_k: int = 0
    """Experts per token."""
    merge: bool = False
    """Whether each dropped expert was merged into its most similar kept one."""
    min_routing_share: float | None = None
    """The routing-share threshold pruning was given, if it was given one instead of a count."""
    layers: list[PrunedLayer] = field(default_factory=list)
    """Per MoE layer, what was kept (empty: no pruning)."""
    accuracy_before: dict[str, float] = field(default_factory=dict)
    """Per task, accuracy on the calibration split before."""
    accuracy_after: dict[str, float] = field(default_factory=dict)
    """And after."""
    same_answer: float = 1.0
    """Fraction of the calibration samples answered as before."""

    def check_values(self, key: str) -> None:
        """Ranges, naming `key` (compression[i]) in the error."""
        if self.weights_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"{key}.weights_dtype: must be float32 or bfloat16, got {self.weights_dtype!r}")
        for name in ("samples", "num_experts_before", "num_experts_after", "top_k"):
            if not 0 <= getattr(self, name) <= (MAX_COUNT if name == "samples" else 10**6):
                raise ConfigError(f"{key}.{name}: out of range, got {getattr(self, name)}")
        numbers = {**{f"accuracy_before.{t}": a for t, a in self.accuracy_before.items()},
                   **{f"accuracy_after.{t}": a for t, a in self.accuracy_after.items()},
                   "same_answer": self.same_answer, "min_routing_share": self.min_routing_share or 0.0}
        for name, value in numbers.items():
            if not 0 <= value <= 1:
                raise ConfigError(f"{key}.{name}: must be in [0, 1], got {value}")
        for i, layer in enumerate(self.layers):
            ids = layer.kept + layer.dropped
            if len(set(ids)) != len(ids) or any(not 0 <= e < self.num_experts_before for e in ids):
                raise ConfigError(f"{key}.layers[{i}]: kept and dropped must be distinct expert ids below "
                                  f"num_experts_before ({self.num_experts_before})")
            if any(not 0 <= s <= 1 for s in layer.share):
                raise ConfigError(f"{key}.layers[{i}].share: routing shares must be in [0, 1]")


@dataclass
class DistillationInfo(Config):
    """`distillation`: the model was trained on a teacher's soft targets as well as the labels (Hinton et al. 2015;
    `moefuse.train.distill`)."""

    config_key = "distillation"

    teacher: str = ""
    """The teacher's model folder, as the run's config gave it."""
    temperature: float = 1.0
    """The softmax temperature T of the distillation term."""
    weight: float = 0.0
    """alpha: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""
    tasks: list[str] = field(default_factory=list)
    """The tasks distilled."""
    samples: int = 0
    """Training samples the teacher answered (its one pass over the training split, all tasks)."""
    missing_rows: int = 0
    """Training rows of distilled tasks that had no teacher target, trained on their labels alone."""

    def __post_init__(self) -> None:
        self.check(0 < len(self.teacher) <= MAX_TEXT, "teacher", f"must be a path of 1 to {MAX_TEXT} characters")
        self.check(math.isfinite(self.temperature) and 0 < self.temperature <= MAX_DISTILL_TEMPERATURE,
                   "temperature", f"must be in (0, {MAX_DISTILL_TEMPERATURE}], got {self.temperature}")
        self.check_range("weight", 0.0, 1.0)
        names = self.tasks
        self.check(0 < len(names) <= 1000 and all(names) and len(set(names)) == len(names), "tasks",
                   f"must be 1 to 1000 distinct task names, got {names[:10]}")
        for name in ("samples", "missing_rows"):
            self.check_range(name, 0, MAX_COUNT)


@dataclass
class ExportInfo(Config):
    """The whole of export.json."""

    format: int = EXPORT_FORMAT
    """The folder format (EXPORT_FORMAT)."""
    step: int | None = None
    """The training step whose weights the folder holds."""
    result: RunResult | None = None
    """The run's summary."""
    final_val_metrics: dict[str, int | float | None] | None = None
    """The last validation's metrics (before calibration)."""
    calibration: dict[str, TaskCalibration] | None = None
    """Per task, the temperature and vote weights fit on the validation split; null = not calibrated."""
    drop_modalities: list[str] = field(default_factory=list)
    """Modalities the model was trained without (`evaluate` drops them too)."""
    train_shards: list[str] = field(default_factory=list)
    """The training data."""
    media: MediaInfo | None = None
    """How raw files are prepared for the model; null = predict's defaults."""
    license: str | None = None
    """The license of the weights, a Hub license id (the card's `license:`)."""
    datasets: list[str] = field(default_factory=list)
    """Hub ids of the training datasets (the card's `datasets:`), when they have one."""
    compression: list[CompressionInfo] = field(default_factory=list)
    """What `moefuse compress` did to the model, oldest first; [] = the weights are the training run's."""
    distillation: DistillationInfo | None = None
    """The teacher the model was distilled from, and how; null = trained on the labels alone."""

    def __post_init__(self) -> None:
        self.check(1 <= self.format <= EXPORT_FORMAT, "format", f"{self.format} is not a format this moefuse reads "
                   f"(1 to {EXPORT_FORMAT}); a newer moefuse wrote it: upgrade moefuse")
        self.check_range("step", 0, MAX_COUNT)
        metrics = self.final_val_metrics or {}
        self.check(len(metrics) <= MAX_ENTRIES and all(0 < len(k) <= 200 for k in metrics), "final_val_metrics",
                   f"at most {MAX_ENTRIES} names of 1 to 200 characters")
        bad = [k for k, v in metrics.items() if v is not None and not math.isfinite(v)]
        self.check(not bad, f"final_val_metrics.{bad[0] if bad else ''}", "must be a finite number or null")
        for task, c in (self.calibration or {}).items():
            c.check_values(f"calibration.{task}")
        names = self.drop_modalities
        self.check(all(names) and len(set(names)) == len(names), "drop_modalities",
                   f"must be distinct modality names, got {names[:10]}")
        self.check(len(self.train_shards) <= MAX_ENTRIES and all(0 < len(s) <= MAX_TEXT for s in self.train_shards),
                   "train_shards", f"at most {MAX_ENTRIES} paths of 1 to {MAX_TEXT} characters")
        self.check(self.license is None or LICENSE.fullmatch(self.license) is not None, "license",
                   f"must be a Hub license id such as apache-2.0, mit, cc-by-4.0 or other, got {self.license!r}")
        bad = [d for d in self.datasets if not DATASET.fullmatch(d)]
        self.check(not bad and len(self.datasets) <= 100, "datasets", f"must be Hub dataset ids (name or "
                   f"owner/name), at most 100; got {bad[0] if bad else self.datasets[:3]!r}")
        self.check(len(self.compression) <= 100, "compression", "at most 100 records")
        for i, c in enumerate(self.compression):
            c.check_values(f"compression[{i}]")

    def to_json(self) -> dict:
        """The export.json object: every field, media without the settings that are not set, and a task's
        calibration without `skipped` when it was fit."""
        data = to_dict(self)
        if self.media is not None:
            data["media"] = self.media.settings()
        for entry in (data.get("calibration") or {}).values():
            if entry.get("skipped") is None:
                entry.pop("skipped", None)
        return data

    def with_card(self, license: str | None = None, datasets: list[str] | None = None) -> ExportInfo:
        """A copy with the card's license and datasets replaced where given (checked)."""
        changes: dict[str, Any] = {}
        if license is not None:
            changes["license"] = license
        if datasets is not None:
            changes["datasets"] = list(datasets)
        return replace(self, **changes) if changes else self


def export_info(data: ExportInfo | dict | None, where: str | Path = "export.json") -> ExportInfo:
    """export.json's object (or an ExportInfo, or None for none) -> a checked ExportInfo; a ConfigError names
    `where` and the dotted field."""
    if isinstance(data, ExportInfo):
        return data
    if data is None:
        return ExportInfo()
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object, got {type(data).__name__}")
    try:
        return from_dict(ExportInfo, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_export_record(folder: str | Path) -> ExportInfo:
    """A model folder's export.json, checked; an empty record when the folder has none (an export written before
    export.json existed)."""
    where = Path(folder) / "export.json"
    if not where.exists():
        return ExportInfo()
    return export_info(read_json_file(where), where)


__all__ = ["EXPORT_FORMAT", "MAX_DISTILL_TEMPERATURE", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "CompressionInfo",
           "DistillationInfo", "ExportInfo", "MediaInfo", "PrunedLayer", "RunResult", "TaskCalibration", "export_info",
           "read_export_record"]
