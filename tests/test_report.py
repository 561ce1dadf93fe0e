"""jobs.report and `mnistjobs compare`: MLflow trial runs -> tables, CSV/Markdown, PNG.

The fast tests build the runs/epochs frames by hand. The slow ones log fake trial runs with
MlflowClient under the contract's names (jobs.contract) into an experiment of their own on the
session's embedded MLflow server (``embedded``: started by jobs.services.up), and read them back
through load_runs and the CLI.
"""
from __future__ import annotations

import io
import math
import os
import re
import socket

import pandas as pd
import pytest
from click.testing import CliRunner

from jobs import report
from jobs.cli import main
from jobs.contract import (ROLE_SWEEP, ROLE_TRIAL, TAG_DEVICE, TAG_JOB, TAG_NODE, TAG_PARENT, TAG_ROLE, TAG_TRIAL,
                           sweep_run_name)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JOB_A = "raysubmit_aaaa1111"
JOB_B = "raysubmit_bbbb2222"
T0 = 1_700_000_000_000  # ms
EXP = "report-test"  # the slow tests' experiment on the session's shared MLflow server

# name -> (job, model, params, schedule, seed, status, train_acc per epoch, test_acc per epoch,
#          wall seconds)
FAKE = {
    "v0-onecycle-s1": (JOB_A, "v0", 18214, "onecycle", 1, "FINISHED",
                       [90.47, 97.43, 97.92, 98.07], [98.00, 99.10, 99.45, 99.41], 120),
    "v0-onecycle-s2": (JOB_A, "v0", 18214, "onecycle", 2, "FINISHED",
                       [90.10, 97.20, 97.80, 98.10], [98.20, 99.40, 99.38, 99.51], 125),
    "v1-onecycle-s1": (JOB_A, "v1", 10970, "onecycle", 1, "FINISHED",
                       [90.33, 95.19, 96.19, 96.42], [97.50, 98.90, 99.20, 99.43], 100),
    "v1-onecycle-s2": (JOB_A, "v1", 10970, "onecycle", 2, "FINISHED",  # never reaches 99.4
                       [90.00, 95.00, 96.00, 96.30], [97.00, 98.50, 99.00, 99.39], 101),
    "v1-onecycle-s3": (JOB_B, "v1", 10970, "onecycle", 3, "FAILED",  # failed after 2 epochs
                       [89.00, 94.00], [96.00, 97.50], 40),
}
TARGET_COL = report.target_column(99.4)


def expected_summary(name):
    job, model, params, schedule, seed, status, train, test, wall = FAKE[name]
    best = max(test)
    reached = [i + 1 for i, v in enumerate(test) if v >= 99.4]
    return {
        "final": test[-1], "best": best, "best_epoch": test.index(best) + 1,
        "first": reached[0] if reached else None, "epochs": len(test), "wall": wall,
    }


def fake_frames(names=None):
    """runs/epochs frames as load_runs would build them, without MLflow."""
    names = names or list(FAKE)
    runs, epochs = [], []
    for i, name in enumerate(names):
        job, model, params, schedule, seed, status, train, test, wall = FAKE[name]
        rid = f"run{i:04d}" + "0" * 24
        runs.append({"run_id": rid, "run": name, "label": name, "job_id": job, "model": model,
                     "params": params, "schedule": schedule, "seed": seed, "status": status,
                     "wall_seconds": float(wall)})
        for e, (tr, te) in enumerate(zip(train, test), start=1):
            epochs.append({"run_id": rid, "label": name, "epoch": e, "train_loss": 0.1 / e,
                           "train_acc": tr, "test_loss": 0.05 / e, "test_acc": te, "lr": 0.01,
                           "epoch_seconds": wall / len(test), "images_per_second": 5000.0})
    runs = pd.DataFrame(runs)
    for col in ("params", "seed"):
        runs[col] = runs[col].astype("Int64")
    return runs, pd.DataFrame(epochs)


# ----------------------------------------------------------------------------- fast tests


def test_epoch_table_side_by_side():
    runs, epochs = fake_frames()
    table = report.epoch_table(epochs, runs)
    assert list(table.columns)[:5] == ["Epoch", "v0-onecycle-s1 Train Acc",
                                       "v0-onecycle-s1 Test Acc", "v0-onecycle-s2 Train Acc",
                                       "v0-onecycle-s2 Test Acc"]
    assert len(table.columns) == 1 + 2 * len(FAKE)
    assert list(table["Epoch"]) == [1, 2, 3, 4]
    for name, spec in FAKE.items():
        train, test = spec[6], spec[7]
        assert list(table[f"{name} Test Acc"].iloc[: len(test)]) == pytest.approx(test)
        assert list(table[f"{name} Train Acc"].iloc[: len(train)]) == pytest.approx(train)
    # the failed run has no epochs 3-4: missing, printed "-"
    assert table["v1-onecycle-s3 Test Acc"].iloc[2:].isna().all()
    text = report.render(table, "table")
    assert "97.43%" in text and "-" in text.splitlines()[-1]


def test_summary_final_best_first_epoch():
    runs, epochs = fake_frames()
    summary = report.summary_table(runs, epochs, target=99.4).set_index("Run")
    for name in FAKE:
        exp, row = expected_summary(name), summary.loc[name]
        assert row["Final Test Acc"] == pytest.approx(exp["final"])
        assert row["Best Test Acc"] == pytest.approx(exp["best"])
        assert row["Best Epoch"] == exp["best_epoch"]
        assert row["Epochs"] == exp["epochs"]
        assert row["Wall Seconds"] == pytest.approx(exp["wall"])
        if exp["first"] is None:
            assert pd.isna(row[TARGET_COL])
        else:
            assert row[TARGET_COL] == exp["first"]
    # exactly 99.40 counts as reaching 99.4
    assert summary.loc["v0-onecycle-s2", TARGET_COL] == 2
    assert summary.loc["v0-onecycle-s1", "Final Test Acc"] != summary.loc["v0-onecycle-s1",
                                                                         "Best Test Acc"]
    row = [ln for ln in report.render(summary.reset_index(), "table").splitlines()
           if ln.startswith("v1-onecycle-s2")][0]
    assert " - " in row  # never reached 99.4
    assert "18,214" in report.render(summary.reset_index(), "markdown")


def test_group_mean_min_over_finished_seeds():
    runs, epochs = fake_frames()
    groups = report.group_table(report.summary_table(runs, epochs)).set_index("Model")
    assert list(groups.index) == ["v0", "v1"]
    assert groups.loc["v0", "Runs"] == 2
    assert groups.loc["v0", "Mean Final Test Acc"] == pytest.approx((99.41 + 99.51) / 2)
    assert groups.loc["v0", "Min Final Test Acc"] == pytest.approx(99.41)
    # the FAILED v1 seed 3 is not counted
    assert groups.loc["v1", "Runs"] == 2
    assert groups.loc["v1", "Mean Final Test Acc"] == pytest.approx((99.43 + 99.39) / 2)
    assert groups.loc["v1", "Min Final Test Acc"] == pytest.approx(99.39)
    # a single seed per group -> no group rows
    runs1, epochs1 = fake_frames(["v0-onecycle-s1", "v1-onecycle-s1"])
    assert report.group_table(report.summary_table(runs1, epochs1)).empty


def test_group_tta_columns_say_how_many_runs_they_cover():
    runs, epochs = fake_frames(["v0-onecycle-s1", "v0-onecycle-s2", "v1-onecycle-s1",
                                "v1-onecycle-s2"])
    epochs["tta_test_acc"] = math.nan
    last = epochs.groupby("run_id")["epoch"].transform("max") == epochs["epoch"]
    tta = {"v0-onecycle-s1": 99.52, "v0-onecycle-s2": 99.48, "v1-onecycle-s1": 99.50}
    for label, value in tta.items():  # v1-onecycle-s2 has no TTA
        epochs.loc[last & (epochs["label"] == label), "tta_test_acc"] = value
    groups = report.group_table(report.summary_table(runs, epochs))
    g = groups.set_index("Model")
    assert list(g["Runs"]) == [2, 2] and list(g["TTA Runs"]) == [2, 1]
    assert g.loc["v0", "Mean Final TTA Acc"] == pytest.approx(99.50)
    assert g.loc["v0", "Min Final TTA Acc"] == pytest.approx(99.48)
    assert g.loc["v1", "Mean Final TTA Acc"] == pytest.approx(99.50)  # over its 1 TTA run
    header, rows = parse_markdown(report.render(groups, "markdown"))
    v1 = dict(zip(header, rows[1]))
    assert (v1["Runs"], v1["TTA Runs"], v1["Mean Final TTA Acc"]) == ("2", "1", "99.50%")
    back = pd.read_csv(io.StringIO(report.render(groups, "csv"))).set_index("Model")
    assert back.loc["v1", "TTA Runs"] == 1 and back.loc["v1", "Mean Final TTA Acc"] == 99.5
    # no run with TTA: a count of 0 and no mean
    epochs["tta_test_acc"] = math.nan
    g = report.group_table(report.summary_table(runs, epochs)).set_index("Model")
    assert list(g["TTA Runs"]) == [0, 0] and g["Mean Final TTA Acc"].isna().all()
    text = report.render(g.reset_index(), "table")
    assert text.splitlines()[-1].split()[-3:] == ["0", "-", "-"]


def parse_markdown(text):
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace(":", "")) == {"-"}
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return header, rows


def number(cell):
    return None if cell in ("", "-") else float(cell.rstrip("%").replace(",", ""))


@pytest.mark.parametrize("kind", ["epochs", "summary"])
def test_csv_and_markdown_parse_back(kind):
    runs, epochs = fake_frames()
    df = report.epoch_table(epochs, runs) if kind == "epochs" else report.summary_table(runs,
                                                                                         epochs)
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]

    back = pd.read_csv(io.StringIO(report.render(df, "csv")))
    assert list(back.columns) == list(df.columns)
    for col in numeric:
        pd.testing.assert_series_equal(back[col].astype("float64"), df[col].astype("float64"),
                                       check_names=False)

    header, rows = parse_markdown(report.render(df, "markdown"))
    assert header == list(df.columns)
    assert len(rows) == len(df)
    for j, col in enumerate(header):
        if col in numeric:
            for i, row in enumerate(rows):
                want = df[col].iloc[i]
                got = number(row[j])
                assert (got is None) if pd.isna(want) else got == pytest.approx(float(want))


def test_render_table_aligned_and_bad_format():
    df = pd.DataFrame({"Run": ["a", "longer-name"], "Test Acc": [99.4, 98.123]})
    lines = report.render(df, "table").splitlines()
    assert lines[0].split() == ["Run", "Test", "Acc"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].endswith("99.40%") and lines[3].endswith("98.12%")
    assert len(lines[2]) == len(lines[3])  # right-aligned numbers
    with pytest.raises(report.ReportError, match="table, csv, markdown"):
        report.render(df, "html")
    assert "a \\| b" in report.render(pd.DataFrame({"x": ["a | b"]}), "markdown")


def test_render_report_sections():
    runs, epochs = fake_frames()
    tables = {"Epochs": report.epoch_table(epochs, runs),
              "Summary": report.summary_table(runs, epochs)}
    md = report.render_report(tables, "markdown")
    assert "## Epochs" in md and "## Summary" in md
    text = report.render_report(tables, "table")
    assert [ln for ln in text.splitlines() if ln.endswith(":")] == ["Epochs:", "Summary:"]
    # CSV holds one table: two are refused, one is a plain CSV with no title line
    with pytest.raises(report.ReportError, match="CSV holds one table.*Epochs, Summary.*--table"):
        report.render_report(tables, "csv")
    one = report.render_report({"Summary": tables["Summary"]}, "csv")
    assert not one.startswith("#")
    assert len(pd.read_csv(io.StringIO(one))) == len(FAKE)


def test_plot_is_png_and_atomic(tmp_path):
    runs, epochs = fake_frames()
    out = tmp_path / "plots" / "acc.png"
    out.parent.mkdir()  # the folder must exist: plot_accuracy never creates one
    report.plot_accuracy(epochs, runs, out)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["acc.png"]  # no temp files left
    # nothing to plot: an error, and the old file stays as it was
    with pytest.raises(report.ReportError):
        report.plot_accuracy(epochs.iloc[0:0], runs, out)
    assert out.read_bytes() == data


def test_write_output_leaves_nothing_on_error(tmp_path, monkeypatch):
    import mnistnets.files

    target = tmp_path / "out.txt"
    target.write_text("old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mnistnets.files.os, "replace", boom)
    with pytest.raises(OSError):
        report.write_output(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_clear_error(monkeypatch):
    """Fails fast: one health check decides, and no MLflow client (whose retries of a dead
    server take minutes) is ever made."""
    import mlflow

    from jobs import cluster

    uri = f"http://127.0.0.1:{free_port()}"
    asked, real = [], cluster.mlflow_answers
    monkeypatch.setattr(cluster, "mlflow_answers", lambda u, **kw: asked.append(u) or real(u, **kw))

    def no_client(*args, **kwargs):
        raise AssertionError("an MLflow client was made for a server that does not answer")

    monkeypatch.setattr(mlflow, "MlflowClient", no_client)
    with pytest.raises(report.ReportError, match="Cannot reach the MLflow tracking server"):
        report.load_runs(uri)
    assert asked == [uri]
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", uri])
    assert result.exit_code == 2
    assert "Cannot reach" in result.output and "Traceback" not in result.output
    assert asked == [uri, uri]


def test_compare_without_any_tracking_uri_exits_2(tmp_path, monkeypatch):
    from jobs import services

    monkeypatch.setattr(services, "tracking_uri_for", lambda home: None)
    result = CliRunner().invoke(main, ["compare", "--home", str(tmp_path)],
                                env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 2
    assert "--tracking-uri" in result.output and "MLFLOW_TRACKING_URI" in result.output


# ----------------------------------------------------------------------------- sqlite stores


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """A real MLflow SQLite store (no server): seed 1 of v0 run by two jobs, one with TTA."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    tmp = tmp_path_factory.mktemp("sqlite_store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("mnistjobs", artifact_location=str(tmp / "art"))
    for i, (job, test, tta) in enumerate([(JOB_A, [98.0, 99.40], 99.50),
                                          (JOB_B, [98.1, 99.60], None)]):
        start = T0 + i * 1000
        run = client.create_run(exp, run_name="v0-onecycle-s1", start_time=start, tags={
            TAG_JOB: job, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: f"t{i}"})
        metrics = [Metric(k, v, start + e, e) for e, te in enumerate(test, start=1)
                   for k, v in (("test_acc", te), ("train_acc", te - 1.0))]
        if tta is not None:
            metrics.append(Metric("tta_test_acc", tta, start + 9, len(test)))
        ps = {"model": "v0", "params": 18214, "schedule": "onecycle", "seed": 1, "epochs": 2}
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param(k, str(v)) for k, v in ps.items()])
        client.set_terminated(run.info.run_id, status="FINISHED", end_time=start + 60_000)
    return uri


def test_compare_file_store_uri_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    missing = tmp_path / "x" / "mlruns"
    existing = tmp_path / "old" / "mlruns"
    existing.mkdir(parents=True)
    for args, env in [(["--tracking-uri", str(missing)], {}),
                      ([], {"MLFLOW_TRACKING_URI": missing.as_uri()}),
                      (["--tracking-uri", str(existing)], {})]:
        result = CliRunner().invoke(main, ["compare", *args], env=env)
        assert result.exit_code == 2, result.output
        assert isinstance(result.exception, SystemExit)  # a clean message, no traceback
        out = " ".join(result.output.split())
        assert "mlruns" in out and "sqlite:///" in out and "mnistjobs up" in out
        assert "Traceback" not in out
    assert not (tmp_path / "x").exists()
    assert list(existing.iterdir()) == []


def test_compare_missing_sqlite_database_creates_nothing(tmp_path, monkeypatch):
    result = CliRunner().invoke(main, ["compare", "--tracking-uri",
                                       f"sqlite:///{tmp_path}/nothere.db"])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path}/nothere.db" in " ".join(result.output.split())
    assert "does not exist" in result.output and "INFO" not in result.output
    monkeypatch.chdir(tmp_path)
    with pytest.raises(report.ReportError, match="typo.db.*does not exist"):
        report.load_runs("sqlite:///typo.db")
    assert list(tmp_path.iterdir()) == []
    # an existing file that is no MLflow database: refused, left as it was
    (tmp_path / "empty.db").write_bytes(b"")
    (tmp_path / "notes.db").write_text("not a database\n" * 20)
    for name in ("empty.db", "notes.db"):
        result = CliRunner().invoke(main, ["compare", "--tracking-uri", f"sqlite:///{name}"])
        assert result.exit_code == 2 and "not an MLflow database" in result.output, result.output
    assert (tmp_path / "empty.db").read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "notes.db"]


def test_compare_output_folder_must_exist(sqlite_store, tmp_path):
    for option, name in [("-o", "out.md"), ("--plot", "acc.png")]:
        target = tmp_path / "missing" / "dir" / name
        result = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store,
                                           option, str(target)])
        assert result.exit_code == 2, result.output
        assert str(target.parent) in result.output and "does not exist" in result.output
        assert not (tmp_path / "missing").exists()
    with pytest.raises(report.ReportError, match="missing.*does not exist"):
        report.write_output(tmp_path / "missing" / "x.txt", "data")
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask(sqlite_store, tmp_path):
    old = os.umask(0o022)
    try:
        out, plot = tmp_path / "out.md", tmp_path / "acc.png"
        result = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store, "--format",
                                           "markdown", "-o", str(out), "--plot", str(plot)])
        assert result.exit_code == 0, result.output
        assert os.stat(out).st_mode & 0o777 == 0o644
        assert os.stat(plot).st_mode & 0o777 == 0o644
        os.umask(0o027)
        assert os.stat(report.write_output(tmp_path / "new.txt", "x")).st_mode & 0o777 == 0o640
        os.chmod(out, 0o600)  # a file written again keeps its mode, as with open(path, "w")
        report.write_output(out, "again")
        assert out.read_text() == "again" and os.stat(out).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.png", "new.txt", "out.md"]


def test_cli_compare_groups_count_runs_and_tta_coverage(sqlite_store):
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store,
                                       "--table", "groups", "--format", "csv"])
    assert result.exit_code == 0, result.output
    back = pd.read_csv(io.StringIO(result.output))
    assert "Seeds" not in back.columns  # seed 1 from two jobs is two runs, not two seeds
    row = back.iloc[0]
    assert (row["Model"], row["Runs"], row["TTA Runs"]) == ("v0", 2, 1)
    assert row["Mean Final Test Acc"] == pytest.approx(99.5)
    assert row["Mean Final TTA Acc"] == pytest.approx(99.5)
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store,
                                       "--table", "groups", "--format", "markdown"])
    header, rows = parse_markdown(result.output)
    cells = dict(zip(header, rows[0]))
    assert (cells["Runs"], cells["TTA Runs"], cells["Min Final TTA Acc"]) == ("2", "1", "99.50%")


def test_cli_compare_csv_is_one_table_the_summary_by_default(sqlite_store, tmp_path):
    """`--format csv` alone writes the summary as one CSV table that pandas reads back; the
    same as `--table summary --format csv`, to stdout and to a file."""
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store, "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "#" not in result.output and "\n\n" not in result.output
    back = pd.read_csv(io.StringIO(result.output))
    assert list(back.columns) == list(report.summary_table(*report.load_runs(sqlite_store)).columns)
    assert len(back) == 2 and sorted(back["Run"]) == [f"v0-onecycle-s1 ({JOB_A})", f"v0-onecycle-s1 ({JOB_B})"]
    assert sorted(back["Final Test Acc"]) == pytest.approx([99.40, 99.60])
    explicit = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store, "--format", "csv",
                                         "--table", "summary"])
    assert explicit.exit_code == 0 and explicit.output == result.output
    out = tmp_path / "summary.csv"
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store, "--format", "csv",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == explicit.output
    epochs = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store, "--format", "csv",
                                       "--table", "epochs"])
    assert epochs.exit_code == 0, epochs.output
    assert list(pd.read_csv(io.StringIO(epochs.output))["Epoch"]) == [1, 2]
    # without --format csv the default is still every table
    text = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store])
    assert text.exit_code == 0 and "Summary:" in text.output and "Side-by-side epoch table:" in text.output


def test_cli_compare_csv_refuses_all_tables(sqlite_store, tmp_path):
    out = tmp_path / "all.csv"
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", sqlite_store, "--format", "csv",
                                       "--table", "all", "-o", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--table all cannot be written as CSV" in text
    assert "--table epochs, summary or groups" in text and "--format table or markdown" in text
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- real MLflow


@pytest.fixture(scope="module")
def logged(embedded):
    """The FAKE trial runs (plus sweep parents and a run elsewhere) logged under contract names,
    in the experiment EXP of the session's embedded MLflow server."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from jobs import tracking

    client = tracking.client(embedded.mlflow_url)  # with the embedded server's login
    exp = client.create_experiment(EXP)
    other = client.create_experiment(f"{EXP}-elsewhere")
    parents = {}
    for job in (JOB_A, JOB_B):
        parent = client.create_run(exp, run_name=sweep_run_name(job), start_time=T0,
                                   tags={TAG_JOB: job, TAG_ROLE: ROLE_SWEEP})
        client.log_metric(parent.info.run_id, "test_acc", 1.0, step=1)
        parents[job] = parent.info.run_id
    ids = {}
    for i, (name, spec) in enumerate(FAKE.items()):
        job, model, params, schedule, seed, status, train, test, wall = spec
        start = T0 + i * 1000
        run = client.create_run(exp, run_name=name, start_time=start, tags={
            TAG_JOB: job, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: f"t{i}", TAG_NODE: "127.0.0.1",
            TAG_DEVICE: "cpu", TAG_PARENT: parents[job]})
        rid = run.info.run_id
        ps = {"model": model, "params": params, "schedule": schedule, "seed": seed,
              "optimizer": "sgd", "batch_size": 128, "epochs": 4, "device": "cpu"}
        metrics = []
        for e, (tr, te) in enumerate(zip(train, test), start=1):
            ts = start + e * 10
            vals = {"train_loss": 0.1 / e, "train_acc": tr, "test_loss": 0.05 / e,
                    "test_acc": te, "lr": 0.01 * e, "epoch_seconds": wall / len(test),
                    "images_per_second": 5000.0 + e}
            metrics += [Metric(k, v, ts, e) for k, v in vals.items()]
        if name == "v0-onecycle-s1":  # a retried epoch 2 logged first with a stale value
            metrics.append(Metric("test_acc", 50.0, start + 1, 2))
        client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in ps.items()])
        client.set_terminated(rid, status=status, end_time=start + wall * 1000)
        ids[name] = rid
    stray = client.create_run(other, run_name="v3-step-s1", tags={TAG_ROLE: ROLE_TRIAL, TAG_JOB: JOB_A})
    client.log_metric(stray.info.run_id, "test_acc", 99.0, step=1)
    return embedded.mlflow_url, ids


@pytest.mark.slow
def test_load_runs_rows_and_values(logged):
    uri, ids = logged
    runs, epochs = report.load_runs(uri, experiment=EXP)
    assert list(runs["run"]) == list(FAKE)  # sorted by model, schedule, seed; no parents/strays
    assert set(runs["run_id"]) == set(ids.values())
    row = runs.set_index("run").loc["v1-onecycle-s3"]
    assert row["status"] == "FAILED" and row["job_id"] == JOB_B and row["model"] == "v1"
    assert row["params"] == 10970 and row["seed"] == 3 and row["schedule"] == "onecycle"
    assert row["wall_seconds"] == pytest.approx(40.0)
    assert row["start_time"] == pd.Timestamp(T0 + 4000, unit="ms", tz="UTC")
    assert row["trial_id"] == "t4" and row["device"] == "cpu"
    assert len(epochs) == sum(len(s[7]) for s in FAKE.values())
    assert set(report.METRICS) <= set(epochs.columns)
    for name, spec in FAKE.items():
        mine = epochs[epochs["run_id"] == ids[name]].sort_values("epoch")
        assert list(mine["epoch"]) == list(range(1, len(spec[7]) + 1))
        assert list(mine["test_acc"]) == pytest.approx(spec[7])  # stale retry value dropped
        assert list(mine["train_acc"]) == pytest.approx(spec[6])
        assert list(mine["lr"]) == pytest.approx([0.01 * e for e in mine["epoch"]])
        assert list(mine["images_per_second"]) == pytest.approx([5000.0 + e
                                                                  for e in mine["epoch"]])
    # the tables straight from MLflow agree with the hand-built expectations
    table = report.epoch_table(epochs, runs)
    assert list(table["v0-onecycle-s1 Test Acc"]) == pytest.approx(FAKE["v0-onecycle-s1"][7])
    summary = report.summary_table(runs, epochs).set_index("Run")
    for name in FAKE:
        exp = expected_summary(name)
        assert summary.loc[name, "Final Test Acc"] == pytest.approx(exp["final"])
        assert summary.loc[name, "Best Test Acc"] == pytest.approx(exp["best"])
        first = summary.loc[name, TARGET_COL]
        assert (pd.isna(first) if exp["first"] is None else first == exp["first"])


@pytest.mark.slow
def test_load_runs_job_filter_and_errors(logged):
    uri, ids = logged
    runs, epochs = report.load_runs(uri, experiment=EXP, job=JOB_B)
    assert list(runs["run"]) == ["v1-onecycle-s3"]
    assert set(epochs["run_id"]) == {ids["v1-onecycle-s3"]}
    with pytest.raises(report.ReportError, match=f"no trial runs.*{JOB_A}"):
        report.load_runs(uri, experiment=EXP, job="raysubmit_nope")
    with pytest.raises(report.ReportError, match=f"no MLflow experiment named 'nope'.*{re.escape(EXP)}"):
        report.load_runs(uri, experiment="nope")


@pytest.mark.slow
def test_cli_compare_prints_tables(logged, tmp_path):
    uri, _ = logged
    plot = tmp_path / "acc.png"
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--experiment", EXP,
                                       "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Side-by-side epoch table" in out and "Summary" in out
    assert "v0-onecycle-s1 Train Acc" in out and "99.51%" in out
    assert "Final test accuracy over seeds" in out
    assert plot.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_cli_compare_job_filter_and_env_uri(logged):
    uri, _ = logged
    result = CliRunner().invoke(main, ["compare", "--experiment", EXP, "--job", JOB_B, "--table", "summary"],
                                env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 0, result.output
    assert "v1-onecycle-s3" in result.output and "FAILED" in result.output
    assert "v0-onecycle" not in result.output


@pytest.mark.slow
def test_cli_compare_csv_and_markdown_files(logged, tmp_path):
    uri, _ = logged
    out = tmp_path / "summary.csv"
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--experiment", EXP,
                                       "--table", "summary", "--format", "csv", "-o", str(out)])
    assert result.exit_code == 0, result.output
    back = pd.read_csv(out).set_index("Run")
    for name in FAKE:
        exp = expected_summary(name)
        assert back.loc[name, "Final Test Acc"] == pytest.approx(exp["final"])
        assert back.loc[name, "Best Test Acc"] == pytest.approx(exp["best"])
        first = back.loc[name, TARGET_COL]
        assert (math.isnan(first) if exp["first"] is None else first == exp["first"])
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--experiment", EXP,
                                       "--table", "epochs", "--format", "markdown"])
    assert result.exit_code == 0, result.output
    header, rows = parse_markdown(result.output)
    j = header.index("v1-onecycle-s2 Test Acc")
    assert [number(r[j]) for r in rows] == pytest.approx(FAKE["v1-onecycle-s2"][7])
    k = header.index("v1-onecycle-s3 Test Acc")
    assert [number(r[k]) for r in rows][2:] == [None, None]


@pytest.mark.slow
def test_cli_compare_unknown_experiment_and_job_exit_2(logged):
    uri, _ = logged
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--experiment", "nope"])
    assert result.exit_code == 2
    assert "no MLflow experiment named 'nope'" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--experiment", EXP,
                                       "--job", "raysubmit_x"])
    assert result.exit_code == 2 and "raysubmit_x" in result.output


def test_duplicate_run_names_get_unique_labels():
    names = ["v0-onecycle-s1", "v0-onecycle-s1", "v1-step-s1"]
    labels = report.unique_labels(names, ["job1", "job2", "job1"], ["a" * 32, "b" * 32, "c" * 32])
    assert labels == ["v0-onecycle-s1 (job1)", "v0-onecycle-s1 (job2)", "v1-step-s1"]
    labels = report.unique_labels(names[:2], ["job1", "job1"], ["a" * 32, "b" * 32])
    assert labels == ["v0-onecycle-s1 (aaaaaaaa)", "v0-onecycle-s1 (bbbbbbbb)"]


def test_one_run_search_pages_and_one_history_reader_keeps_the_last_value():
    """search_all asks MLflow page after page until no token is left; metric_history keeps, of a
    step logged twice (a retried epoch), the value logged last."""
    from types import SimpleNamespace as NS

    from jobs.tracking import metric_history, search_all

    class Pages(list):
        token = None

    class Fake:
        def __init__(self):
            self.asked = []

        def search_runs(self, experiment_ids, filter_string, run_view_type, max_results, page_token):
            self.asked.append((tuple(experiment_ids), filter_string, page_token))
            page = Pages([f"run-{page_token or 0}-{i}" for i in range(2)])
            page.token = {None: "1", "1": "2"}.get(page_token)
            return page

        def get_metric_history(self, run_id, key):
            return [NS(step=2, value=50.0, timestamp=5), NS(step=1, value=98.0, timestamp=3),
                    NS(step=2, value=99.1, timestamp=9), NS(step=3, value=99.2, timestamp=9),
                    NS(step=3, value=99.3, timestamp=9)] if key == "test_acc" else []

    fake = Fake()
    runs = search_all(fake, ["7"], "tags.x = 'y'")
    assert runs == ["run-0-0", "run-0-1", "run-1-0", "run-1-1", "run-2-0", "run-2-1"]
    assert fake.asked == [(("7",), "tags.x = 'y'", None), (("7",), "tags.x = 'y'", "1"),
                          (("7",), "tags.x = 'y'", "2")]
    assert search_all(fake, [], "") == [] and len(fake.asked) == 3  # no experiment: nothing asked
    history = metric_history(fake, "r", ["test_acc", "lr"])
    assert history == {"test_acc": [(1, 98.0), (2, 99.1), (3, 99.3)], "lr": []}
