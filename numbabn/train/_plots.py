"""Figure helpers for :mod:`numbabn.train.experiments` (matplotlib, Agg, no pyplot).

Figures are built on :class:`matplotlib.figure.Figure` directly, so running an
experiment never changes the caller's pyplot backend or opens a window. PNGs are
written at a modest dpi as palette PNGs (each under 200 KB).
"""

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._typing import FloatArray

DPI = 80
COLORS = {
    "standard": "tab:blue",
    "bn": "tab:red",
    "noisy": "tab:green",
    "l1": "tab:purple",
    "l2": "tab:orange",
    "linf": "tab:brown",
}
LABELS = {
    "standard": "standard",
    "bn": "batch norm",
    "noisy": "noisy batch norm",
    "l1": "ℓ1 batch norm",
    "l2": "ℓ2 batch norm",
    "linf": "ℓ∞ batch norm",
}


def figure(rows: int, cols: int, title: str, width: float = 4.0, height: float = 3.0) -> tuple[Any, NDArray[Any]]:
    """``(fig, axes)`` with ``axes`` a 2-D array, and the suptitle naming the paper figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows + 0.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    fig.suptitle(title)
    return fig, axes


def save(fig: Any, out: Path, name: str) -> str:
    """Write ``out / name`` (PNG) and return its path as a string. The image is
    quantised to a 256-colour palette (Pillow, matplotlib's own dependency): line
    plots lose nothing visible and the files shrink about threefold."""
    import io

    from PIL import Image

    path = out / name
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)
    return str(path)


def label(ax: Any, xlabel: str, ylabel: str, title: str, log: bool = False) -> None:
    """Axis labels, title, legend and grid; ``log`` for a log-scaled y axis."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def band(ax: Any, steps: ArrayLike, low: ArrayLike, high: ArrayLike, net: str, line: ArrayLike | None = None) -> None:
    """A shaded [low, high] band per step (and an optional line inside it) for ``net``."""
    color = COLORS.get(net)
    ax.fill_between(steps, low, high, color=color, alpha=0.3, label=LABELS.get(net, net))
    if line is not None:
        ax.plot(steps, line, color=color, lw=1)


def line(ax: Any, steps: ArrayLike, values: ArrayLike, net: str, nolabel: bool = False, **kwargs: Any) -> None:
    """One line for ``net`` (``nolabel``: kept out of the legend, e.g. its second seed)."""
    ax.plot(steps, values, color=COLORS.get(net), label=None if nolabel else LABELS.get(net, net), lw=1.2, **kwargs)


def seed_band(ax: Any, steps: ArrayLike, values: ArrayLike, net: str) -> None:
    """``values`` of shape (seeds, steps): the median over seeds as a line and the
    range over seeds (min to max) as a shaded band. Non-finite values are left out."""
    values = np.asarray(values, dtype=np.float64)
    masked = np.where(np.isfinite(values), values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (a diverged step)
        low, mid, high = np.nanmin(masked, 0), np.nanmedian(masked, 0), np.nanmax(masked, 0)
    color = COLORS.get(net)
    if values.shape[0] > 1:
        ax.fill_between(steps, low, high, color=color, alpha=0.25, lw=0)
    ax.plot(steps, mid, color=color, lw=1.2, label=LABELS.get(net, net))


def reference(ax: Any, value: float, text: str) -> None:
    """A dashed horizontal reference line (2/lr, the stability edge) with its label."""
    ax.axhline(value, color="k", ls="--", lw=0.8, label=text)


def moving_average(values: ArrayLike, window: int) -> tuple[NDArray[np.intp], FloatArray]:
    """``(steps, means)`` of the trailing mean over ``window`` steps (aligned at its end)."""
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(values)))
    means = np.lib.stride_tricks.sliding_window_view(values, window).mean(axis=1)
    return np.arange(window - 1, len(values)), means
