"""Voters with different views of the fused sequence: per-modality voters abstain exactly where their modality is
absent and take no part in the vote there; online bagging draws are reproducible from the seed and differ between
voters; a model with such voters trains; bad view names are config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sample

from moefuse.configutil import ConfigError
from moefuse.fusion import EncodersConfig, FusionConfig, ModelConfig, TaskConfig, build_collator, build_model
from moefuse.fusion.heads import HeadsConfig, VotingHeads, poisson_bag_weights

DIGITS = [str(i) for i in range(10)]


def cfg(**heads) -> ModelConfig:
    return ModelConfig(fusion=FusionConfig(d_model=64, num_heads=2, d_expert=64, num_experts=4, pooling="mean"),
                       heads=HeadsConfig(num_heads=2, **heads), tasks=[TaskConfig("digit", "classification", DIGITS)])


def test_modality_voters_abstain_exactly_where_their_modality_is_absent(rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = build_model(cfg(views=["cls", "modalities"])).eval()
    assert model.voter_views == ["pooled", "pooled", "cls", "text", "image", "audio"]
    subsets = [dict(text="one", image=True, audio=True), dict(image=True), dict(audio=True), dict(text="two")]
    batch = build_collator(model)([make_sample(rng, f"s{i}", "digit", "1", **s) for i, s in enumerate(subsets)])
    out = model(batch).tasks["digit"]
    expected = torch.stack([torch.ones(4, dtype=torch.bool)] * 3 + [batch["present"][m] for m in model.modalities], 1)
    assert torch.equal(out.voted, expected)
    assert torch.equal(out.head_predictions == -1, ~expected)
    # the abstaining voters take no part: the vote and the agreement are those of the voting voters alone
    probs = out.logits.softmax(-1)
    for i in range(4):
        kept = expected[i]
        torch.testing.assert_close(out.uncalibrated[i], probs[i, kept].mean(0))
        agree = (probs[i, kept].argmax(-1) == out.prediction[i]).float().mean()
        torch.testing.assert_close(out.agreement[i], agree)


def test_an_abstaining_voter_gets_no_loss_and_weighted_votes_renormalise() -> None:
    torch.manual_seed(0)
    heads = VotingHeads(8, 3, HeadsConfig(num_heads=2, combine="weighted", hidden=0, dropout=0.0), num_voters=3)
    x, y = torch.randn(4, 3, 8, requires_grad=True), torch.tensor([0, 1, 2, 0])
    voted = torch.tensor([[True, True, False]] * 4)
    out = heads(x, torch.arange(4), y, voted)
    out.loss.backward()
    assert x.grad[:, 2].abs().sum() == 0  # the third voter never voted: its input gets no gradient
    torch.testing.assert_close(out.uncalibrated, out.logits[:, :2].softmax(-1).mean(1))  # equal weights of two


def test_bagging_draws_are_reproducible_from_the_seed_and_differ_between_voters() -> None:
    torch.manual_seed(3)
    a = poisson_bag_weights(500, 3)
    torch.manual_seed(3)
    b = poisson_bag_weights(500, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1]) and not torch.equal(a[:, 1], a[:, 2])
    assert abs(float(a.mean()) - 1.0) < 0.1 and float((a == 0).float().mean()) > 0.3  # Poisson(1): P(0) = 0.37


def test_bagging_changes_the_training_loss_only_in_training() -> None:
    torch.manual_seed(0)
    plain = VotingHeads(8, 4, HeadsConfig(num_heads=3))
    bagged = VotingHeads(8, 4, HeadsConfig(num_heads=3, bagging=True))
    bagged.load_state_dict(plain.state_dict())
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    plain.eval(), bagged.eval()
    torch.testing.assert_close(plain(x, torch.arange(32), y).loss, bagged(x, torch.arange(32), y).loss)
    plain.train(), bagged.train()
    torch.manual_seed(1)
    first = bagged(x, torch.arange(32), y).loss
    torch.manual_seed(1)
    assert torch.equal(first, bagged(x, torch.arange(32), y).loss)  # the same seed, the same draws
    torch.manual_seed(1)
    assert not torch.equal(first, plain(x, torch.arange(32), y).loss)


def test_a_model_with_view_voters_learns_a_fixed_batch(rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = build_model(cfg(views=["mean", "modalities"], bagging=True))
    samples = [make_sample(rng, f"s{i}", "digit", str(i % 10), image=bool(i % 2), audio=i % 3 != 0) for i in range(12)]
    batch = build_collator(model)(samples)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(batch).loss
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


@pytest.mark.parametrize("views, bad", [(["smell"], "smell"), (["audio"], "audio")])
def test_a_view_the_model_lacks_is_a_config_error(views: list[str], bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"^heads\.views: '{bad}' is not a view of this model"):
        ModelConfig(encoders=EncodersConfig(audio=None), heads=HeadsConfig(views=views),
                    tasks=[TaskConfig("digit", "classification", DIGITS)])


def test_a_voters_accuracy_counts_only_the_samples_it_voted_on() -> None:
    """An abstention is neither right nor wrong: head_accuracy is over the voted samples, head_coverage their share,
    and the best single head is the best voter that answers every sample."""
    from moefuse.evaluation.metrics import compute_metrics

    votes = [[True, True, None], [False, True, None], [True, False, True], [True, False, None]]  # 3 voters x 4
    records = [{"task": "digit", "target_index": 0, "prediction_index": 0, "probability": 0.9, "agreement": 1.0,
                "head_correct": v, "modalities": "image", "meta": {}} for v in votes]
    flat = compute_metrics(records, {"digit": ["0", "1"]}, {"digit": "classification"})["metrics"]
    assert flat["digit/head0_acc"] == 0.75 and flat["digit/head1_acc"] == 0.5 and flat["digit/head2_acc"] == 1.0
    assert flat["digit/best_head_acc"] == 0.75  # voter 2 voted on one sample: no stand-alone member
    records = [{**r, "head_correct": [c, None]} for r, (c, *_) in zip(records, votes)]
    flat = compute_metrics(records, {"digit": ["0", "1"]}, {"digit": "classification"})["metrics"]
    assert "digit/head1_acc" not in flat  # a voter that never voted has no accuracy


def test_voter_diversity_against_a_hand_computed_example() -> None:
    """Oracle, hard majority and pairwise disagreement of three voters (the third abstains on two samples) over four
    samples whose target is "a"."""
    from moefuse.evaluation.metrics import voter_diversity

    votes = [["a", "a", None],  # all voting voters right
             ["b", "a", None],  # a tie: the ensemble said "a", so the majority takes "a"
             ["b", "c", "b"],  # majority "b", wrong; no voter right
             ["c", "a", "b"]]  # a three-way tie without the ensemble's answer ("d"): the first voter's, "c"
    ensemble = ["a", "a", "b", "d"]
    records = [{"prediction": e, "head_predictions": v, "head_correct": [None if x is None else x == "a" for x in v]}
               for v, e in zip(votes, ensemble)]
    d = voter_diversity(records)
    assert d["oracle_accuracy"] == 0.75  # samples 1, 2, 4
    assert d["majority_accuracy"] == 0.5  # samples 1, 2
    # pairs (0,1): 3 of 4 differ; (0,2) and (1,2) share samples 3 and 4: 1 of 2 and 2 of 2 differ
    assert d["disagreement"] == pytest.approx((3 / 4 + 1 / 2 + 2 / 2) / 3)
    one = voter_diversity([{"prediction": "a", "head_predictions": ["a"], "head_correct": [True]}])
    assert one == {"oracle_accuracy": 1.0, "majority_accuracy": 1.0, "disagreement": None}


def test_weighted_votes_and_temperature_round_trip_through_the_export(tmp_path: Path) -> None:
    from moefuse.fusion.model import MultimodalMoEModel
    from moefuse.pretrained.folder import export_model

    model = build_model(cfg(views=["modalities"], combine="weighted"))
    for heads in model.heads.values():
        heads.vote_logits.data = torch.randn_like(heads.vote_logits)
        heads.temperature.fill_(1.7)
    loaded = MultimodalMoEModel.from_pretrained(export_model(model, tmp_path / "model"))
    for task, heads in model.heads.items():
        assert torch.equal(loaded.heads[task].vote_logits, heads.vote_logits)
        assert float(loaded.heads[task].temperature) == pytest.approx(1.7)
