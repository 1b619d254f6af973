"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on sys.path).

Importing this module also makes `moefuse` importable from a checkout without `pip install -e .`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, flags: list[str], log: IO | None = None, wait_s: float = 120.0
                 ) -> tuple[subprocess.Popen, str]:
    """`moefuse serve --checkpoint CHECKPOINT FLAGS` on a free loopback port, in a session of its own (so that
    stop_server ends its worker processes too), once it answers /health -> (process, base url). Its output goes to
    `log` (an open file), else to this terminal; a later flag overrides an earlier one (argparse)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "moefuse.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
               *flags]
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                sys.exit(f"error: moefuse serve exited ({proc.returncode}) before it answered /health")
            time.sleep(0.2)
    stop_server(proc)
    sys.exit(f"error: moefuse serve did not answer /health within {wait_s:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    """End a server of start_server: SIGTERM (uvicorn stops its workers), then SIGKILL to whatever of its
    session is left."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its session's group: the workers, should any outlive it
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
