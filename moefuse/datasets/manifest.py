"""The manifest: a user's dataset as JSON Lines (`.jsonl`/`.ndjson`) or CSV (`.csv`), one sample a row.

Fields (any other is an error): `id` (unique; letters, digits, `_`, `-`; at most 80 characters, so tar member
names fit the ustar format), `task` (same characters), inputs `text`, `image` (path), `audio` (path), targets
`label` (classification) or `question` + `answer` (QA), optional `split` (train/val/test) and `meta` (a JSON
object; in CSV a JSON string). Paths are relative to the manifest's folder, or absolute. JSON null and an empty
CSV cell mean "absent". Labels and answers are strings (JSON integers are converted with str()). CSV cells may be
of any length (the csv module's 128 KiB default field limit is lifted); a NUL byte or a record the csv module
cannot parse is an error of that row.

Training and evaluation need a target in every row; `read_manifest(path, require_target=False)` (for `predict`
on unlabelled data) accepts rows without one: their `type` is None, unless a `label` (classification) or a
`question` and/or `answer` (QA) says which kind of row it is. Every other check still applies.

Reading never stops at a bad row: every row comes back as a ManifestRow, bad ones with `errors` filled, so the
builder can list them all (or reject them with --skip-bad) and nothing is lost. Only problems with the whole
file (missing, a folder, empty, an unknown extension, a bad CSV header) raise ManifestError.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moefuse.errors import UserError

FIELDS = ("id", "task", "text", "image", "audio", "label", "question", "answer", "split", "meta")
SPLITS = ("train", "val", "test")
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,80}")
TASK_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_FIELD_LIMIT = 2**31 - 1  # characters per CSV cell: no practical limit (the csv default is 131072)


class ManifestError(UserError, ValueError):
    """The manifest as a whole cannot be read; the message names the file and the fix."""


@dataclass
class ManifestRow:
    """One manifest row: the raw value (kept for rejected.jsonl), the checked fields and the reasons it is bad."""

    line: int
    raw: Any
    id: str | None = None
    task: str | None = None
    type: str | None = None
    """"classification" (a label) or "qa" (question + answer); None for an unlabelled row read with
    require_target=False."""
    text: str | None = None
    image: Path | None = None
    audio: Path | None = None
    label: str | None = None
    question: str | None = None
    answer: str | None = None
    split: str | None = None
    meta: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def target(self) -> str | None:
        return self.label if self.type == "classification" else self.answer

    def modalities(self) -> str:
        """The inputs the model sees, e.g. "text+image" (a QA question counts as text, as in the collator)."""
        present = [("text", bool(self.text or self.question)), ("image", self.image is not None),
                   ("audio", self.audio is not None)]
        return "+".join(name for name, has in present if has)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"field {dup[0]!r} appears twice in the row")
    return dict(pairs)


def _bad_utf8(data: bytes) -> str:
    try:
        data.decode("utf-8")
        return ""
    except UnicodeDecodeError as e:
        return (f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {e.start + 1}); save the manifest as "
                f"UTF-8")


def _string(value: Any, name: str, errors: list[str], *, allow_int: bool = False) -> str | None:
    """A non-empty string field (ints converted when allowed); None when absent; errors appended."""
    if value is None:
        return None
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        kind = "a string or an integer" if allow_int else "a string"
        errors.append(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        errors.append(f"{name} is not valid UTF-8 text (it holds an unpaired surrogate or undecodable bytes)")
        return None
    if not value.strip():
        errors.append(f"{name} is empty; leave the field out when a sample has no {name}")
        return None
    return value


def _path(value: Any, name: str, base: Path, errors: list[str]) -> Path | None:
    text = _string(value, name, errors)
    if text is None:
        return None
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _row_type(values: dict[str, Any], errors: list[str], require_target: bool) -> str | None:
    """"classification", "qa" or None from the target fields present; errors appended."""
    has_label, has_qa = "label" in values, ("question" in values or "answer" in values)
    if has_label and has_qa:
        errors.append("a row has either label (classification) or question + answer (QA), not both")
        return None
    if has_label:
        return "classification"
    if has_qa:
        for name in ("question", "answer"):
            if name not in values and require_target:
                errors.append(f"missing target: a QA row needs both question and answer; {name} is missing")
        return "qa"
    if require_target:
        errors.append("missing target: give label (classification) or question + answer (QA)")
    return None


def check_row(line: int, raw: Any, base: Path, *, require_target: bool = True) -> ManifestRow:
    """Field checks of one parsed row (no media is opened here). Cross-row checks are in `read_manifest`.
    With require_target=False a row may have no label or answer (see the module docstring)."""
    row = ManifestRow(line=line, raw=raw)
    if not isinstance(raw, dict):
        row.errors.append(f"a row must be a JSON object, got {type(raw).__name__}")
        return row
    values = {k: v for k, v in raw.items() if v is not None}
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        row.errors.append(f"unknown field {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1
                          else "") + f"; allowed fields: {', '.join(FIELDS)}")
    errors = row.errors
    row.id = _string(values.get("id"), "id", errors, allow_int=True)
    if row.id is None and "id" not in values:
        errors.append("id is missing")
    elif row.id is not None and not ID_RE.fullmatch(row.id):
        errors.append(f"id {row.id!r} may hold only letters, digits, '_' and '-' (webdataset splits a member name "
                      f"at its first '.'), at most 80 characters")
    row.task = _string(values.get("task"), "task", errors)
    if row.task is None and "task" not in values:
        errors.append("task is missing")
    elif row.task is not None and not TASK_RE.fullmatch(row.task):
        errors.append(f"task {row.task!r} may hold only letters, digits, '_' and '-', at most 64 characters")
    row.text = _string(values.get("text"), "text", errors)
    row.image = _path(values.get("image"), "image", base, errors)
    row.audio = _path(values.get("audio"), "audio", base, errors)
    row.label = _string(values.get("label"), "label", errors, allow_int=True)
    row.question = _string(values.get("question"), "question", errors)
    row.answer = _string(values.get("answer"), "answer", errors, allow_int=True)
    split = values.get("split")
    if split is not None and split not in SPLITS:
        errors.append(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    else:
        row.split = split
    meta = values.get("meta", {})
    if not isinstance(meta, dict):
        errors.append(f"meta must be a JSON object, got {type(meta).__name__} {meta!r}")
    else:
        row.meta = meta
    row.type = _row_type(values, errors, require_target)
    if not any(k in values for k in ("text", "question", "image", "audio")):
        errors.append("no input: give at least one of text, image, audio (or a QA question)")
    return row


# ---------------------------------------------------------------------------------------------------------------
# readers


def _jsonl_rows(data: bytes, base: Path, require_target: bool = True) -> list[ManifestRow]:
    rows = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines (and a trailing newline) are not rows
        bad = _bad_utf8(line)
        if bad:
            row = ManifestRow(line=number, raw=line.decode("utf-8", "backslashreplace"), errors=[bad])
            try:  # name the row by its id when the rest of the line can be read
                sid = json.loads(line.decode("utf-8", "replace")).get("id")
                row.id = sid if isinstance(sid, str) and ID_RE.fullmatch(sid) else None
            except (ValueError, AttributeError):
                pass
            rows.append(row)
            continue
        text = line.decode("utf-8")
        try:
            raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except ValueError as e:
            rows.append(ManifestRow(line=number, raw=text.rstrip("\r"), errors=[f"not valid JSON: {e}"]))
            continue
        rows.append(check_row(number, raw, base, require_target=require_target))
    return rows


class _Lines:
    """The lines of a CSV text, iterated by csv.reader, remembering those of the record being parsed (so that a
    record the csv module rejects is kept as written, for rejected.jsonl)."""

    def __init__(self, text: str):
        self._lines = iter(io.StringIO(text, newline=""))
        self.taken: list[str] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.taken.append(line)
        return line

    def record(self) -> str:
        """The text of the lines read since the last call."""
        text, self.taken = "".join(self.taken), []
        return text


def _csv_header(reader: Any, lines: _Lines, path: Path) -> list[str] | None:
    """The checked header (None for an empty file); a bad header raises ManifestError."""
    try:
        header = next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        raise ManifestError(f"{path}: line {reader.line_num}: the CSV header cannot be read ({e}); save the "
                            f"manifest as UTF-8 CSV") from None
    lines.record()
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in FIELDS]
    if unknown:
        raise ManifestError(f"{path}: unknown CSV column {unknown[0]!r}; allowed columns: {', '.join(FIELDS)}")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise ManifestError(f"{path}: CSV column {dup[0]!r} appears twice in the header")
    return header


def _csv_row(number: int, header: list[str], cells: list[str], base: Path, require_target: bool) -> ManifestRow:
    """One CSV record -> a checked row (cell-level problems first in its errors)."""
    if len(cells) > len(header):
        return ManifestRow(line=number, raw=cells,
                           errors=[f"the row has {len(cells)} cells but the header has {len(header)}"])
    raw: dict[str, Any] = {h: (c if c != "" else None) for h, c in zip(header, cells)}
    errors = []
    if any("\udc80" <= ch <= "\udcff" for c in cells for ch in c):
        errors.append("not valid UTF-8; save the manifest as UTF-8")
    if any("\x00" in c for c in cells):
        errors.append("the row holds a NUL byte (is the file UTF-16 or binary?); save the manifest as UTF-8 CSV")
    if raw.get("meta") is not None:
        try:
            raw["meta"] = json.loads(raw["meta"])
        except ValueError as e:
            errors.append(f"meta is not valid JSON: {e}")
            raw["meta"] = None
    row = check_row(number, raw, base, require_target=require_target)
    row.errors[:0] = errors
    if errors:  # keep the cells as read, undecodable bytes shown as \x.. escapes
        row.raw = {h: c.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                   for h, c in zip(header, cells)}
    return row


def _csv_rows(data: bytes, path: Path, base: Path, require_target: bool = True) -> list[ManifestRow]:
    # surrogateescape keeps undecodable bytes as lone surrogates: the rows that hold them are reported, the
    # others still read.
    lines = _Lines(data.decode("utf-8", "surrogateescape"))
    reader = csv.reader(lines)
    saved_limit = csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide: restored below
    try:
        header = _csv_header(reader, lines, path)
        rows: list[ManifestRow] = []
        start = reader.line_num + 1
        while header is not None:
            number = start
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # a row error like any other; the reader goes on with the next line
                text = lines.record().encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                rows.append(ManifestRow(line=number, raw=text.rstrip("\r\n"), errors=[f"not valid CSV: {e}"]))
                start = reader.line_num + 1
                continue
            lines.record()
            start = reader.line_num + 1
            if any(c.strip() for c in cells):
                rows.append(_csv_row(number, header, cells, base, require_target))
        return rows
    finally:
        csv.field_size_limit(saved_limit)


def check_rows_together(rows: list[ManifestRow]) -> None:
    """Cross-row checks: unique ids, and one type (classification or QA) per task."""
    first_id: dict[str, int] = {}
    task_type: dict[str, tuple[str, int]] = {}
    for row in rows:
        if row.id is not None:
            if row.id in first_id:
                row.errors.append(f"duplicate id {row.id!r} (first on line {first_id[row.id]})")
            else:
                first_id[row.id] = row.line
        if row.errors or row.task is None or row.type is None:
            continue
        known = task_type.setdefault(row.task, (row.type, row.line))
        if known[0] != row.type:
            row.errors.append(f"task {row.task!r} is {known[0]} (line {known[1]}) but this row is {row.type}; a task "
                              f"has one type throughout")


def read_manifest(path: str | Path, *, require_target: bool = True) -> list[ManifestRow]:
    """All rows of a JSON Lines or CSV manifest, checked field by field and across rows. require_target=False
    accepts rows without a label or answer (unlabelled data for `predict`)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    if path.is_dir():
        raise ManifestError(f"manifest {path} is a folder; give the .jsonl or .csv file inside it")
    suffix = path.suffix.lower()
    if suffix not in (*JSONL_SUFFIXES, ".csv"):
        raise ManifestError(f"manifest {path}: unknown format {suffix or '(no extension)'!r}; use .jsonl (JSON "
                            f"Lines) or .csv")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as spreadsheet programs write
        data = data[3:]
    base = path.resolve().parent
    if suffix == ".csv":
        rows = _csv_rows(data, path, base, require_target)
    else:
        rows = _jsonl_rows(data, base, require_target)
    if not rows:
        raise ManifestError(f"manifest {path} holds no rows (it is empty or blank)")
    check_rows_together(rows)
    return rows


def assign_splits(rows: list[ManifestRow], val_fraction: float, test_fraction: float, seed: int) -> int:
    """Give each row without a `split` one: rows ordered by a seeded hash of their id, the first
    round(n * val_fraction) go to val, the next round(n * test_fraction) to test, the rest to train. Exact
    fractions, independent of row order and worker count; adding rows moves few others. Returns n."""
    todo = [r for r in rows if r.split is None]
    todo.sort(key=lambda r: hashlib.sha256(f"{seed}:{r.id}".encode()).digest())
    n_val, n_test = round(len(todo) * val_fraction), round(len(todo) * test_fraction)
    for i, row in enumerate(todo):
        row.split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return len(todo)
