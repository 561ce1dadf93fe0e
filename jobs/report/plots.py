"""``mnistjobs compare --plot``: every run's accuracy per epoch in one PNG (drawn by
:func:`jobs.plots.plot_runs`, the project's one plotter)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from jobs.report.errors import ReportError
from jobs.report.load import run_labels
from jobs.report.render import check_output_path
from jobs.report.tables import DEFAULT_TARGET


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
