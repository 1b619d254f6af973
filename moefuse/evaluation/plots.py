"""The modality x expert routing heatmap, drawn with matplotlib (Agg, no display needed).

One panel per MoE layer; rows are modalities (text, image, audio, fusion token), columns experts; each cell is the
fraction of that modality's routed assignments that went to that expert (rows sum to 1, the value is printed in
the cell), so specialisation shows as bright cells and a uniform row as an even tint (1/E). The colour scale runs
from 0 to the brightest cell (shown by the colour bar), so small differences stay visible; a modality with no
routed tokens is a grey row.

    save_routing_heatmap(counts, ["text", "image", "audio", "fusion"], "step 500", [out / "routing_heatmap.png"])
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from moefuse.configutil import atomic_write_bytes

CELL_INCHES = 0.5  # each cell is this many inches square, so 8 experts x 4 modalities is about 4 x 2 inches
MAX_ANNOTATED = 24  # experts per panel up to which every cell shows its value (beyond, the cells get too small)
MAX_PANEL_WIDTH, MAX_WIDTH = 8.0, 16.0  # inches: many experts share a panel's width; many layers wrap to rows


def routing_fractions(counts: torch.Tensor) -> torch.Tensor:
    """[L, M, E] assignment counts -> row-normalised fractions (rows with no tokens stay 0)."""
    counts = counts.float()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


def _annotate(ax, frac: np.ndarray, vmax: float) -> None:
    """The value in each cell, dark on bright cells and light on dark ones."""
    rows, experts = frac.shape
    size = 8 if experts <= 12 else 6
    for r in range(rows):
        for e in range(experts):
            value = frac[r, e]
            if np.ma.is_masked(value):
                continue
            ax.text(e, r, f"{value:.2f}", ha="center", va="center", fontsize=size,
                    color="black" if value > 0.6 * vmax else "white")


def _panels(layers: int, experts: int, rows: int):
    """A figure with one axes per layer, in a grid at most MAX_WIDTH inches wide; returns (figure, axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: slow, only the plotting needs it
    from matplotlib.figure import Figure

    panel_w = min(experts * CELL_INCHES, MAX_PANEL_WIDTH) + 0.6
    cols = max(1, min(layers, int(MAX_WIDTH // panel_w)))
    grid_rows = math.ceil(layers / cols)
    fig = Figure(figsize=(cols * panel_w + 2.2, grid_rows * (rows * CELL_INCHES + 1.0) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(grid_rows, cols, squeeze=False).ravel()
    for ax in axes[layers:]:
        ax.set_visible(False)
    return fig, axes[:layers]


def render_routing_heatmap(counts: torch.Tensor, row_names: Sequence[str], title: str = "") -> bytes:
    """[L, M, E] counts -> the heatmap as PNG bytes, one panel per layer with a shared colour bar."""
    from matplotlib import colormaps

    counts = counts.detach().cpu()
    frac = routing_fractions(counts).numpy()
    layers, rows, experts = frac.shape
    empty = np.repeat((counts.sum(-1) == 0).numpy()[:, :, None], experts, axis=2)  # modalities with no token
    vmax = max(float(frac.max()), 1e-6)
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    fig, axes = _panels(layers, experts, rows)
    for layer, ax in enumerate(axes):
        cells = np.ma.masked_array(frac[layer], mask=empty[layer])
        image = ax.imshow(cells, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest",
                          aspect="equal" if experts <= MAX_ANNOTATED else "auto")
        if experts <= MAX_ANNOTATED:  # beyond, the cells are too small for text; matplotlib picks the ticks
            _annotate(ax, cells, vmax)
            ax.set_xticks(range(experts))
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_yticks(range(rows), list(row_names))
        ax.set_ylabel("modality")
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9)
    bar.set_label("share of the modality's assignments")
    note = "; grey: no tokens of that modality" if empty.any() else ""
    fig.suptitle(f"{title + ': ' if title else ''}routing per modality (rows sum to 1){note}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def save_routing_heatmap(counts: torch.Tensor, row_names: Sequence[str], title: str,
                         paths: Sequence[str | Path]) -> None:
    """Render the heatmap once and write it to each of `paths` atomically (temp file, then rename)."""
    png = render_routing_heatmap(counts, row_names, title)
    for path in paths:
        atomic_write_bytes(path, png)

