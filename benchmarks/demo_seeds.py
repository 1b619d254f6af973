"""The demo's figures over seeds: `moefuse demo --seed S` for each seed, one after another, then each task's
accuracy on the validation and test splits, the best single voter and the calibration error, as mean ± standard
deviation over the seeds. With --readme, the README's demo table (between its demo-figures markers) is rewritten
from this run, so the figures there are always ones this command printed.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --work runs/demo-seeds --readme   # make demo-figures

Each seed is a full `make demo` (about 6 min on 2 cores); a seed whose folder already holds its eval files is
read, not rerun (--rerun to redo it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _bench import REPO, command_line

START, END = "<!-- demo-figures:start -->", "<!-- demo-figures:end -->"


def run_seed(work: Path, seed: int, rerun: bool, extra: list[str]) -> dict[str, dict]:
    """{split: evaluation report} of `moefuse demo --seed SEED --out WORK/seed-SEED`."""
    out = work / f"seed-{seed}"
    files = {"val": out / "eval.json", "test": out / "eval-test.json"}
    if rerun or not all(f.is_file() for f in files.values()):
        if out.exists():
            raise SystemExit(f"demo_seeds: {out} holds an unfinished or earlier run; remove it or pass --work")
        cmd = [sys.executable, "-m", "moefuse", "demo", "--out", str(out), "--seed", str(seed), *extra]
        print(f"seed {seed}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return {split: json.loads(f.read_text()) for split, f in files.items()}


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(reports: list[dict[str, dict]]) -> str:
    """A markdown table: a row per task, mean ± sd over the seeds."""
    lines = ["| task | val accuracy | test accuracy | best single voter (test) | ECE before → after (test) |",
             "|---|---:|---:|---:|---|"]
    for task in reports[0]["val"]["tasks"]:
        def col(split: str, key: str, task: str = task) -> list[float]:
            return [r[split]["tasks"][task][key] for r in reports]

        lines.append(f"| {task} | {mean_sd(col('val', 'accuracy'))} | {mean_sd(col('test', 'accuracy'))} | "
                     f"{mean_sd(col('test', 'best_single_head_accuracy'))} | "
                     f"{mean_sd(col('test', 'ece_uncalibrated'))} → {mean_sd(col('test', 'ece'))} |")
    return "\n".join(lines)


def rewrite_readme(text: str, seeds: list[int]) -> None:
    readme = REPO / "README.md"
    old = readme.read_text()
    if START not in old or END not in old:
        raise SystemExit(f"demo_seeds: README.md has no {START} ... {END} block to rewrite")
    block = (f"{START}\nMean ± standard deviation over seeds {', '.join(map(str, seeds))} (`{command_line()}`):\n\n"
             f"{text}\n{END}")
    head, rest = old.split(START, 1)
    readme.write_text(head + block + rest.split(END, 1)[1])
    print("rewrote README.md's demo figures", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "demo-seeds")
    p.add_argument("--rerun", action="store_true", help="rerun seeds whose folders hold results")
    p.add_argument("--readme", action="store_true", help="rewrite the README's demo table from this run")
    p.add_argument("extra", nargs="*", help="extra `moefuse demo` arguments, e.g. --count 400 train.max_steps=20")
    args = p.parse_args()
    reports = [run_seed(args.work, s, args.rerun, args.extra) for s in args.seeds]
    text = table(reports)
    print(text)
    print(f"\n{command_line()}")
    if args.readme:
        rewrite_readme(text, args.seeds)


if __name__ == "__main__":
    main()
