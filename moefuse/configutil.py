"""Typed dataclass configs from YAML with dotted overrides (torchtune / litgpt style).

`from_dict(Cls, data)` builds a (nested) dataclass, checking every key and value type and naming the dotted key
in any error; `apply_overrides(data, ["fusion.num_experts=16"])` edits the raw dict before that, so overrides go
through the same checks. Each component config subclasses `Config` and validates its own values in
`__post_init__` with `self.check(cond, field, msg)`, which names the key from the class's `config_key`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from moefuse.errors import UserError, naming

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the dotted key and what is expected."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError naming the dotted `key` when `cond` is false."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


class Config:
    """Base of every component config (a dataclass). `config_key` says where the component sits in the experiment
    config, so its errors name the full dotted key whether it was loaded from YAML or built in code:
    `FusionConfig(top_k=9)` raises `fusion.top_k: must be in [1, num_experts=8], got 9`."""

    config_key: ClassVar[str] = ""
    """The component's dotted key (`fusion`, `train`, ...); "" = the top level, or a config used on its own.
    A subclass whose key depends on its values (a task's name) overrides it with a property."""

    def key(self, name: str) -> str:
        """The dotted key of this config's field `name`, for error messages."""
        return f"{self.config_key}.{name}" if self.config_key else name

    def check(self, cond: bool, name: str, msg: str) -> None:
        """Validation for `__post_init__`: ConfigError `<key(name)>: <msg>` when `cond` is false."""
        check(cond, self.key(name), msg)

    def check_range(self, name: str, low: float, high: float) -> None:
        """Validation for `__post_init__`: field `name` is a finite number in [low, high], or None (not set)."""
        value = getattr(self, name)
        self.check(value is None or (math.isfinite(value) and low <= value <= high), name,
                   f"must be in [{low}, {high}], got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _wrong(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of the union the value converts to; null only when the union allows None."""
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: null is not allowed, expected {_type_name(tp)}")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")


YAML11_BOOLS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}  # what YAML reads as a boolean


def _convert_literal(value: Any, tp: Any, key: str) -> Any:
    if isinstance(value, bool):  # a bare `no` (mixed_precision: no) is YAML's false: the option spelled so
        spelled = [a for a in get_args(tp) if isinstance(a, str) and a.lower() in YAML11_BOOLS[value]]
        if spelled:
            return spelled[0]
    if value not in get_args(tp):
        choices = ", ".join(repr(a) for a in get_args(tp))
        raise ConfigError(f"{key}: {value!r} is not one of {choices}")
    return value


def _convert_sequence(value: Any, tp: Any, key: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise _wrong(key, "a list", value)
    (item_tp, *_) = get_args(tp) or (Any,)
    items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    return items if get_origin(tp) is list else tuple(items)


def _convert_mapping(value: Any, tp: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise _wrong(key, "a mapping", value)
    _, val_tp = get_args(tp) or (Any, Any)
    return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}


def _convert_dataclass(value: Any, tp: Any, key: str) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise _wrong(key, f"a mapping for {tp.__name__}", value)
    return from_dict(tp, value, prefix=key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_BY_ORIGIN = {Union: _convert_union, types.UnionType: _convert_union, Literal: _convert_literal,
              list: _convert_sequence, tuple: _convert_sequence, dict: _convert_mapping}
"""Converters of the generic annotations, by `get_origin(annotation)`."""
_SCALARS = {
    float: ("a finite number", lambda v: _is_int(v) or (isinstance(v, float) and math.isfinite(v)), float),
    int: ("an integer", _is_int, None),
    bool: ("true or false", lambda v: isinstance(v, bool), None),
    str: ("a string", lambda v: isinstance(v, str), None),
}
"""Scalar annotation -> (what the error says is expected, the check, the conversion or None). A float must be
finite: no setting means "unlimited" by inf, and nan compares false with every bound its __post_init__ checks."""


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    if value is None:
        raise ConfigError(f"{key}: null is not allowed, expected {_type_name(tp)}")
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string; take what float() does
        try:
            value = float(value)
        except ValueError:
            pass
    if tp not in _SCALARS:
        return value
    expected, ok, convert = _SCALARS[tp]
    if not ok(value):
        raise _wrong(key, expected, value)
    return value if convert is None else convert(value)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert nested dicts to dataclasses."""
    if tp is Any:
        return value
    by_origin = _BY_ORIGIN.get(get_origin(tp))
    if by_origin is not None:
        return by_origin(value, tp, key)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, key)
    return _convert_scalar(value, tp, key)


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types raise ConfigError naming the key."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; {cls.__name__} accepts: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    return cls(**kwargs)  # its __post_init__ names the keys of its own values (Config.config_key)


def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring} of a dataclass, read from the string literal under each field's declaration in the
    class's own source (where every field is documented), e.g. for a command's --help."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    return {node.target.id: " ".join(str(doc.value.value).split())
            for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}


def to_dict(cfg: Any) -> Any:
    """Dataclass (tree) to plain dicts/lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so `16`, `true`, `null`, `[1, 2]` are typed)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted `key.sub=value` in the raw config dict (a new dict; the input is not changed)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (or is not a file)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          f"save it as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML (or holds a Python tag, which is never "
                          f"loaded): {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp folder to its final name (replacing an old one) with renames only."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


TEMP_NAME_CHARS = 100
"""An atomic write's temp file is `.NAME.XXXXXXXX.tmp` with NAME cut to this many characters, so that any name the
file system takes for the file itself (up to 255 bytes) also fits its temp file."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a half-written file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Bytes version of `atomic_write_text` (temp file in the same folder, fsync, rename). `fsync=False` skips
    the flush to disk, for many small files that can be regenerated (a crash may then leave an empty file).

    A failure (full disk, a folder or file in the way) raises an OSError that names `path`, and leaves no temp
    file behind and any earlier `path` as it was."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data), fsync)


def atomic_write_file(path: str | Path, write: Callable[[Path], None], fsync: bool = True) -> None:
    """`write(tmp)` writes the whole file at a temp path in the same folder (a library's own writer, e.g.
    safetensors' `save_file`); then it is flushed to disk, given the permissions `open()` would give (0666 less the
    umask: readable like any other file, whatever mode the writer or `mkstemp` used) and renamed to `path`, so
    readers never see a half-written file. Failures as `atomic_write_bytes`."""
    path = Path(path)
    prefix = f".{path.name[:TEMP_NAME_CHARS]}."
    try:
        with naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                write(Path(tmp))
                if fsync:
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files (so do some writers); open() would not
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
    except OSError as e:  # mkstemp, the writer, chmod or replace failed on the temp file: the user asked for `path`
        said = e.filename
        if isinstance(said, str) and os.path.dirname(said) == str(path.parent) and \
                os.path.basename(said).startswith(prefix) and said.endswith(".tmp"):
            raise type(e)(e.errno, e.strerror or str(e), str(path)) from e
        raise


def read_json_file(path: str | Path, max_bytes: int = 64 << 20) -> Any:
    """A JSON file a user may have edited, read strictly: UTF-8, at most `max_bytes`, no NaN or Infinity (not
    JSON, RFC 8259 section 6) and no key given twice in one object (RFC 8259 section 4 leaves the meaning open;
    Python would keep the last). Anything else is a ConfigError naming the file."""
    path = Path(path)

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number (RFC 8259); write a finite number or null")

    def unique(pairs: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"the key {k[:80]!r} is given twice in one object")
            seen[k] = v
        return seen

    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ConfigError(f"{path} is {size} bytes, over the {max_bytes >> 20} MiB limit of a JSON file here")
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=constant, object_pairs_hook=unique)
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path} cannot be read as JSON: {str(e)[:300]}") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_yaml(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def finite(obj: Any) -> tuple[Any, int]:
    """A copy of a JSON-ready tree with NaN/inf floats replaced by None, and how many were replaced."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, 1
    if isinstance(obj, dict):
        pairs = [(k, finite(v)) for k, v in obj.items()]
        return {k: v for k, (v, _) in pairs}, sum(n for _, (_, n) in pairs)
    if isinstance(obj, (list, tuple)):
        items = [finite(v) for v in obj]
        return [v for v, _ in items], sum(n for _, n in items)
    return obj, 0


def dumps_json(obj: Any, what: str, **kwargs: Any) -> str:
    """json.dumps that never writes invalid JSON: non-finite numbers become null, with a warning naming `what`."""
    clean, replaced = finite(obj)
    if replaced:
        warnings.warn(f"{what}: {replaced} non-finite value(s) (NaN or inf) written as null", stacklevel=2)
    return json.dumps(clean, allow_nan=False, **kwargs)


__all__ = [
    "Config",
    "ConfigError",
    "apply_overrides",
    "atomic_write_file",
    "atomic_write_text",
    "check",
    "dumps_json",
    "finite",
    "from_dict",
    "load_yaml",
    "parse_override",
    "read_json_file",
    "save_yaml",
    "sha256_file",
    "to_dict",
]
