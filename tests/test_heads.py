"""Voting heads: soft, weighted and majority combination; agreement; per-head losses."""

from __future__ import annotations

import torch

from moefuse.fusion.heads import HeadsConfig, VotingHeads


def test_soft_vote_is_mean_probability() -> None:
    heads = VotingHeads(8, 4, HeadsConfig(num_heads=3, combine="soft"))
    logits = torch.randn(5, 3, 4)
    probs, pred, votes = heads.combine(logits)
    torch.testing.assert_close(probs, logits.softmax(-1).mean(1))
    assert pred.tolist() == probs.argmax(-1).tolist()
    assert votes.shape == (5, 3)


def test_majority_vote_and_tie_break() -> None:
    heads = VotingHeads(8, 3, HeadsConfig(num_heads=3, combine="majority"))
    # two heads barely prefer class 1, one head is very sure of class 0: majority says 1, soft would say 0
    logits = torch.tensor([[[0.0, 0.1, -5], [0.0, 0.1, -5], [9.0, 0.0, -5]]])
    _, pred, _ = heads.combine(logits)
    assert pred.item() == 1
    # a three-way tie (each head votes differently) is broken by the soft score
    tie = torch.tensor([[[3.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    _, pred, _ = heads.combine(tie)
    assert pred.item() == 0


def test_weighted_vote_learns_to_trust_the_good_head() -> None:
    torch.manual_seed(0)
    heads = VotingHeads(4, 2, HeadsConfig(num_heads=2, combine="weighted", hidden=0, dropout=0.0))
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    with torch.no_grad():  # head 0 is right, head 1 is confidently wrong; freeze the heads, learn the weights
        heads.heads[0][1].weight.copy_(torch.tensor([[-5.0, 0, 0, 0], [5.0, 0, 0, 0]]))
        heads.heads[1][1].weight.copy_(torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]]))
    opt = torch.optim.SGD([heads.vote_logits], lr=1.0)
    for _ in range(50):
        out = heads(x, torch.arange(64), y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    w = heads.vote_logits.softmax(0)
    assert w[0] > 0.9
    assert (out.prediction == y).float().mean() > 0.95


def test_agreement_and_per_head_loss() -> None:
    heads = VotingHeads(8, 4, HeadsConfig(num_heads=3))
    x = torch.randn(6, 8)
    y = torch.tensor([0, 1, 2, 3, -100, 1])
    out = heads(x, torch.tensor([0, 2, 4]), y)
    assert out.logits.shape == (3, 3, 4) and out.agreement.shape == (3,)
    assert ((out.agreement * 3).round() == out.agreement * 3).all()  # multiples of 1/3
    # loss: sum over heads of each head's mean CE over the valid rows (row 4 has the ignore label)
    valid = torch.tensor([0, 1])  # positions of batch rows 0 and 2 among the task's rows [0, 2, 4]
    expected = sum(torch.nn.functional.cross_entropy(out.logits[valid, k], y[[0, 2]]) for k in range(3))
    torch.testing.assert_close(out.loss, expected)
