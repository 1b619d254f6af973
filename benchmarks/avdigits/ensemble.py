"""AV-digits ensembles (issue #25), replicated over seeds: train the members, each in a fresh process -> build one
ensemble per seed -> distil one model per seed -> evaluate everything under full inputs, each modality removed and
each modality corrupted -> the cost of each -> the ensemble section of RESULTS.md, every figure a mean ± sd over
the seeds.

    python benchmarks/avdigits/ensemble.py --data ../shared/data --work runs/avdigits        (make bench-ensemble)

Members (all from the same pretrained encoders, data and steps as run.py's variants): for each seed in --seeds
(default 0, 1, 2), the MoE model, dense, concat, image only and audio only trained with train.seed = that seed
(WORK/<variant> for seed 0, WORK/<variant>_seed<N> for the others). Each is trained in its own Python process, so
nothing a member leaves behind in a process (allocator state, thread pools, caches, RNG streams of libraries that
are not seeded) touches the next (issue #25's reproducibility question: benchmarks/repro_check.py).

Stages (`--stages`, default all, in this order; each reuses what an earlier run of it left in WORK):
    members     train the members of each seed that WORK does not hold yet (WORK/<member>/model)
    ensembles   `moefuse ensemble` (the library call) of each seed's five members (WORK/ensemble/seed<N>), and of
                the three MoE seeds (WORK/ensemble/moe3: a deep ensemble, one run since it takes every seed), on
                the validation split: every rule cross-fitted over 5 folds, fit on the split as it is and with each
                modality removed, scored also under each corruption (never fit on)
    distill     per seed, the MoE config with that seed trained on that seed's ensemble's soft targets
                (`distill.teacher`, the section's defaults T = 2, weight 0.5: WORK/distilled[_seed<N>]); and for
                seed 0 only, each of TRIED, the other distillation settings tried (WORK/distilled-<name>)
    evaluate    every distilled model under every condition (WORK/ensemble/eval-<name>.json)
    cost        parameters, and ms per sample at batch 1 and batch 32 of seed 0's best member, its ensemble, the
                MoE-seed ensemble and its distilled model, measured side by side (benchmarks/compress.py's
                round-robin `measure`); one seed, as the cost does not depend on it
    report      the ensemble section of benchmarks/avdigits/RESULTS.md (between its ensemble markers; run.py keeps
                that section when it rewrites the file), over the seeds whose ensemble and distilled model exist

The ensembles' combiners are fit on the validation split (cross-fitted: every ensemble figure of that split comes
from samples its combiner was not fit on); a distilled student's teacher is its seed's ensemble, whose combiner saw
the validation labels, so the student's validation figures carry that (small, indirect) leak.
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

SEEDS = [0, 1, 2]
KINDS = ["moe", "dense", "concat", "image_only", "audio_only"]  # run.py's variants


def member_name(kind: str, seed: int) -> str:
    """A member's folder name: the variant for seed 0 (run.py's names), with _seed<N> after it for the others."""
    return kind if seed == 0 else f"{kind}_seed{seed}"


def student_name(seed: int, tried: str = "") -> str:
    """A distilled model's folder name: distilled[_seed<N>], or distilled-<tried> for a setting of TRIED."""
    return f"distilled-{tried}" if tried else ("distilled" if seed == 0 else f"distilled_seed{seed}")


MEMBERS: dict[str, tuple[str, int]] = {member_name(k, s): (k, s) for s in SEEDS for k in KINDS}
"""member -> (run.py variant, train.seed), seed by seed"""
TRIED: dict[str, list[str]] = {"w0.9-T4": ["distill.weight=0.9", "distill.temperature=4"]}
"""Other distillation settings, each trained once (seed 0, seed 0's teacher) and reported beside the defaults; chosen
before any was run, not picked on the validation figures"""
TRAINED: dict[str, tuple[str, int, list[str]]] = {  # what --train-member trains -> (variant, seed, overrides)
    **{name: (kind, seed, []) for name, (kind, seed) in MEMBERS.items()},
    **{student_name(s): ("moe", s, []) for s in SEEDS}, **{student_name(0, t): ("moe", 0, o) for t, o in TRIED.items()}}
STAGES = ["members", "ensembles", "distill", "evaluate", "cost", "report"]
SCORED_CORRUPTIONS = ["audio:noise:0", "image:noise:0", "audio:conflict", "image:conflict"]
CONDITION_OF = {"audio:noise:0": "audio noise 0 dB", "image:noise:0": "image noise 0 dB",
                "audio:conflict": "audio conflict", "image:conflict": "image conflict"}


def train_member(name: str, shards: Path, work: Path, init: list[str], extra: list[str]) -> Path:
    """Train one member in this process (the child's job) -> its model folder; WORK/<name>/train_seconds.txt."""
    import shutil

    from moefuse.config import load_config
    from moefuse.train.recipe import train

    variant, seed, overrides = TRAINED[name]
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
                       f"train.seed={seed}", *init, *VARIANTS[variant], *extra, *overrides])
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
    """The model folder of every member of --seeds, training each one WORK lacks in a fresh process."""
    folders = {}
    for name in [member_name(k, s) for s in args.seeds for k in KINDS]:
        folder = args.work / name / "model"
        if not (folder / "model.safetensors").exists():
            print(f"[{name}] training in a fresh process", flush=True)
            subprocess.run([sys.executable, __file__, "--data", str(args.data), "--work", str(args.work),
                            "--train-member", name, *extra], check=True)
        folders[name] = folder
    return folders


def ensembles_of(seeds: list[int]) -> dict[str, list[str]]:
    """{ensemble: its members}: seed<N> (that seed's five members) for each seed, and moe3 (the MoE model of seeds
    0, 1 and 2) when all three are among `seeds`."""
    out = {f"seed{s}": [member_name(k, s) for k in KINDS] for s in seeds}
    if set(SEEDS) <= set(seeds):
        out["moe3"] = [member_name("moe", s) for s in SEEDS]
    return out


def ensembles_stage(work: Path, seeds: list[int], shards: Path) -> dict[str, Path]:
    """Each ensemble of `seeds` built (cross-fitted figures in its ensemble.json) -> {name: its folder}."""
    from moefuse.datasets.corruption import Corruption
    from moefuse.evaluation.ensemble import build_ensemble, format_build

    built = {}
    for name, members in ensembles_of(seeds).items():
        folder = work / "ensemble" / name
        if not (folder / "ensemble.json").exists():
            build = build_ensemble([work / m / "model" for m in members], [str(shards)], folder, split="val",
                                   combine="gated", folds=5, progress=False,
                                   score_corrupt=[Corruption.parse(c) for c in SCORED_CORRUPTIONS])
            print(f"[ensemble {name}]\n{format_build(build)}", flush=True)
        built[name] = folder
    return built


def students_of(seeds: list[int]) -> dict[str, int]:
    """{student: its seed}: per seed the defaults' student, and (with seed 0) each setting of TRIED."""
    return {**{student_name(s): s for s in seeds}, **{student_name(0, t): 0 for t in TRIED if 0 in seeds}}


def distill_stage(args: argparse.Namespace, extra: list[str]) -> None:
    """Train each student of --seeds (`students_of`) that WORK lacks, in a fresh process: the MoE config taught by
    its seed's ensemble."""
    for name, seed in students_of(args.seeds).items():
        if not (args.work / name / "model" / "model.safetensors").exists():
            teacher = args.work / "ensemble" / f"seed{seed}"
            print(f"[{name}] training in a fresh process, teacher {teacher}", flush=True)
            subprocess.run([sys.executable, __file__, "--data", str(args.data), "--work", str(args.work),
                            "--train-member", name, *extra, f"distill.teacher={teacher}"], check=True)


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
RULES = ["soft", "weighted", "gated", "majority"]
TASKS = ["digit", "avqa"]


def stat(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """`mean ± sd` over the seeds (sample sd), the value alone for one run, `–` where a value is missing (a
    member that answers no sample: its modality is gone)."""
    if not values or any(v is None for v in values):
        return "–"
    xs = [scale * v for v in values]  # type: ignore[operator]
    mean = f"{statistics.fmean(xs):.{digits}f}"
    return mean if len(xs) == 1 else f"{mean} ± {statistics.stdev(xs):.{digits}f}"


def figure(cfg, kind: str, name: str, condition: str, task: str) -> float | None:
    """One figure of an ensemble.json (EnsembleConfig) under a RESULTS condition."""
    from moefuse.fusion.ensemble_folder import figure_key

    key = figure_key(kind, name, TABLE_CONDITIONS[condition])
    return cfg.figures.get(key, {}).get(task)


class Results:
    """What the stages left in WORK, read for the report: the ensemble of each seed, the MoE-seed ensemble (if
    built), each distilled model's evaluation, the cost."""

    def __init__(self, work: Path, seeds: list[int]) -> None:
        from moefuse.fusion.ensemble_folder import read_ensemble_config

        out = work / "ensemble"
        self.seeds = seeds
        self.ens = {s: read_ensemble_config(out / f"seed{s}") for s in seeds}
        self.moe3 = read_ensemble_config(out / "moe3") if (out / "moe3" / "ensemble.json").exists() else None
        self.distilled = {s: json.loads((out / f"eval-{student_name(s)}.json").read_text()) for s in seeds}
        self.tried = {t: json.loads((out / f"eval-{student_name(0, t)}.json").read_text()) for t in TRIED
                      if (out / f"eval-{student_name(0, t)}.json").exists()}
        self.cost = json.loads((out / "cost.json").read_text())

    def over_seeds(self, kind: str, name: str, condition: str, task: str) -> list[float | None]:
        """One figure of each seed's ensemble."""
        return [figure(self.ens[s], kind, name, condition, task) for s in self.seeds]

    def distilled_acc(self, evals: list[dict], condition: str, task: str) -> list[float | None]:
        return [e.get(condition, {}).get(task, {}).get("accuracy") for e in evals]


def accuracy_rows(r: Results, conditions: list[str]) -> list[str]:
    """Table rows (accuracy %, `digit / avqa` per condition, mean ± sd over the seeds): each member kind, the best
    member, each seed's ensemble under each rule, the MoE-seed ensemble, the distilled models."""
    def row(label: str, get) -> str:  # get(condition, task) -> values over seeds
        return f"| {label} | " + " | ".join(" / ".join(stat(get(c, t)) for t in TASKS) for c in conditions) + " |"

    rows = [row(f"member {k}", lambda c, t, k=k: [figure(r.ens[s], "member", member_name(k, s), c, t)
                                                for s in r.seeds]) for k in KINDS]
    rows.append(row("**best member** (per seed and column)", lambda c, t: r.over_seeds("best member", "", c, t)))
    rows += [row(f"ensemble of a seed's 5, {rule}", lambda c, t, u=rule: r.over_seeds("ensemble", u, c, t))
             for rule in RULES]
    if r.moe3 is not None:
        rows.append(row("ensemble of the MoE seeds 0, 1, 2, gated (one run)",
                        lambda c, t: [figure(r.moe3, "ensemble", "gated", c, t)]))
    rows.append(row("distilled (one MoE model; T = 2, weight 0.5)",
                    lambda c, t: r.distilled_acc(list(r.distilled.values()), c, t)))
    rows += [row(f"distilled, {' '.join(TRIED[t])} (seed 0, one run)",
                 lambda c, u, e=e: r.distilled_acc([e], c, u)) for t, e in r.tried.items()]
    return rows


def seed_rows(r: Results) -> list[str]:
    """Per seed, full inputs: the best member, the gated ensemble and the distilled model (digit / avqa)."""
    rows = ["| seed | best member | gated ensemble | distilled |", "|---|---|---|---|"]
    for s in r.seeds:
        cells = [figure(r.ens[s], "best member", "", "full", t) for t in TASKS], \
            [figure(r.ens[s], "ensemble", "gated", "full", t) for t in TASKS], \
            [r.distilled[s]["full"][t]["accuracy"] for t in TASKS]
        rows.append(f"| {s} | " + " | ".join(" / ".join(stat([v]) for v in c) for c in cells) + " |")
    return rows


def calibration_rows(r: Results) -> list[str]:
    """ECE / AUROC of the confidence for wrong answers (full inputs), mean ± sd over the seeds."""
    rows = ["| model | digit | avqa |", "|---|---|---|"]
    for rule in RULES:
        rows.append(f"| ensemble of a seed's 5, {rule} | " + " | ".join(
            f"{stat(r.over_seeds('ece', rule, 'full', t), 1, 3)} / {stat(r.over_seeds('auroc', rule, 'full', t), 1, 3)}"
            for t in TASKS) + " |")
    d = list(r.distilled.values())
    rows.append("| distilled | " + " | ".join(
        f"{stat([e['full'][t]['ece'] for e in d], 1, 3)} / "
        f"{stat([e['full'][t]['selective']['auroc_confidence'] for e in d], 1, 3)}" for t in TASKS) + " |")
    return rows


def qtype_rows(r: Results) -> list[str]:
    """avqa accuracy per question type: each seed's gated ensemble (cross-fitted) and the distilled models."""
    qtypes = list(next(iter(r.distilled.values()))["full"]["avqa"].get("accuracy_by_qtype", {}))
    rows = ["| model | " + " | ".join(qtypes) + " |", "|---|" + "---|" * len(qtypes)]
    rows.append("| ensemble of a seed's 5, gated | " + " | ".join(
        stat(r.over_seeds("qtype", f"gated:{q}", "full", "avqa")) for q in qtypes) + " |")
    evals = {"distilled (T = 2, weight 0.5)": list(r.distilled.values()),
             **{f"distilled, {' '.join(TRIED[t])} (seed 0)": [e] for t, e in r.tried.items()}}
    for label, es in evals.items():
        rows.append(f"| {label} | " + " | ".join(
            stat([e["full"]["avqa"]["accuracy_by_qtype"][q]["accuracy"] for e in es]) for q in qtypes) + " |")
    return rows


def cost_rows(cost: dict) -> list[str]:
    rows = ["| model | parameters | ms / sample, batch 1 | ms / sample, batch 32 |", "|---|---:|---:|---:|"]
    for name, c in cost.items():
        rows.append(f"| {name} | {c['parameters']:,} | {statistics.median(c['b1_ms']):.1f} | "
                    f"{statistics.median(c['b32_ms']):.2f} |")
    return rows


def mean(values: list[float | None]) -> float:
    return statistics.fmean(v for v in values if v is not None)


def target_lines(r: Results) -> list[str]:
    """Issue #25's targets, met or missed, on the means over the seeds (with the number of seeds meeting each)."""
    checks = []

    def check(text: str, per_seed: list[bool], ok: bool) -> None:
        checks.append((f"{text} (met in {sum(per_seed)} of {len(per_seed)} seeds)", ok))

    for t in TASKS:
        g, b = r.over_seeds("ensemble", "gated", "full", t), r.over_seeds("best member", "", "full", t)
        check(f"{t}: gated ensemble >= best member + 1.5: {stat(g)} vs {stat(b)}",
              [x >= y + 0.015 for x, y in zip(g, b)], mean(g) >= mean(b) + 0.015)
    for removed, member in (("audio removed", "image_only"), ("image removed", "audio_only")):
        g = r.over_seeds("ensemble", "gated", removed, "digit")
        m = [figure(r.ens[s], "member", member_name(member, s), "full", "digit") for s in r.seeds]
        check(f"digit with the {removed.split()[0]} removed >= {member}: {stat(g)} vs {stat(m)}",
              [x >= y for x, y in zip(g, m)], mean(g) >= mean(m))
    for t in TASKS:
        e, a = r.over_seeds("ece", "gated", "full", t), r.over_seeds("auroc", "gated", "full", t)
        check(f"{t}: gated ECE <= 0.03: {stat(e, 1, 3)}", [x <= 0.03 for x in e], mean(e) <= 0.03)
        check(f"{t}: gated AUROC of confidence for wrong answers >= 0.85: {stat(a, 1, 3)}",
              [x is not None and x >= 0.85 for x in a], mean(a) >= 0.85)
        d = r.distilled_acc(list(r.distilled.values()), "full", t)
        b, g = r.over_seeds("best member", "", "full", t), r.over_seeds("ensemble", "gated", "full", t)
        check(f"{t}: distilled >= best member + 1.0 and within 1.0 of the ensemble: {stat(d)} vs best {stat(b)}, "
              f"ensemble {stat(g)}", [x >= y + 0.01 and x >= z - 0.01 for x, y, z in zip(d, b, g)],
              mean(d) >= mean(b) + 0.01 and mean(d) >= mean(g) - 0.01)
    a = [e["full"]["avqa"] for e in r.distilled.values()]
    worst = [min(q["accuracy"] for q in x["accuracy_by_qtype"].values()) for x in a]
    acc = [x["accuracy"] for x in a]
    check(f"distilled avqa >= 95 % ({stat(acc)}) with every question type >= 90 % (worst {stat(worst)})",
          [x >= 0.95 and w >= 0.90 for x, w in zip(acc, worst)], mean(acc) >= 0.95 and mean(worst) >= 0.90)
    g = r.over_seeds("ensemble", "gated", "full", "avqa")
    qtypes = [k.split(":")[2] for k in r.ens[r.seeds[0]].figures if k.startswith("qtype:gated:") and " @ " not in k]
    worst = [min(figure(r.ens[s], "qtype", f"gated:{q}", "full", "avqa") for q in qtypes) for s in r.seeds]
    check(f"gated ensemble avqa >= 95 % ({stat(g)}) with every question type >= 90 % (worst {stat(worst)})",
          [x >= 0.95 and w >= 0.90 for x, w in zip(g, worst)], mean(g) >= 0.95 and mean(worst) >= 0.90)
    return [f"- {'met' if ok else '**missed**'}: {text}" for text, ok in checks]


def report_stage(work: Path, seeds: list[int], results: Path) -> Path:
    """The ensemble section of `results` (a RESULTS.md) from WORK/ensemble's results (between START and END)."""
    r = Results(work, seeds)
    n = f"mean ± sd over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]} alone"
    lines = [START, "## Ensembles of models and distillation (issue #25)", "",
             "Command: `python benchmarks/avdigits/ensemble.py --data ../shared/data --work runs/avdigits` "
             f"(`make bench-ensemble`). Accuracy in % on the validation split, {n} (each seed trains its own five "
             "members, builds its own ensemble and distils its own student). Every ensemble figure is cross-fitted "
             "over 5 folds (from samples its combiner was not fit on); a member's figure is over the samples it "
             "answers (`–`: none, its modality is gone). The combiners were fit on the split as it is and with each "
             "modality removed; the corruptions were never fit on. Cells: digit / avqa.", "",
             "| model | full | audio removed | image removed |", "|---|---|---|---|"]
    lines += accuracy_rows(r, ["full", "audio removed", "image removed"])
    lines += ["", "| model | " + " | ".join(CONDITION_OF.values()) + " |", "|---|" + "---|" * 4]
    lines += accuracy_rows(r, list(CONDITION_OF.values()))
    lines += ["", "Seed by seed, full inputs:", "", *seed_rows(r)]
    lines += ["", "Calibration (full inputs): ECE / AUROC of the confidence for wrong answers.", "",
              *calibration_rows(r)]
    lines += ["", "avqa by question type (full inputs):", "", *qtype_rows(r)]
    threads = next(iter(r.cost.values()))["threads"]
    lines += ["", f"Cost (seed 0's models), measured side by side in one process ({threads} torch thread"
              f"{'s' if threads != 1 else ''}; batch-1 "
              "p50 with cold encoder caches and batch-32 time per sample, median over rounds; the parameters of an "
              "ensemble count an encoder shared by identical weights once):", "", *cost_rows(r.cost)]
    lines += ["", "Distillation tried: the `distill:` section's defaults (T = 2, weight 0.5) on every seed, and on "
              "seed 0 " + "; ".join(" ".join(o) for o in TRIED.values()) + " (chosen before any run, not picked on the "
              "validation figures).", "", "Targets (on the means over the seeds):", "", *target_lines(r), "", END]
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
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS, choices=SEEDS,
                   help="the seeds to train, ensemble, distil and report (each seed: its five members)")
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
    (args.work / "ensemble").mkdir(parents=True, exist_ok=True)
    if "members" in args.stages:
        members_stage(args, args.overrides)
    if "ensembles" in args.stages:
        ensembles_stage(args.work, args.seeds, shards)
    if "distill" in args.stages:
        distill_stage(args, args.overrides)
    students = {name: args.work / name / "model" for name in students_of(args.seeds)}
    if "evaluate" in args.stages:
        evaluate_stage({n: f for n, f in students.items() if (f / "model.safetensors").exists()}, shards,
                       args.work / "ensemble")
    if "cost" in args.stages and 0 in args.seeds:
        out = args.work / "ensemble"
        cost_stage({"best member (moe)": args.work / "moe" / "model", "ensemble of seed 0's 5": out / "seed0",
                    **({"ensemble of the 3 MoE seeds": out / "moe3"} if (out / "moe3").exists() else {}),
                    "distilled": students[student_name(0)]}, shards, out)
    if "report" in args.stages:
        print(f"wrote {report_stage(args.work, args.seeds, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
