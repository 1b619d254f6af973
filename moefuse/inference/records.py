"""A model output -> one record per sample: what `predict` answers and what the metrics
(`moefuse.evaluation.metrics`) are computed from.

A record: id, task, target (string), target index (IGNORE_INDEX when the target is outside the vocabulary),
prediction and its index, probability (calibrated) and uncalibrated, the top 5, each voter's prediction and whether
it is right, the voters' agreement, the modalities the sample had, and its meta.
"""

from __future__ import annotations


def records_from_output(batch: dict, output, vocabularies: dict[str, list[str]]) -> list[dict]:
    """Per-sample records of one batch's ModelOutput."""
    records = []
    present = {m: flags.tolist() for m, flags in batch["present"].items()}
    labels = batch["labels"].tolist()
    for task, out in output.tasks.items():
        vocab = vocabularies[task]
        top = out.probs.topk(min(5, out.probs.shape[-1]), dim=-1)
        for j, row in enumerate(out.rows.tolist()):
            modalities = "+".join(m for m, flags in present.items() if flags[row]) or "none"
            records.append({
                "id": batch["ids"][row],
                "task": task,
                "target": batch["targets"][row],
                "target_index": labels[row],
                "prediction_index": int(out.prediction[j]),
                "prediction": vocab[int(out.prediction[j])],
                "probability": float(out.probs[j, out.prediction[j]]),
                "probability_uncalibrated": float(out.uncalibrated[j, out.prediction[j]]),
                "top5": [[vocab[int(i)], float(p)] for p, i in zip(top.values[j], top.indices[j])],
                "head_predictions": [vocab[int(i)] if i >= 0 else None for i in out.head_predictions[j]],
                "head_correct": [None if i < 0 else int(i) == labels[row] for i in out.head_predictions[j]],
                "agreement": float(out.agreement[j]),
                "modalities": modalities,
                "meta": batch["meta"][row],
            })
    return records
