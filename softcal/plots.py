"""Reliability diagrams.

The figures are built on :class:`matplotlib.figure.Figure` directly, not through pyplot, so they
need no display and never change matplotlib's global backend: ``fig.savefig(path)`` renders with
Agg on a headless machine, and Jupyter still shows the returned figure inline.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union


from .metrics import expected_calibration_error, reliability_bins

__all__ = ["reliability_diagram"]


def _panel(ax_rel, ax_hist, bins, ece: float, title: str) -> None:
    edges = bins.edges.numpy()
    width = edges[1:] - edges[:-1]
    left = edges[:-1]
    centres = left + width / 2
    count = bins.count.numpy()
    nonempty = count > 0
    acc = bins.accuracy.numpy()
    conf = bins.confidence.numpy()

    ax_rel.plot([0, 1], [0, 1], linestyle="--", color="0.4", linewidth=1, label="perfect calibration")
    ax_rel.bar(left[nonempty], acc[nonempty], width=width[nonempty], align="edge",
               color="#1f77b4", edgecolor="black", linewidth=0.6, label="accuracy")
    # Gap between accuracy and mean confidence, drawn from accuracy to confidence.
    gap = conf[nonempty] - acc[nonempty]
    ax_rel.bar(left[nonempty], gap, bottom=acc[nonempty], width=width[nonempty], align="edge",
               color="#d62728", alpha=0.3, edgecolor="#d62728", hatch="//", linewidth=0.6,
               label="gap to confidence")
    ax_rel.plot(conf[nonempty], acc[nonempty], "o", color="black", markersize=3)
    ax_rel.set_xlim(0, 1)
    ax_rel.set_ylim(0, 1)
    ax_rel.set_ylabel("accuracy")
    ax_rel.set_title(title)
    ax_rel.text(0.04, 0.93, f"ECE = {100 * ece:.2f}%", transform=ax_rel.transAxes,
                fontsize=10, va="top", bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    ax_rel.legend(loc="lower right", fontsize=8)

    total = max(count.sum(), 1)
    ax_hist.bar(centres, count / total, width=width, color="0.6", edgecolor="black", linewidth=0.6)
    ax_hist.set_xlim(0, 1)
    ax_hist.set_xlabel("confidence")
    ax_hist.set_ylabel("fraction of rows")


def reliability_diagram(
    scores,
    labels,
    temperature: Optional[float] = None,
    *,
    n_bins: int = 15,
    probs: bool = False,
    titles: Optional[Sequence[str]] = None,
    path: Optional[Union[str, "object"]] = None,
    dpi: int = 120,
):
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the gap and
    the histogram of confidences below.

    Args:
        scores: (N, C) logits (or probabilities with ``probs=True``), tensor or numpy array.
        labels: (N,) integer labels.
        temperature: when given, two columns side by side: before (T = 1) and after (T).
        n_bins: equal-width bins (as :func:`softcal.metrics.ece`).
        titles: titles of the panels (default "before (T = 1)", "after (T = ...)").
        path: when given, the figure is also saved there (PNG by extension).

    Returns:
        matplotlib.figure.Figure.
    """
    from matplotlib.figure import Figure

    temps = [None] if temperature is None else [None, float(temperature)]
    if titles is None:
        titles = ["uncalibrated"] if temperature is None else \
            ["before (T = 1)", f"after temperature scaling (T = {float(temperature):.3f})"]
    if len(titles) != len(temps):
        raise ValueError(f"softcal.plots.reliability_diagram: titles needs {len(temps)} entries, "
                         f"got {len(titles)}")
    fig = Figure(figsize=(5.0 * len(temps), 6.0), dpi=dpi, layout="constrained")
    grid = fig.add_gridspec(2, len(temps), height_ratios=[3, 1])
    for j, (t, title) in enumerate(zip(temps, titles)):
        ax_rel = fig.add_subplot(grid[0, j])
        ax_hist = fig.add_subplot(grid[1, j], sharex=ax_rel)
        bins = reliability_bins(scores, labels, n_bins, temperature=t, probs=probs)
        e = expected_calibration_error(scores, labels, n_bins, temperature=t, probs=probs)
        _panel(ax_rel, ax_hist, bins, e, title)
    if path is not None:
        fig.savefig(path)
    return fig
