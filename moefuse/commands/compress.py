"""`moefuse compress --checkpoint DIR --out DIR --shards SRC [--keep-experts N | --min-routing-share S]
[--weights-dtype bfloat16]`: prune each MoE layer's least-routed experts, measured on a calibration split, and/or
store the weights in 16 bits, and write a new model folder.

Each layer keeps the experts with the largest routing share on `--split` of `--shards` (default val), its router
re-normalised over them; `--merge` folds each dropped expert into its most similar kept one. The new folder's
config.yaml has the new `fusion.num_experts`, and its model card (README.md) and export.json say what was pruned,
on which data, and the accuracy on that split before and after. `--weights-dtype bfloat16` stores the weight
matrices in bfloat16 (half the file; they load into fp32). The library: `moefuse.evaluation.compress` and
`moefuse.fusion.prune` (Chen et al. 2022; Lu et al. 2024; merging: Li et al. 2024).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moefuse.errors import command, positive_int, probability


def _count(text: str) -> int:
    """argparse type: an integer (its range depends on the model, checked after loading it)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _check_count(checkpoint: Path, keep: int | None) -> None:
    """A bad --keep-experts fails at once, from the folder's config.yaml, before torch is imported; anything odd
    about the folder is left to the library, which names it."""
    import yaml

    try:
        fusion = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))["fusion"]
        experts, top_k, kind = int(fusion["num_experts"]), int(fusion["top_k"]), fusion.get("kind", "moe")
    except Exception:  # no folder, no config, not a mapping: the library reports it
        return
    if keep is not None and kind == "moe" and not top_k <= keep <= experts:
        from moefuse.configutil import ConfigError

        raise ConfigError(f"--keep-experts must be in [top_k={top_k}, num_experts={experts}] for this model "
                          f"(each token picks {top_k} experts among those kept), got {keep}")


@command("moefuse compress")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moefuse compress", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="exported model folder (a run's model/)")
    p.add_argument("--out", required=True, type=Path, help="where to write the compressed model folder")
    p.add_argument("--shards", required=True, nargs="+",
                   help="calibration data: build-shards folders (read at --split), dataset.json paths or patterns")
    p.add_argument("--split", default="val", help="split of the calibration data (default: val)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--keep-experts", type=_count, metavar="N",
                     help="experts each MoE layer keeps, in [top_k, num_experts]")
    how.add_argument("--min-routing-share", type=probability, metavar="S",
                     help="keep every expert with at least this share of its layer's routing (in [0, 1]); every "
                          "layer keeps as many as the layer that keeps most")
    p.add_argument("--merge", action="store_true",
                   help="merge each dropped expert into its most similar kept one (routing-share weighted average)")
    p.add_argument("--weights-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="store the weight matrices in bfloat16: half the file (they load into fp32); default float32")
    p.add_argument("--batch-size", type=positive_int, default=64)
    args = p.parse_args(argv)
    _check_count(args.checkpoint, args.keep_experts)
    from moefuse.evaluation.compress import compress_model, format_record  # heavy: after the arguments are checked

    record = compress_model(args.checkpoint, args.out, args.shards, args.split, keep=args.keep_experts,
                            min_share=args.min_routing_share, merge=args.merge, batch_size=args.batch_size,
                            weights_dtype=args.weights_dtype)
    print(format_record(record))
    print(f"wrote {args.out}")
    return 0
