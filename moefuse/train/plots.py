"""The modality x expert routing heatmap, drawn with Pillow (no plotting dependency).

One panel per MoE layer; rows are modalities (text, image, audio, fusion token), columns experts; each cell is the
fraction of that modality's routed assignments that went to that expert (rows sum to 1), so specialisation shows
as bright cells and a uniform row as an even tint (1/E).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from moefuse.configutil import atomic_write_bytes

CELL, PAD, LABEL_W, TITLE_H = 28, 12, 64, 22


def _color(v: float) -> tuple[int, int, int]:
    """0 -> dark blue, 1 -> yellow (a viridis-like ramp through three stops)."""
    stops = [(0.0, (40, 20, 84)), (0.5, (33, 145, 140)), (1.0, (253, 231, 37))]
    v = min(max(v, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(stops, stops[1:]):
        if v <= b:
            t = (v - a) / (b - a)
            return tuple(int(x + (y - x) * t) for x, y in zip(ca, cb))
    return stops[-1][1]


def routing_fractions(counts: torch.Tensor) -> torch.Tensor:
    """[L, M, E] assignment counts -> row-normalised fractions (rows with no tokens stay 0)."""
    counts = counts.float()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


def draw_routing_heatmap(counts: torch.Tensor, row_names: list[str], title: str = "") -> Image.Image:
    """[L, M, E] counts -> an RGB image with L panels side by side."""
    frac = routing_fractions(counts)
    layers, rows, experts = frac.shape
    font = ImageFont.load_default()
    vmax = max(float(frac.max()), 1e-6)  # scale to the brightest cell so small differences stay visible
    panel_w = experts * CELL
    width = LABEL_W + layers * (panel_w + PAD) + PAD
    height = TITLE_H * 2 + rows * CELL + 2 * PAD
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, 4), f"{title}  (fraction of a modality's assignments per expert; max {vmax:.2f})", fill="black",
           font=font)
    for layer in range(layers):
        x0 = LABEL_W + layer * (panel_w + PAD)
        d.text((x0, TITLE_H), f"layer {layer}", fill="black", font=font)
        for r in range(rows):
            y = TITLE_H * 2 + r * CELL
            if layer == 0:
                d.text((PAD, y + CELL // 3), row_names[r], fill="black", font=font)
            for e in range(experts):
                v = float(frac[layer, r, e])
                d.rectangle([x0 + e * CELL, y, x0 + (e + 1) * CELL - 1, y + CELL - 1], fill=_color(v / vmax))
        for e in range(experts):
            d.text((x0 + e * CELL + CELL // 3, TITLE_H * 2 + rows * CELL + 2), str(e), fill="black", font=font)
    return img


def save_png_atomic(img: Image.Image, path: str | Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
