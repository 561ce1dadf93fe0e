"""The one plotter: accuracy and loss curves per epoch, as PNG files.

Two pictures share the drawing code here: a trial run's own ``plots/accuracy.png`` and
``plots/loss.png`` artifacts (:func:`plot_history`), and ``mnistjobs compare --plot``'s one
picture of many runs (:func:`plot_runs`). Matplotlib's object API only (a ``Figure`` per
picture, no pyplot and its global state); every file is written through
:func:`mnistnets.files.write_atomic`, so a reader never sees half a PNG.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from jobs.contract import CURVE_METRICS, PLOT_FILES
from mnistnets.files import write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Points = Sequence[tuple[float, float]]  # (epoch, value)

#: (file name, the metrics it draws, the y axis label): accuracy.png draws train_acc and test_acc,
#: loss.png train_loss and test_loss (the contract's PLOT_FILES and CURVE_METRICS)
RUN_PLOTS = ((PLOT_FILES[0], CURVE_METRICS[:2], "accuracy (%)"),
             (PLOT_FILES[1], CURVE_METRICS[2:], "loss"))


def _figure(width: float, height: float) -> tuple["Figure", "Axes"]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def _curve(ax: "Axes", points: Points, **style) -> bool:
    """Draw ``points`` on ``ax``; False (nothing drawn) when there are none."""
    if not points:
        return False
    xs, ys = zip(*points)
    ax.plot(xs, ys, **style)
    return True


def _save(fig: "Figure", path: str | os.PathLike) -> Path:
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))


def plot_history(history: Mapping[str, Points], out_dir: str | os.PathLike) -> list[Path]:
    """One run's ``accuracy.png`` (train/test accuracy per epoch) and ``loss.png`` in
    ``out_dir``, from ``{metric: [(epoch, value)]}``; returns the paths written."""
    paths = []
    for fname, keys, ylabel in RUN_PLOTS:
        fig, ax = _figure(6, 4)
        for key in keys:
            _curve(ax, history.get(key) or [], marker="o", markersize=3, label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend()
        paths.append(_save(fig, Path(out_dir) / fname))
    return paths


def _colors(n: int) -> list:
    if n <= 10:
        return [f"C{i}" for i in range(10)]
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def plot_runs(curves: Sequence[tuple[str, Points, Points]], path: str | os.PathLike,
              target: float | None = None) -> Path:
    """Test (solid) and train (dashed) accuracy per epoch of many runs in one PNG at ``path``.

    ``curves``: ``(label, test points, train points)`` per run, one colour each; a dotted line
    marks ``target`` (percent) unless it is None. The legend sits right of the axes.
    """
    from matplotlib.lines import Line2D

    many = len(curves) > 12
    fig, ax = _figure(11 + (3 if many else 0), 6)
    colors = _colors(len(curves))
    handles, max_epoch = [], 0
    for i, (label, test, train) in enumerate(curves):
        color = colors[i % len(colors)]
        _curve(ax, test, color=color, marker="o", markersize=3, linewidth=1.5)
        _curve(ax, train, color=color, linestyle="--", linewidth=1, alpha=0.8)
        max_epoch = max([max_epoch, *(int(x) for x, _ in (*test, *train))])
        handles.append(Line2D([], [], color=color, marker="o", markersize=3, label=label))
    handles.append(Line2D([], [], color="0.3", linestyle="-", label="test (solid)"))
    handles.append(Line2D([], [], color="0.3", linestyle="--", label="train (dashed)"))
    if target is not None:
        ax.axhline(target, color="0.5", linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color="0.5", linestyle=":", label=f"{target:g}% target"))
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Accuracy (%)")
    ax.set_title("Train (dashed) and test (solid) accuracy per epoch")
    ax.grid(True, alpha=0.3)
    if 0 < max_epoch <= 30:
        ax.set_xticks(range(1, max_epoch + 1))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
              ncol=2 if many else 1, frameon=False)
    return _save(fig, path)
