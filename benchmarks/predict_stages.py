"""Where `predict`'s time goes at batch 1: each stage's share of the per-sample cost of an exported model.

Stages: reading the sample's files (`load_media_sample`: decode, resize, resample), collation (tokenise,
transform, pad), each encoder, the projection and fusion stack, the voting heads, and the rest of
`predict_samples` (routing summary, records). Stage times come from forward pre/post hooks on the encoders, the
fusion stack and the heads (so they are wall time inside those modules, CPU, torch's default threads), and from
timing the other steps directly; --rows evenly spaced rows of the split (every task) are each run --rounds times
after one untimed pass, on the default inference path (the frozen encoders' outputs cached) or with --no-cache.
The table gives each stage's median share of the total per round (± half the interquartile range over rounds)
and its median milliseconds per sample.

    python benchmarks/predict_stages.py          # runs/avdigits/moe/model on runs/avdigits/data/manifest.jsonl
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from _bench import command_line, manifest_rows, summary

from moefuse.fusion.loading import load_inference_model
from moefuse.fusion.model import build_collator
from moefuse.inference.predict import export_media, load_media_sample, routing_per_sample
from moefuse.inference.records import records_from_output

REPO = Path(__file__).resolve().parents[1]


def hook_times(model, times: dict[str, float]) -> list:
    """Forward hooks that add each module's wall time to times[name]."""
    handles, started = [], {}
    modules = {f"encoder {m}": enc for m, enc in model.encoders.items()}
    modules.update({"fusion stack": model.fusion, **{f"heads {t}": h for t, h in model.heads.items()}})
    for name, module in modules.items():
        def pre(_m, _i, name=name) -> None:
            started[name] = time.perf_counter()

        def post(_m, _i, _o, name=name) -> None:
            times[name] += time.perf_counter() - started[name]

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def one_round(model, media: dict, manifest: Path, rows: list[dict]) -> dict[str, float]:
    """Seconds per stage, summed over the rows, each predicted alone (batch 1), in the steps of `predict`."""
    hooked: dict[str, float] = defaultdict(float)
    times: dict[str, float] = defaultdict(float)
    collator = build_collator(model, train=False)
    vocab = {t.name: list(t.labels) for t in model.cfg.tasks}
    handles = hook_times(model, hooked)
    try:
        for r in rows:
            t0 = time.perf_counter()
            sample = load_media_sample(model, r["id"], r["task"], media=media, text=r.get("text"),
                                       question=r.get("question"),
                                       **r["files"])
            t1 = time.perf_counter()
            batch = collator([sample])
            t2 = time.perf_counter()
            inside = sum(hooked.values())
            out = model(batch)
            t3 = time.perf_counter()
            records_from_output(batch, out, vocab)
            routing_per_sample(out, model.routing_rows)
            t4 = time.perf_counter()
            times["read files"] += t1 - t0
            times["collate"] += t2 - t1
            times["model, outside the hooked modules (projections, voter views)"] += \
                (t3 - t2) - (sum(hooked.values()) - inside)
            times["records and routing summary"] += t4 - t3
    finally:
        for h in handles:
            h.remove()
    return {**times, **hooked}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=REPO / "runs" / "avdigits" / "moe" / "model")
    p.add_argument("--manifest", type=Path, default=REPO / "runs" / "avdigits" / "data" / "manifest.jsonl")
    p.add_argument("--split", default="val")
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-cache", action="store_true", help="without the encoder cache (session 7's predict)")
    args = p.parse_args(argv)
    model = load_inference_model(args.checkpoint, cache_encoders=[] if args.no_cache else None)
    media = export_media(args.checkpoint)
    rows = manifest_rows(args.manifest, args.split, args.rows, model)
    with torch.no_grad():
        one_round(model, media, args.manifest, rows)  # untimed: first-call costs
        rounds = [one_round(model, media, args.manifest, rows) for _ in range(args.rounds)]
    print(f"batch 1, {len(rows)} samples of {args.manifest} split {args.split}, {args.rounds} rounds:")
    print("| stage | share of the total | ms per sample |")
    print("|---|---|---|")
    for stage in sorted(rounds[0], key=lambda s: -rounds[0][s]):
        share, spread = summary([r[stage] / sum(r.values()) for r in rounds])
        ms = summary([1000 * r[stage] / len(rows) for r in rounds])[0]
        print(f"| {stage} | {100 * share:.1f} % ± {100 * spread:.1f} | {ms:.2f} |")
    print(f"| total | 100 % | {summary([1000 * sum(r.values()) / len(rows) for r in rounds])[0]:.2f} |")
    print(f"\ncommand: {command_line()}")


if __name__ == "__main__":
    main()
