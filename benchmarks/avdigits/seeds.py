"""Issue #13's targets on the mean of several seeds: reads the eval-<variant>.json that run.py wrote into each
--work folder and prints the robustness table and the target checks of the mean, then each seed's headline.

    python benchmarks/avdigits/seeds.py runs/avdigits runs/avdigits-s1

A variant counts only where every folder has it. Means are over seeds of each figure (accuracies, per-voter
accuracies, ECE, AUROC, temperatures); the best single voter of the mean is the best of the voters' mean accuracies;
`train s` is the slowest seed's.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from run import pct, robustness_table, target_checks

from moefuse.evaluation.metrics import best_single_voter


def mean_task(tasks: list[dict]) -> dict:
    def avg(get) -> float | None:
        values = [get(t) for t in tasks]
        return None if any(v is None for v in values) else statistics.fmean(values)

    voters = len(tasks[0]["head_accuracy"])
    heads = [avg(lambda t, h=h: t["head_accuracy"][h]) for h in range(voters)]
    coverage = [avg(lambda t, h=h: t["head_coverage"][h]) for h in range(voters)]
    qtypes = tasks[0].get("accuracy_by_qtype", {})
    return {"accuracy": avg(lambda t: t["accuracy"]), "head_accuracy": heads, "head_coverage": coverage,
            "best_single_head_accuracy": best_single_voter(heads, coverage), "voters": tasks[0]["voters"],
            "ece": avg(lambda t: t["ece"]),
            "ece_uncalibrated": avg(lambda t: t["ece_uncalibrated"]), "temperature": avg(lambda t: t["temperature"]),
            "selective": {"auroc_confidence": avg(lambda t: t["selective"]["auroc_confidence"])},
            "accuracy_by_qtype": {q: {"accuracy": avg(lambda t, q=q: t["accuracy_by_qtype"][q]["accuracy"])}
                                  for q in qtypes},
            **({"diversity": {k: avg(lambda t, k=k: t["diversity"][k]) for k in tasks[0]["diversity"]}}
               if all("diversity" in t for t in tasks) else {})}


def mean_results(runs: list[dict[str, dict]]) -> dict[str, dict]:
    out = {}
    for name in [n for n in runs[0] if all(n in r for r in runs)]:
        reports = [r[name] for r in runs]
        tasks = {t: mean_task([rep["tasks"][t] for rep in reports]) for t in reports[0]["tasks"]}
        robust = {c: {t: statistics.fmean(rep["robustness"][c][t] for rep in reports) for t in accs}
                  for c, accs in reports[0].get("robustness", {}).items()}
        seconds = [rep.get("train_seconds", "") for rep in reports]
        slowest = str(max(int(s) for s in seconds)) if all(str(s).isdigit() for s in seconds) else "–"
        out[name] = {"tasks": tasks, "robustness": robust, "train_seconds": slowest}
    return out


def main(folders: list[str]) -> int:
    runs = [{p.stem.removeprefix("eval-"): json.loads(p.read_text()) for p in sorted(Path(f).glob("eval-*.json"))}
            for f in folders]
    if len(runs) < 2 or not all(runs):
        print("usage: seeds.py WORK1 WORK2 [...] (each a run.py --work folder with eval-<variant>.json)")
        return 2
    mean = mean_results(runs)
    print(f"Mean of {len(runs)} seeds ({', '.join(folders)}):")
    print("\n".join(robustness_table(mean)))
    print()
    print("\n".join(f"- {'met' if ok else '**missed**'}: {text}" for text, ok in target_checks(mean)))
    print("\nPer seed (digit / avqa, ensemble vs best single voter):")
    for folder, run in zip(folders, runs):
        cells = [f"{n} {pct(r['tasks']['digit']['accuracy'])} / {pct(r['tasks']['avqa']['accuracy'])} (best voter "
                 f"{pct(r['tasks']['digit']['best_single_head_accuracy'])} / "
                 f"{pct(r['tasks']['avqa']['best_single_head_accuracy'])})" for n, r in run.items() if n in mean]
        print(f"- {folder}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
