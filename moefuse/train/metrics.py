"""Evaluation metrics over per-sample records, shared by validation during training and `moefuse evaluate`.

A record is one sample's result (built by `records_from_output`): id, task, target (string), target index
(-100 if the target is not in the vocabulary: always counted wrong), ensemble prediction, confidence, per-head
predictions, agreement and which modalities the sample had.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

IGNORE_INDEX = -100


def records_from_output(batch: dict, output, vocabularies: dict[str, list[str]]) -> list[dict]:
    """Per-sample records of one batch's ModelOutput."""
    records = []
    present = {m: batch[f"{m}_present"].tolist() for m in ("text", "image", "audio")}
    labels = batch["labels"].tolist()
    for task, out in output.tasks.items():
        vocab = vocabularies[task]
        top = out.probs.topk(min(5, out.probs.shape[-1]), dim=-1)
        for j, row in enumerate(out.rows.tolist()):
            modalities = "+".join(m for m in ("text", "image", "audio") if present[m][row]) or "none"
            records.append({
                "id": batch["ids"][row],
                "task": task,
                "target": batch["targets"][row],
                "target_index": labels[row],
                "prediction_index": int(out.prediction[j]),
                "prediction": vocab[int(out.prediction[j])],
                "probability": float(out.probs[j, out.prediction[j]]),
                "top5": [[vocab[int(i)], float(p)] for p, i in zip(top.values[j], top.indices[j])],
                "head_predictions": [vocab[int(i)] for i in out.head_predictions[j]],
                "head_correct": [int(i) == labels[row] for i in out.head_predictions[j]],
                "agreement": float(out.agreement[j]),
                "modalities": modalities,
                "meta": batch["meta"][row],
            })
    return records


def macro_f1(y_true: list[int], y_pred: list[int], num_classes: int) -> tuple[float, list[dict]]:
    """Macro-averaged F1 over the classes that occur in y_true or y_pred, and the per-class report."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for t, p in zip(y_true, y_pred):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    report, f1s = [], []
    for c in range(num_classes):
        support = tp[c] + fn[c]
        if support == 0 and fp[c] == 0:
            continue
        precision = tp[c] / (tp[c] + fp[c]) if tp[c] + fp[c] else 0.0
        recall = tp[c] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report.append({"class": c, "precision": precision, "recall": recall, "f1": f1, "support": support})
        f1s.append(f1)
    return (sum(f1s) / len(f1s) if f1s else 0.0), report


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = 15) -> float:
    """ECE (Guo et al. 2017): |accuracy - confidence| averaged over equal-width confidence bins."""
    if not confidences:
        return 0.0
    conf = torch.tensor(confidences)
    corr = torch.tensor(correct, dtype=torch.float)
    idx = torch.clamp((conf * bins).long(), max=bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += float(sel.float().mean() * (corr[sel].mean() - conf[sel].mean()).abs())
    return ece


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


def compute_metrics(records: list[dict], vocabularies: dict[str, list[str]], task_types: dict[str, str],
                    detailed: bool = False) -> dict:
    """Flat metrics {"<task>/acc": ..} for logging, plus nested details when `detailed` (evaluate)."""
    flat: dict[str, float] = {}
    details: dict[str, dict] = {}
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    for task, recs in sorted(by_task.items()):
        n = len(recs)
        correct = [r["prediction_index"] == r["target_index"] for r in recs]
        acc = sum(correct) / n
        k = len(recs[0]["head_correct"])
        head_acc = [sum(r["head_correct"][h] for r in recs) / n for h in range(k)]
        flat[f"{task}/acc"] = acc
        if task_types[task] == "qa":
            flat[f"{task}/exact_match"] = acc
        y_true = [r["target_index"] for r in recs]
        y_pred = [r["prediction_index"] for r in recs]
        f1, report = macro_f1(y_true, y_pred, len(vocabularies[task]))
        if task_types[task] == "classification":
            flat[f"{task}/macro_f1"] = f1
        for h, a in enumerate(head_acc):
            flat[f"{task}/head{h}_acc"] = a
        flat[f"{task}/best_head_acc"] = max(head_acc)
        flat[f"{task}/ensemble_minus_best_head"] = acc - max(head_acc)
        flat[f"{task}/ece"] = expected_calibration_error([r["probability"] for r in recs], correct)
        flat[f"{task}/agreement"] = sum(r["agreement"] for r in recs) / n
        flat[f"{task}/unseen_targets"] = sum(r["target_index"] == IGNORE_INDEX for r in recs)
        flat[f"{task}/samples"] = n
        if not detailed:
            continue
        vocab = vocabularies[task]
        unanimous = [r["agreement"] == 1.0 for r in recs]
        subsets = defaultdict(list)
        for r, c in zip(recs, correct):
            subsets[r["modalities"]].append(c)
        qtypes = defaultdict(list)
        for r, c in zip(recs, correct):
            if "qtype" in (r.get("meta") or {}):
                qtypes[r["meta"]["qtype"]].append(c)
        confusion = [[0] * len(vocab) for _ in vocab]
        for t, p in zip(y_true, y_pred):
            if t != IGNORE_INDEX:
                confusion[t][p] += 1

        def mean(xs: list) -> float | None:
            return sum(xs) / len(xs) if xs else None

        details[task] = {
            "type": task_types[task],
            "samples": n,
            "accuracy": acc,
            "macro_f1": f1,
            "ensemble_accuracy": acc,
            "head_accuracy": head_acc,
            "best_single_head_accuracy": max(head_acc),
            "ece": flat[f"{task}/ece"],
            "agreement_vs_correctness": {
                "mean_agreement_when_correct": mean([r["agreement"] for r, c in zip(recs, correct) if c]),
                "mean_agreement_when_wrong": mean([r["agreement"] for r, c in zip(recs, correct) if not c]),
                "accuracy_when_unanimous": mean([c for c, u in zip(correct, unanimous) if u]),
                "accuracy_when_split": mean([c for c, u in zip(correct, unanimous) if not u]),
                "unanimous_fraction": mean(unanimous),
            },
            "accuracy_by_modalities": {s: {"accuracy": mean(cs), "samples": len(cs)}
                                       for s, cs in sorted(subsets.items())},
            "accuracy_by_qtype": {q: {"accuracy": mean(cs), "samples": len(cs)} for q, cs in sorted(qtypes.items())},
            "per_class": [{**row, "class": vocab[row["class"]]} for row in report],
            "confusion_matrix": {"labels": vocab, "matrix": confusion},
            "unseen_targets": flat[f"{task}/unseen_targets"],
        }
    accs = [v for k, v in flat.items() if k.endswith("/acc")]
    flat["mean_acc"] = sum(accs) / len(accs) if accs else 0.0
    return {"metrics": flat, "tasks": details} if detailed else {"metrics": flat}
