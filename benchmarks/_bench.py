"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on sys.path).

Importing this module also makes `moefuse` importable from a checkout without `pip install -e .`.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("moefuse") is None:
    sys.path.insert(0, str(REPO))


def summary(values: list[float]) -> tuple[float, float]:
    """Median and half the interquartile range."""
    if len(values) < 2:
        return values[0], 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), (q3 - q1) / 2


def command_line() -> str:
    """The command that ran this benchmark, for pasting under its table."""
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(exe), *sys.argv])


def demo_shards(work: Path, count: int, seed: int, maxcount: int = 100) -> Path:
    """Demo data (`moefuse demo-data`, `count` samples, manifest in WORK/data/manifest.jsonl) -> shards of
    `maxcount` samples in WORK/shards, quietly; returns the shards folder."""
    from moefuse.datasets.demo import make_demo_data
    from moefuse.datasets.shards import BuildOptions, build_shards

    manifest = make_demo_data(work / "data", count=count, seed=seed, overwrite=True, progress=False)
    shards = work / "shards"
    opts = BuildOptions(maxcount=maxcount, workers=1, overwrite=True, progress=False, seed=seed)
    build_shards(manifest, shards, opts)
    return shards


def manifest_rows(manifest: Path, split: str, count: int, model) -> list[dict]:
    """`count` rows of `split`, evenly spaced (a manifest lists its tasks one after the other, so every task is
    in), each with `files`: {field: path} for the model's file fields (its encoders' `file_fields`) it names."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == split]
    if not rows:
        sys.exit(f"error: {manifest} has no rows of split {split!r}")
    k = min(count, len(rows))
    rows = [rows[i * len(rows) // k] for i in range(k)]
    fields = {f for encoder in model.encoders.values() for f in encoder.cfg.file_fields}
    for r in rows:
        r["files"] = {f: manifest.parent / r[f] for f in fields if r.get(f)}
    return rows
