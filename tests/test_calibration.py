"""Confidence: temperature scaling (fit, applied by the heads, stored in the export), selective prediction
(risk-coverage, AURC, error-detection AUROC against hand-computed values) and their place in evaluate and
predict, through the CLI."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_overrides
from safetensors.torch import load_file, save_file

from moefuse.cli import main as cli
from moefuse.evaluation.metrics import error_detection_auroc, expected_calibration_error, risk_coverage
from moefuse.evaluation.report import evaluate
from moefuse.fusion.calibration import (
    MIN_TEMPERATURE,
    fit_problem,
    fit_temperature,
    fit_vote_weights,
    mixture_nll,
    temperature_nll,
)
from moefuse.fusion.heads import HeadsConfig, VotingHeads
from moefuse.fusion.model import MultimodalMoEModel


def train_cli(shards: Path, out: Path, *extra: str) -> int:
    return cli(["train", str(TINY), *run_overrides(shards, out, *extra)])


def overconfident(n: int = 2000, classes: int = 5, sharpen: float = 4.0, seed: int = 0):
    """Samples whose true class is drawn from softmax(z), reported with probabilities softmax(sharpen * z):
    calibrated at T = sharpen, over-confident at T = 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g)
    targets = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    return (sharpen * z).softmax(-1), targets


def test_temperature_scaling_lowers_the_nll_of_a_miscalibrated_batch() -> None:
    probs, targets = overconfident()
    t = fit_temperature(probs, targets)
    assert 3.0 < t < 5.5  # the sharpening it undoes is 4
    assert temperature_nll(probs, targets, t) < temperature_nll(probs, targets, 1.0) - 0.1
    for other in (t * 0.8, t * 1.25):  # it is the minimum, not just better than 1
        assert temperature_nll(probs, targets, t) <= temperature_nll(probs, targets, other)
    scaled = (probs.log() / t).softmax(-1)
    correct = (probs.argmax(-1) == targets).tolist()
    assert torch.equal(scaled.argmax(-1), probs.argmax(-1))  # the answers never change
    assert expected_calibration_error(scaled.max(-1).values.tolist(), correct) < \
        expected_calibration_error(probs.max(-1).values.tolist(), correct) / 2


def test_an_underconfident_batch_is_sharpened_and_no_target_leaves_t_at_1() -> None:
    probs, targets = overconfident(sharpen=0.5, seed=1)
    assert fit_temperature(probs, targets) < 0.8
    assert fit_temperature(probs, torch.full_like(targets, -100)) == 1.0


def test_vote_weights_fit_on_held_out_data_trust_the_better_voter() -> None:
    """Three voters: one right 90 % of the time, one 60 %, one guessing; the fitted weights rank them so, and the
    weighted vote has a lower NLL than the soft vote (uniform weights) on the same data."""
    g = torch.Generator().manual_seed(0)
    n, c = 1000, 4
    targets = torch.randint(0, c, (n,), generator=g)
    voters = []
    for accuracy in (0.9, 0.6, 0.25):
        right = torch.rand(n, generator=g) < accuracy
        said = torch.where(right, targets, torch.randint(0, c, (n,), generator=g))
        voters.append(torch.full((n, c), 0.1).scatter(1, said[:, None], 0.7))  # 0.7 on the voter's answer
    probs = torch.stack(voters, dim=1)  # [N, K, C]
    v = fit_vote_weights(probs, targets)
    w = v.softmax(0).tolist()
    assert w[0] > w[1] > w[2]
    assert mixture_nll(probs, targets, v) < mixture_nll(probs, targets, torch.zeros(3)) - 0.05
    assert torch.equal(fit_vote_weights(probs, torch.full_like(targets, -100)), torch.zeros(3))


def test_heads_apply_their_temperature_and_t_1_is_exact() -> None:
    torch.manual_seed(0)
    heads = VotingHeads(8, 4, HeadsConfig(num_heads=3)).eval()
    x, rows = torch.randn(6, 8), torch.arange(6)
    plain = heads(x, rows)
    assert torch.equal(plain.probs, plain.uncalibrated)
    heads.temperature.fill_(2.0)
    hot = heads(x, rows)
    torch.testing.assert_close(hot.probs, (plain.uncalibrated.log() / 2.0).softmax(-1))
    assert torch.equal(hot.prediction, plain.prediction) and torch.equal(hot.agreement, plain.agreement)
    assert (hot.probs.max(-1).values < plain.probs.max(-1).values).all()


def test_risk_coverage_and_aurc_against_a_hand_computed_example() -> None:
    # confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong): risks at coverage 1/4..4/4 = 0, 1/2, 1/3, 1/2
    curve = risk_coverage([0.7, 0.9, 0.6, 0.8], [True, True, False, False])
    assert curve["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["risk"] == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    assert curve["aurc"] == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    # tied confidences are answered together: the pair (one right, one wrong) enters at once, risk 1/2 for both
    tied = risk_coverage([0.9, 0.5, 0.5], [True, True, False])
    assert tied["coverage"] == pytest.approx([1 / 3, 1.0]) and tied["aurc"] == pytest.approx((0 + 2 * (1 / 3)) / 3)


def test_error_detection_auroc_against_a_hand_computed_example() -> None:
    # doubt scores of the wrong answers: 0.9, 0.4; of the right ones: 0.5, 0.1, 0.0. Pairs (wrong > right): 0.9
    # beats all 3, 0.4 beats 2 of 3 -> AUROC = 5/6
    wrong = [True, False, True, False, False]
    assert error_detection_auroc([0.9, 0.5, 0.4, 0.1, 0.0], wrong) == pytest.approx(5 / 6)
    assert error_detection_auroc([0.3, 0.2], [False, False]) is None


def test_training_calibrates_and_the_export_round_trips_the_temperature(fault_run: Path, copy_model: Path) -> None:
    info = json.loads((fault_run / "model" / "export.json").read_text())
    temperatures = {task: c["temperature"] for task, c in info["calibration"].items()}
    assert temperatures and all(t != 1.0 for t in temperatures.values())
    for task, c in info["calibration"].items():
        assert c["nll_after"] <= c["nll_before"] + 1e-9, task
    model = MultimodalMoEModel.from_pretrained(fault_run / "model")
    assert {t: float(model.heads[t].temperature) for t in temperatures} == pytest.approx(temperatures)
    # an export written before calibration existed (no temperature in its weights) loads with T = 1
    weights = copy_model / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.endswith(".temperature")}
    save_file(state, str(weights), metadata={"format": "moefuse", "version": "1"})
    old = MultimodalMoEModel.from_pretrained(copy_model)
    assert all(float(old.heads[t].temperature) == 1.0 for t in temperatures)


def test_evaluate_reports_confidence_before_and_after_with_plots(fault_run: Path, fault_data: dict,
                                                                 tmp_path: Path) -> None:
    report = evaluate(fault_run / "model", [str(fault_data["shards"])], progress=False, plots=tmp_path / "plots")
    loaded = MultimodalMoEModel.from_pretrained(fault_run / "model")
    for task, d in report["tasks"].items():
        assert d["temperature"] == pytest.approx(float(loaded.heads[task].temperature))
        assert {"ece", "ece_uncalibrated", "selective", "reliability"} <= set(d)
        sel = d["selective"]
        assert sel["coverage"][-1] == 1.0 and sel["risk"][-1] == pytest.approx(1 - d["accuracy"])
        assert sum(c["samples"] for c in d["reliability"]["calibrated"]) == d["samples"]
        png = Path(report["confidence_plots"][task])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_min_confidence_marks_abstentions(fault_run: Path, fault_data: dict, tmp_path: Path,
                                                  capsys) -> None:
    rows = [json.loads(line) for line in fault_data["manifest"].read_text().splitlines()][:12]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({**r, "image": str(fault_data["manifest"].parent / r["image"])
                                            if r.get("image") else None,
                                            "audio": str(fault_data["manifest"].parent / r["audio"])
                                            if r.get("audio") else None}) + "\n" for r in rows))
    out = tmp_path / "p.jsonl"
    assert cli(["predict", "--checkpoint", str(fault_run / "model"), "--manifest", str(manifest), "--out", str(out),
                "--min-confidence", "0.3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 12
    for line in lines:
        assert line["abstain"] == (line["probability"] < 0.3) and "prediction" in line
    assert not math.isnan(sum(line["probability"] for line in lines))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "most"])
def test_predict_min_confidence_must_be_a_probability(fault_run: Path, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli(["predict", "--checkpoint", str(fault_run / "model"), "--text", "x", "--min-confidence", value])
    assert e.value.code == 2
    assert "--min-confidence" in capsys.readouterr().err


def test_fit_problem_names_too_few_samples_and_a_set_without_errors() -> None:
    probs, targets = overconfident(n=60)
    assert fit_problem(probs, targets, 50) is None
    assert "only 49 validation samples, fewer than the 50" in fit_problem(probs[:49], targets[:49], 50)
    unlabelled = targets.clone()
    unlabelled[:20] = -1  # samples without a target do not count
    assert "only 40 validation samples" in fit_problem(probs, unlabelled, 50)
    right = probs.argmax(-1)
    assert "all 60 validation answers are right" in fit_problem(probs, right, 50)
    assert fit_temperature(probs, right) == pytest.approx(MIN_TEMPERATURE, rel=1e-2)  # what it would have fit


def test_training_on_a_tiny_validation_split_succeeds_uncalibrated(fault_data: dict, tmp_path: Path) -> None:
    """5 and 6 validation samples with a target (avqa, digit; the default minimum is 50): training succeeds, each
    task is named with its count in a warning, keeps T = 1, and export.json and the model card say why."""
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as caught:
        assert train_cli(fault_data["shards"], out, "heads.calibration_min_samples=50") == 0
    said = [str(w.message) for w in caught]
    for task, n in (("avqa", 5), ("digit", 6)):
        assert any(f"task {task!r} is not calibrated" in m and f"only {n} validation samples" in m for m in said)
    calibration = json.loads((out / "model" / "export.json").read_text())["calibration"]
    assert {t: (c["temperature"], c["samples"]) for t, c in calibration.items()} == {"avqa": (1.0, 5),
                                                                                     "digit": (1.0, 6)}
    assert all("fewer than the 50" in c["skipped"] for c in calibration.values())
    card = (out / "model" / "README.md").read_text()
    assert "- digit: not calibrated (temperature 1, vote weights as trained): only 6 validation samples" in card
    model = MultimodalMoEModel.from_pretrained(out / "model")
    assert all(float(model.heads[t].temperature) == 1.0 for t in calibration)


@pytest.mark.parametrize(("minimum", "skipped"), [(5, set()), (6, {"avqa"}), (7, {"avqa", "digit"})])
def test_the_minimum_is_per_task_and_inclusive(copy_run: Path, minimum: int, skipped: set[str]) -> None:
    """`moefuse export` recalibrates with the run's own heads.calibration_min_samples; avqa has 5 validation
    samples with a target, digit 6: each task is fit or skipped on its own count."""
    config = copy_run / "config.yaml"
    config.write_text(config.read_text().replace("calibration_min_samples: 5", f"calibration_min_samples: {minimum}"))
    assert f"calibration_min_samples: {minimum}" in config.read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli(["export", str(copy_run)]) == 0
    warned = {t for t in ("avqa", "digit") if any(f"task {t!r} is not calibrated" in str(w.message) for w in caught)}
    calibration = json.loads((copy_run / "model" / "export.json").read_text())["calibration"]
    assert warned == skipped == {t for t, c in calibration.items() if "skipped" in c}
    assert {t for t, c in calibration.items() if c["temperature"] == 1.0} == skipped
