"""Inference latency, throughput and accuracy: a candidate path (default: today's, the frozen encoders' outputs
cached) as a speed-up over fp32 without the cache (session 7's predict), or dynamic int8 (`--candidate int8`).

What is measured (CPU, torch's default thread count, ``torch.no_grad``, eval mode):

* The model: by default the tiny config trained for --steps steps (150) on freshly made demo shards through
  ``moefuse.train.recipe.train`` (``train.eval_every=1000 train.save_every=1000 train.tensorboard=false``; the run
  validates and exports once, at the last step); or an existing export with ``--checkpoint DIR`` (then give its
  data with ``--shards``, e.g. ``runs/avdigits/shards``). The baseline is ``load_model(DIR, cache_encoders=[])``;
  the candidates are ``cached`` (``load_model(DIR)``: the outputs of the encoders frozen in training are reused for
  inputs seen before, moefuse/fusion/encoder_cache.py), ``int8`` (``quantize_int8``: every nn.Linear and every
  expert dynamic-int8, routers fp32; no cache) and ``int8+cached``.
* Inputs: samples of the validation split, decoded from the shards exactly as the loader decodes them
  (``decode_sample``), held in memory; no file reading is timed.
* ``latency, batch 1``: for --latency-samples evenly spaced validation samples (both tasks, every modality mix),
  two ways: ``model forward`` (the model alone on that sample pre-collated into a batch of 1 by the eval collator)
  and ``predict_samples`` (``predict_samples(model, [sample], batch_size=1)``: collator set-up, collation, forward,
  routing summary and records, i.e. ``moefuse predict`` minus reading files). p50 and p95 over all timed calls;
  the samples have different modality subsets, so the spread is partly the data. The caches start each
  measure's pass over those samples empty (a fresh ``predict`` over them: a question is encoded the first time it
  comes), or with ``--warm-cache`` keep what the warm-up pass saw (a long-running server that has seen every
  wording). Each batch-32 pass starts empty too.
* ``throughput, batch 32``: samples/s of the model forward on the full batches of 32 of the validation split
  (pre-collated), and of ``predict_samples(model, those samples, batch_size=32)``.
* ``accuracy``: ``evaluate(DIR, [shards], split="val", batch_size=32, ...)`` per task for both, and the share of
  validation samples on which the two give the same answer (from ``predict_samples``).

How: both models first run every sample and batch once, untimed (first-call costs per shape). Then --rounds
rounds; in each, every latency sample is timed on both models back to back (the baseline first on even samples,
the candidate first on odd ones), then each batch-32 measurement on both (order alternating between rounds). Per
round: baseline p50 / candidate p50, the same at p95, and candidate / baseline throughput; the table leads with
the medians of these per-round speed-ups (± half their interquartile range), and gives the absolute values pooled
over all rounds as secondary columns. Shared machines are noisy, so ratios taken close together in time are far
steadier than absolute numbers.

Usage::

    python benchmarks/predict_latency.py                      # train 150 steps on demo data, then measure
    python benchmarks/predict_latency.py --quick              # smoke run: 400 samples, 5 steps, 3 rounds
    python benchmarks/predict_latency.py --checkpoint runs/avdigits/moe/model --shards runs/avdigits/shards
    python benchmarks/predict_latency.py --checkpoint ... --shards ... --candidate int8    # int8 against fp32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds
from _bench import command_line, demo_shards, summary

from moefuse.config import load_config
from moefuse.datasets.loader import decode_sample, shard_urls
from moefuse.evaluation.report import evaluate
from moefuse.fusion.loading import load_inference_model as load_model
from moefuse.fusion.model import MultimodalMoEModel, build_collator
from moefuse.inference.predict import predict_samples
from moefuse.train.recipe import train

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
BATCH = 32
CANDIDATES = {  # name -> load_model keyword arguments; the baseline is fp32 without the encoder cache (session 7)
    "cached": {},  # today's default: fp32, the frozen encoders' outputs cached
    "int8": {"int8": True, "cache_encoders": []},
    "int8+cached": {"int8": True},
}
MEASURES = ("forward", "predict")



def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between order statistics."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)



def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# setup


def train_tiny(work: Path, shards: Path, steps: int, seed: int) -> Path:
    run = work / "run"
    cfg = load_config(CONFIG, [f"data.train_shards=[{shards}]", f"data.val_shards=[{shards}]",
                               f"train.output_dir={run}", f"train.max_steps={steps}", "train.eval_every=1000",
                               "train.save_every=1000", "train.tensorboard=false", f"train.seed={seed}"])
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's messages; stdout is for the report
        train(cfg)
    return run / "model"


def val_samples(shards: Path, model: MultimodalMoEModel) -> list[dict]:
    """Every validation sample, decoded as the loader decodes it (at the audio encoder's rate)."""
    rate = model.encoders["audio"].sample_rate if "audio" in model.encoders else None
    samples = []
    for url in shard_urls(shards, "val"):
        for raw in wds.tarfile_samples([{"url": url}], handler=wds.reraise_exception):
            samples.append(decode_sample(raw, rate))
    return samples


# ---------------------------------------------------------------------------------------------------------------
# measurement


class Runs:
    """Per model and measure: latencies (s) per round, and batch-32 seconds per round; `names` = (baseline,
    candidate)."""

    def __init__(self, rounds: int, names: tuple[str, str]):
        self.names = names
        self.latency = {(m, k): [[] for _ in range(rounds)] for m in names for k in MEASURES}
        self.batch = {(m, k): [0.0] * rounds for m in names for k in MEASURES}

    def pooled(self, model: str, measure: str) -> list[float]:
        return [t for r in self.latency[(model, measure)] for t in r]

    def ratios(self, measure: str, q: float) -> list[float]:
        base, new = self.names
        return [percentile(b, q) / percentile(c, q)
                for b, c in zip(self.latency[(base, measure)], self.latency[(new, measure)])]

    def throughput_ratios(self, measure: str) -> list[float]:
        base, new = self.names
        return [b / c for b, c in zip(self.batch[(base, measure)], self.batch[(new, measure)])]


def measure(models: dict[str, MultimodalMoEModel], samples: list[dict], rounds: int,
            latency_samples: int, warm: bool) -> tuple[Runs, int, int]:
    names = tuple(models)
    collator = build_collator(models[names[0]], train=False)
    k = min(latency_samples, len(samples))  # evenly spaced: both tasks (stored one after the other), every modality mix
    latency_set = [samples[i * len(samples) // k] for i in range(k)]
    singles = [collator([s]) for s in latency_set]
    full = len(samples) // BATCH * BATCH
    if full == 0:
        raise SystemExit(f"only {len(samples)} validation samples: need at least {BATCH} for the batch measurement")
    batch_samples = samples[:full]
    batches = [collator(batch_samples[i:i + BATCH]) for i in range(0, full, BATCH)]

    def single(name: str, i: int, kind: str) -> Callable[[], object]:
        model = models[name]
        if kind == "forward":
            return lambda: model(singles[i])
        return lambda: predict_samples(model, [latency_set[i]], batch_size=1)

    def batched(name: str, kind: str) -> Callable[[], object]:
        model = models[name]
        if kind == "forward":
            return lambda: [model(b) for b in batches]
        return lambda: predict_samples(model, batch_samples, batch_size=BATCH)

    with torch.no_grad():
        for name in names:  # warm-up, untimed
            for i in range(len(latency_set)):
                for kind in MEASURES:
                    single(name, i, kind)()
            for kind in MEASURES:
                batched(name, kind)()
        def fresh() -> None:  # a fresh `predict`: the encoder caches start empty (unless --warm-cache)
            if not warm:
                for model in models.values():
                    model.cache_encoders(list(model.encoder_caches))

        runs = Runs(rounds, names)
        for r in range(rounds):
            t0 = time.perf_counter()
            for kind in MEASURES:  # each measure's pass over the samples starts from empty caches
                fresh()
                for i in range(len(latency_set)):
                    order = names if i % 2 == 0 else names[::-1]
                    for name in order:
                        runs.latency[(name, kind)][r].append(timed(single(name, i, kind)))
            for kind in MEASURES:
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    fresh()
                    runs.batch[(name, kind)][r] = timed(batched(name, kind))
            print(f"round {r + 1}/{rounds}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return runs, len(latency_set), full


def agreement(models: dict[str, MultimodalMoEModel], samples: list[dict]) -> tuple[float, dict[str, dict]]:
    """Share of samples with the same answer from both models; per model and task, accuracy from predict_samples."""
    preds = {name: predict_samples(model, samples, batch_size=BATCH) for name, model in models.items()}
    base, new = preds.values()
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(base, new))
    acc: dict[str, dict] = {}
    for name, rows in preds.items():
        for task in sorted({r["task"] for r in rows}):
            mine = [r for r in rows if r["task"] == task and "correct" in r]
            acc.setdefault(name, {})[task] = sum(r["correct"] for r in mine) / max(1, len(mine))
    return same / len(samples), acc


# ---------------------------------------------------------------------------------------------------------------
# report


def print_report(runs: Runs, rounds: int, n_single: int, n_batch: int, evals: dict[str, dict], same: float,
                 own_acc: dict[str, dict], checkpoint: Path | str) -> None:
    base, new = runs.names
    print(f"\nspeed-up of {new} over {base} (median over {rounds} rounds of per-round ratios, ± half the "
          f"interquartile range); the {base} and {new} columns are absolute, pooled over all rounds, secondary:\n")
    print(f"| measure | {new} speed-up | {base} | {new} |")
    print("|---|---:|---:|---:|")
    names = {"forward": "model forward", "predict": "predict_samples"}
    for kind in MEASURES:
        for q in (50, 95):
            med, half_iqr = summary(runs.ratios(kind, q))
            f32, i8 = (percentile(runs.pooled(m, kind), q) * 1e3 for m in runs.names)
            print(f"| latency p{q}, batch 1, {names[kind]} (ms) | {med:.2f}x ±{half_iqr:.2f} | {f32:.1f} | "
                  f"{i8:.1f} |")
    for kind in MEASURES:
        med, half_iqr = summary(runs.throughput_ratios(kind))
        f32, i8 = (n_batch * rounds / sum(runs.batch[(m, kind)]) for m in runs.names)
        print(f"| throughput, batch {BATCH}, {names[kind]} (samples/s) | {med:.2f}x ±{half_iqr:.2f} | {f32:.0f} | "
              f"{i8:.0f} |")
    for task, result in evals[base]["tasks"].items():
        a32, a8 = result["accuracy"], evals[new]["tasks"][task]["accuracy"]
        print(f"| accuracy {task}, val ({result['samples']} samples) | {a8 - a32:+.4f} ({new} - {base}) | {a32:.4f} "
              f"| {a8:.4f} |")
    print(f"| same answer as {base}, val | {same:.1%} | - | - |")
    print(f"\nlatency: {n_single} validation samples (evenly spaced) x {rounds} rounds per model and measure; "
          f"throughput: {n_batch} samples ({n_batch // BATCH} batch{'es' if n_batch > BATCH else ''} of {BATCH}) per "
          f"round; checkpoint {checkpoint}")
    consistent = all(abs(own_acc[m][t] - evals[m]["tasks"][t]["accuracy"]) < 1e-9
                     for m in runs.names for t in evals[m]["tasks"] if t in own_acc[m])
    print(f"accuracy check: predict_samples on the decoded val samples gives the same accuracies as evaluate(): "
          f"{'yes' if consistent else 'NO: ' + repr(own_acc)}")
    print(f"\nCommand: {command_line()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an exported model folder to use instead of training one")
    parser.add_argument("--shards", type=Path, help="dataset folder with a val split (default: make demo shards)")
    parser.add_argument("--work", type=Path, help="folder for demo data, shards and the run (default: temp)")
    parser.add_argument("--count", type=int, default=1200, help="demo samples (default 1200)")
    parser.add_argument("--steps", type=int, default=150, help="training steps when no --checkpoint (default 150)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--latency-samples", type=int, default=48,
                        help="validation samples (evenly spaced) timed one at a time per round (default 48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--candidate", choices=list(CANDIDATES), default="cached",
                        help="the path compared with fp32 without the encoder cache (default: cached, today's default)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep the encoder caches between rounds (a long-running server) instead of starting each "
                             "round from empty ones (a fresh predict over the latency samples)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 400 samples, 5 training steps, 3 rounds, 8 latency samples")
    if parser.parse_args(argv).quick:  # the smoke-run presets; flags given explicitly still win
        parser.set_defaults(count=400, steps=5, rounds=3, latency_samples=8)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="moefuse-predict-bench-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation and other one-time notices
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        shards = args.shards or demo_shards(work, args.count, args.seed)
        trained = "given"
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = train_tiny(work, shards, args.steps, args.seed)
            trained = f"tiny config trained {args.steps} steps"
        shown = checkpoint if args.checkpoint or args.work else "trained in a temp folder, removed"
        print(f"setup: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        chosen = {"fp32": {"cache_encoders": []}, args.candidate: CANDIDATES[args.candidate]}
        models = {name: load_model(checkpoint, **kw) for name, kw in chosen.items()}
        samples = val_samples(shards, models["fp32"])
        # The batch size of predict_samples: dynamic int8 scales activations per batch, so int8 answers depend
        # on which samples share a batch, and the accuracy check below compares like with like.
        evals = {name: evaluate(checkpoint, [str(shards)], split="val", batch_size=BATCH, progress=False, **kw)
                 for name, kw in chosen.items()}
        same, own_acc = agreement(models, samples)
        runs, n_single, n_batch = measure(models, samples, args.rounds, args.latency_samples, args.warm_cache)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPU cores, load average "
          f"{load:.1f} at start; model: {trained}; {len(samples)} validation samples, {args.rounds} rounds after "
          f"1 warm-up pass")
    print_report(runs, args.rounds, n_single, n_batch, evals, same, own_acc, shown)


if __name__ == "__main__":
    main()
