"""Inference on raw inputs, the library part of `moefuse predict` (and of the demo and the benchmarks).

Raw files are prepared by each modality's encoder (`read_input`) with the settings the training shards were built
with, recorded in the export's `media` (image size and fit, audio limits; audio is resampled to the encoder's
rate), so predictions on raw files see what the model saw in training. `predict_samples` gives one result per
sample: prediction, probability, top 5, per-head votes, agreement and a routing summary (which experts each
modality's tokens went to, per MoE layer), or an `error` for a sample the model cannot take.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moefuse.configutil import ConfigError
from moefuse.datasets.collate import has_value
from moefuse.datasets.manifest import read_manifest
from moefuse.datasets.media import MediaError
from moefuse.errors import UserError
from moefuse.inference.records import records_from_output
from moefuse.pretrained.export_info import read_export_record
from moefuse.progress import track

if TYPE_CHECKING:
    from moefuse.fusion.model import ModelOutput, MultimodalMoEModel

# Limits for exports that do not record the shards' media settings (trained on shard patterns, or before the
# settings were recorded); otherwise the build's own limits apply.
DEFAULT_MEDIA = {"max_file_bytes": 1 << 30, "max_image_pixels": 100_000_000, "max_audio_seconds": 3600.0}


def export_media(source: MultimodalMoEModel | str | Path) -> dict:
    """The media settings predict applies to raw inputs: the export's record of the training shards' build
    settings over DEFAULT_MEDIA. `source`: a loaded model (the record of the folder or Hub repository it came from,
    `model.export_info`; none for a model built in code) or a model folder."""
    info = source.export_info if hasattr(source, "export_info") else read_export_record(Path(source))
    return {**DEFAULT_MEDIA, **(info.media.settings() if info is not None and info.media is not None else {})}


def predict_one(model: MultimodalMoEModel, task: str | None = None, *, media: dict | None = None,
                min_confidence: float | None = None, sid: str = "sample", **inputs: object) -> dict:
    """One sample's result, the record `moefuse predict` writes: raw inputs by field name (a path, a PIL image or an
    array for files), prepared with `media` (default: the model folder's, `export_media(model)`). `task` may be left
    out when the model has one task. A sample the model cannot take raises the error its result line would carry
    (ConfigError, MediaError, or a ValueError for a non-finite output)."""
    if task is None:
        if len(model.task_names) != 1:
            raise ConfigError(f"this model has several tasks; choose one with task= ({', '.join(model.task_names)})")
        task = model.task_names[0]
    media = media if media is not None else export_media(model)
    fields = {f: None for names in model.sample_fields.values() for f in names}
    unknown = sorted(set(inputs) - set(fields))
    if unknown:
        raise ConfigError(f"unknown input {unknown[0]!r}; this model takes {', '.join(fields)}")
    sample = load_media_sample(model, sid, task, media=media, spell="{}=".format, **{**fields, **inputs})
    [result] = predict_samples(model, [sample], batch_size=1, min_confidence=min_confidence)
    if "error" in result:
        raise ValueError(result["error"])
    return result


def load_media_sample(model: MultimodalMoEModel, sid: str, task: str, *, media: dict | None = None,
                      target: str | None = None, meta: dict | None = None, spell: Callable[[str], str] = "--{}".format,
                      **inputs: object) -> dict:
    """Raw inputs (text, question: strings; image, audio: file paths; None = not given) -> a decoded sample (the
    collate contract), each read by the encoder of its modality with the training shards' `media` settings.
    `spell(field)` is how messages name an input: `--question` for the command line, the server's own wording."""
    tasks = {t.name: t for t in model.cfg.tasks}
    if task not in tasks:
        raise _of_field(ConfigError(f"unknown task {task!r}; this model has: {', '.join(tasks)}"), "task")
    if tasks[task].type == "qa" and not inputs.get("question"):
        raise _of_field(ConfigError(f"task {task!r} is a QA task: give {spell('question')}"), "question")
    given = {f: v for f, v in inputs.items() if has_value(v)}
    if not given:
        raise ConfigError(f"give at least one input: {', '.join(spell(f) for f in inputs)}")
    owner = {f: m for m, names in model.sample_fields.items() for f in names}
    sample = {"id": sid, "task": task, **dict.fromkeys(inputs), "target": target, "meta": meta or {}}
    for f, value in given.items():
        if f not in owner or owner[f] not in model.encoders:
            raise _of_field(ConfigError(f"this model has no {owner.get(f, f)} encoder; drop {spell(f)}"), f)
        if isinstance(value, str) and not is_utf8(value):  # the tokenizers refuse them later, with a TypeError
            raise _of_field(ConfigError(f"{spell(f)} is not valid UTF-8 text (it holds an unpaired surrogate or "
                                        f"undecodable bytes)"), f)
        try:
            sample[f] = model.encoders[owner[f]].read_input(f, value, media or DEFAULT_MEDIA)
        except UserError as e:
            raise _of_field(e, f) from None
        except Exception as e:  # any other failure of a reader is this input's, never the caller's crash
            raise _of_field(MediaError(f"{spell(f)} cannot be read: {describe(e)}"), f) from None
    return sample


def is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8: False for lone surrogates (from JSON escapes such as \\ud800, or from
    undecodable bytes that Python keeps as surrogates, e.g. in argv)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def describe(error: BaseException, limit: int = 300) -> str:
    """`Type: message` of an unexpected exception, for the one sample it is about, cut to `limit` characters."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _of_field(error: Exception, field: str) -> Exception:
    """The error, marked with the input field it is about (`error.field`, which the server reports)."""
    error.field = field  # type: ignore[attr-defined]
    return error


def routing_per_sample(output: ModelOutput, rows: list[str]) -> list[dict]:
    """For each sample: {modality: [ {expert: assignments} per MoE layer ]}, experts sorted by count; `rows` names
    the modality ids (the model's routing_rows). An output that routes no tokens itself (an ensemble's:
    `token_mask` None) gives an empty summary per sample."""
    if output.token_mask is None:
        return [{} for _ in range(sum(len(t.rows) for t in output.tasks.values()))]
    b = output.token_mask.shape[0]
    real = output.token_mask.reshape(-1).nonzero().squeeze(1)  # [N_real] row-major over [B, T]
    t = output.token_mask.shape[1]
    sample_of = (real // t).tolist()
    mod_of = output.modality_ids.reshape(-1)[real].tolist()
    result = [{} for _ in range(b)]
    for layer, moe in enumerate(output.moe_layers):
        counters: dict[tuple[int, int], Counter] = {}
        for i, experts in enumerate(moe.top_k_index.tolist()):
            counters.setdefault((sample_of[i], mod_of[i]), Counter()).update(experts)
        for (s, m), c in counters.items():
            per_layer = result[s].setdefault(rows[m], [{} for _ in output.moe_layers])
            per_layer[layer] = {str(e): n for e, n in c.most_common()}
    return result


def _result_line(rec: dict, routing: dict, min_confidence: float | None) -> dict:
    """One prediction as `predict` writes it; non-finite model outputs make it an error line instead. With
    `min_confidence`, `abstain` says whether the (calibrated) probability is below it: the answer is then only a
    best guess (selective prediction)."""
    numbers = [rec["probability"], *(p for _, p in rec["top5"])]
    if not all(math.isfinite(x) for x in numbers):
        return {"id": rec["id"], "task": rec["task"],
                "error": "the model's output is not finite (NaN or inf): its weights are damaged or it diverged"}
    return {
        "id": rec["id"], "task": rec["task"], "prediction": rec["prediction"],
        "probability": rec["probability"],
        **({"abstain": rec["probability"] < min_confidence} if min_confidence is not None else {}),
        "top5": rec["top5"], "votes": rec["head_predictions"],
        "agreement": rec["agreement"], "modalities": rec["modalities"],
        **({"target": rec["target"], "correct": rec["target"] == rec["prediction"]}
           if rec["target"] is not None else {}),
        "routing": routing,
    }


@torch.no_grad()
def _predict_batch(model: MultimodalMoEModel, collator, samples: list[dict], min_confidence: float | None
                   ) -> list[dict]:
    batch = collator(samples)
    out = model(batch)
    routing = routing_per_sample(out, model.routing_rows)
    vocab = {t.name: list(t.labels) for t in model.cfg.tasks}
    return [_result_line(rec, routing[batch["ids"].index(rec["id"])], min_confidence)
            for rec in records_from_output(batch, out, vocab)]


def predict_samples(model: MultimodalMoEModel, samples: list[dict], batch_size: int = 32,
                    min_confidence: float | None = None, progress: bool = False) -> list[dict]:
    """One result per sample, in order. A batch that fails is retried sample by sample, so one sample the model
    cannot take becomes one line with an `error` field and every other sample is still predicted. With
    `min_confidence` in [0, 1], each result says whether it is an abstention (`abstain`). `progress`: per batch
    (`moefuse.progress`)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"the minimum confidence must be in [0, 1], got {min_confidence}")
    collator = model.collator(train=False)
    results = []
    starts = range(0, len(samples), batch_size)
    for i in track(starts, "predict", total=len(starts), enabled=progress):
        chunk = samples[i : i + batch_size]
        try:
            results += _predict_batch(model, collator, chunk, min_confidence)
        except Exception:  # whatever failed (collation, a tokenizer, the model): find the samples it was about
            for sample in chunk:
                try:
                    results += _predict_batch(model, collator, [sample], min_confidence)
                except Exception as e:
                    results.append({"id": sample["id"], "task": sample["task"], "error": describe(e)})
    position = {s["id"]: k for k, s in enumerate(samples)}
    return sorted(results, key=lambda r: position[r["id"]])


def manifest_samples(model: MultimodalMoEModel, manifest: Path, media: dict | None = None
                     ) -> tuple[list[dict], list[dict]]:
    """Manifest rows (targets optional) -> decoded samples, and error lines for the rows that could not be read,
    each naming the row's problems. Both carry the manifest line, for the output order."""
    samples, bad = [], []
    for row in read_manifest(manifest, require_target=False):
        if row.errors:
            bad.append({"line": row.line, "id": row.id, "task": row.task, "error": "; ".join(row.errors)})
            continue
        target = row.label if row.label is not None else row.answer
        try:
            sample = load_media_sample(model, row.id, row.task, media=media, target=target, meta=row.meta,
                                       text=row.text, question=row.question, image=row.image, audio=row.audio)
        except UserError as e:
            bad.append({"line": row.line, "id": row.id, "task": row.task, "error": str(e)})
            continue
        samples.append({**sample, "line": row.line})
    return samples, bad
