"""Cross-checks of the evaluation metrics: the hand-written ECE against torchmetrics, and the scikit-learn based
macro-F1, per-class report and confusion matrix against a direct count (targets outside the vocabulary
included)."""

from __future__ import annotations

import random

import pytest
import torch

from moefuse.datasets.collate import IGNORE_INDEX
from moefuse.evaluation.metrics import confusion, expected_calibration_error, macro_f1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_torchmetrics(seed: int) -> None:
    tm = pytest.importorskip("torchmetrics.classification")
    gen = torch.Generator().manual_seed(seed)
    num_classes, n = 5, 400
    probs = torch.softmax(3 * torch.randn(n, num_classes, generator=gen), dim=-1)
    target = torch.randint(0, num_classes, (n,), generator=gen)
    target[: n // 2] = probs[: n // 2].argmax(-1)  # half of them right, so the bins differ in accuracy
    conf, pred = probs.max(-1)
    assert float(conf.max()) < 1.0  # torchmetrics gives a confidence of exactly 1 a bin of its own
    ours = expected_calibration_error(conf.tolist(), (pred == target).tolist(), bins=15)
    theirs = tm.MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1")(probs, target)
    assert ours == pytest.approx(float(theirs), abs=1e-5)
    assert ours > 0.01


def _counted(y_true: list[int], y_pred: list[int], num_classes: int) -> tuple[float, list[dict], list[list[int]]]:
    """Macro-F1, per-class report and confusion matrix by direct counting (the definitions metrics.py follows)."""
    report = []
    for c in range(num_classes):
        tp = sum(t == p == c for t, p in zip(y_true, y_pred))
        fp = sum(p == c != t for t, p in zip(y_true, y_pred))
        support = sum(t == c for t in y_true)
        if support == 0 and fp == 0:
            continue
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report.append({"class": c, "precision": precision, "recall": recall, "f1": f1, "support": support})
    matrix = [[sum(t == i and p == j for t, p in zip(y_true, y_pred)) for j in range(num_classes)]
              for i in range(num_classes)]
    return (sum(r["f1"] for r in report) / len(report) if report else 0.0), report, matrix


@pytest.mark.parametrize("seed", range(5))
def test_sklearn_metrics_match_direct_counts(seed: int) -> None:
    rng = random.Random(seed)
    num_classes = rng.randint(1, 9)
    n = rng.randint(1, 80)
    y_true = [rng.choice([IGNORE_INDEX, *range(num_classes)]) for _ in range(n)]
    y_pred = [rng.randrange(num_classes) for _ in range(n)]
    f1, report = macro_f1(y_true, y_pred, num_classes)
    want_f1, want_report, want_matrix = _counted(y_true, y_pred, num_classes)
    assert f1 == pytest.approx(want_f1, rel=1e-12)
    assert [r["class"] for r in report] == [r["class"] for r in want_report]
    for got, want in zip(report, want_report):
        assert got == pytest.approx(want, rel=1e-12)
        assert isinstance(got["support"], int) and isinstance(got["f1"], float)
    assert confusion(y_true, y_pred, num_classes) == want_matrix


def test_edge_cases() -> None:
    assert macro_f1([IGNORE_INDEX], [0], 1) == (0.0, [{"class": 0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                       "support": 0}])
    assert confusion([IGNORE_INDEX, IGNORE_INDEX], [1, 0], 2) == [[0, 0], [0, 0]]
    assert confusion([0, 0], [0, 0], 1) == [[2]]
    assert expected_calibration_error([], []) == 0.0
