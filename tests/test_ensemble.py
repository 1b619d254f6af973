"""Ensembles of whole models (issue #25): the combination rules against hand-computed values, the gate handing a
sample to the specialist where the generalist's modality is missing, cross-fitting's bookkeeping, shared encoders
run once, and the ensemble folder through `moefuse ensemble`, `from_pretrained`, `evaluate` and `predict`."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from conftest import TINY, run_cli, run_overrides

from moefuse.configutil import ConfigError
from moefuse.fusion.ensemble_combine import (
    MemberAnswers,
    TaskCombiner,
    combine,
    cross_fit,
    fit_combiner,
    fold_of,
    gate_feature_names,
)

# ---------------------------------------------------------------------------------------------------------------
# the rules' arithmetic: two fixed fake members, 3 classes, modalities (image, audio)

A0, B0 = [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]  # sample 0: both answer
A1, B1 = [0.3, 0.3, 0.4], [0.1, 0.7, 0.2]  # sample 1: member A abstains (it has none of its modalities)


def fake_members() -> MemberAnswers:
    return MemberAnswers(probs=torch.tensor([[A0, B0], [A1, B1]]), answers=torch.tensor([[True, True], [False, True]]),
                         present=torch.tensor([[True, True], [False, True]]))


def test_soft_is_the_mean_of_the_answering_members() -> None:
    out = combine(TaskCombiner(rule="soft"), fake_members())
    assert torch.allclose(out.probs[0], torch.tensor([0.4, 0.25, 0.35]))
    assert torch.allclose(out.probs[1], torch.tensor(B1))  # A abstains: B alone
    assert out.prediction.tolist() == [0, 1]
    assert out.member_weights.tolist() == [[0.5, 0.5], [0.0, 1.0]]


def test_temperature_scales_the_combined_probabilities() -> None:
    out = combine(TaskCombiner(rule="soft", temperature=2.0), fake_members())
    raw = [0.4, 0.25, 0.35]
    z = sum(p ** 0.5 for p in raw)
    assert torch.allclose(out.probs[0], torch.tensor([p ** 0.5 / z for p in raw]), atol=1e-6)
    assert torch.allclose(out.uncalibrated[0], torch.tensor(raw))


def test_weighted_is_a_log_linear_pool_renormalised_over_the_answering_members() -> None:
    out = combine(TaskCombiner(rule="weighted", weights=[0.75, 0.25]), fake_members())
    pooled = [a ** 0.75 * b ** 0.25 for a, b in zip(A0, B0)]
    assert torch.allclose(out.probs[0], torch.tensor([p / sum(pooled) for p in pooled]), atol=1e-6)
    assert torch.allclose(out.probs[1], torch.tensor(B1), atol=1e-6)  # A's weight goes to B
    assert out.member_weights[1].tolist() == [0.0, 1.0]


def test_gated_mixes_by_the_gate_softmax_over_the_answering_members() -> None:
    names = gate_feature_names(["image", "audio"], ["a", "b"])
    assert names == ["has:image", "has:audio", "conf:a", "entropy:a", "answers:a", "conf:b", "entropy:b", "answers:b"]
    coef = [[0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    gate = TaskCombiner(rule="gated", gate_features=names, gate_coef=coef, gate_intercept=[0.0, 0.5])
    out = combine(gate, fake_members())
    za, zb = 2.0 * 0.6, 1.0 + 0.5  # a: 2 x its confidence; b: has:audio + its intercept
    ga = math.exp(za) / (math.exp(za) + math.exp(zb))
    expected = [ga * a + (1 - ga) * b for a, b in zip(A0, B0)]
    assert torch.allclose(out.probs[0], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(out.member_weights[0], torch.tensor([ga, 1 - ga]), atol=1e-6)
    assert torch.allclose(out.probs[1], torch.tensor(B1), atol=1e-6)  # a abstains: the gate has b alone


def test_majority_votes_and_breaks_ties_by_the_soft_probabilities() -> None:
    c = [0.1, 0.2, 0.7]
    x = MemberAnswers(torch.tensor([[A0, B0, c], [A0, B0, c]]),
                      torch.tensor([[True, True, True], [True, True, False]]), torch.ones(2, 1, dtype=torch.bool))
    out = combine(TaskCombiner(rule="majority"), x)
    # sample 0: votes 0, 2, 2 -> 2; sample 1: votes 0, 2 tie -> the soft mean [0.4, 0.25, 0.35] picks 0
    assert out.prediction.tolist() == [2, 0]


def test_fitted_weights_favour_the_member_that_is_right() -> None:
    torch.manual_seed(0)
    n, y = 200, torch.randint(0, 3, (200,))
    good = torch.nn.functional.one_hot(y, 3).float() * 0.7 + 0.1  # right, 0.8 on the target
    noise = torch.rand(n, 3).softmax(-1)
    x = MemberAnswers(torch.stack([good, noise], 1), torch.ones(n, 2, dtype=torch.bool), torch.ones(n, 1).bool())
    c = fit_combiner("weighted", x, y, [])
    assert c.weights[0] > 0.9 and abs(sum(c.weights) - 1) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# the gate hands the sample to the specialist where the generalist's modality is missing


def specialist_data(n: int, seed: int) -> tuple[MemberAnswers, torch.Tensor]:
    """Member 0, a generalist (image + audio), is right and sure with audio and confidently wrong without it;
    member 1, an image specialist, is right 80 % of the time whatever the audio."""
    g = torch.Generator().manual_seed(seed)
    c = 5
    y = torch.randint(0, c, (n,), generator=g)
    audio = torch.rand(n, generator=g) < 0.5
    wrong = (y + torch.randint(1, c, (n,), generator=g)) % c

    def peaked(index: torch.Tensor, p: float) -> torch.Tensor:
        return torch.nn.functional.one_hot(index, c).float() * (p - (1 - p) / (c - 1)) + (1 - p) / (c - 1)

    generalist = torch.where(audio[:, None], peaked(y, 0.9), peaked(wrong, 0.6))
    right = torch.rand(n, generator=g) < 0.8
    specialist = peaked(torch.where(right, y, wrong), 0.6)
    x = MemberAnswers(torch.stack([generalist, specialist], 1), torch.ones(n, 2, dtype=torch.bool),
                      torch.stack([torch.ones(n, dtype=torch.bool), audio], 1))
    return x, y


def test_the_gate_picks_the_specialist_when_the_generalists_modality_is_absent() -> None:
    x, y = specialist_data(600, seed=0)
    gate = fit_combiner("gated", x, y, gate_feature_names(["image", "audio"], ["generalist", "image-only"]))
    test, ty = specialist_data(400, seed=1)
    out = combine(gate, test)
    audio = test.present[:, 1]
    # no audio: the specialist has most of the weight (its expected responsibility, 0.8 x 0.6 / 0.7 + 0.2 x 0.5, is
    # 0.79) and its answer is the ensemble's; audio: the generalist (0.8 x 0.9 / 1.5 + 0.2 x 0.9 / 1.0 = 0.66)
    assert float(out.member_weights[~audio, 1].min()) > 0.7 and float(out.member_weights[audio, 0].min()) > 0.6
    assert torch.equal(out.prediction[~audio], test.probs[~audio, 1].argmax(-1))
    assert torch.equal(out.prediction[audio], test.probs[audio, 0].argmax(-1))
    gated = (out.prediction == ty).float()
    soft = (combine(TaskCombiner(rule="soft"), test).prediction == ty).float()
    specialist = (test.probs[:, 1].argmax(-1) == ty).float()
    assert gated[~audio].mean() >= specialist[~audio].mean() - 1e-6
    assert gated.mean() > soft.mean() + 0.05


# ---------------------------------------------------------------------------------------------------------------
# cross-fitting


def test_cross_fitting_never_scores_a_sample_with_a_combiner_fit_on_it() -> None:
    g = torch.Generator().manual_seed(2)
    x = MemberAnswers(torch.rand(120, 2, 4, generator=g).softmax(-1), torch.ones(120, 2, dtype=torch.bool),
                      torch.ones(120, 1, dtype=torch.bool))  # every row's probabilities its own
    y = torch.randint(0, 4, (120,), generator=g)
    ids = [f"s-{i}" for i in range(120)]
    seen: list[set[int]] = []

    def spy(rows: MemberAnswers, targets: torch.Tensor) -> TaskCombiner:
        # which rows the fit sees, found by their probabilities
        seen.append({next(i for i in range(120) if torch.equal(x.probs[i], p)) for p in rows.probs})
        return fit_combiner("weighted", rows, targets, [])

    result = cross_fit(ids, x, y, 5, spy)
    assert result.fold == [fold_of(i, 5) for i in ids]
    scored_all: list[int] = []
    for f in range(5):
        fit_rows, scored = set(result.fit_rows[f]), set(result.scored_rows[f])
        assert seen[f] == fit_rows and not (fit_rows & scored)
        assert scored == {i for i in range(120) if result.fold[i] == f} and fit_rows | scored == set(range(120))
        scored_all += result.scored_rows[f]
        index = torch.tensor(sorted(scored))
        again = combine(result.combiners[f], x.rows(index))
        assert torch.allclose(result.combined.probs[index], again.probs)
    assert sorted(scored_all) == list(range(120))  # every sample scored exactly once
    assert len(set(result.fold)) == 5
    # copies of a sample (the same id, e.g. with a modality removed) share its fold; rows outside the fit mask
    # (corrupted copies) are scored and never fit on
    seen.clear()
    twice = MemberAnswers(torch.cat([x.probs, x.probs.flip(-1)]), torch.cat([x.answers] * 2),
                          torch.cat([x.present] * 2))
    x = twice
    masked = cross_fit(ids * 2, twice, torch.cat([y, y]), 5, spy, fit_mask=[True] * 120 + [False] * 120)
    assert masked.fold[:120] == masked.fold[120:]
    for f in range(5):
        assert seen[f] == set(masked.fit_rows[f]) and all(i < 120 for i in masked.fit_rows[f])
        assert {i for i in masked.scored_rows[f] if i >= 120} == {i + 120 for i in result.scored_rows[f]}


def test_the_rules_are_scored_per_question_type() -> None:
    from moefuse.evaluation.ensemble import TaskAnswers, rule_scores

    n = 40
    said = [(3 * i) % 4 for i in range(n)]  # both members say this class, confidently
    targets = [(s if i % 3 else (s + 1) % 4) for i, s in enumerate(said)]  # every third sample answered wrong
    qtypes = [("sum", "same", "")[i % 3 if i % 5 else 1] for i in range(n)]
    probs = torch.full((n, 2, 4), 0.1)
    probs[torch.arange(n), :, torch.tensor(said)] = 0.7
    a = TaskAnswers([f"s-{i}" for i in range(n)], MemberAnswers(probs, torch.ones(n, 2, dtype=torch.bool),
                                                                 torch.ones(n, 1, dtype=torch.bool)),
                    torch.tensor(targets), ["full"] * n, qtypes)
    score = rule_scores(a, "soft", 5, [])["full"]
    right = [s == t for s, t in zip(said, targets)]
    for q in ("sum", "same"):  # by hand: the share of that type's rows whose said class is the target
        rows = [i for i in range(n) if qtypes[i] == q]
        assert score.by_qtype[q] == pytest.approx(sum(right[i] for i in rows) / len(rows))
    assert set(score.by_qtype) == {"sum", "same"} and score.accuracy == pytest.approx(sum(right) / n)
    assert score.by_qtype["sum"] == 0.0 < score.by_qtype["same"] < 1.0  # sum: the rows i % 3 == 0 (wrong) alone


def test_the_fold_of_a_sample_depends_on_its_id_only() -> None:
    assert [fold_of(f"id-{i}", 5) for i in range(50)] == [fold_of(f"id-{i}", 5) for i in range(50)]
    assert fold_of("cat-001", 5) == fold_of("cat-001", 5) and 0 <= fold_of("x", 3) < 3


# ---------------------------------------------------------------------------------------------------------------
# real members: the fault-test run, a copy (identical encoders), an image-only specialist cut from it


def make_specialist(src: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    """The model of `src` with only the encoders of `keep` (its other weights as they are): a member that reads
    fewer modalities."""
    from moefuse.fusion.model import MultimodalMoEModel

    model = MultimodalMoEModel.from_pretrained(src)
    cfg = copy.deepcopy(model.cfg)
    for m in cfg.encoders.slots():
        if m not in keep:
            setattr(cfg.encoders, m, None)
    cut = MultimodalMoEModel.from_config(cfg, arch_dir=src)
    cut.load_state_dict({k: v for k, v in model.state_dict().items() if k in cut.state_dict()})
    cut.export_info = model.export_info
    cut.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def members(fault_run: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("members")
    same = Path(shutil.copytree(fault_run / "model", root / "same"))
    return {"run": fault_run / "model", "same": same,
            "image-only": make_specialist(fault_run / "model", root / "image-only", ("image",))}


@pytest.fixture(scope="module")
def ensemble_dir(members: dict[str, Path], fault_data: dict, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ens") / "ensemble"
    r = run_cli("ensemble", "--members", *map(str, members.values()), "--shards", str(fault_data["shards"]),
                "--out", str(out), "--combine", "gated", "--score-corrupt", "audio:noise:0", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    for rule in ("soft", "majority", "weighted", "gated *"):  # every rule beside the members and the best one
        assert f"ensemble {rule}" in r.stdout
    assert "best member" in r.stdout and "member image-only" in r.stdout
    for modality in ("text", "image", "audio"):  # fit and scored with each modality removed too, cross-fitted
        assert f"model (accuracy on val, {modality} removed)" in r.stdout
    return out


def test_the_ensemble_folder_holds_its_members_config_and_card(ensemble_dir: Path) -> None:
    from moefuse.fusion.ensemble_folder import read_ensemble_config

    cfg = read_ensemble_config(ensemble_dir)
    assert [m.name for m in cfg.members] == ["run", "same", "image-only"]
    assert all((ensemble_dir / m.folder / "model.safetensors").is_file() for m in cfg.members)
    assert cfg.combine == "gated" and set(cfg.combiners) == {"digit", "avqa"}
    assert cfg.figures["coverage:image-only"]["avqa"] < 1.0 or cfg.figures["coverage:image-only"]["digit"] < 1.0
    assert 0 < cfg.parameters_deduplicated < cfg.parameters  # the copy's encoders are counted once
    card = (ensemble_dir / "README.md").read_text()
    assert "member image-only" in card and "best member" in card and "## Cost" in card
    assert cfg.fit_drops == ["text", "image", "audio"] and "### With audio removed" in card
    assert cfg.scored_corruptions == ["audio:noise:0"] and "### Under audio:noise:0" in card
    assert set(cfg.figures["ensemble:gated @ audio:noise:0"]) == {"digit", "avqa"}
    # without the image, the image specialist answers nothing: its coverage is 0 and its accuracy n/a
    assert cfg.figures["coverage:image-only @ image removed"] == {"digit": 0.0, "avqa": 0.0}
    assert cfg.figures["member:image-only @ image removed"] == {"digit": None, "avqa": None}
    assert all(0 <= cfg.figures[f"ensemble:{r} @ audio removed"]["digit"] <= 1 for r in ("soft", "gated"))
    # avqa's question types (the demo's meta.qtype), cross-fitted under full inputs, on the card for its rule
    qtypes = {k.split(":")[2] for k in cfg.figures if k.startswith("qtype:gated:") and " @ " not in k}
    assert qtypes and qtypes <= {"written", "spoken", "sum", "same"} and "### By question type (`gated`" in card
    assert not any(k.startswith("qtype:") and " @ " in k for k in cfg.figures)


def test_members_sharing_encoder_weights_run_that_encoder_once(members: dict[str, Path], fault_data: dict) -> None:
    from moefuse.fusion.ensemble import build_ensemble_model
    from moefuse.fusion.model import MultimodalMoEModel
    from moefuse.inference.predict import load_media_sample

    run, same = (MultimodalMoEModel.from_pretrained(members[k]) for k in ("run", "same"))
    with torch.no_grad():
        next(same.encoders["image"].parameters()).add_(0.01)  # the image encoders now differ
    soft = {t: TaskCombiner(rule="soft") for t in run.task_names}
    ens = build_ensemble_model({"a": run, "b": same}, soft).eval()
    assert {s.modality for s in ens.shared} == {"text", "audio"}
    assert ens.members["a"].encoders["text"] is ens.members["b"].encoders["text"]
    calls = {m: 0 for m in ("text", "image", "audio")}
    modules = {(m, id(e)): e for member in ens.members.values() for m, e in member.encoders.items()}
    for (m, _), enc in modules.items():
        enc.register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    image = sorted((fault_data["root"] / "data" / "media" / "image").iterdir())[0]
    sample = load_media_sample(ens, "s1", "digit", text="a digit", image=image)
    samples = [sample, {**sample, "id": "s2"}]
    with torch.no_grad():
        out = ens(ens.collator()(samples))
    assert calls["text"] == 1  # shared: once for both members
    assert calls["image"] == 2 and calls["audio"] == 0  # different weights: once per member; no audio, no call
    single = run(run.collator()(samples))
    assert out.tasks["digit"].prediction.tolist() == single.tasks["digit"].prediction.tolist()


def test_members_with_other_vocabularies_are_refused_through_the_cli(members: dict[str, Path], fault_data: dict,
                                                                    tmp_path: Path) -> None:
    import yaml

    other = Path(shutil.copytree(members["run"], tmp_path / "other"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    task = next(t for t in cfg["tasks"] if t["name"] == "digit")
    task["labels"] = list(reversed(task["labels"]))
    (other / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    hub = json.loads((other / "config.json").read_text())
    hub["tasks"] = cfg["tasks"]
    (other / "config.json").write_text(json.dumps(hub))
    r = run_cli("ensemble", "--members", str(members["run"]), str(other), "--shards", str(fault_data["shards"]),
                "--out", str(tmp_path / "ens"), "--quiet")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("moefuse ensemble: error: member other: task digit: its vocabulary differs")
    assert not (tmp_path / "ens").exists()


def test_members_whose_raw_files_are_read_differently_are_refused_through_the_cli(members: dict[str, Path],
                                                                                 fault_data: dict,
                                                                                 tmp_path: Path) -> None:
    other = Path(shutil.copytree(members["run"], tmp_path / "other"))
    record = json.loads((other / "export.json").read_text())
    size = record["media"]["image_size"]
    record["media"]["image_size"] = size * 2
    (other / "export.json").write_text(json.dumps(record))
    r = run_cli("ensemble", "--members", str(members["run"]), str(other), "--shards", str(fault_data["shards"]),
                "--out", str(tmp_path / "ens"), "--quiet")
    [line] = r.stderr.strip().splitlines()
    assert r.returncode != 0 and line.startswith(
        f"moefuse ensemble: error: member other: media.image_size: {size * 2}, where member run has {size}")
    assert not (tmp_path / "ens").exists()


def test_out_is_never_a_member_nor_a_folder_that_holds_something(members: dict[str, Path], fault_data: dict,
                                                                tmp_path: Path) -> None:
    from moefuse.fusion.ensemble_folder import check_new_folder

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    r = run_cli("ensemble", "--members", str(members["run"]), str(members["same"]), "--shards",
                str(fault_data["shards"]), "--out", str(tmp_path / "full"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(tmp_path / "full") in r.stderr
    for out in (members["same"], members["same"] / "inside", tmp_path):
        with pytest.raises(ConfigError, match="member folder|not empty"):
            check_new_folder(out, [members["run"], members["same"]])
    check_new_folder(tmp_path / "new", [members["run"], members["same"]])
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and (members["same"] / "model.safetensors").exists()


def test_an_ensemble_folder_round_trips_through_from_pretrained(ensemble_dir: Path, fault_data: dict,
                                                                tmp_path: Path) -> None:
    from moefuse.datasets import make_loader
    from moefuse.fusion.ensemble import EnsembleModel
    from moefuse.fusion.model import MultimodalMoEModel

    ens = EnsembleModel.from_pretrained(ensemble_dir)
    again = EnsembleModel.from_pretrained(ens.save_pretrained(tmp_path / "copy"))
    assert again.cfg == ens.cfg
    batch = next(iter(make_loader([str(fault_data["shards"])], ens.collator(), 16, split="val",
                                  **ens.decode_options())))
    with torch.no_grad():
        a, b = ens(batch), again(batch)
    for task in a.tasks:
        assert torch.equal(a.tasks[task].prediction, b.tasks[task].prediction)
        assert torch.allclose(a.tasks[task].probs, b.tasks[task].probs, atol=1e-6)
        assert (a.tasks[task].head_predictions[:, 2] == -1).any() or a.answers[task].answers[:, 2].all()
    with pytest.raises(ConfigError, match="is an ensemble folder"):
        MultimodalMoEModel.from_pretrained(ensemble_dir)


def test_evaluate_and_predict_run_on_an_ensemble_folder(ensemble_dir: Path, fault_data: dict,
                                                        tmp_path: Path) -> None:
    report = tmp_path / "eval.json"
    r = run_cli("evaluate", "--checkpoint", str(ensemble_dir), "--shards", str(fault_data["shards"]), "--json",
                str(report), "--plots", str(tmp_path / "plots"), "--drop", "audio", "--corrupt", "image:noise:5",
                "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(report.read_text())
    assert set(result["members"]) == {"run", "same", "image-only"}
    assert result["tasks"]["digit"]["voters"] == ["run", "same", "image-only"]
    assert "member image-only" in r.stdout and (tmp_path / "plots" / "confidence-digit.png").is_file()
    out = tmp_path / "p.jsonl"
    r = run_cli("predict", "--checkpoint", str(ensemble_dir), "--manifest", str(fault_data["manifest"]), "--out",
                str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 120 and all(len(x["votes"]) == 3 for x in lines)
    audio_only = [x for x in lines if x["modalities"] == "audio"]
    assert audio_only and all(x["votes"][2] is None for x in audio_only)  # the image specialist abstains


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["combiners"]["digit"].update(temperature=100.0), "combiners.digit.temperature"),
    (lambda d: d["members"][0].update(folder="../elsewhere"), "folder"),
    (lambda d: d.update(combine="median"), "combine"),
    (lambda d: d["combiners"]["digit"].update(gate_intercept=[0.0]), "combiners.digit.gate_intercept"),
])
def test_a_damaged_ensemble_config_is_an_error_naming_the_file_and_field(ensemble_dir: Path, tmp_path: Path, edit,
                                                                         field: str) -> None:
    from moefuse.fusion.ensemble import EnsembleModel

    bad = Path(shutil.copytree(ensemble_dir, tmp_path / "bad"))
    data = json.loads((bad / "ensemble.json").read_text())
    edit(data)
    (bad / "ensemble.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        EnsembleModel.from_pretrained(bad)
    assert str(bad / "ensemble.json") in str(e.value) and field in str(e.value)


def test_a_damaged_ensemble_folder_is_a_one_line_error_of_the_commands(ensemble_dir: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(ensemble_dir, tmp_path / "bad"))
    data = json.loads((bad / "ensemble.json").read_text())
    data["combiners"]["digit"]["gate_coef"][0][0] = "x"
    (bad / "ensemble.json").write_text(json.dumps(data))
    r = run_cli("predict", "--checkpoint", str(bad), "--task", "digit", "--text", "seven")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("moefuse predict: error: ") and "ensemble.json" in line and "gate_coef" in line


def test_moefuse_serve_answers_with_an_ensemble_folder_as_predict_does(ensemble_dir: Path, fault_data: dict) -> None:
    from test_serve import post, start

    rows = [json.loads(line) for line in fault_data["manifest"].read_text().splitlines()]
    image = fault_data["manifest"].parent / next(r["image"] for r in rows if r.get("image"))
    proc, url = start(ensemble_dir)
    try:
        info = httpx.get(f"{url}/info", timeout=30).json()
        assert info["config"]["members"] == ["run", "same", "image-only"]
        assert set(info["temperature"]) == {"digit", "avqa"}
        answer = post(url, data={"task": "digit", "text": "seven"}, files={"image": image.open("rb")})
        assert answer.status_code == 200, answer.text
        alone = post(url, data={"task": "digit", "text": "seven"})  # the image specialist abstains without an image
        assert alone.status_code == 200 and alone.json()["votes"][2] is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    done = run_cli("predict", "--checkpoint", str(ensemble_dir), "--task", "digit", "--text", "seven", "--image",
                   str(image))
    expected = json.loads(done.stdout)
    got = answer.json()
    assert got["prediction"] == expected["prediction"] and got["votes"] == expected["votes"]
    assert got["probability"] == pytest.approx(expected["probability"], abs=1e-5)


def test_an_ensemble_teaches_a_student_through_moefuse_train(ensemble_dir: Path, fault_data: dict,
                                                              tmp_path: Path) -> None:
    """#25 item 3 on item 1's folder: `distill.teacher` takes an ensemble folder like any model folder."""
    out = tmp_path / "student"
    done = run_cli("train", str(TINY), *run_overrides(fault_data["shards"], out, f"distill.teacher={ensemble_dir}",
                                                     "data.val_shards=[]"), timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads((out / "model" / "export.json").read_text())["distillation"]
    assert info["teacher"] == str(ensemble_dir) and info["samples"] > 0 and info["missing_rows"] == 0


@pytest.mark.parametrize("quantize", ["int8", "bf16"])
def test_the_quantised_runtimes_agree_with_fp32_on_an_ensemble_with_shared_encoders(ensemble_dir: Path,
                                                                                   fault_data: dict,
                                                                                   quantize: str) -> None:
    """A shared encoder is one module: quantised once, whichever member reaches it first, and still shared."""
    from moefuse.datasets import make_loader
    from moefuse.fusion.loading import load_inference_model

    def probs(q: str) -> dict[str, torch.Tensor]:
        model = load_inference_model(ensemble_dir, quantize=q)
        assert model.shared and all(model.members[s.members[0]].encoders[s.modality]
                                    is model.members[n].encoders[s.modality] for s in model.shared for n in s.members)
        loader = make_loader([str(fault_data["shards"])], model.collator(), 16, split="val", tasks=model.task_names,
                             **model.decode_options())
        with torch.no_grad():
            out = model(next(iter(loader)))
        return {t: o.probs for t, o in out.tasks.items()}

    fp32, low = probs("none"), probs(quantize)
    for task, p in fp32.items():
        assert torch.allclose(low[task], p, atol=1e-2), (task, (low[task] - p).abs().max())
        assert torch.equal(low[task].argmax(-1), p.argmax(-1))


def test_the_ensemble_collators_corruptions_draw_anew_per_batch_and_replay_per_epoch(ensemble_dir: Path,
                                                                                    fault_data: dict,
                                                                                    monkeypatch) -> None:
    import types

    import moefuse.datasets.collate as collate
    from moefuse.datasets.corruption import Corruption
    from moefuse.fusion.loading import load_inference_model
    from moefuse.inference.predict import load_media_sample

    model = load_inference_model(ensemble_dir)
    plain = model.collator()
    rows = [json.loads(line) for line in fault_data["manifest"].read_text().splitlines()]
    images = [fault_data["manifest"].parent / r["image"] for r in rows if r.get("image")][:4]
    samples = [load_media_sample(model, f"s{i}", "digit", text="a digit", image=str(f)) for i, f in enumerate(images)]
    noisy = model.collator(corrupt=[Corruption.parse("image:noise:0")])

    def pixels(collator) -> torch.Tensor:
        return collator(samples)["members"]["run"]["inputs"]["image"]["pixel_values"]

    first, second = pixels(noisy), pixels(noisy)
    assert not torch.equal(first, pixels(plain)) and not torch.equal(first, second)  # fresh noise per batch
    noisy.set_epoch(0)
    assert torch.equal(pixels(noisy), first)  # an epoch replays its draws
    in_worker = {}
    for worker in (0, 1):  # each DataLoader worker's copy draws its own noise
        monkeypatch.setattr(collate, "get_worker_info", lambda w=worker: types.SimpleNamespace(id=w))
        in_worker[worker] = pixels(model.collator(corrupt=[Corruption.parse("image:noise:0")]))
    assert not torch.equal(in_worker[0], in_worker[1])


def test_the_temperature_is_fit_on_the_rows_marked_for_calibration_only() -> None:
    """The removed-modality copies train the gate but not the temperature (`MemberAnswers.calibrate`)."""
    g = torch.Generator().manual_seed(3)
    n = 400
    y = torch.randint(0, 4, (n,), generator=g)
    sure = torch.nn.functional.one_hot(y, 4).float() * 0.6 + 0.1  # right and fairly sure
    noise = torch.rand(n, 4, generator=g).softmax(-1)  # a copy that lost what the answer needs
    probs = torch.cat([sure, noise])[:, None, :]  # [2N, 1 member, C]
    ones = torch.ones(2 * n, 1, dtype=torch.bool)
    marked = MemberAnswers(probs, ones, ones, torch.arange(2 * n) < n)
    alone = MemberAnswers(probs[:n], ones[:n], ones[:n])
    targets = torch.cat([y, y])
    t_marked = fit_combiner("soft", marked, targets, []).temperature
    assert t_marked == pytest.approx(fit_combiner("soft", alone, y, []).temperature)
    assert t_marked != pytest.approx(fit_combiner("soft", MemberAnswers(probs, ones, ones), targets, []).temperature)
