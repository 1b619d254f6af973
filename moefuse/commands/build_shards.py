"""`moefuse build-shards --manifest M.jsonl --out DIR [--workers 4] [--skip-bad]`: a manifest -> webdataset tar
shards plus `dataset.json`.

How the build works and what it writes: `moefuse.datasets.shards`, the library this entry point runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import get_args

from moefuse.datasets.manifest import ManifestError
from moefuse.datasets.media import ImageFit, ImageFormat
from moefuse.datasets.shards import BuildError, BuildOptions, build_shards, parse_size
from moefuse.errors import MAX_PROCESSES, Number, command, fraction, positive_int, process_count, seed

IMAGE_SIZE = Number(int, 8, 4096, unit="pixels")
SAMPLE_RATE = Number(int, 1000, 384_000, unit="Hz")  # 384 kHz: the highest rate of common audio hardware
MAX_FILE_MB = Number(float, 0, 2**20, low_open=True, unit="MiB")
MAX_AUDIO_SECONDS = Number(float, 0, 86400, low_open=True, unit="s")


@command("build-shards")
def main(argv: list[str] | None = None) -> int:
    """`moefuse build-shards`. Exit codes: 0 built; 1 a bad manifest, bad rows or an --out that cannot be used; 2 a
    read or write that failed (a full disk, a file in the way: one line naming the path); 130 interrupted."""
    p = argparse.ArgumentParser(prog="moefuse build-shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", required=True, help="JSON Lines (.jsonl) or CSV (.csv) manifest, one sample a row")
    p.add_argument("--out", required=True, help="output folder for the shards, dataset.json and rejected.jsonl")
    d = BuildOptions()
    p.add_argument("--maxcount", type=positive_int, default=d.maxcount, help="samples per shard at most (>= 1)")
    p.add_argument("--maxsize", type=parse_size, default=d.maxsize,
                   help="bytes per shard (e.g. 256MB, 1G; >= 1 byte); a shard closes once it reaches this size")
    p.add_argument("--workers", type=process_count, default=max(1, min(8, os.cpu_count() or 1)),
                   help=f"processes that decode and normalise media, 1-{MAX_PROCESSES} (the output does not depend "
                        f"on it)")
    p.add_argument("--val-fraction", type=fraction, default=d.val_fraction,
                   help="share of the rows without a split column that go to val, in [0, 1) (seeded by --seed)")
    p.add_argument("--test-fraction", type=fraction, default=d.test_fraction,
                   help="share of the rows without a split column that go to test, in [0, 1); with --val-fraction "
                        "under 1")
    p.add_argument("--seed", type=seed, default=d.seed, help="seed of the val/test assignment, 0 to 2**32 - 1")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=d.image_size,
                   help=f"stored images are this many pixels square, {IMAGE_SIZE.range_text()}")
    p.add_argument("--image-fit", choices=get_args(ImageFit), default=d.image_fit,
                   help="pad: longer side to --image-size, black borders; crop: shorter side, centre crop")
    p.add_argument("--image-format", choices=get_args(ImageFormat), default=d.image_format,
                   help="stored image format")
    p.add_argument("--sample-rate", type=SAMPLE_RATE, default=d.sample_rate,
                   help=f"audio is resampled to this rate, {SAMPLE_RATE.range_text()}")
    p.add_argument("--max-file-mb", type=MAX_FILE_MB, default=d.max_file_mb,
                   help=f"larger media files are bad rows, {MAX_FILE_MB.range_text()}")
    p.add_argument("--max-image-pixels", type=positive_int, default=d.max_image_pixels,
                   help="larger images are bad rows (>= 1)")
    p.add_argument("--max-audio-seconds", type=MAX_AUDIO_SECONDS, default=d.max_audio_seconds,
                   help=f"longer recordings are bad rows, {MAX_AUDIO_SECONDS.range_text()}")
    p.add_argument("--skip-bad", action="store_true",
                   help="write the good rows and list the bad ones in OUT/rejected.jsonl instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier build in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.val_fraction + args.test_fraction >= 1:
        p.error(f"argument --test-fraction: --val-fraction + --test-fraction must be < 1 (some rows must train), got "
                f"{args.val_fraction:g} + {args.test_fraction:g}")
    # SIGTERM (kill, a cluster scheduler) unwinds like Ctrl-C, so temp shards are removed.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        opts = BuildOptions(**{k: v for k, v in vars(args).items() if k in BuildOptions.__dataclass_fields__},
                            progress=not args.quiet)
        info = build_shards(args.manifest, args.out, opts)
    except (ManifestError, BuildError) as e:
        print(f"build-shards: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build-shards: interrupted; no shard was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    splits = ", ".join(f"{s}: {v['samples']} samples in {len(v['shards'])} shards" for s, v in info["splits"].items())
    print(f"build-shards: wrote {args.out}: {splits}" + (f"; {info['rejected']} rows rejected, see "
                                                          f"{Path(args.out) / 'rejected.jsonl'}"
                                                          if info["rejected"] else ""))
    return 0
