"""AV-digits end to end: prepare -> build-shards -> pretrain the image and audio encoders alone (probe_encoders.py
--save, into WORK/encoders/) -> train configs/avdigits.yaml and its ablations from them -> evaluate ->
benchmarks/avdigits/RESULTS.md.

    python benchmarks/avdigits/run.py --data ../shared/data --work runs/avdigits       (make bench-avdigits)

Variants, all with the same data, seed, steps, heads and pretrained encoders (validation = the held-out speaker
theo, MNIST 7000-7999):
    image_only  encoders.audio: null, audio removed from every sample   (text still reads avqa questions)
    audio_only  encoders.image: null, images removed from every sample
    concat      late fusion: per-modality means + presence flags -> MLP
    dense       fusion blocks with a dense SwiGLU FFN of width top_k * d_expert (equal active compute to moe)
    moe         the sparse-MoE fusion stack (configs/avdigits.yaml as is); its export stays in WORK/moe/model
Each variant is then evaluated on val; moe also with each modality removed, noised (0 dB SNR) and taken from another
sample, and image_only / audio_only under what touches their modality (the robustness table, CONDITIONS).
A run of all five variants writes benchmarks/avdigits/RESULTS.md and routing_heatmap.png; a partial one (--variants
or --quick) writes them into WORK instead. Nothing here reads the reserved split (speaker yweweler, MNIST >= 8000):
prepare.py writes it only when asked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from moefuse.configutil import atomic_write_text  # noqa: E402  (after the path insert, for a plain checkout)

VARIANTS: dict[str, list[str]] = {
    "image_only": ["encoders.audio=null", "data.drop_modalities=[audio]"],
    "audio_only": ["encoders.image=null", "data.drop_modalities=[image]"],
    "concat": ["fusion.kind=concat"],
    "dense": ["fusion.kind=dense"],
    "moe": [],
}
QTYPES = ["written", "spoken", "sum", "same", "larger"]
CONDITIONS: dict[str, dict] = {  # robustness: evaluate's --drop / --corrupt for each condition
    "full": {},
    "audio removed": {"drop_modalities": ["audio"]},
    "image removed": {"drop_modalities": ["image"]},
    "audio noise 0 dB": {"corrupt": ["audio:noise:0"]},
    "image noise 0 dB": {"corrupt": ["image:noise:0"]},
    "audio conflict": {"corrupt": ["audio:conflict"]},
    "image conflict": {"corrupt": ["image:conflict"]},
}
ROBUST_VARIANTS = {"moe": list(CONDITIONS),  # a single-modality variant only under what touches its modality
                   "image_only": ["full", "image noise 0 dB", "image conflict"],
                   "audio_only": ["full", "audio noise 0 dB", "audio conflict"]}


def prepare(data: Path, work: Path, quick: bool) -> Path:
    out = work / "data"
    if not (out / "manifest.jsonl").exists():
        cmd = [sys.executable, str(HERE / "prepare.py"), "--fsdd", str(data / "fsdd"), "--mnist", str(data / "mnist"),
               "--out", str(out)]
        if quick:
            cmd += ["--limit", "200"]
        subprocess.run(cmd, check=True)
    return out / "manifest.jsonl"


def pretrain_encoders(data: Path, work: Path, quick: bool, extra: list[str]) -> list[str]:
    """Per-modality pretraining: probe_encoders.py trains the image and the audio encoder of configs/avdigits.yaml
    alone on the train split's own digits (with the run's train.seed) and saves them; every variant's joint training
    starts from them."""
    from moefuse.config import load_config

    cfg = load_config(REPO / "configs" / "avdigits.yaml", extra)
    enc = cfg.encoders
    # Everything that shapes the encoder comes from the config, so that the saved weights fit its init_file.
    flags = {"image": ["--preset", enc.image.preset, "--conv-stem", *map(str, enc.image.conv_stem)],
             "audio": ["--preset", enc.audio.preset, "--frontend", enc.audio.frontend, "--mel-bins",
                       str(enc.audio.mel_bins), "--audio-seconds", str(enc.audio.max_seconds)]}
    overrides = []
    for modality, args in flags.items():
        file = work / "encoders" / f"{modality}.safetensors"
        if not file.exists():
            subprocess.run([sys.executable, str(HERE / "probe_encoders.py"), "--data", str(data), "--modality",
                            modality, *args, "--seed", str(cfg.train.seed), "--save", str(file),
                            *(["--steps", "20"] if quick else [])], check=True)
        overrides.append(f"encoders.{modality}.init_file={file}")
    return overrides


def build(manifest: Path, work: Path) -> Path:
    from moefuse.datasets import BuildOptions, build_shards

    shards = work / "shards"
    if not (shards / "dataset.json").exists():
        build_shards(manifest, shards, BuildOptions(maxcount=500, image_size=32, workers=2, overwrite=True))
    return shards


def train_variant(name: str, shards: Path, work: Path, init: list[str], extra: list[str]) -> Path:
    from moefuse.config import load_config
    from moefuse.train.recipe import train

    run = work / name
    if (run / "model" / "model.safetensors").exists():
        print(f"[{name}] reusing {run / 'model'}")
        return run / "model"
    if run.exists():
        shutil.rmtree(run)
    cfg = load_config(REPO / "configs" / "avdigits.yaml",
                      [f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]", f"train.output_dir={run}",
                       *init, *VARIANTS[name], *extra])  # after init: encoders.audio=null drops it again
    start = time.perf_counter()
    train(cfg)
    atomic_write_text(run / "train_seconds.txt", f"{time.perf_counter() - start:.0f}\n")
    return run / "model"


def robustness(name: str, model: Path, shards: Path, full: dict, conditions: list[str] | None = None
               ) -> dict[str, dict[str, float]]:
    """{condition: {task: accuracy}} of one model under `conditions` (default: its variant's ROBUST_VARIANTS);
    `full` is its report under full inputs."""
    from moefuse.datasets.corruption import Corruption
    from moefuse.evaluation.report import evaluate

    out = {}
    for condition in ROBUST_VARIANTS.get(name, []) if conditions is None else conditions:
        how = CONDITIONS[condition]
        report = full if not how else evaluate(
            model, [str(shards)], split="val", progress=False, drop_modalities=how.get("drop_modalities"),
            corrupt=[Corruption.parse(c) for c in how.get("corrupt", [])])
        out[condition] = {t: d["accuracy"] for t, d in report["tasks"].items()}
        print(f"[{name}] {condition}: " + ", ".join(f"{t}={a:.3f}" for t, a in out[condition].items()))
    return out


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def write_results(results: dict[str, dict], work: Path, command: str, out_dir: Path) -> Path:
    """RESULTS.md in out_dir from each variant's evaluation (eval-<variant>.json), with NOTES.md appended; `command`
    is the run.py arguments that trained and evaluated them."""
    lines = ["# AV-digits results", "",
             "Validation = speaker theo (unseen in training) and MNIST test images 7000-7999; the reserved split "
             "(yweweler, MNIST >= 8000) was not read. Accuracy in %.", "",
             f"Command: `python benchmarks/avdigits/run.py {command}`", "",
             "| variant | digit | avqa | " + " | ".join(f"avqa {q}" for q in QTYPES)
             + " | digit best head | avqa best head | train s |",
             "|---|---|---|" + "---|" * len(QTYPES) + "---|---|---|"]
    for name, r in results.items():
        d, a = r["tasks"].get("digit", {}), r["tasks"].get("avqa", {})
        by_q = a.get("accuracy_by_qtype", {})
        lines.append(f"| {name} | {pct(d.get('accuracy'))} | {pct(a.get('accuracy'))} | "
                     + " | ".join(pct(by_q.get(q, {}).get("accuracy")) for q in QTYPES)
                     + f" | {pct(d.get('best_single_head_accuracy'))} | {pct(a.get('best_single_head_accuracy'))} | "
                     + f"{r.get('train_seconds', '–')} |")
    lines += robustness_table(results)
    lines += ["", "## Targets of issue #13, on these runs (one seed)", ""]
    lines += [f"- {'met' if ok else '**missed**'}: {text}" for text, ok in target_checks(results)]
    lines += ["", "## Routing (moe)", "", "![modality x expert routing](routing_heatmap.png)", "",
              "Fraction of each modality's routed assignments per expert on the validation split: per layer in the "
              "heatmap, summed over the layers below (experts 0..E-1).", ""]
    moe = results.get("moe", {})
    if moe.get("routing"):
        for k, v in moe["routing"].items():
            if k.startswith("expert_load/"):
                lines.append(f"- {k.split('/', 1)[1]}: {', '.join(f'{x:.2f}' for x in v)}")
    shown = work.resolve().relative_to(REPO) if work.resolve().is_relative_to(REPO) else work
    lines += ["", f"The exported MoE model: `{shown / 'moe' / 'model'}` (loaded by `moefuse evaluate` and "
              f"`moefuse predict --checkpoint`).", ""]
    notes = HERE / "NOTES.md"  # hand-written: what the figures mean, what was tried where a target is missed
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    out = out_dir / "RESULTS.md"
    old = out.read_text() if out.exists() else ""
    start, end = "<!-- ensemble:start -->", "<!-- ensemble:end -->"  # ensemble.py's section: kept as it is
    if start in old and end in old:
        lines += [old[old.index(start): old.index(end) + len(end)], ""]
    atomic_write_text(out, "\n".join(lines))
    return out


def robustness_table(results: dict[str, dict]) -> list[str]:
    """Accuracy (digit / avqa) per condition (rows) and variant (columns); – where a condition does not apply."""
    names = [n for n in ROBUST_VARIANTS if results.get(n, {}).get("robustness")]
    if not names:
        return []
    lines = ["", "## Robustness: one model for every modality subset, and corrupted modalities", "",
             "Accuracy digit / avqa in % on the validation split under `moefuse evaluate --drop` / `--corrupt` "
             "(noise: white noise as strong as the signal, 0 dB SNR; conflict: the modality of another sample "
             "of the batch). Single-modality variants only under what touches their modality.", "",
             "| condition | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for condition in CONDITIONS:
        cells = []
        for n in names:
            r = results[n]["robustness"].get(condition)
            cells.append("–" if r is None else f"{pct(r.get('digit'))} / {pct(r.get('avqa'))}")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return lines


def target_checks(results: dict[str, dict]) -> list[tuple[str, bool]]:
    """Issue #13's targets, each as (what was measured, met)."""
    def task(v: str, t: str) -> dict:
        return results.get(v, {}).get("tasks", {}).get(t, {})

    checks = []
    for name in ("digit", "avqa"):
        t = task("moe", name)
        if not t:
            continue
        best = t["best_single_head_accuracy"]
        voters = ", ".join(f"{v} {pct(a)}" for v, a, c in zip(t["voters"], t["head_accuracy"], t["head_coverage"])
                           if c > 0)
        div = t.get("diversity")  # eval-*.json written before it have none
        spread = f"; some voter right on {pct(div['oracle_accuracy'])}, hard majority {pct(div['majority_accuracy'])}" \
            if div else ""
        checks.append((f"{name}: ensemble >= its best single voter + 1.0: {pct(t['accuracy'])} vs {pct(best)} "
                       f"(voters: {voters}{spread})", t["accuracy"] >= best + 0.01))
        checks.append((f"{name}: ECE after temperature scaling <= 0.03: {t['ece']:.3f} (before "
                       f"{t['ece_uncalibrated']:.3f}, T {t['temperature']:.2f})", t["ece"] <= 0.03))
        auroc = t["selective"]["auroc_confidence"]
        checks.append((f"{name}: AUROC of confidence for wrong answers >= 0.85: {auroc:.3f}",
                       auroc is not None and auroc >= 0.85))
    avqa, digit = task("moe", "avqa"), task("moe", "digit")
    if avqa:
        worst = min((v["accuracy"] for v in avqa["accuracy_by_qtype"].values()), default=0.0)
        checks.append((f"avqa >= 95% ({pct(avqa['accuracy'])}) with every question type >= 90% (worst {pct(worst)})",
                       avqa["accuracy"] >= 0.95 and worst >= 0.9))
    if digit:
        checks.append((f"digit >= 85%: {pct(digit['accuracy'])}", digit["accuracy"] >= 0.85))
    robust = results.get("moe", {}).get("robustness", {})
    for removed, single in (("audio", "image_only"), ("image", "audio_only")):
        fused, alone = robust.get(f"{removed} removed", {}).get("digit"), task(single, "digit").get("accuracy")
        if fused is not None and alone is not None:
            checks.append((f"digit with the {removed} removed within 2 points of {single}: {pct(fused)} vs "
                           f"{pct(alone)}", fused >= alone - 0.02))
    for name, r in results.items():
        seconds = r.get("train_seconds")
        if isinstance(seconds, str) and seconds.isdigit():
            checks.append((f"{name} trained in <= 15 minutes: {seconds} s", int(seconds) <= 900))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder with fsdd/ and mnist/")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "avdigits")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--quick", action="store_true", help="200-sample subset and 20 steps: a smoke run, not results")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: write RESULTS.md again from WORK's eval-<variant>.json (after "
                   "an edit of NOTES.md); give the arguments of the run that wrote them")
    p.add_argument("overrides", nargs="*", help="config overrides for every variant, e.g. train.max_steps=300 "
                   "(put them before --variants, which takes every word after it)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    command = " ".join(a for a in argv if a != "--report-only")
    # Only a full run replaces the committed RESULTS.md and heatmap; a partial one (some variants, or --quick)
    # writes its own into WORK.
    out_dir = HERE if set(args.variants) == set(VARIANTS) and not args.quick else args.work
    if args.report_only:
        return report_only(args.work, args.variants, command, out_dir)
    if not (args.data / "fsdd").is_dir() or not (args.data / "mnist").is_dir():
        print(f"error: {args.data} must hold fsdd/ and mnist/ (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    extra = list(args.overrides) + (["train.max_steps=20", "train.eval_every=10", "train.save_every=10"]
                                    if args.quick else [])
    manifest = prepare(args.data, args.work, args.quick)
    shards = build(manifest, args.work)
    init = pretrain_encoders(manifest.parent, args.work, args.quick, extra)
    from moefuse.evaluation.report import evaluate

    results = {}
    for name in args.variants:
        model = train_variant(name, shards, args.work, init, extra)
        heatmap = out_dir / "routing_heatmap.png" if name == "moe" else None
        results[name] = evaluate(model, [str(shards)], split="val", heatmap=heatmap, progress=False)
        results[name]["robustness"] = robustness(name, model, shards, results[name])
        seconds = model.parent / "train_seconds.txt"
        results[name]["train_seconds"] = seconds.read_text().strip() if seconds.exists() else "–"
        atomic_write_text(args.work / f"eval-{name}.json", json.dumps(results[name], indent=2))
        print(f"[{name}] " + ", ".join(f"{t}={d['accuracy']:.3f}" for t, d in results[name]["tasks"].items()))
    print(f"wrote {write_results(results, args.work, command, out_dir)}")
    return 0


def report_only(work: Path, variants: list[str], command: str, out_dir: Path) -> int:
    """--report-only: RESULTS.md from the eval-<variant>.json a run wrote into WORK, nothing retrained."""
    files = {name: work / f"eval-{name}.json" for name in variants}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        print(f"error: --report-only needs {', '.join(missing)}: run the same command without --report-only first",
              file=sys.stderr)
        return 2
    results = {name: json.loads(f.read_text()) for name, f in files.items()}
    print(f"wrote {write_results(results, work, command, out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
