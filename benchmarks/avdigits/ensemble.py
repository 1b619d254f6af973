"""AV-digits ensembles (issue #25): train the members, each in a fresh process -> build the ensembles -> distil ->
evaluate everything under full inputs, each modality removed and each modality corrupted -> the cost of each ->
the ensemble section of RESULTS.md.

    python benchmarks/avdigits/ensemble.py --data ../shared/data --work runs/avdigits        (make bench-ensemble)

Members (all from the same pretrained encoders, data and steps as run.py's variants): the MoE model on seeds 0, 1
and 2, dense, concat, image only and audio only. Each is trained in its own Python process, so nothing a member
leaves behind in a process (allocator state, thread pools, caches, RNG streams of libraries that are not seeded)
touches the next: run.py trains its variants one after another in one process, and that is one of the two
suspects of the reproducibility question of issue #25 (the other: the machine's kernels).

Stages (`--stages`, default all, in this order; each reuses what an earlier run of it left in WORK):
    members     train the members that WORK does not hold yet (WORK/<member>/model)
    ensembles   `moefuse ensemble` (the library call) of all seven members and of the three MoE seeds alone, on
                the validation split: every rule cross-fitted over 5 folds, fit on the split as it is and with each
                modality removed, scored also under each corruption (never fit on): WORK/ensemble/<name>/
    distill     the MoE config (seed 0) trained on the all-member ensemble's soft targets (`distill.teacher`, the
                section's defaults T = 2, weight 0.5: nothing tuned): WORK/distilled/model
    evaluate    the distilled model under every condition (WORK/ensemble/eval-distilled.json)
    cost        parameters, and ms per sample at batch 1 and batch 32 of the best member, each ensemble and the
                distilled model, measured side by side (benchmarks/compress.py's round-robin `measure`)
    report      the ensemble section of benchmarks/avdigits/RESULTS.md (between its ensemble markers; run.py keeps
                that section when it rewrites the file)

The ensembles' combiners are fit on the validation split (cross-fitted: every ensemble figure of that split comes
from samples its combiner was not fit on); the distilled student's teacher is the all-member ensemble, whose
combiner saw the validation labels, so the student's validation figures carry that (small, indirect) leak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from run import CONDITIONS, HERE, REPO, VARIANTS, build, prepare, pretrain_encoders, robustness

from moefuse.configutil import atomic_write_text

MEMBERS: dict[str, tuple[str, int]] = {  # member -> (run.py variant, train.seed)
    "moe": ("moe", 0), "moe_seed1": ("moe", 1), "moe_seed2": ("moe", 2), "dense": ("dense", 0),
    "concat": ("concat", 0), "image_only": ("image_only", 0), "audio_only": ("audio_only", 0),
}
TRAINED = {**MEMBERS, "distilled": ("moe", 0)}  # what --train-member trains: the members and the student
STAGES = ["members", "ensembles", "distill", "evaluate", "cost", "report"]
ENSEMBLES: dict[str, list[str]] = {"all": list(MEMBERS), "moe3": ["moe", "moe_seed1", "moe_seed2"]}
SCORED_CORRUPTIONS = ["audio:noise:0", "image:noise:0", "audio:conflict", "image:conflict"]
CONDITION_OF = {"audio:noise:0": "audio noise 0 dB", "image:noise:0": "image noise 0 dB",
                "audio:conflict": "audio conflict", "image:conflict": "image conflict"}


def train_member(name: str, shards: Path, work: Path, init: list[str], extra: list[str]) -> Path:
    """Train one member in this process (the child's job) -> its model folder; WORK/<name>/train_seconds.txt."""
    import shutil

    from moefuse.config import load_config
    from moefuse.train.recipe import train

    variant, seed = TRAINED[name]
    run = work / name
    if (run / "model" / "model.safetensors").exists():
        return run / "model"
    owner = run / "trainer.pid"
    if owner.exists() and _alive(int(owner.read_text() or 0)):  # another process of this script trains it now
        print(f"[{name}] being trained by process {owner.read_text()}: left to it", flush=True)
        return run / "model"
    resume = any((run / "checkpoints").glob("step-*"))  # a run stopped half-way goes on from its last checkpoint
    if run.exists() and not resume:  # a run that stopped before its first checkpoint: this script's, started again
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(owner, str(os.getpid()))
    cfg = load_config(REPO / "configs" / "avdigits.yaml",
                      [f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]", f"train.output_dir={run}",
                       f"train.seed={seed}", *init, *VARIANTS[variant], *extra])
    start = time.perf_counter()
    train(cfg, resume=resume)
    atomic_write_text(run / "train_seconds.txt", f"{time.perf_counter() - start:.0f}\n")
    owner.unlink()
    return run / "model"


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return pid > 0


def members_stage(args: argparse.Namespace, extra: list[str]) -> dict[str, Path]:
    """Every member's model folder, training each one WORK lacks in a fresh process."""
    folders = {}
    for name in args.members:
        folder = args.work / name / "model"
        if not (folder / "model.safetensors").exists():
            print(f"[{name}] training in a fresh process", flush=True)
            subprocess.run([sys.executable, __file__, "--data", str(args.data), "--work", str(args.work),
                            "--train-member", name, *extra], check=True)
        folders[name] = folder
    return folders


def ensembles_stage(folders: dict[str, Path], shards: Path, out: Path) -> dict[str, Path]:
    """Each of ENSEMBLES built (cross-fitted figures in its ensemble.json) -> {name: its folder}."""
    from moefuse.datasets.corruption import Corruption
    from moefuse.evaluation.ensemble import build_ensemble, format_build

    built = {}
    for name, members in ENSEMBLES.items():
        folder = out / name
        if not (folder / "ensemble.json").exists():
            build = build_ensemble([folders[m] for m in members], [str(shards)], folder, split="val",
                                   combine="gated", folds=5, progress=False,
                                   score_corrupt=[Corruption.parse(c) for c in SCORED_CORRUPTIONS])
            print(f"[ensemble {name}]\n{format_build(build)}", flush=True)
        built[name] = folder
    return built


def distill_stage(args: argparse.Namespace, teacher: Path, extra: list[str]) -> Path:
    """The distilled student (the MoE config, seed 0, taught by `teacher`), trained in a fresh process."""
    run = args.work / "distilled"
    if not (run / "model" / "model.safetensors").exists():
        print(f"[distilled] training in a fresh process, teacher {teacher}", flush=True)
        subprocess.run([sys.executable, __file__, "--data", str(args.data), "--work", str(args.work),
                        "--train-member", "distilled", *extra, f"distill.teacher={teacher}"], check=True)
    return run / "model"


def evaluate_stage(folders: dict[str, Path], shards: Path, out: Path) -> dict[str, dict]:
    """{model: {condition: {task: figures}}} under every condition (run.py's `robustness`; full inputs with ECE,
    the confidence's AUROC and the question types as well), each written to out/eval-<model>.json."""
    from moefuse.evaluation.report import evaluate

    results = {}
    for name, folder in folders.items():
        file = out / f"eval-{name}.json"
        if file.exists():
            results[name] = json.loads(file.read_text())
            continue
        full = evaluate(folder, [str(shards)], split="val", progress=False)
        others = robustness(name, folder, shards, full, [c for c in CONDITIONS if c != "full"])
        results[name] = {"full": {t: {k: d[k] for k in ("accuracy", "ece", "accuracy_by_qtype", "selective") if k in d}
                                  for t, d in full["tasks"].items()},
                         **{c: {t: {"accuracy": a} for t, a in acc.items()} for c, acc in others.items()}}
        atomic_write_text(file, json.dumps(results[name], indent=2))
    return results


def cost_stage(models: dict[str, Path], shards: Path, out: Path, rounds: int = 3) -> dict[str, dict]:
    """{model: parameters, ms per sample at batch 1 (p50, cold caches) and batch 32}, measured side by side in
    one process (compress.py's `measure`: round-robin, paired rounds) -> out/cost.json."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from compress import measure
    from predict_latency import percentile, val_samples

    from moefuse.fusion.loading import load_inference_model

    file = out / "cost.json"
    if file.exists():
        return json.loads(file.read_text())
    loaded = {name: load_inference_model(folder) for name, folder in models.items()}
    samples = val_samples(shards, next(iter(loaded.values())))
    step = max(1, len(samples) // 16)
    runs = measure(loaded, samples[::step][:16], samples[:64], rounds)
    cost = {}
    for name, model in loaded.items():
        count = model.parameter_counts()[1] if hasattr(model, "parameter_counts") else \
            sum(p.numel() for p in model.parameters())
        b1 = [percentile(r, 50) * 1e3 for r in runs[(name, "cold")]]
        b32 = [s * 1e3 / 64 for s in runs[(name, "b32")]]
        cost[name] = {"parameters": count, "b1_ms": b1, "b32_ms": b32, "threads": torch.get_num_threads()}
    atomic_write_text(file, json.dumps(cost, indent=2))
    return cost


START, END = "<!-- ensemble:start -->", "<!-- ensemble:end -->"
TABLE_CONDITIONS = {"full": "full", "audio removed": "audio removed", "image removed": "image removed",
                    **{v: k for k, v in CONDITION_OF.items()}}  # RESULTS condition -> ensemble.json condition


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _spread(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def figure(cfg, kind: str, name: str, condition: str, task: str) -> float | None:
    """One figure of an ensemble.json (EnsembleConfig) under a RESULTS condition."""
    from moefuse.fusion.ensemble_folder import figure_key

    key = figure_key(kind, name, TABLE_CONDITIONS[condition])
    return cfg.figures.get(key, {}).get(task)


def accuracy_rows(ens: dict, distilled: dict, conditions: list[str]) -> list[str]:
    """Table rows (accuracy %, digit / avqa per condition): members, the MoE seeds' mean, best member, the
    ensembles under each rule, the distilled model."""
    cfg, moe3 = ens["all"], ens["moe3"]
    cells = lambda get: " | ".join(f"{get(c, 'digit')} / {get(c, 'avqa')}" for c in conditions)  # noqa: E731
    rows = [f"| member {m} | " + cells(lambda c, t, m=m: _pct(figure(cfg, "member", m, c, t))) + " |"
            for m in MEMBERS]

    def seeds(c: str, t: str) -> str:
        values = [figure(cfg, "member", m, c, t) for m in ("moe", "moe_seed1", "moe_seed2")]
        return "–" if None in values else _spread(values)  # type: ignore[arg-type]
    rows.append("| MoE, mean ± sd over seeds 0, 1, 2 | " + cells(seeds) + " |")
    rows.append("| **best member** | " + cells(lambda c, t: _pct(figure(cfg, "best member", "", c, t))) + " |")
    for rule in ("soft", "weighted", "gated", "majority"):
        rows.append(f"| ensemble of all 7, {rule} | "
                    + cells(lambda c, t, r=rule: _pct(figure(cfg, "ensemble", r, c, t))) + " |")
    rows.append("| ensemble of the 3 MoE seeds, gated | "
                + cells(lambda c, t: _pct(figure(moe3, "ensemble", "gated", c, t))) + " |")
    rows.append("| distilled (one MoE model) | " + cells(
        lambda c, t: _pct(distilled.get(c, {}).get(t, {}).get("accuracy"))) + " |")
    return rows


def target_lines(ens: dict, distilled: dict, cost: dict) -> list[str]:
    """Issue #25's targets, met or missed, on these figures."""
    cfg = ens["all"]
    checks = []
    for t in ("digit", "avqa"):
        g, b = figure(cfg, "ensemble", "gated", "full", t), figure(cfg, "best member", "", "full", t)
        checks.append((f"{t}: gated ensemble >= best member + 1.5: {_pct(g)} vs {_pct(b)}", g >= b + 0.015))
    for removed_, member in (("audio removed", "image_only"), ("image removed", "audio_only")):
        g, m = figure(cfg, "ensemble", "gated", removed_, "digit"), figure(cfg, "member", member, "full", "digit")
        checks.append((f"digit with the {removed_.split()[0]} removed >= {member}: {_pct(g)} vs {_pct(m)}", g >= m))
    for t in ("digit", "avqa"):
        e, a = figure(cfg, "ece", "gated", "full", t), figure(cfg, "auroc", "gated", "full", t)
        checks.append((f"{t}: gated ECE <= 0.03: {e:.3f}", e <= 0.03))
        checks.append((f"{t}: gated AUROC of confidence for wrong answers >= 0.85: {_num(a)}",
                       a is not None and a >= 0.85))
        d, b = distilled["full"][t]["accuracy"], figure(cfg, "best member", "", "full", t)
        g = figure(cfg, "ensemble", "gated", "full", t)
        checks.append((f"{t}: distilled >= best member + 1.0 and within 1.0 of the ensemble: {_pct(d)} vs best "
                       f"{_pct(b)}, ensemble {_pct(g)}", d >= b + 0.01 and d >= g - 0.01))
    a = distilled["full"]["avqa"]
    worst = min(q["accuracy"] for q in a.get("accuracy_by_qtype", {}).values())
    checks.append((f"distilled avqa >= 95 % ({_pct(a['accuracy'])}) with every question type >= 90 % (worst "
                   f"{_pct(worst)})", a["accuracy"] >= 0.95 and worst >= 0.90))
    g = figure(cfg, "ensemble", "gated", "full", "avqa")
    checks.append((f"gated ensemble avqa >= 95 %: {_pct(g)} (its question types are not cross-fitted: not checked)",
                   g >= 0.95))
    return [f"- {'met' if ok else '**missed**'}: {text}" for text, ok in checks]


def report_stage(work: Path, results: Path) -> Path:
    """The ensemble section of `results` (a RESULTS.md) from WORK/ensemble's results (between START and END)."""
    from moefuse.fusion.ensemble_folder import read_ensemble_config

    out = work / "ensemble"
    ens = {name: read_ensemble_config(out / name) for name in ENSEMBLES}
    distilled = json.loads((out / "eval-distilled.json").read_text())
    cost = json.loads((out / "cost.json").read_text())
    head = ["digit / avqa"] * 3
    lines = [START, "## Ensembles of models and distillation (issue #25)", "",
             "Command: `python benchmarks/avdigits/ensemble.py --data ../shared/data --work runs/avdigits` "
             "(`make bench-ensemble`). Accuracy in % on the validation split; every ensemble figure is cross-fitted "
             "over 5 folds (from samples its combiner was not fit on); a member's figure is over the samples it "
             "answers (`–`: none, its modality is gone). The combiners were fit on the split as it is and with each "
             "modality removed; the corruptions were never fit on.", "",
             "| model | full | audio removed | image removed |", "|---|" + "---|" * len(head)]
    lines += accuracy_rows(ens, distilled, ["full", "audio removed", "image removed"])
    lines += ["", "| model | " + " | ".join(CONDITION_OF.values()) + " |", "|---|" + "---|" * 4]
    lines += accuracy_rows(ens, distilled, list(CONDITION_OF.values()))
    lines += ["", "Calibration (full inputs): ECE / AUROC of the confidence for wrong answers.", "",
              "| model | digit | avqa |", "|---|---|---|"]
    for rule in ("soft", "weighted", "gated", "majority"):
        lines.append(f"| ensemble of all 7, {rule} | " + " | ".join(
            f"{_num(figure(ens['all'], 'ece', rule, 'full', t))} / {_num(figure(ens['all'], 'auroc', rule, 'full', t))}"
            for t in ("digit", "avqa")) + " |")
    d = distilled["full"]
    lines.append("| distilled | " + " | ".join(f"{_num(d[t]['ece'])} / {_num(d[t]['selective']['auroc_confidence'])}"
                                             for t in ("digit", "avqa")) + " |")
    threads = next(iter(cost.values()))["threads"]
    lines += ["", f"Cost, measured side by side in one process ({threads} torch threads; batch-1 p50 with cold encoder "
              "caches and batch-32 time per sample, median over rounds; the parameters of an ensemble count an "
              "encoder shared by identical weights once):", "",
              "| model | parameters | ms / sample, batch 1 | ms / sample, batch 32 |", "|---|---:|---:|---:|"]
    for name, c in cost.items():
        lines.append(f"| {name} | {c['parameters']:,} | {statistics.median(c['b1_ms']):.1f} | "
                     f"{statistics.median(c['b32_ms']):.2f} |")
    lines += ["", "Targets:", "", *target_lines(ens, distilled, cost), "", END]
    text = results.read_text() if results.exists() else ""
    if START in text:
        text = text[: text.index(START)] + "\n".join(lines) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    atomic_write_text(results, text)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder with fsdd/ and mnist/")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "avdigits")
    p.add_argument("--members", nargs="+", default=list(MEMBERS), choices=list(MEMBERS),
                   help="the members to train (the members stage); the later stages need all of them")
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="the RESULTS.md to write the section to")
    p.add_argument("--train-member", choices=list(TRAINED), help=argparse.SUPPRESS)  # the child's job
    p.add_argument("overrides", nargs="*", help="config overrides for every member, e.g. train.max_steps=300")
    args = p.parse_args(argv)
    manifest = prepare(args.data, args.work, quick=False)
    shards = build(manifest, args.work)
    init = pretrain_encoders(manifest.parent, args.work, False, [o for o in args.overrides
                                                                 if not o.startswith("distill.")])
    if args.train_member:
        train_member(args.train_member, shards, args.work, init, args.overrides)
        return 0
    out = args.work / "ensemble"
    out.mkdir(parents=True, exist_ok=True)
    folders = members_stage(args, args.overrides) if "members" in args.stages else \
        {name: args.work / name / "model" for name in MEMBERS}
    built = ensembles_stage(folders, shards, out) if "ensembles" in args.stages else \
        {name: out / name for name in ENSEMBLES}
    distilled = distill_stage(args, built["all"], args.overrides) if "distill" in args.stages else \
        args.work / "distilled" / "model"
    if "evaluate" in args.stages:
        evaluate_stage({"distilled": distilled}, shards, out)
    if "cost" in args.stages:
        cost_stage({"best member (moe)": folders["moe"], "ensemble of all 7": built["all"],
                    "ensemble of the 3 MoE seeds": built["moe3"], "distilled": distilled}, shards, out)
    if "report" in args.stages:
        print(f"wrote {report_stage(args.work, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
