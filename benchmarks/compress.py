"""Compression and inference runtimes side by side: size on disk, start-up, batch-1 latency (cold and warm encoder
caches), batch-32 throughput and accuracy of one model folder run as fp32 eager (today's default) and as each
variant: compiled (torch.compile), int8 (torch.ao dynamic), bf16 (weights and matmuls), expert-pruned
(`moefuse compress`), bf16-stored, and their combinations.

What is measured (CPU, --threads torch threads, ``torch.no_grad``, eval mode, every model in this one process):

* Model folders: the given --checkpoint (or the tiny config trained --steps steps on demo shards), and what
  ``compress_model`` makes of it in --work: ``pruned`` (--keep-experts, default half the experts, routing share on
  the val split) and ``pruned-bf16`` / ``bf16`` (the same with the weight matrices stored in bfloat16).
* size: model.safetensors in MB.
* load s: loading the folder and setting up the runtime in this process (a compiled variant: compiling and the
  warm-up at load; inductor's on-disk cache starts empty (a fresh TORCHINDUCTOR_CACHE_DIR, unless the
  environment sets one), so the first compiled variant compiles from scratch, and a later one reuses the kernels
  of the graphs it shares: a later start-up of the same model is that fast).
* latency, batch 1: ``predict_samples(model, [sample], batch_size=1)`` (collation, forward, routing summary,
  records; ``moefuse predict`` minus reading files) on --latency-samples evenly spaced validation samples, decoded
  as the loader decodes them; p50 and p95 per round. ``cold``: every model's encoder caches are emptied before each
  pass (a fresh predict); ``warm``: a second pass right after, the caches holding what the first saw.
* throughput, batch 32: ``predict_samples`` over the full batches of 32 of the validation split, caches emptied.
* accuracy: ``predict_samples`` over every validation sample at batch 32, per task, and the share of samples whose
  answer equals fp32 eager's.

How: every model first runs every measured sample and batch once, untimed. Then --rounds rounds; in each, every
latency sample is timed on every model back to back (the order rotating from sample to sample), then each model's
batch-32 pass (order rotating between rounds). The table gives each variant's speed-up over fp32 eager as the median
of its per-round ratios (± half their interquartile range): ratios taken close together in time are far steadier
on a shared machine than absolute numbers, which are given pooled over rounds as secondary columns.

    python benchmarks/compress.py --quick            # smoke run: tiny model, a few samples
    python benchmarks/compress.py --checkpoint runs/avdigits/moe/model --shards runs/avdigits/shards
    python benchmarks/compress.py ... --threads 1 --cpu-time     # a busy machine: work, not waiting for a core
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

# A fresh inductor cache (cold start-up), unless the environment names one (before torch loads).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="moefuse-bench-inductor-"))

import torch  # noqa: E402
from _bench import command_line, demo_shards, summary  # noqa: E402
from predict_latency import percentile, train_tiny, val_samples  # noqa: E402

from moefuse.evaluation.compress import compress_model  # noqa: E402
from moefuse.fusion.loading import load_inference_model  # noqa: E402
from moefuse.inference.predict import predict_samples  # noqa: E402

BATCH = 32
# name -> (model folder, runtime, quantize); the first is the baseline, today's default path
VARIANTS: dict[str, tuple[str, str, str]] = {
    "fp32": ("full", "eager", "none"),
    "compiled": ("full", "compiled", "none"),
    "int8": ("full", "eager", "int8"),
    "bf16": ("full", "eager", "bf16"),
    "compiled+bf16": ("full", "compiled", "bf16"),
    "bf16 file": ("bf16", "eager", "none"),
    "pruned": ("pruned", "eager", "none"),
    "pruned+compiled": ("pruned", "compiled", "none"),
    "pruned+bf16 file+compiled": ("pruned-bf16", "compiled", "none"),
}
KINDS = ("cold", "warm")


def make_folders(checkpoint: Path, shards: Path, split: str, work: Path, keep: int, needed: set[str]
                 ) -> dict[str, Path]:
    """The model folders the chosen variants need, made by compress_model from `checkpoint` (routing share on
    `split`)."""
    folders = {"full": checkpoint}
    specs = {"pruned": {"keep": keep}, "pruned-bf16": {"keep": keep, "weights_dtype": "bfloat16"},
             "bf16": {"weights_dtype": "bfloat16"}}
    for name, options in specs.items():
        if name in needed:
            folders[name] = work / name
            with contextlib.redirect_stdout(sys.stderr):
                compress_model(checkpoint, folders[name], [str(shards)], split, **options)
    return folders


def sweep(checkpoint: Path, shards: Path, split: str, work: Path, counts: list[int]) -> None:
    """Accuracy on val against experts kept, with and without merging: compress_model with the routing share on
    `split`, then evaluate() on val."""
    from moefuse.evaluation.report import evaluate

    print(f"\naccuracy on val against experts kept per layer (routing share measured on {split}):\n")
    rows = []
    for count in counts:
        for merge in (False, True):
            folder = work / f"sweep-{count}{'-merged' if merge else ''}"
            with contextlib.redirect_stdout(sys.stderr):
                compress_model(checkpoint, folder, [str(shards)], split, keep=count, merge=merge)
            result = evaluate(folder, [str(shards)], split="val", batch_size=BATCH, progress=False)
            rows.append((count, merge, {t: d["accuracy"] for t, d in result["tasks"].items()}, size_mb(folder)))
    tasks = sorted(rows[0][2])
    print("| experts kept | merged | " + " | ".join(tasks) + " | file MB |")
    print("|---:|---|" + "---:|" * len(tasks) + "---:|")
    for count, merge, acc, mb in rows:
        print(f"| {count} | {'yes' if merge else 'no'} | " + " | ".join(f"{acc[t]:.4f}" for t in tasks)
              + f" | {mb:.1f} |")


def size_mb(folder: Path) -> float:
    return (folder / "model.safetensors").stat().st_size / 2**20


def load_all(chosen: list[str], folders: dict[str, Path]) -> tuple[dict, dict[str, float]]:
    models, load_s = {}, {}
    for name in chosen:
        folder, runtime, quantize = VARIANTS[name]
        t0 = time.perf_counter()
        models[name] = load_inference_model(folders[folder], runtime=runtime, quantize=quantize)
        load_s[name] = time.perf_counter() - t0
        print(f"loaded {name}: {load_s[name]:.1f} s", file=sys.stderr, flush=True)
    return models, load_s


def empty_caches(models: dict) -> None:
    for model in models.values():
        model.cache_encoders(list(model.encoder_caches))


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def measure(models: dict, latency_set: list[dict], batch_samples: list[dict], rounds: int) -> dict:
    """{(name, kind): [[seconds per call] per round]} for kind in cold/warm, and {(name, "b32"): [s per round]}."""
    names = list(models)
    runs: dict = {(n, k): [[] for _ in range(rounds)] for n in names for k in KINDS}
    runs.update({(n, "b32"): [0.0] * rounds for n in names})
    with torch.no_grad():
        for model in models.values():  # warm-up, untimed
            predict_samples(model, batch_samples, batch_size=BATCH)
            for s in latency_set:
                predict_samples(model, [s], batch_size=1)
        for r in range(rounds):
            t0 = time.perf_counter()
            for kind in KINDS:
                if kind == "cold":
                    empty_caches(models)
                for i, s in enumerate(latency_set):
                    order = names[i % len(names):] + names[:i % len(names)]
                    for n in order:
                        runs[(n, kind)][r].append(timed(lambda m=models[n], s=s: predict_samples(m, [s], 1)))
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                empty_caches(models)
                runs[(n, "b32")][r] = timed(lambda m=models[n]: predict_samples(m, batch_samples, BATCH))
            print(f"round {r + 1}/{rounds}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return runs


def accuracy(models: dict, samples: list[dict]) -> dict[str, dict]:
    """Per model: accuracy per task and the share of answers equal to the first model's."""
    preds = {n: predict_samples(m, samples, batch_size=BATCH) for n, m in models.items()}
    base = next(iter(preds.values()))
    out: dict[str, dict] = {}
    for n, rows in preds.items():
        tasks = sorted({r["task"] for r in rows})
        out[n] = {t: sum(r.get("correct", False) for r in rows if r["task"] == t)
                  / max(1, sum(r["task"] == t for r in rows)) for t in tasks}
        out[n]["same"] = sum(a.get("prediction") == b.get("prediction") for a, b in zip(base, rows)) / len(rows)
    return out


def ratio(runs: dict, base: str, name: str, kind: str, q: float) -> tuple[float, float]:
    return summary([percentile(b, q) / percentile(c, q) for b, c in zip(runs[(base, kind)], runs[(name, kind)])])


def print_report(runs: dict, models: dict, sizes: dict, load_s: dict, acc: dict, n_lat: int, n_batch: int,
                 rounds: int) -> None:
    names = list(models)
    base = names[0]
    tasks = [t for t in acc[base] if t != "same"]
    print(f"\nspeed-ups over {base} (median of per-round ratios ± half their IQR; ms and samples/s pooled over "
          f"rounds):\n")
    print("| variant | file MB | load s | b1 p50 cold | b1 p95 cold | b1 p50 warm | b32 throughput | "
          + " | ".join(f"{t} acc" for t in tasks) + " | same answer |")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|")
    for n in names:
        cells = [f"{sizes[n]:.1f} ({sizes[base] / sizes[n]:.2f}x smaller)" if n != base else f"{sizes[n]:.1f}",
                 f"{load_s[n]:.1f}"]
        for kind, q in (("cold", 50), ("cold", 95), ("warm", 50)):
            ms = percentile([t for r in runs[(n, kind)] for t in r], q) * 1e3
            med, half = ratio(runs, base, n, kind, q)
            cells.append(f"{ms:.1f} ms" if n == base else f"{med:.2f}x ±{half:.2f} ({ms:.1f} ms)")
        sps = n_batch * rounds / sum(runs[(n, "b32")])
        thr = summary([b / c for b, c in zip(runs[(base, "b32")], runs[(n, "b32")])])
        cells.append(f"{sps:.0f}/s" if n == base else f"{thr[0]:.2f}x ±{thr[1]:.2f} ({sps:.0f}/s)")
        cells += [f"{acc[n][t]:.4f}" for t in tasks] + [f"{acc[n]['same']:.1%}"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\nlatency: {n_lat} validation samples x {rounds} rounds per variant and cache state; throughput: {n_batch} "
          f"samples (batches of {BATCH}) per round; accuracy: predict_samples over the whole validation split")
    print(f"\nCommand: {command_line()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="the model folder (default: train the tiny config)")
    parser.add_argument("--shards", type=Path, help="dataset folder with a val split (default: make demo shards)")
    parser.add_argument("--work", type=Path, help="folder for the compressed folders (default: temp)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="fp32 (the baseline) is always first")
    parser.add_argument("--keep-experts", type=int, help="experts kept by the pruned variants (default: half)")
    parser.add_argument("--calibration-split", default="train",
                        help="split whose routing share chooses the experts (default train: val stays unseen)")
    parser.add_argument("--sweep", type=int, nargs="+", metavar="N",
                        help="also tabulate val accuracy against these counts of experts kept (with and without "
                             "--merge)")
    parser.add_argument("--count", type=int, default=1200, help="demo samples without --shards (default 1200)")
    parser.add_argument("--steps", type=int, default=150, help="training steps without --checkpoint (default 150)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-samples", type=int, default=24)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time instead of the wall clock: on a busy machine, with "
                             "--threads 1, it measures the work and not the waiting for a core")
    parser.add_argument("--quick", action="store_true", help="smoke run: 400 demo samples, 5 steps, 2 rounds, 6 "
                        "latency samples")
    if parser.parse_args(argv).quick:
        parser.set_defaults(count=400, steps=5, rounds=2, latency_samples=6)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    chosen = ["fp32", *[v for v in args.variants if v != "fp32"]]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="moefuse-compress-bench-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = args.shards or demo_shards(work, args.count, args.seed)
        checkpoint = args.checkpoint or train_tiny(work, shards, args.steps, args.seed)
        experts = load_inference_model(checkpoint).cfg.fusion.num_experts
        folders = make_folders(checkpoint, shards, args.calibration_split, work, args.keep_experts or experts // 2,
                               {VARIANTS[v][0] for v in chosen})
        models, load_s = load_all(chosen, folders)
        sizes = {n: size_mb(folders[VARIANTS[n][0]]) for n in chosen}
        samples = val_samples(shards, models["fp32"])
        k = min(args.latency_samples, len(samples))
        latency_set = [samples[i * len(samples) // k] for i in range(k)]
        full = len(samples) // BATCH * BATCH
        if full == 0:
            sys.exit(f"only {len(samples)} validation samples: need at least {BATCH}")
        acc = accuracy(models, samples)
        runs = measure(models, latency_set, samples[:full], args.rounds)
        counts = {n: models[n].cfg.fusion.num_experts for n in chosen}
        print(f"{'CPU' if args.cpu_time else 'wall'} time; torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads, {os.cpu_count()} CPU cores, load "
              f"average {load:.1f} at start, {os.getloadavg()[0]:.1f} at the end; model {checkpoint} "
              f"({counts['fp32']} experts; pruned: {min(counts.values())}, routing share on "
              f"{args.calibration_split}); {len(samples)} validation samples")
        print_report(runs, models, sizes, load_s, acc, k, full, args.rounds)
        if args.sweep:
            sweep(checkpoint, shards, args.calibration_split, work, args.sweep)


if __name__ == "__main__":
    main()
