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
    evaluate    each member under every condition (WORK/ensemble/eval-<member>.json)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from run import CONDITIONS, REPO, VARIANTS, build, prepare, pretrain_encoders

from moefuse.configutil import atomic_write_text

MEMBERS: dict[str, tuple[str, int]] = {  # member -> (run.py variant, train.seed)
    "moe": ("moe", 0), "moe_seed1": ("moe", 1), "moe_seed2": ("moe", 2), "dense": ("dense", 0),
    "concat": ("concat", 0), "image_only": ("image_only", 0), "audio_only": ("audio_only", 0),
}
STAGES = ["members", "evaluate"]


def train_member(name: str, shards: Path, work: Path, init: list[str], extra: list[str]) -> Path:
    """Train one member in this process (the child's job) -> its model folder; WORK/<name>/train_seconds.txt."""
    import shutil

    from moefuse.config import load_config
    from moefuse.train.recipe import train

    variant, seed = MEMBERS[name]
    run = work / name
    if (run / "model" / "model.safetensors").exists():
        return run / "model"
    if run.exists():  # a run that stopped half-way: it is this script's own output, started again
        shutil.rmtree(run)
    cfg = load_config(REPO / "configs" / "avdigits.yaml",
                      [f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]", f"train.output_dir={run}",
                       f"train.seed={seed}", *init, *VARIANTS[variant], *extra])
    start = time.perf_counter()
    train(cfg)
    atomic_write_text(run / "train_seconds.txt", f"{time.perf_counter() - start:.0f}\n")
    return run / "model"


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


def evaluate_stage(folders: dict[str, Path], shards: Path, out: Path) -> dict[str, dict]:
    """{member: {condition: evaluate's report}} under every condition, each written to out/eval-<member>.json."""
    from moefuse.datasets.corruption import Corruption
    from moefuse.evaluation.report import evaluate

    results = {}
    for name, folder in folders.items():
        file = out / f"eval-{name}.json"
        if file.exists():
            results[name] = json.loads(file.read_text())
            continue
        results[name] = {}
        for condition, how in CONDITIONS.items():
            report = evaluate(folder, [str(shards)], split="val", progress=False,
                              drop_modalities=how.get("drop_modalities"),
                              corrupt=[Corruption.parse(c) for c in how.get("corrupt", [])])
            results[name][condition] = report
            print(f"[{name}] {condition}: " + ", ".join(f"{t}={d['accuracy']:.3f}"
                                                        for t, d in report["tasks"].items()), flush=True)
        atomic_write_text(file, json.dumps(results[name], indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder with fsdd/ and mnist/")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "avdigits")
    p.add_argument("--members", nargs="+", default=list(MEMBERS), choices=list(MEMBERS))
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    p.add_argument("--train-member", choices=list(MEMBERS), help=argparse.SUPPRESS)  # the child's job
    p.add_argument("overrides", nargs="*", help="config overrides for every member, e.g. train.max_steps=300")
    args = p.parse_args(argv)
    manifest = prepare(args.data, args.work, quick=False)
    shards = build(manifest, args.work)
    init = pretrain_encoders(manifest.parent, args.work, False, args.overrides)
    if args.train_member:
        train_member(args.train_member, shards, args.work, init, args.overrides)
        return 0
    out = args.work / "ensemble"
    out.mkdir(parents=True, exist_ok=True)
    folders = members_stage(args, args.overrides) if "members" in args.stages else \
        {name: args.work / name / "model" for name in args.members}
    if "evaluate" in args.stages:
        evaluate_stage(folders, shards, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
