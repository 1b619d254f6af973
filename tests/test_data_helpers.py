"""Tiny generated datasets for the data tests (imported by the other test_data_* files), and checks of them."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from moefuse.datasets.shards import BuildOptions, build_shards

# A cycle of modality subsets, so batches mix samples with different inputs.
SUBSETS = (("text", "image", "audio"), ("image",), ("audio",), ("text",), ("image", "audio"), ("text", "image"))


def write_png(path: Path, seed: int, size: tuple[int, int] = (12, 9), fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def write_wav(path: Path, seed: int, rate: int = 8000, seconds: float = 0.05) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (rng.standard_normal(int(rate * seconds)) * 0.1).astype(np.float32), rate, subtype="PCM_16")
    return path


def make_rows(folder: Path, n: int = 24, *, with_split: bool = True) -> list[dict]:
    """n rows over two tasks (cls: classification, qa: QA), media written under folder/media."""
    rows = []
    for i in range(n):
        subset = SUBSETS[i % len(SUBSETS)]
        row: dict = {"id": f"s{i:03d}", "task": "cls" if i % 2 == 0 else "qa"}
        if "text" in subset:
            row["text"] = f"caption {i}"
        if "image" in subset:
            row["image"] = f"media/{i}.{'jpg' if i % 5 == 0 else 'png'}"
            write_png(folder / row["image"], i, size=(10 + i % 7, 8 + i % 5), fmt="JPEG" if i % 5 == 0 else "PNG")
        if "audio" in subset:
            row["audio"] = f"media/{i}.wav"
            write_wav(folder / row["audio"], i, rate=8000 if i % 3 else 16000)
        if row["task"] == "cls":
            row["label"] = str((i // 2) % 3)
        else:
            row.update(question=f"what is {i % 4}?", answer=str(i % 4))
        if with_split:  # every val label and answer also occurs in train
            row["split"] = "val" if i % 8 in (3, 4) else "train"
        row["meta"] = {"n": i}
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON Lines; a str row is written as is (for broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    from moefuse.datasets.manifest import FIELDS

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(FIELDS))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if k == "meta" else v for k, v in r.items()})
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def make_manifest(folder: Path, n: int = 24, **kw) -> Path:
    return write_jsonl(folder / "manifest.jsonl", make_rows(folder, n, **kw))


def build(manifest: Path, out: Path, **opts) -> dict:
    return build_shards(manifest, out, BuildOptions(progress=False, **{"workers": 1, **opts}))


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def shard_ids(out: Path) -> dict[str, list[str]]:
    """{split: ids in shard order} from the shards listed in dataset.json."""
    info = json.loads((out / "dataset.json").read_text())
    return {split: [m.split(".")[0] for s in v["shards"] for m in tar_members(out / s["name"])
                    if m.endswith(".sample.json")] for split, v in info["splits"].items()}


def final_files(out: Path) -> list[str]:
    """Everything in `out` a reader could take for part of a dataset (not hidden temp files)."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.exists() else []


def test_helpers_make_a_clean_manifest(tmp_path: Path) -> None:
    from moefuse.datasets.manifest import read_manifest

    rows = read_manifest(make_manifest(tmp_path, 12))
    assert len(rows) == 12 and not any(r.errors for r in rows)
    assert {r.type for r in rows} == {"classification", "qa"}
