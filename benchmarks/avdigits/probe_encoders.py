"""Probe one AV-digits encoder alone: how well does it learn to recognise the digit from its own modality?

    python benchmarks/avdigits/probe_encoders.py --data runs/avdigits/data --modality image --conv-stem 16 32 64
    python benchmarks/avdigits/probe_encoders.py --data runs/avdigits/data --modality audio --frontend logmel

Trains the encoder (a moefuse preset, random init) plus a linear head on its mean token, with AdamW, on every train
sample's own digit (the written digit a of avqa images, the spoken digit b of avqa recordings, the label of the
corrupted `digit` pairs), then prints validation accuracy (speaker theo, MNIST 7000-7999) on the clean avqa media
and on the corrupted `digit` media. This isolates the encoder from fusion: it is how the encoder front ends of
configs/avdigits.yaml were chosen (benchmarks/avdigits/NOTES.md). Reads only the train and val rows of the manifest.

With `--save FILE` it is also the per-modality pretraining stage of the benchmark: the trained encoder's weights go
to FILE, which configs/avdigits.yaml starts the joint model from (`encoders.<modality>.init_file`). Only the train
split is learned from; the validation figures printed are for reading, not for choosing anything.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moefuse.configutil import ConfigError  # noqa: E402  (after the path insert, for a plain checkout)
from moefuse.encoders import (  # noqa: E402  (after the path insert, for a plain checkout)
    AudioEncoderConfig,
    ImageEncoderConfig,
    build_audio_encoder,
    build_image_encoder,
)
from moefuse.encoders.base import save_init_file  # noqa: E402


def own_digit(row: dict, modality: str) -> int:
    """The digit this row's image (or recording) shows."""
    if row["task"] == "digit":
        return int(row["label"])
    return row["meta"]["image_digit" if modality == "image" else "spoken_digit"]


Rows = dict[tuple[str, str], tuple[list[torch.Tensor], list[int]]]  # (split, task) -> (inputs, digits)


def load_rows(data: Path, modality: str, audio_seconds: float) -> Rows:
    """(split, task) -> (inputs, digits); images as normalised [3, 32, 32], audio as 16 kHz [S] (S <= audio_seconds)."""
    out: Rows = {}
    for line in (data / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] not in ("train", "val"):
            continue
        if modality == "image":
            img = Image.open(data / row["image"]).convert("RGB").resize((32, 32), Image.BICUBIC)
            x = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1) - 0.5) / 0.5
        else:
            wav, sr = sf.read(data / row["audio"], dtype="float32")
            x = torchaudio.functional.resample(torch.from_numpy(wav), sr, 16000)[: int(16000 * audio_seconds)]
        xs, ys = out.setdefault((row["split"], row["task"]), ([], []))
        xs.append(x)
        ys.append(own_digit(row, modality))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a prepare.py output folder (manifest.jsonl)")
    p.add_argument("--modality", choices=["image", "audio"], required=True)
    p.add_argument("--preset", default="tiny", help="encoder preset (default tiny)")
    p.add_argument("--conv-stem", type=int, nargs="*", default=[], help="image: conv stem channels ([] = patches)")
    p.add_argument("--frontend", choices=["conv", "logmel"], default="conv", help="audio front end")
    p.add_argument("--mel-bins", type=int, default=64, help="audio: mel bands of the logmel front end")
    p.add_argument("--audio-seconds", type=float, default=1.0, help="audio: clips are cut to this length "
                   "(configs/avdigits.yaml's max_seconds)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, help="write the trained encoder's weights here (safetensors), for "
                   "encoders.<modality>.init_file")
    args = p.parse_args(argv)
    if not (args.data / "manifest.jsonl").is_file():
        print(f"error: {args.data}/manifest.jsonl not found; run prepare.py (or make bench-avdigits) first",
              file=sys.stderr)
        return 2
    try:  # the encoder configs validate the flags; say what is wrong, not a traceback
        if args.modality == "image":
            image_cfg = ImageEncoderConfig(preset=args.preset, conv_stem=args.conv_stem)
        else:
            audio_cfg = AudioEncoderConfig(preset=args.preset, frontend=args.frontend, mel_bins=args.mel_bins,
                                           max_seconds=args.audio_seconds)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if args.modality == "image":
        enc = build_image_encoder(image_cfg)

        def encode(xs: list[torch.Tensor]):
            return enc(torch.stack(xs))  # [B, 3, 32, 32] -> tokens [B, T, D]
    else:
        enc = build_audio_encoder(audio_cfg)

        def encode(xs: list[torch.Tensor]):
            wav = torch.zeros(len(xs), max(len(x) for x in xs))  # [B, S], zero padded
            mask = torch.zeros(wav.shape, dtype=torch.bool)
            for i, x in enumerate(xs):
                wav[i, : len(x)], mask[i, : len(x)] = x, True
            return enc(wav, mask)

    data = load_rows(args.data, args.modality, args.audio_seconds)
    train_x = data[("train", "digit")][0] + data[("train", "avqa")][0]
    train_y = data[("train", "digit")][1] + data[("train", "avqa")][1]
    head = nn.Linear(enc.out_dim, 10)
    params = [p for p in [*enc.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = 40  # then cosine to 0, as the trainer
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    def logits(xs: list[torch.Tensor]) -> torch.Tensor:
        out = encode(xs)
        w = out.mask.unsqueeze(-1).float()  # [B, T, 1]
        return head((out.tokens * w).sum(1) / w.sum(1))  # mean token [B, D] -> [B, 10]

    @torch.no_grad()
    def accuracy(key: tuple[str, str]) -> float:
        enc.eval()
        xs, ys = data[key]
        right = sum(int((logits(xs[i:i + 100]).argmax(-1) == torch.tensor(ys[i:i + 100])).sum())
                    for i in range(0, len(xs), 100))
        enc.train()
        return right / len(xs)

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    print(f"{args.modality} encoder: {sum(p.numel() for p in enc.parameters())} parameters, "
          f"{len(train_x)} train samples", flush=True)
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(train_x), args.batch_size, replace=False)
        loss = nn.functional.cross_entropy(logits([train_x[i] for i in idx]), torch.tensor([train_y[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps:
            print(f"step {step}: val clean (avqa media) {accuracy(('val', 'avqa')):.3f}, val corrupted (digit media) "
                  f"{accuracy(('val', 'digit')):.3f}, train loss {loss.item():.3f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    if args.save is not None:
        save_init_file(enc.vit if args.modality == "image" else enc.wav2vec2, args.save)
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
