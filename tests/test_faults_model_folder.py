"""Faults in a model folder, met as a user meets them: a file of the folder edited by hand (or by a careless tool) is
refused when the folder is loaded, before anything is allocated, by `moefuse predict`, `moefuse evaluate` and
`moefuse serve` alike: one line naming the file and the field, exit code 2, no traceback.

One class per file of the folder, each with its own variants: export.json (schema: types, ranges, allowed values,
strict JSON), config.yaml (the model config's bounds), config.json (the Hub entry point agrees with config.yaml),
each encoder's architecture files (text/, image/, audio/), and model.safetensors (every tensor's name, shape and
dtype against the model the config describes, read from the header). Plus the server's start-up and a Hub id that
cannot be fetched offline.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moefuse.cli import main as cli
from moefuse.configutil import ConfigError
from moefuse.fusion.model import MultimodalMoEModel

Tamper = Callable[[Path], tuple[str, str]]  # edits a copied model folder -> (the file named, the field named)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "input.png"
    Image.new("RGB", (40, 24), (200, 10, 10)).save(path)
    return path


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def set_key(path: Path, dotted: str, value: object) -> None:
    """Set `a.b.c` in a JSON (or YAML, by suffix) file of the folder."""
    load, dump = (yaml.safe_load, yaml.safe_dump) if path.suffix == ".yaml" else (json.loads, json.dumps)
    data = load(path.read_text())
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(dump(data))


def assert_refused(code: int, err: str, prog: str, file: Path, field: str) -> None:
    """One error line from `prog`, naming the file and the field; exit code 2; no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert str(file) in lines[0] and field in lines[0], lines[0]
    assert "Traceback" not in err


def check_cli_refuses(model: Path, tamper: Tamper, image: Path, shards: Path, capsys) -> None:
    """The tampered folder, through predict and evaluate (in process, the real CLI entry point)."""
    file, field = tamper(model)
    code = cli(["predict", "--checkpoint", str(model), "--task", "digit", "--image", str(image)])
    captured = capsys.readouterr()
    assert not captured.out  # no prediction from a refused folder
    assert_refused(code, captured.err, "moefuse predict", model / file, field)
    code = cli(["evaluate", "--checkpoint", str(model), "--shards", str(shards), "--batch-size", "32"])
    assert_refused(code, capsys.readouterr().err, "moefuse evaluate", model / file, field)


# ---------------------------------------------------------------------------------------------------------------
# export.json


def _export(key: str, value: object) -> Tamper:
    def tamper(model: Path) -> tuple[str, str]:
        set_key(model / "export.json", key, value)
        return "export.json", key
    return tamper


def _export_text(text: str, field: str) -> Tamper:
    def tamper(model: Path) -> tuple[str, str]:
        (model / "export.json").write_text(text)
        return "export.json", field
    return tamper


def _export_vote_weights(model: Path) -> tuple[str, str]:
    edit_json(model / "export.json", lambda d: d["calibration"]["digit"].update(vote_weights=[0.5, 0.25]))
    return "export.json", "calibration.digit.vote_weights"


EXPORT_VARIANTS = {
    "image_fit not an allowed value": _export("media.image_fit", "stretch"),
    "image_size huge": _export("media.image_size", 30000),
    "image_size a string": _export("media.image_size", "64"),
    "sample_rate negative": _export("media.sample_rate", -16000),
    "max_image_pixels huge": _export("media.max_image_pixels", 10**12),
    "max_audio_seconds zero": _export("media.max_audio_seconds", 0),
    "an unknown media key": _export("media.image_fitt", "pad"),
    "temperature zero": _export("calibration.digit.temperature", 0.0),
    "temperature huge": _export("calibration.digit.temperature", 1e9),
    "temperature a boolean": _export("calibration.digit.temperature", True),
    "vote weights not summing to 1": _export_vote_weights,
    "calibration of an unknown task": _export("calibration.smell", {"temperature": 1.5, "samples": 3}),
    "drop_modalities not a modality": _export("drop_modalities", ["smell"]),
    "drop_modalities a string": _export("drop_modalities", "audio"),
    "a newer format": _export("format", 99),
    "step negative": _export("step", -3),
    "best_step after the last step": _export("result.best_step", 10**6),
    "train_shards a number": _export("train_shards", 5),
    "license not a license id": _export("license", "Apache License 2.0 (see LICENSE)"),
    "NaN in the metrics": _export_text('{"format": 1, "final_val_metrics": {"val/digit/acc": NaN}}', "NaN"),
    "a key given twice": _export_text('{"format": 1, "step": 2, "step": 3}', "given twice"),
    "not an object": _export_text("[1, 2]", "JSON object"),
    "not JSON": _export_text("{format: 1", "cannot be read as JSON"),
}


class TestExportJson:
    @pytest.mark.parametrize("variant", list(EXPORT_VARIANTS))
    def test_refused_naming_the_field(self, variant: str, copy_model: Path, image: Path, fault_data: dict,
                                      capsys) -> None:
        check_cli_refuses(copy_model, EXPORT_VARIANTS[variant], image, fault_data["shards"], capsys)


# ---------------------------------------------------------------------------------------------------------------
# config.yaml


def _config(key: str, value: object) -> Tamper:
    def tamper(model: Path) -> tuple[str, str]:
        set_key(model / "config.yaml", key, value)
        return "config.yaml", key
    return tamper


def _duplicate_label(model: Path) -> tuple[str, str]:
    data = yaml.safe_load((model / "config.yaml").read_text())
    data["tasks"][1]["labels"][1] = data["tasks"][1]["labels"][0]
    (model / "config.yaml").write_text(yaml.safe_dump(data))
    return "config.yaml", "labels"


def _conv_stem(model: Path) -> tuple[str, str]:
    """An architecture within every bound that is not the one saved: refused by the weights' header."""
    set_key(model / "config.yaml", "encoders.image.conv_stem", [8, 16])
    return "model.safetensors", "encoders.image.vit"


def _oversized_config(model: Path) -> tuple[str, str]:
    with open(model / "config.yaml", "r+b") as f:
        f.truncate(65 << 20)  # sparse: no disk written
    return "config.yaml", "limit of a model config"


CONFIG_VARIANTS = {
    "fusion layers 100000": _config("fusion.num_layers", 100000),
    "experts 10^6": _config("fusion.num_experts", 10**6),
    "expert width a string": _config("fusion.d_expert", "big"),
    "zero voters": _config("heads.num_heads", 0),
    "text max_length 10^6": _config("encoders.text.max_length", 10**6),
    "image size 10^5": _config("encoders.image.image_size", 10**5),
    "an unknown key": _config("fusion.num_layer", 2),
    "a duplicate label": _duplicate_label,
    "a conv stem the weights do not have": _conv_stem,
    "a 65 MiB config": _oversized_config,
}


class TestConfigYaml:
    @pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
    def test_refused_naming_the_field(self, variant: str, copy_model: Path, image: Path, fault_data: dict,
                                      capsys) -> None:
        check_cli_refuses(copy_model, CONFIG_VARIANTS[variant], image, fault_data["shards"], capsys)


# ---------------------------------------------------------------------------------------------------------------
# config.json (the Hub's entry point)


def _config_json(key: str, value: object, field: str | None = None) -> Tamper:
    def tamper(model: Path) -> tuple[str, str]:
        set_key(model / "config.json", key, value)
        return "config.json", field or key
    return tamper


def _config_json_text(text: str, field: str) -> Tamper:
    def tamper(model: Path) -> tuple[str, str]:
        (model / "config.json").write_text(text)
        return "config.json", field
    return tamper


CONFIG_JSON_VARIANTS = {
    "another model type": _config_json("model_type", "bert"),
    "a width that config.yaml does not have": _config_json("fusion.d_model", 96, "disagree at fusion.d_model"),
    "a vocabulary that config.yaml does not have": _config_json("tasks", [], "disagree at tasks"),
    "architectures not a list": _config_json("architectures", "MultimodalMoEModel"),
    "a type error": _config_json("fusion.num_heads", "four"),
    "not JSON": _config_json_text("{", "cannot be read as JSON"),
    "not an object": _config_json_text('"moefuse"', "JSON object"),
}


class TestConfigJson:
    @pytest.mark.parametrize("variant", list(CONFIG_JSON_VARIANTS))
    def test_refused_naming_the_field(self, variant: str, copy_model: Path, image: Path, fault_data: dict,
                                      capsys) -> None:
        check_cli_refuses(copy_model, CONFIG_JSON_VARIANTS[variant], image, fault_data["shards"], capsys)


# ---------------------------------------------------------------------------------------------------------------
# each encoder's architecture files


def _arch(file: str, key: str, value: object, field: str | None = None, named: str | None = None) -> Tamper:
    def tamper(model: Path) -> tuple[str, str]:
        set_key(model / file, key, value)
        return named or file, field or key
    return tamper


def _huge_in_bounds(model: Path) -> tuple[str, str]:
    """A BERT of about 10^11 parameters, every field within its bound: refused by the weights' header before a
    parameter is allocated (were it built, this test would run out of memory)."""
    edit_json(model / "text" / "config.json", lambda d: d.update(
        hidden_size=16384, num_hidden_layers=128, num_attention_heads=128, intermediate_size=65536))
    return "model.safetensors", "encoders.text.bert"


def _oversized_tokenizer(model: Path) -> tuple[str, str]:
    with open(model / "text" / "tokenizer.json", "r+b") as f:
        f.truncate(65 << 20)  # sparse: no disk written
    return "text/tokenizer.json", "limit of an architecture file"


def _data_config_key(model: Path) -> tuple[str, str]:
    edit_json(model / "image" / "data_config.json", lambda d: d.update(sharpen=True))
    return "image/data_config.json", "unknown config key sharpen"


ENCODER_VARIANTS = {
    "text: 100000 layers": _arch("text/config.json", "num_hidden_layers", 100000),
    "text: width not divisible by heads": _arch("text/config.json", "num_attention_heads", 3),
    "text: an unknown activation": _arch("text/config.json", "hidden_act", "sparkle"),
    "text: a decoder": _arch("text/config.json", "is_decoder", True),
    "text: fewer positions than max_length": _arch("text/config.json", "max_position_embeddings", 8),
    "text: a vocabulary smaller than the tokenizer's": _arch("text/config.json", "vocab_size", 10, "vocab_size",
                                                             "text"),
    "text: an int dtype": _arch("text/config.json", "dtype", "int32"),
    "text: a huge BERT within bounds": _huge_in_bounds,
    "text: a 65 MiB tokenizer": _oversized_tokenizer,
    "audio: a conv kernel longer than any clip": _arch("audio/config.json", "conv_kernel", [8192, 8, 4, 4, 2],
                                                       "conv_kernel"),
    "audio: conv lists of different lengths": _arch("audio/config.json", "conv_stride", [5, 4], "conv_kernel"),
    "audio: a norm that does not exist": _arch("audio/config.json", "feat_extract_norm", "batch"),
    "audio: another model type": _arch("audio/config.json", "model_type", "hubert"),
    "image: input_size 10^5": _arch("image/data_config.json", "input_size", [3, 100000, 100000], "input_size"),
    "image: a crop of 1 %": _arch("image/data_config.json", "crop_pct", 0.01),
    "image: an unknown interpolation": _arch("image/data_config.json", "interpolation", "sinc"),
    "image: two means": _arch("image/data_config.json", "mean", [0.5, 0.5]),
    "image: an unknown key": _data_config_key,
}


class TestEncoderFiles:
    @pytest.mark.parametrize("variant", list(ENCODER_VARIANTS))
    def test_refused_naming_the_field(self, variant: str, copy_model: Path, image: Path, fault_data: dict,
                                      capsys) -> None:
        check_cli_refuses(copy_model, ENCODER_VARIANTS[variant], image, fault_data["shards"], capsys)


# ---------------------------------------------------------------------------------------------------------------
# model.safetensors


def _weights(edit: Callable[[dict], str], field: str | None = None) -> Tamper:
    def tamper(model: Path) -> tuple[str, str]:
        state = load_file(str(model / "model.safetensors"))
        name = edit(state)
        save_file(state, str(model / "model.safetensors"), metadata={"format": "moefuse", "version": "1"})
        return "model.safetensors", field or name
    return tamper


def _float_as_int(state: dict) -> str:
    name = "fusion_token"
    state[name] = state[name].to(torch.int32)
    return name


def _transposed(state: dict) -> str:
    name = next(k for k, v in state.items() if v.dim() == 2 and v.shape[0] != v.shape[1])
    state[name] = state[name].t().contiguous()
    return name


def _extra(state: dict) -> str:
    state["backdoor.weight"] = torch.zeros(4, 4)
    return "backdoor.weight"


def _dropped(state: dict) -> str:
    name = next(k for k in state if k.startswith("heads.digit") and k.endswith("weight"))
    del state[name]
    return name


def _bool_mask(state: dict) -> str:
    name = next(k for k in state if k.startswith("fusion.") and state[k].is_floating_point())
    state[name] = state[name] > 0
    return name


def _truncated(model: Path) -> tuple[str, str]:
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "model.safetensors", "truncated"


def _newer_version(model: Path) -> tuple[str, str]:
    state = load_file(str(model / "model.safetensors"))
    save_file(state, str(model / "model.safetensors"), metadata={"format": "moefuse", "version": "7"})
    return "model.safetensors", "version"


WEIGHT_VARIANTS = {
    "a float weight stored as int32": _weights(_float_as_int),
    "a float weight stored as bool": _weights(_bool_mask),
    "a weight transposed": _weights(_transposed),
    "an extra tensor": _weights(_extra),
    "a tensor dropped": _weights(_dropped),
    "truncated": _truncated,
    "a newer format": _newer_version,
}


class TestWeights:
    @pytest.mark.parametrize("variant", list(WEIGHT_VARIANTS))
    def test_refused_naming_the_tensor(self, variant: str, copy_model: Path, image: Path, fault_data: dict,
                                       capsys) -> None:
        check_cli_refuses(copy_model, WEIGHT_VARIANTS[variant], image, fault_data["shards"], capsys)

    def test_half_precision_weights_load(self, copy_model: Path) -> None:
        """float16 for float32 is the same kind: loaded (and converted), not refused."""
        state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(
            str(copy_model / "model.safetensors")).items()}
        save_file(state, str(copy_model / "model.safetensors"), metadata={"format": "moefuse", "version": "1"})
        model = MultimodalMoEModel.from_pretrained(copy_model)
        assert model.fusion_token.dtype == torch.float32

    def test_header_is_checked_before_any_weight_is_read(self, copy_model: Path, monkeypatch) -> None:
        """A folder refused by its header never reaches the weights' loader."""
        import moefuse.pretrained.folder as folder

        _weights(_float_as_int)(copy_model)
        monkeypatch.setattr(folder, "load_file", lambda *a, **k: pytest.fail("weights read before the check"))
        with pytest.raises(ConfigError, match="fusion_token is stored as int32"):
            MultimodalMoEModel.from_pretrained(copy_model)


# ---------------------------------------------------------------------------------------------------------------
# the server's start-up, and a subprocess per command (the real exit code and stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE_VARIANTS = {"image_fit": EXPORT_VARIANTS["image_fit not an allowed value"],
                  "text layers": ENCODER_VARIANTS["text: 100000 layers"],
                  "int weights": WEIGHT_VARIANTS["a float weight stored as int32"]}


class TestServeStartup:
    @pytest.mark.parametrize("variant", list(SERVE_VARIANTS))
    def test_refuses_to_start(self, variant: str, copy_model: Path) -> None:
        """`moefuse serve` loads the folder before it listens: a tampered one is one error line and exit code 2,
        and nothing is listening on the port (run_cli's timeout kills a server that started anyway)."""
        file, field = SERVE_VARIANTS[variant](copy_model)
        port = free_port()
        done = run_cli("serve", "--checkpoint", str(copy_model), "--host", "127.0.0.1", "--port", str(port),
                       timeout=180)
        assert_refused(done.returncode, done.stderr, "moefuse serve", copy_model / file, field)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0

    def test_predict_in_a_process(self, copy_model: Path, image: Path) -> None:
        file, field = EXPORT_VARIANTS["image_size huge"](copy_model)
        done = run_cli("predict", "--checkpoint", str(copy_model), "--task", "digit", "--image", str(image))
        assert_refused(done.returncode, done.stderr, "moefuse predict", copy_model / file, field)
        assert not done.stdout


class TestHubIds:
    def test_a_hub_id_offline_is_one_line(self, image: Path) -> None:
        """Offline (tests/conftest.py sets HF_HUB_OFFLINE=1) a Hub id that is not in the cache is refused with
        a line that says so; the Hub is never asked."""
        assert os.environ.get("HF_HUB_OFFLINE") == "1"
        done = run_cli("predict", "--checkpoint", "moefuse-tests/no-such-model", "--task", "digit", "--image",
                       str(image))
        assert_refused(done.returncode, done.stderr, "moefuse predict", Path("moefuse-tests/no-such-model"),
                       "HF_HUB_OFFLINE")

    @pytest.mark.parametrize("name, message", [
        ("moefuse-tests/no-such-model", "not in the Hub cache"),
        ("runs/typo/model", "is not a folder, nor a Hub repository id"),
        ("../model", "is not a folder, nor a Hub repository id"),
    ])
    def test_from_pretrained_names_what_it_could_not_find(self, name: str, message: str) -> None:
        with pytest.raises(ConfigError, match=message) as e:
            MultimodalMoEModel.from_pretrained(name)
        assert name in str(e.value)


def test_the_header_names_every_tensor_of_the_export(fault_run: Path) -> None:
    """The header check reads what the loader would load: every tensor of an export, float, of the model's shape."""
    from moefuse.pretrained.folder import read_weights_header

    header = read_weights_header(fault_run / "model" / "model.safetensors")
    with safe_open(str(fault_run / "model" / "model.safetensors"), framework="pt") as f:
        assert set(header) == set(f.keys())
    model = MultimodalMoEModel.from_pretrained(fault_run / "model")
    assert {k: (list(v.shape), v.dtype) for k, v in model.state_dict().items()} == header
