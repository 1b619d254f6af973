"""Evaluation metrics over per-sample records, shared by validation during training and `moefuse evaluate`.

A record is one sample's result (built by `moefuse.inference.records.records_from_output`): id, task, target
(string), target index (-100 if the target is not in the vocabulary: always counted wrong), ensemble prediction,
confidence, per-head predictions, agreement and which modalities the sample had.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict

import torch

from moefuse.datasets.collate import IGNORE_INDEX


def macro_f1(y_true: list[int], y_pred: list[int], num_classes: int) -> tuple[float, list[dict]]:
    """Macro-averaged F1 over the classes that occur in y_true or y_pred, and the per-class report (scikit-learn's
    precision/recall/F1 per class; a target outside the vocabulary (IGNORE_INDEX) is no class, but its prediction
    counts as a false positive of the predicted class)."""
    from sklearn.metrics import precision_recall_fscore_support  # imported here: slow, and only validation needs it

    classes = sorted(c for c in set(y_true) | set(y_pred) if 0 <= c < num_classes)
    if not classes:
        return 0.0, []
    columns = precision_recall_fscore_support(y_true, y_pred, labels=classes, average=None, zero_division=0)
    report = [{"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
              for c, p, r, f, n in zip(classes, *columns)]
    return sum(row["f1"] for row in report) / len(report), report


def confusion(y_true: list[int], y_pred: list[int], num_classes: int) -> list[list[int]]:
    """[target][prediction] counts over the samples whose target is in the vocabulary (scikit-learn's)."""
    from sklearn.metrics import confusion_matrix

    pairs = [(t, p) for t, p in zip(y_true, y_pred) if t != IGNORE_INDEX]
    if not pairs:  # scikit-learn refuses empty input
        return [[0] * num_classes for _ in range(num_classes)]
    seen, predicted = zip(*pairs)
    with warnings.catch_warnings():  # a one-word vocabulary makes a 1x1 matrix, which scikit-learn warns about
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        return confusion_matrix(seen, predicted, labels=list(range(num_classes))).tolist()


def reliability_bins(confidences: list[float], correct: list[bool], bins: int = 15) -> list[dict]:
    """Equal-width confidence bins (the reliability diagram's): each non-empty bin's mean confidence, accuracy and
    number of samples, lowest bin first."""
    if not confidences:
        return []
    conf = torch.tensor(confidences, dtype=torch.float64)
    corr = torch.tensor(correct, dtype=torch.float64)
    idx = torch.clamp((conf * bins).long(), max=bins - 1)
    return [{"low": b / bins, "high": (b + 1) / bins, "confidence": float(conf[sel].mean()),
             "accuracy": float(corr[sel].mean()), "samples": int(sel.sum())}
            for b in range(bins) if (sel := idx == b).any()]


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = 15) -> float:
    """ECE (Guo et al. 2017): |accuracy - confidence| averaged over equal-width confidence bins, weighted by the
    bins' shares of the samples."""
    n = len(confidences)
    cells = reliability_bins(confidences, correct, bins)
    return float(sum(c["samples"] / n * abs(c["accuracy"] - c["confidence"]) for c in cells))


def risk_coverage(confidences: list[float], correct: list[bool], points: int = 101) -> dict:
    """Selective prediction (Geifman & El-Yaniv 2017): answer only the samples whose confidence reaches a threshold;
    coverage = the fraction answered, risk = the error rate among them. Samples are taken by confidence, highest
    first, tied confidences together. AURC (Geifman et al. 2019) = the risk averaged over the coverages 1/N .. N/N,
    each sample adding the risk of the threshold that first answers it. The curve is given at up to `points`
    coverages (the thresholds nearest 0, 1/(points-1), ..., 1)."""
    n = len(confidences)
    if n == 0:
        return {"aurc": None, "coverage": [], "risk": []}
    order = sorted(range(n), key=lambda i: -confidences[i])
    ends, errors, risk_at = [], 0, []  # ends: how many are answered at each distinct threshold
    for k, i in enumerate(order):
        errors += not correct[i]
        if k + 1 == n or confidences[order[k + 1]] != confidences[i]:
            ends.append(k + 1)
            risk_at.append(errors / (k + 1))
    start, aurc = 0, 0.0
    for end, risk in zip(ends, risk_at):
        aurc += (end - start) * risk
        start = end
    picks = sorted({min(range(len(ends)), key=lambda j: abs(ends[j] / n - q / (points - 1))) for q in range(points)})
    return {"aurc": aurc / n, "coverage": [ends[j] / n for j in picks], "risk": [risk_at[j] for j in picks]}


def error_detection_auroc(scores: list[float], wrong: list[bool]) -> float | None:
    """AUROC with which a score (higher = more doubt) detects the wrong answers (scikit-learn's roc_auc_score);
    None when every answer is right or every answer is wrong."""
    if len(set(wrong)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(wrong, scores))


def selective_prediction(recs: list[dict], correct: list[bool]) -> dict:
    """The risk-coverage curve and AURC of the ensemble's confidence, and how well low confidence and voter
    disagreement each detect the wrong answers (AUROC). A non-finite output (a diverged model) has the lowest
    confidence of all."""
    wrong = [not c for c in correct]
    confidence = [r["probability"] if math.isfinite(r["probability"]) else -1.0 for r in recs]
    return {**risk_coverage(confidence, correct),
            "auroc_confidence": error_detection_auroc([-c for c in confidence], wrong),
            "auroc_disagreement": error_detection_auroc([1.0 - r["agreement"] for r in recs], wrong)}


def voter_diversity(recs: list[dict]) -> dict:
    """How different the voters' answers are (Kuncheva & Whitaker 2003): members that make the same errors cannot
    correct each other. `oracle_accuracy`: a sample counts when any of its voters is right, the most that any
    combination of these votes could reach; `majority_accuracy`: the hard plurality vote of the voters that voted
    (ties to the ensemble's answer when it is among the tied, else to the first voter's), what `heads.combine:
    majority` would give with the same voters; `disagreement`: Skalak's pairwise disagreement, the fraction of the
    samples two voters both vote on where their answers differ, averaged over the pairs (None with one voter)."""
    oracle, majority, differ, shared = [], [], defaultdict(int), defaultdict(int)
    for r in recs:
        votes = [(h, p) for h, p in enumerate(r["head_predictions"]) if p is not None]
        oracle.append(any(r["head_correct"][h] for h, _ in votes))
        counts = Counter(p for _, p in votes)
        most = max(counts.values())
        top = [p for _, p in votes if counts[p] == most]
        chosen = r["prediction"] if r["prediction"] in top else top[0]
        majority.append(any(r["head_correct"][h] for h, p in votes if p == chosen))
        for i, (a, pa) in enumerate(votes):
            for b, pb in votes[i + 1:]:
                shared[a, b] += 1
                differ[a, b] += pa != pb
    pairs = [differ[k] / n for k, n in shared.items()]
    return {"oracle_accuracy": _mean(oracle), "majority_accuracy": _mean(majority), "disagreement": _mean(pairs)}


def metric_names(task_types: dict[str, str], num_heads: int) -> list[str]:
    """The flat metrics `compute_metrics` gives for these tasks (without the "val/" prefix the trainer adds): what
    `train.metric` may name, checked before the first step."""
    names = ["mean_acc"]
    for task, kind in sorted(task_types.items()):
        names += [f"{task}/{m}" for m in ("acc", "best_head_acc", "ensemble_minus_best_head", "ece", "agreement",
                                          "unseen_targets", "samples")]
        names.append(f"{task}/exact_match" if kind == "qa" else f"{task}/macro_f1")
        names += [f"{task}/head{h}_acc" for h in range(num_heads)]
    return names


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def best_single_voter(accuracy: list[float | None], coverage: list[float]) -> float:
    """The accuracy of the best single member: of the voters that answer every sample (a voter that abstains is
    no stand-alone model for the samples it skips); of those that answer some when none answers all."""
    full = [a for a, c in zip(accuracy, coverage) if a is not None and c == 1.0]
    return max(full or [a for a in accuracy if a is not None])


def _task_scores(recs: list[dict], num_classes: int) -> dict:
    """The statistics of one task's records that both the flat metrics and the details use."""
    n = len(recs)
    correct = [r["prediction_index"] == r["target_index"] for r in recs]
    votes = [[r["head_correct"][h] for r in recs if r["head_correct"][h] is not None]
             for h in range(len(recs[0]["head_correct"]))]  # per voter: correct or not, where it voted
    head_acc = [_mean(v) for v in votes]  # None for a voter that abstained on every sample
    coverage = [len(v) / n for v in votes]
    y_true = [r["target_index"] for r in recs]
    y_pred = [r["prediction_index"] for r in recs]
    f1, report = macro_f1(y_true, y_pred, num_classes)
    return {"samples": n, "correct": correct, "acc": sum(correct) / n, "head_acc": head_acc, "f1": f1,
            "head_coverage": coverage, "best_head_acc": best_single_voter(head_acc, coverage),
            "report": report, "y_true": y_true, "y_pred": y_pred,
            "ece": expected_calibration_error([r["probability"] for r in recs], correct),
            "agreement": sum(r["agreement"] for r in recs) / n,
            "unseen": sum(r["target_index"] == IGNORE_INDEX for r in recs)}


def _flat_metrics(task: str, kind: str, s: dict) -> dict[str, float]:
    """One task's entries of the flat metrics, in the order they are logged."""
    flat = {f"{task}/acc": s["acc"]}
    if kind == "qa":
        flat[f"{task}/exact_match"] = s["acc"]
    if kind == "classification":
        flat[f"{task}/macro_f1"] = s["f1"]
    flat.update({f"{task}/head{h}_acc": a for h, a in enumerate(s["head_acc"]) if a is not None})
    flat[f"{task}/best_head_acc"] = s["best_head_acc"]
    flat[f"{task}/ensemble_minus_best_head"] = s["acc"] - s["best_head_acc"]
    flat[f"{task}/ece"] = s["ece"]
    flat[f"{task}/agreement"] = s["agreement"]
    flat[f"{task}/unseen_targets"] = s["unseen"]
    flat[f"{task}/samples"] = s["samples"]
    return flat


def _accuracy_by(pairs: list[tuple]) -> dict:
    """(key, correct) pairs -> {key: {accuracy, samples}}, keys sorted."""
    groups = defaultdict(list)
    for key, c in pairs:
        groups[key].append(c)
    return {k: {"accuracy": _mean(cs), "samples": len(cs)} for k, cs in sorted(groups.items())}


def _agreement_vs_correctness(recs: list[dict], correct: list[bool]) -> dict:
    """Are the heads' disagreements the errors? Agreement by correctness, and accuracy by unanimity."""
    unanimous = [r["agreement"] == 1.0 for r in recs]
    return {
        "mean_agreement_when_correct": _mean([r["agreement"] for r, c in zip(recs, correct) if c]),
        "mean_agreement_when_wrong": _mean([r["agreement"] for r, c in zip(recs, correct) if not c]),
        "accuracy_when_unanimous": _mean([c for c, u in zip(correct, unanimous) if u]),
        "accuracy_when_split": _mean([c for c, u in zip(correct, unanimous) if not u]),
        "unanimous_fraction": _mean(unanimous),
    }


def _task_details(recs: list[dict], vocab: list[str], kind: str, s: dict) -> dict:
    """One task's nested report (`moefuse evaluate`)."""
    correct = s["correct"]
    qtypes = [(r["meta"]["qtype"], c) for r, c in zip(recs, correct) if "qtype" in (r.get("meta") or {})]
    return {
        "type": kind,
        "samples": s["samples"],
        "accuracy": s["acc"],
        "macro_f1": s["f1"],
        "ensemble_accuracy": s["acc"],
        "head_accuracy": s["head_acc"],
        "head_coverage": s["head_coverage"],
        "best_single_head_accuracy": s["best_head_acc"],
        "ece": s["ece"],
        "ece_uncalibrated": expected_calibration_error([r["probability_uncalibrated"] for r in recs], correct),
        "selective": selective_prediction(recs, correct),
        "reliability": {"calibrated": reliability_bins([r["probability"] for r in recs], correct),
                        "uncalibrated": reliability_bins([r["probability_uncalibrated"] for r in recs], correct)},
        "agreement_vs_correctness": _agreement_vs_correctness(recs, correct),
        "diversity": voter_diversity(recs),
        "accuracy_by_modalities": _accuracy_by([(r["modalities"], c) for r, c in zip(recs, correct)]),
        "accuracy_by_qtype": _accuracy_by(qtypes),
        "per_class": [{**row, "class": vocab[row["class"]]} for row in s["report"]],
        "confusion_matrix": {"labels": vocab, "matrix": confusion(s["y_true"], s["y_pred"], len(vocab))},
        "unseen_targets": s["unseen"],
    }


def compute_metrics(records: list[dict], vocabularies: dict[str, list[str]], task_types: dict[str, str],
                    detailed: bool = False) -> dict:
    """Flat metrics {"<task>/acc": ..} for logging, plus nested details when `detailed` (evaluate)."""
    flat: dict[str, float] = {}
    details: dict[str, dict] = {}
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    for task, recs in sorted(by_task.items()):
        scores = _task_scores(recs, len(vocabularies[task]))
        flat.update(_flat_metrics(task, task_types[task], scores))
        if detailed:
            details[task] = _task_details(recs, vocabularies[task], task_types[task], scores)
    accs = [v for k, v in flat.items() if k.endswith("/acc")]
    flat["mean_acc"] = sum(accs) / len(accs) if accs else 0.0
    return {"metrics": flat, "tasks": details} if detailed else {"metrics": flat}
