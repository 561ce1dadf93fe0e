"""``mnistjobs compare --plot``: every run's accuracy per epoch in one PNG (drawn by
:func:`jobs.plots.plot_runs`, the project's one plotter), or for search jobs the metric against
each searched setting (:func:`search_figure`, matplotlib's object API as in jobs.plots)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from jobs.report.errors import ReportError
from jobs.report.load import run_labels
from jobs.report.render import check_output_path
from jobs.report.tables import DEFAULT_TARGET, search_trials

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def _points(mine: pd.DataFrame, key: str) -> list[tuple[int, float]]:
    rows = mine[["epoch", key]].dropna()
    return [(int(e), float(v)) for e, v in zip(rows["epoch"], rows[key])]


def plot_accuracy(
    epochs: pd.DataFrame, runs: pd.DataFrame, path: str | os.PathLike,
    target: float | None = DEFAULT_TARGET,
) -> Path:
    """Test (solid) and train (dashed) accuracy per epoch of every run, one PNG at `path`.

    One colour per run; a dotted line marks `target`. Written atomically: on any error the
    previous file (if any) is untouched and no partial file is left.
    """
    from jobs.plots import plot_runs

    check_output_path(path)  # before drawing: a missing folder is an error, never created
    labels = run_labels(runs)
    if epochs.empty or not labels:
        raise ReportError("There are no epoch metrics to plot yet (no run has logged an epoch).")
    curves = []
    for run_id, label in labels:
        mine = epochs[epochs["run_id"] == run_id].sort_values("epoch")
        curves.append((label, _points(mine, "test_acc"), _points(mine, "train_acc")))
    return plot_runs(curves, path, target=target)


# ------------------------------------------------------------------------------- search jobs

#: A numeric setting spread wider than this (max / min, every value > 0) gets a log x axis.
LOG_SPREAD = 20.0
_STYLES = {  # (label, marker, colour) per kind of trial
    "finished": ("trained every epoch", "o", "C0"),
    "stopped": ("stopped early", "X", "C1"),
    "diverged": ("diverged (on the edge when off the scale)", "v", "C3"),
}


def _kind(row) -> str:
    return "diverged" if row["diverged"] else "stopped" if row["stopped"] else "finished"


def _is_log(values: pd.Series) -> bool:
    values = values.dropna().astype("float64")
    return len(values) > 1 and bool((values > 0).all()) and float(values.max()) / float(values.min()) > LOG_SPREAD


def _panel(ax, trials: pd.DataFrame, key: str, metric: str, mode: str, title: str) -> None:
    """One searched setting: the metric (last epoch) of each trial against the setting's value.
    Diverged trials outside the other trials' range are drawn on the worse edge of the axis."""
    column = trials[key]
    numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
    shown = trials[column.notna() & trials["metric"].notna()]
    if numeric:
        xs = shown[key].astype("float64")
        if _is_log(xs):
            from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            if float(xs.max()) / float(xs.min()) < 30:  # about a decade: label 1, 2, 5 x 10^k
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    else:  # categories in the order first seen in the sorted table (best first)
        cats = list(dict.fromkeys(str(v) for v in shown[key]))
        seen: dict[str, int] = {}
        xs = []
        for v in shown[key]:  # trials of one category side by side, not on top of each other
            n = seen[str(v)] = seen.get(str(v), -1) + 1
            xs.append(cats.index(str(v)) + ((n % 7) - 3) * 0.04)
        xs = pd.Series(xs, index=shown.index, dtype="float64")
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=20 if max((len(c) for c in cats), default=0) > 8 else 0,
                           fontsize="small")
        ax.set_xlim(-0.6, len(cats) - 0.4)
    kinds = shown.apply(_kind, axis=1) if len(shown) else pd.Series(dtype="object")
    ys = shown["metric"].astype("float64")
    sane = ys[kinds != "diverged"]
    if (kinds == "diverged").any() and len(sane):  # keep the trained trials' range readable:
        low, high = float(sane.min()), float(sane.max())  # diverged ones sit on the worse edge
        pad = max((high - low) * 0.08, abs(high) * 1e-3, 1e-6)
        low, high = low - pad, high + pad
        ax.set_ylim(low, high)
        edge = low if mode == "max" else high
        ys = ys.where(kinds != "diverged", ys.clip(low, high).where(lambda v: (v > low) & (v < high), edge))
    for kind, (label, marker, color) in _STYLES.items():
        mask = kinds == kind
        if mask.any():
            ax.scatter(xs[mask], ys[mask], marker=marker, color=color, s=36, alpha=0.85, label=label,
                       zorder=3, clip_on=kind != "diverged")
    best = shown["best"] if len(shown) else pd.Series(dtype="bool")
    if best.any():
        ax.scatter(xs[best], ys[best], marker="*", s=220, facecolor="gold",
                   edgecolor="black", linewidth=0.8, label="best trial", zorder=4)
    missing = len(trials) - len(shown)
    ax.set_title(title + (f"\n{missing} of {len(trials)} not drawn: no {key} or no {metric} yet"
                          if missing else ""), fontsize="medium")
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} (last epoch)")
    ax.grid(True, alpha=0.3)


def search_figure(runs: pd.DataFrame, epochs: pd.DataFrame, searches: list) -> "Figure":
    """The figure ``compare --plot`` draws for search jobs: one row per search job, one panel
    per searched setting (the search's metric at each trial's last logged epoch against the
    setting's value; a log x axis when the values are all positive and spread more than
    :data:`LOG_SPREAD` times; categorical settings as categories), stopped trials drawn as
    crosses, diverged ones as triangles (on the axis' worse edge when their value is off the
    other trials' scale), the best trial as a star. ``fig.axes`` holds the
    panels (a job that searched nothing gets one empty panel)."""
    from matplotlib.figure import Figure

    if not searches:
        raise ReportError("There is no search job among these runs to plot.")
    ncols = max(max(len(s.searched), 1) for s in searches)
    fig = Figure(figsize=(4.4 * ncols, 3.8 * len(searches)), dpi=100)
    for row, search in enumerate(searches):
        trials = search_trials(runs, epochs, search)
        prefix = f"{search.job_id}: " if len(searches) > 1 else ""
        head = f"{search.search} search, {search.scheduler}, {search.metric} {search.mode}"
        if not search.searched:
            ax = fig.add_subplot(len(searches), ncols, row * ncols + 1)
            ax.set_title(f"{prefix}{head}: no searched settings recorded", fontsize="medium")
            continue
        for i, key in enumerate(search.searched):
            ax = fig.add_subplot(len(searches), ncols, row * ncols + i + 1)
            _panel(ax, trials, key, search.metric, search.mode,
                   f"{prefix}{key}" if i else f"{prefix}{key} ({head})")
            if i == 0 and ax.has_data():
                ax.legend(fontsize="x-small", loc="best", markerscale=0.7)
    fig.tight_layout()
    return fig


def plot_search(runs: pd.DataFrame, epochs: pd.DataFrame, searches: list,
                path: str | os.PathLike) -> Path:
    """Write :func:`search_figure` to the PNG ``path`` atomically (a missing folder is an
    error, never created; no trial with the metric yet is a :class:`ReportError`)."""
    from mnistnets.files import write_atomic

    check_output_path(path)
    if all(search_trials(runs, epochs, s)["metric"].isna().all() for s in searches):
        metrics = ", ".join(sorted({s.metric for s in searches}))
        raise ReportError(f"There is nothing to plot yet: no trial of the search has logged {metrics}.")
    fig = search_figure(runs, epochs, searches)
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))
