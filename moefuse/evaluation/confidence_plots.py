"""How far a task's confidence can be trusted, drawn with matplotlib (Agg) from the numbers of an evaluate report:

- the reliability diagram (Guo et al. 2017): accuracy against mean confidence in equal-width bins, before and
  after temperature scaling, with the diagonal of perfect calibration and the ECE of each in the legend;
- the risk-coverage curve (Geifman & El-Yaniv 2017): the error rate among the answers kept when only the most
  confident ones are given, with its area (AURC) and the AUROC with which low confidence detects wrong answers.

    save_confidence_plot(report["tasks"]["digit"], "digit", out / "confidence-digit.png")
"""

from __future__ import annotations

import io
from pathlib import Path

from moefuse.configutil import atomic_write_bytes


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _reliability(ax, details: dict) -> None:
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for kind, marker in (("uncalibrated", "s"), ("calibrated", "o")):
        cells = details["reliability"][kind]
        ece = details["ece" if kind == "calibrated" else "ece_uncalibrated"]
        ax.plot([c["confidence"] for c in cells], [c["accuracy"] for c in cells], marker=marker, markersize=4,
                label=f"{kind} (ECE {_fmt(ece)})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (bin mean)", ylabel="accuracy", title="reliability")
    ax.legend(fontsize=8, loc="upper left")


def _risk_coverage(ax, details: dict) -> None:
    sel = details["selective"]
    ax.plot(sel["coverage"], sel["risk"], color="tab:red")
    ax.axhline(1 - details["accuracy"], color="grey", linestyle="--", linewidth=1, label="risk at full coverage")
    ax.set(xlim=(0, 1), ylim=(0, max([*sel["risk"], 0.05]) * 1.05), xlabel="coverage (share answered)",
           ylabel="risk (error rate of the answered)",
           title=f"risk-coverage: AURC {_fmt(sel['aurc'])}, AUROC {_fmt(sel['auroc_confidence'])}")
    ax.legend(fontsize=8, loc="upper left")


def render_confidence_plot(details: dict, task: str) -> bytes:
    """One task's reliability diagram and risk-coverage curve (its entry of an evaluate report) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: slow, only the plotting needs it
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _reliability(left, details)
    _risk_coverage(right, details)
    fig.suptitle(f"{task}: {details['samples']} samples, accuracy {_fmt(details['accuracy'])}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def save_confidence_plot(details: dict, task: str, path: str | Path) -> None:
    atomic_write_bytes(path, render_confidence_plot(details, task))


__all__ = ["render_confidence_plot", "save_confidence_plot"]
