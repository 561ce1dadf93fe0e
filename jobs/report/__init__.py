"""Comparison reports: MLflow trial runs -> pandas tables, text/CSV/Markdown, and a PNG plot.

    from jobs import report

    runs, epochs = report.load_runs("http://127.0.0.1:5001", job="raysubmit_abc")
    print(report.render(report.epoch_table(epochs, runs), "table"))  # the seed's side-by-side table
    summary = report.summary_table(runs, epochs)                     # final / best / first epoch >= 99.4
    print(report.render(report.group_table(summary), "markdown"))    # mean/min over finished runs
    report.plot_accuracy(epochs, runs, "accuracy.png")

    runs, epochs, searches = report.load_compare("http://127.0.0.1:5001", job="raysubmit_def")
    print(report.render(report.search_table(runs, epochs, searches[0]), "table"))  # best first
    report.plot_search(runs, epochs, searches, "search.png")         # metric vs each setting

The parts: :mod:`.load` (MLflow -> frames; :mod:`.stores` checks the tracking URI first),
:mod:`.tables`, :mod:`.render` (text and output files), :mod:`.plots`. The embedded default's
tracking URI is :func:`jobs.services.tracking_uri_for`.
"""
from __future__ import annotations

from jobs.contract import DEFAULT_EXPERIMENT
from jobs.report.errors import ReportError
from jobs.report.load import (EPOCH_COLUMNS, METRICS, RUN_COLUMNS, SearchJob, load_compare, load_runs, run_labels,
                              unique_labels)
from jobs.report.plots import plot_accuracy, plot_search, search_figure
from jobs.report.render import FORMATS, check_output_path, render, render_report, write_output
from jobs.report.tables import (DEFAULT_TARGET, epoch_table, group_table, metric_column, search_table, search_trials,
                                summary_table, target_column)

__all__ = ["DEFAULT_EXPERIMENT", "DEFAULT_TARGET", "EPOCH_COLUMNS", "FORMATS", "METRICS", "RUN_COLUMNS",
           "ReportError", "SearchJob", "check_output_path", "epoch_table", "group_table", "load_compare",
           "load_runs", "metric_column", "plot_accuracy", "plot_search", "render", "render_report",
           "run_labels", "search_figure", "search_table", "search_trials", "summary_table", "target_column",
           "unique_labels", "write_output"]
