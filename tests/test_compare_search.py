"""`mnistjobs compare` of search jobs (issue 14): one row per trial with its searched values,
sorted by the search's metric, stopped / diverged trials marked, the parent's best trial marked,
and `--plot` drawing the metric against each searched setting.

The runs are logged with MlflowClient under the contract's names (jobs.contract) into a real
MLflow SQLite store (no server), as a search job's driver and trials write them, and read back
through jobs.report and the CLI. Fast: no Ray, no MLflow server.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from jobs import report
from jobs.cli import main
from jobs.contract import (BEST_PARAM_PREFIX, ROLE_SWEEP, ROLE_TRIAL, TAG_BEST_RUN, TAG_DIVERGED, TAG_DIVERGED_REASON,
                           TAG_JOB, TAG_METRIC, TAG_MODE, TAG_PARENT, TAG_ROLE, TAG_SCHEDULER, TAG_SEARCH,
                           TAG_SEARCHED, TAG_STOPPED_AT, TAG_STOPPED_EARLY, TAG_TRIAL, best_metric_name,
                           sweep_run_name)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000_000  # ms
SEARCH = "raysubmit_search0001"  # random search, ASHA, test_acc max: lr, weight_decay, schedule
OPTUNA = "raysubmit_optuna0002"  # optuna, fifo, test_loss min: lr only
GRID = "raysubmit_grid000003"    # a grid job (parent tagged search=grid)

# name -> (lr, weight_decay, schedule, status, test_acc per epoch, stopped at, diverged)
TRIALS = {
    "v2-t000": ("0.02", "1e-05", "onecycle", "FINISHED", [98.0, 98.9, 99.2, 99.31], None, False),
    "v2-t001": ("0.3", "0.0003", "cosine:warmup=1", "FINISHED", [97.5, 98.6, 99.1, 99.45], None, False),
    "v2-t002": ("0.05", "0.001", "onecycle", "FINISHED", [96.0, 97.0], 2, False),
    "v2-t003": ("0.45", "5e-05", "cosine:warmup=1", "FAILED", [9.8], None, True),
    "v2-t004": ("0.1234567", "0.0002", "onecycle", "FINISHED", [98.2, 99.0, 99.3, 99.38], None, False),
}
ORDER = ["v2-t001", "v2-t004", "v2-t000", "v2-t002", "v2-t003"]  # by final test_acc, highest first
BEST = "v2-t001"
# the optuna job: name -> (lr, final test_loss); lowest first: t002, t000, t001
OPTUNA_TRIALS = {"v3-t000": ("0.01", 0.031), "v3-t001": ("0.2", 0.045), "v3-t002": ("0.05", 0.022)}


def _log_trial(client, exp, name, job, parent, params, metrics_per_epoch, status, start, tags=()):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp, run_name=name, start_time=start, tags={
        TAG_JOB: job, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: f"{name}_id", TAG_PARENT: parent, **dict(tags)})
    metrics = [Metric(k, v, start + e, e) for e, values in enumerate(metrics_per_epoch, start=1)
               for k, v in values.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run.info.run_id, status=status, end_time=start + 10_000 * len(metrics_per_epoch))
    return run.info.run_id


def _parent(client, exp, job, tags):
    run = client.create_run(exp, run_name=sweep_run_name(job), start_time=T0,
                            tags={TAG_JOB: job, TAG_ROLE: ROLE_SWEEP, **tags})
    return run.info.run_id


def _log_search(client, exp, start=T0):
    parent = _parent(client, exp, SEARCH, {TAG_SEARCH: "random", TAG_SEARCHED: "lr,weight_decay,schedule",
                                           TAG_METRIC: "test_acc", TAG_MODE: "max", TAG_SCHEDULER: "asha"})
    ids = {}
    for i, (name, (lr, wd, schedule, status, test, stopped, diverged)) in enumerate(TRIALS.items()):
        tags = {}
        if stopped:
            tags = {TAG_STOPPED_EARLY: "true", TAG_STOPPED_AT: str(stopped)}
        if diverged:
            tags = {TAG_DIVERGED: "true", TAG_DIVERGED_REASON: "training loss is nan at epoch 1"}
        params = {"model": "v2", "params": 13_000, "lr": lr, "weight_decay": wd, "schedule": schedule,
                  "seed": 1, "epochs": 4}
        per_epoch = [{"test_acc": te, "train_acc": te - 1.0, "test_loss": 0.1 / e}
                     for e, te in enumerate(test, start=1)]
        ids[name] = _log_trial(client, exp, name, SEARCH, parent, params, per_epoch, status,
                               start + i * 1000, tags)
    client.set_tag(parent, TAG_BEST_RUN, ids[BEST])
    client.log_metric(parent, best_metric_name("test_acc"), TRIALS[BEST][4][-1])
    for key, value in zip(("lr", "weight_decay", "schedule"), TRIALS[BEST][:3]):
        client.log_param(parent, BEST_PARAM_PREFIX + key, value)
    client.set_terminated(parent, status="FINISHED")
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment "search": one search job. Experiment "mixed": a grid job (2 seeds), the same
    search job and an Optuna job minimising test_loss."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("search_store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    only = client.create_experiment("search", artifact_location=str(tmp / "art1"))
    ids = _log_search(client, only)
    mixed = client.create_experiment("mixed", artifact_location=str(tmp / "art2"))
    grid_parent = _parent(client, mixed, GRID, {TAG_SEARCH: "grid"})
    for seed, test in ((1, [98.0, 99.40]), (2, [98.1, 99.60])):
        _log_trial(client, mixed, f"v0-onecycle-s{seed}", GRID, grid_parent,
                   {"model": "v0", "params": 18214, "schedule": "onecycle", "seed": seed, "epochs": 2},
                   [{"test_acc": te, "train_acc": te - 1.0} for te in test], "FINISHED", T0 + seed)
    _log_search(client, mixed, start=T0 + 50_000)
    opt_parent = _parent(client, mixed, OPTUNA, {TAG_SEARCH: "optuna", TAG_SEARCHED: "lr",
                                                 TAG_METRIC: "test_loss", TAG_MODE: "min"})
    for i, (name, (lr, loss)) in enumerate(OPTUNA_TRIALS.items()):
        _log_trial(client, mixed, name, OPTUNA, opt_parent, {"model": "v3", "lr": lr, "seed": 1, "epochs": 2},
                   [{"test_loss": loss * 2, "test_acc": 98.0}, {"test_loss": loss, "test_acc": 99.0 + i / 10}],
                   "FINISHED", T0 + 90_000 + i)
    return uri, ids


def compare(uri, *args, experiment="search"):
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--experiment", experiment, *args])
    return result


# ----------------------------------------------------------------------------- the table


def test_load_compare_finds_the_search_job_and_its_marks(store):
    uri, ids = store
    runs, epochs, searches = report.load_compare(uri, experiment="search")
    assert len(runs) == len(TRIALS)
    [sj] = searches
    assert (sj.job_id, sj.search, sj.scheduler, sj.metric, sj.mode) == (SEARCH, "random", "asha", "test_acc", "max")
    assert sj.searched == ["lr", "weight_decay", "schedule"]
    assert sj.best_run_id == ids[BEST] and sj.best_value == pytest.approx(99.45)
    assert sj.stopped_at == {ids["v2-t002"]: 2} and sj.diverged == {ids["v2-t003"]}
    assert sj.values[ids["v2-t004"]] == {"lr": "0.1234567", "weight_decay": "0.0002", "schedule": "onecycle"}
    # load_runs is unchanged: the same two frames
    runs2, epochs2 = report.load_runs(uri, experiment="search")
    pd.testing.assert_frame_equal(runs, runs2)
    pd.testing.assert_frame_equal(epochs, epochs2)


def test_search_table_rows_order_marks_and_columns(store):
    uri, ids = store
    runs, epochs, [sj] = report.load_compare(uri, experiment="search")
    table = report.search_table(runs, epochs, sj)
    assert list(table.columns) == ["Rank", "Trial", "lr", "weight_decay", "schedule", "Final Test Acc",
                                   "Epochs", "Status", "Best", "Wall Seconds"]
    assert list(table["Trial"]) == ORDER and list(table["Rank"]) == [1, 2, 3, 4, 5]
    assert list(table["Final Test Acc"]) == pytest.approx([TRIALS[n][4][-1] for n in ORDER])
    assert list(table["Epochs"]) == [len(TRIALS[n][4]) for n in ORDER]
    assert list(table["Status"]) == ["finished", "finished", "finished", "stopped at 2", "diverged"]
    assert list(table["Best"]) == ["best", "", "", "", ""]
    assert table["lr"].dtype == "float64" and list(table["lr"]) == pytest.approx([float(TRIALS[n][0]) for n in ORDER])
    assert table["schedule"].tolist() == [TRIALS[n][2] for n in ORDER]
    # the text table: numbers to 4 significant digits, accuracy as percent
    text = report.render(table, "table")
    lines = text.splitlines()
    assert lines[0].split() == ["Rank", "Trial", "lr", "weight_decay", "schedule", "Final", "Test", "Acc",
                                "Epochs", "Status", "Best", "Wall", "Seconds"]
    row = {ln.split()[1]: ln for ln in lines[2:]}
    assert "0.1235" in row["v2-t004"] and "0.1234567" not in row["v2-t004"]
    assert "1e-05" in row["v2-t000"] and "99.31%" in row["v2-t000"]
    assert row["v2-t002"].split()[-4:-1] == ["stopped", "at", "2"]
    assert row["v2-t001"].split()[-2] == "best"


def test_search_table_sorts_lowest_first_for_mode_min(store):
    uri, _ = store
    runs, epochs, searches = report.load_compare(uri, experiment="mixed", job=OPTUNA)
    [sj] = searches
    assert (sj.search, sj.mode, sj.metric, sj.scheduler, sj.best_run_id) == ("optuna", "min", "test_loss", "fifo", None)
    table = report.search_table(runs, epochs, sj)
    assert list(table["Trial"]) == ["v3-t002", "v3-t000", "v3-t001"]
    assert list(table["Final Test Loss"]) == pytest.approx([0.022, 0.031, 0.045])
    assert list(table["Final Test Acc"]) == pytest.approx([99.2, 99.0, 99.1])  # shown too: not the metric
    assert list(table["Best"]) == ["", "", ""]  # the parent names no best trial (yet)
    assert table["lr"].dtype == "float64"


def test_cli_search_job_table_and_csv(store, tmp_path):
    uri, _ = store
    result = compare(uri)
    assert result.exit_code == 0, result.output
    out = result.output
    # one job, one table (so no title, as for any single table): the search table
    assert out.splitlines()[0].split()[:5] == ["Rank", "Trial", "lr", "weight_decay", "schedule"]
    assert "Summary" not in out and "Final test accuracy over seeds" not in out and "Train Acc" not in out
    assert [ln.split()[1] for ln in out.splitlines()[2:]] == ORDER
    # CSV: the search table, numbers in full
    csv_out = tmp_path / "search.csv"
    result = compare(uri, "--format", "csv", "-o", str(csv_out))
    assert result.exit_code == 0, result.output
    back = pd.read_csv(csv_out)
    assert list(back["Trial"]) == ORDER
    assert list(back["lr"]) == pytest.approx([float(TRIALS[n][0]) for n in ORDER])
    assert 0.1234567 in list(back["lr"])  # not rounded in CSV
    assert list(back["Status"]) == ["finished", "finished", "finished", "stopped at 2", "diverged"]
    assert back["Best"].fillna("").tolist() == ["best", "", "", "", ""]
    assert back["Final Test Acc"].tolist() == pytest.approx([99.45, 99.38, 99.31, 97.0, 9.8])
    # Markdown: one table, no title when it is the only one
    result = compare(uri, "--table", "summary", "--format", "markdown")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("| Rank | Trial | lr | weight_decay | schedule | Final Test Acc |")
    assert "| 1 | v2-t001 | 0.3 | 0.0003 | cosine:warmup=1 | 99.45% | 4 | finished | best |" in lines[2]
    # --table epochs: every trial's epochs side by side
    result = compare(uri, "--table", "epochs", "--format", "csv")
    assert result.exit_code == 0, result.output
    back = pd.read_csv(io.StringIO(result.output))
    assert list(back["Epoch"]) == [1, 2, 3, 4] and "v2-t002 Test Acc" in back.columns
    assert back["v2-t002 Test Acc"].isna().tolist() == [False, False, True, True]


def test_cli_mixed_jobs_grid_tables_unchanged_and_a_section_per_search(store):
    uri, _ = store
    grid_only = compare(uri, "--job", GRID, experiment="mixed")
    assert grid_only.exit_code == 0, grid_only.output
    assert "Summary:" in grid_only.output and "Search job" not in grid_only.output
    result = compare(uri, experiment="mixed")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith(grid_only.output)  # the grid job's tables exactly as with --job GRID
    titles = [ln for ln in out.splitlines() if ln.startswith("Search job")]
    assert titles == [f"Search job {SEARCH} (random search, asha scheduler, 5 trials): highest test_acc first:",
                      f"Search job {OPTUNA} (optuna search, fifo scheduler, 3 trials): lowest test_loss first:"]
    assert "v2-t001" in out and "v3-t002" in out
    assert "v2-t001 Train Acc" not in out  # the grid tables hold only the grid job's runs
    # --job of the search job: its table alone
    result = compare(uri, "--job", SEARCH, "--table", "summary", "--format", "csv", experiment="mixed")
    assert result.exit_code == 0, result.output
    assert list(pd.read_csv(io.StringIO(result.output))["Trial"]) == ORDER
    # --table groups: the grid runs' seed statistics only
    result = compare(uri, "--table", "groups", "--format", "csv", experiment="mixed")
    assert result.exit_code == 0, result.output
    back = pd.read_csv(io.StringIO(result.output))
    assert list(back["Model"]) == ["v0"] and list(back["Runs"]) == [2]


def test_cli_csv_of_several_jobs_names_job(store, tmp_path):
    uri, _ = store
    out = tmp_path / "x.csv"
    result = compare(uri, "--format", "csv", "-o", str(out), experiment="mixed")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "CSV holds one table" in text and "--job JOB" in text and SEARCH in text and OPTUNA in text
    assert "Traceback" not in result.output and not out.exists()


def test_search_groups_only_has_no_grid_runs(store):
    uri, _ = store
    result = compare(uri, "--table", "groups")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split()[:2] == ["Model", "Schedule"]
    assert len(result.output.splitlines()) == 2  # the header and its rule: no grid runs here


# ----------------------------------------------------------------------------- the plot


def test_search_figure_one_panel_per_setting(store):
    uri, _ = store
    runs, epochs, searches = report.load_compare(uri, experiment="search")
    fig = report.search_figure(runs, epochs, searches)
    assert len(fig.axes) == 3
    lr, wd, schedule = fig.axes
    assert lr.get_xscale() == "log" and wd.get_xscale() == "log"  # 0.02..0.45, 1e-5..1e-3
    assert [t.get_text() for t in schedule.get_xticklabels()] == ["cosine:warmup=1", "onecycle"]
    labels = {h.get_label() for h in lr.get_legend().legend_handles}
    assert labels == {"trained every epoch", "stopped early", "diverged (on the edge when off the scale)", "best trial"}
    # each trial is one point; the stopped one drawn with its own marker
    points = {c.get_label(): c.get_offsets() for c in lr.collections}
    assert len(points["trained every epoch"]) == 3 and len(points["stopped early"]) == 1
    assert points["stopped early"][0][0] == pytest.approx(0.05) and points["stopped early"][0][1] == pytest.approx(97.0)
    assert points["best trial"][0][1] == pytest.approx(99.45)
    # the diverged trial (9.8%) is off the trained trials' scale: on the lower edge, which the
    # trained trials' range sets (97.0 .. 99.45), not 9.8
    [diverged] = [c for c in lr.collections if c.get_label().startswith("diverged")]
    low, high = lr.get_ylim()
    assert 96.0 < low < 97.0 and 99.45 < high < 100.0
    assert diverged.get_offsets()[0][1] == pytest.approx(low) and diverged.get_offsets()[0][0] == pytest.approx(0.45)
    # mixed: a row per search job (3 + 1 panels); the optuna lr spread (20x) stays linear
    runs, epochs, searches = report.load_compare(uri, experiment="mixed")
    fig = report.search_figure(runs, epochs, searches)
    assert len(fig.axes) == 4 and fig.axes[3].get_xscale() == "linear"


def test_cli_plot_search_png(store, tmp_path):
    uri, _ = store
    png = tmp_path / "search.png"
    result = compare(uri, "--table", "summary", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000
    from matplotlib.image import imread

    height, width = imread(png).shape[:2]
    assert width > 2.5 * height  # three panels side by side
    # mixed: the search jobs are drawn, the note says the grid runs are not
    png2 = tmp_path / "mixed.png"
    result = compare(uri, "--table", "summary", "--plot", str(png2), experiment="mixed")
    assert result.exit_code == 0, result.output
    assert png2.read_bytes().startswith(PNG_MAGIC)
    assert "the other 2 runs' accuracy curves" in " ".join(result.output.split())
    # a grid job alone keeps today's accuracy plot
    png3 = tmp_path / "grid.png"
    result = compare(uri, "--job", GRID, "--plot", str(png3), experiment="mixed")
    assert result.exit_code == 0 and png3.read_bytes().startswith(PNG_MAGIC)
    assert "the other" not in result.output


# ----------------------------------------------------------------------------- pieces


def test_setting_values_parse_numbers_as_numbers():
    from jobs.report.tables import setting_values

    assert setting_values(["128", "64", None]).tolist() == [128, 64, pd.NA]
    assert str(setting_values(["128", "64"]).dtype) == "Int64"
    floats = setting_values(["0.1", "1e-05", "2"])
    assert floats.dtype == "float64" and floats.tolist() == [0.1, 1e-05, 2.0]
    assert setting_values(["onecycle", "0.1"]).tolist() == ["onecycle", "0.1"]
    assert setting_values(["True", "False"]).tolist() == ["True", "False"]
    assert setting_values(["nan", "0.1"]).tolist() == ["nan", "0.1"]  # no number: kept as written


def test_metric_column_names_and_number_cells():
    assert report.metric_column("test_acc") == "Final Test Acc"
    assert report.metric_column("tta_test_acc") == "Final TTA Test Acc"
    assert report.metric_column("test_loss") == "Final Test Loss"
    df = pd.DataFrame({"lr": [0.123456789, 1e-05], "Final Test Acc": [99.456, 9.8]})
    assert report.render(df, "csv").splitlines()[1:] == ["0.123456789,99.46", "1e-05,9.80"]
    text = report.render(df, "table").splitlines()
    assert text[2].split() == ["0.1235", "99.46%"] and text[3].split() == ["1e-05", "9.80%"]


def test_compare_help_names_search_jobs_and_imports_nothing_heavy():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom jobs.cli import main\n"
            "r = CliRunner().invoke(main, ['compare', '--help'])\nassert r.exit_code == 0, r.output\n"
            "print(' '.join(r.output.split()))\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pandas', 'matplotlib', 'mlflow'}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    help_text, heavy = out.stdout.strip().splitlines()
    assert heavy == "[]"
    assert "search job" in help_text.lower() and "stopped at E" in help_text and "searched setting" in help_text


def test_a_running_search_job_without_epochs_or_values(tmp_path):
    """While a search runs: a trial with no epoch yet, one missing a searched value, one ASHA
    stopped before its first epoch; the parent has no best yet. The table still sorts (no
    metric last) and the plot refuses only when no trial has the metric."""
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "run": ["v2-t000", "v2-t001", "v2-t002"],
                         "label": ["v2-t000", "v2-t001", "v2-t002"], "model": ["v2"] * 3,
                         "seed": pd.array([1, 1, 1], dtype="Int64"),
                         "status": ["RUNNING", "FINISHED", "FINISHED"], "wall_seconds": [float("nan")] * 3})
    epochs = pd.DataFrame({"run_id": ["b"], "label": ["v2-t001"], "epoch": [1], "test_acc": [98.5],
                           "epoch_seconds": [3.0]})
    sj = report.SearchJob(job_id="j", parent_run_id="p", search="random", searched=["lr", "batch_size"],
                          run_ids=["a", "b", "c"], values={"a": {"lr": "0.1", "batch_size": "128"},
                                                           "b": {"lr": "0.01"}, "c": {"lr": "0.2", "batch_size": "64"}},
                          stopped_at={"c": 0})
    table = report.search_table(runs, epochs, sj)
    assert list(table["Trial"]) == ["v2-t001", "v2-t000", "v2-t002"]  # no metric: last, by name
    assert list(table["Status"]) == ["finished", "running", "stopped at 0"]
    assert list(table["Epochs"]) == [1, 0, 0] and list(table["Best"]) == ["", "", ""]
    assert str(table["batch_size"].dtype) == "Int64" and pd.isna(table["batch_size"].iloc[0])
    assert table["Wall Seconds"].iloc[0] == pytest.approx(3.0)  # the epochs' seconds while no end
    text = report.render(table, "table").splitlines()
    assert text[2].split()[:5] == ["1", "v2-t001", "0.01", "-", "98.50%"]
    fig = report.search_figure(runs, epochs, [sj])
    assert len(fig.axes) == 2
    assert "2 of 3 not drawn: no lr or no test_acc yet" in fig.axes[0].get_title()
    assert "3 of 3 not drawn" in fig.axes[1].get_title()
    assert report.plot_search(runs, epochs, [sj], tmp_path / "s.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(report.ReportError, match="no trial of the search has logged test_acc"):
        report.plot_search(runs, epochs[epochs["run_id"] == "x"], [sj], tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()
