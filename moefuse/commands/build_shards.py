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
from moefuse.errors import command


@command("build-shards")
def main(argv: list[str] | None = None) -> int:
    """`moefuse build-shards`. Exit codes: 0 built; 1 a bad manifest, bad rows or an --out that cannot be used; 2 a
    read or write that failed (a full disk, a file in the way: one line naming the path); 130 interrupted."""
    p = argparse.ArgumentParser(prog="moefuse build-shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", required=True, help="JSON Lines (.jsonl) or CSV (.csv) manifest, one sample a row")
    p.add_argument("--out", required=True, help="output folder for the shards, dataset.json and rejected.jsonl")
    d = BuildOptions()
    p.add_argument("--maxcount", type=int, default=d.maxcount, help="samples per shard at most")
    p.add_argument("--maxsize", type=parse_size, default=d.maxsize,
                   help="bytes per shard (e.g. 256MB, 1G); a shard closes once it reaches this size")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="processes that decode and normalise media (the output does not depend on it)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the rows without a split column that go to val (seeded by --seed)")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="share of the rows without a split column that go to test")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the val/test assignment")
    p.add_argument("--image-size", type=int, default=d.image_size, help="stored images are this many pixels square")
    p.add_argument("--image-fit", choices=get_args(ImageFit), default=d.image_fit,
                   help="pad: longer side to --image-size, black borders; crop: shorter side, centre crop")
    p.add_argument("--image-format", choices=get_args(ImageFormat), default=d.image_format,
                   help="stored image format")
    p.add_argument("--sample-rate", type=int, default=d.sample_rate, help="audio is resampled to this rate (Hz)")
    p.add_argument("--max-file-mb", type=float, default=d.max_file_mb, help="larger media files are bad rows")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="larger images are bad rows")
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                   help="longer recordings are bad rows")
    p.add_argument("--skip-bad", action="store_true",
                   help="write the good rows and list the bad ones in OUT/rejected.jsonl instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier build in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
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
