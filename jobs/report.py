"""Comparison reports: MLflow trial runs -> pandas tables, text/CSV/Markdown, and a PNG plot.

Reads MLflow only (never Ray's result folders), using the names in the project contract:
trial runs are tagged ``mnistjobs.role = trial`` and ``mnistjobs.job_id = <job>``, carry the
params ``model``, ``params``, ``schedule``, ``seed`` ... and log one value per epoch
(``step = epoch``) of each metric in :data:`METRICS`.

    runs, epochs = load_runs("http://127.0.0.1:5001", job="raysubmit_abc")
    print(render(epoch_table(epochs, runs), "table"))       # the seed's side-by-side table
    summary = summary_table(runs, epochs)                   # final / best / first epoch >= 99.4
    print(render(group_table(summary), "markdown"))         # mean/min over finished runs
    plot_accuracy(epochs, runs, "accuracy.png")
"""
from __future__ import annotations

import io
import json
import math
import numbers
import os
import secrets
import stat
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import pandas as pd

DEFAULT_EXPERIMENT = "mnistjobs"
DEFAULT_TARGET = 99.4
ROLE_TAG = "mnistjobs.role"
JOB_TAG = "mnistjobs.job_id"
TRIAL_TAG = "mnistjobs.trial_id"
DEVICE_TAG = "mnistjobs.device"
METRICS = (
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
    "epoch_seconds",
    "images_per_second",
    "tta_test_acc",  # the last epoch only, when the run's recipe asks for test-time augmentation
)
FORMATS = ("table", "csv", "markdown")

RUN_COLUMNS = [
    "run_id", "run", "label", "job_id", "trial_id", "model", "params", "schedule", "seed",
    "optimizer", "batch_size", "epochs_planned", "device", "status",
    "start_time", "end_time", "wall_seconds",
]
EPOCH_COLUMNS = ["run_id", "label", "epoch", *METRICS]


class ReportError(Exception):
    """Nothing to report, or MLflow cannot be read: a one-paragraph message for the user."""


# ----------------------------------------------------------------------------- loading


def _check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast (instead of MLflow's minutes of retries) when an HTTP server is not there."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (user-given URL)
            return
    except urllib.error.HTTPError:
        return  # something answers; let MLflow report what is wrong with it
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReportError(
            f"Cannot reach the MLflow tracking server at {tracking_uri} ({reason}). Start the "
            "embedded default with `mnistjobs up`, or point --tracking-uri / MLFLOW_TRACKING_URI "
            "at a running server."
        ) from None


_POINT_ELSEWHERE = (
    "Point --tracking-uri (or MLFLOW_TRACKING_URI) at the MLflow tracking server the jobs log "
    "to, e.g. the MLflow URL that `mnistjobs up` prints (http://127.0.0.1:5000 by default), or "
    "at an existing MLflow database, e.g. sqlite:////absolute/path/to/mlflow.db."
)


def _file_store_folder(uri: str) -> Path | None:
    """The folder of an MLflow file-store URI (a plain path or file:...), else None."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if scheme == "" or len(scheme) == 1:  # a plain path (a Windows drive letter parses as one)
        return Path(uri)
    return None


def _sqlite_tables(path: Path) -> set[str] | None:
    """Table names of the SQLite file `path`, opened read-only; None when that cannot be told."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return None  # locked, unreadable, ...: let MLflow say what is wrong
    except sqlite3.DatabaseError:
        return set()  # not an SQLite file at all
    return {name for (name,) in rows}


def _check_local_store(uri: str) -> None:
    """Refuse a local store that MLflow would create (compare only reads) or cannot open.

    A file-store folder (plain path or file: URI) must exist; a sqlite URI must name an existing
    MLflow database (MLflow would otherwise create the file, or add its tables to it).
    """
    folder = _file_store_folder(uri)
    if folder is not None:
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            raise ReportError(
                f"The MLflow tracking URI {uri} is a local path (MLflow's old file store), and "
                f"{folder} {what}; `mnistjobs compare` only reads, so it creates nothing there. "
                + _POINT_ELSEWHERE
            )
        return  # an existing folder: MLflow opens it, or refuses (see load_runs)
    if urllib.parse.urlsplit(uri).scheme.lower().split("+")[0] != "sqlite":
        return
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception:  # noqa: BLE001 - a malformed URI: MLflow reports it
        return
    if not database or database == ":memory:":
        return
    if database.startswith("file:"):  # an SQLite URI filename (sqlite:///file:...?uri=true)
        database = urllib.request.url2pathname(urllib.parse.urlsplit(database).path)
    path = Path(database)
    if not path.exists():
        raise ReportError(
            f"The MLflow database {path} (from --tracking-uri / MLFLOW_TRACKING_URI {uri}) does "
            "not exist, and `mnistjobs compare` only reads, so it creates none. Check the path: "
            "sqlite:////abs/path.db (four slashes) is absolute, sqlite:///name.db is relative to "
            f"the current folder ({Path.cwd()}). " + _POINT_ELSEWHERE
        )
    if not path.is_file():
        raise ReportError(
            f"The MLflow database {path} (from {uri}) is not a file. " + _POINT_ELSEWHERE
        )
    tables = _sqlite_tables(path)
    if tables is not None and not {"experiments", "runs"} <= tables:
        raise ReportError(
            f"{path} (from {uri}) is not an MLflow database (it has no MLflow tables), and "
            "`mnistjobs compare` only reads, so it adds none. " + _POINT_ELSEWHERE
        )


def _to_int(value):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return pd.NA


def _ms_to_time(ms):
    return pd.to_datetime(ms, unit="ms", utc=True) if ms else pd.NaT


def _unique_labels(names: list[str], job_ids: list[str], run_ids: list[str]) -> list[str]:
    """Run names as column labels; a name used by several runs gets its job (or run) id added."""
    labels = []
    for name, job, run_id in zip(names, job_ids, run_ids):
        same = [i for i, n in enumerate(names) if n == name]
        if len(same) == 1:
            labels.append(name)
            continue
        jobs_of_same = {job_ids[i] for i in same}
        suffix = job if job and len(jobs_of_same) == len(same) else run_id[:8]
        labels.append(f"{name} ({suffix})")
    return labels


def _metric_history(client, run_id: str) -> list[dict]:
    """One dict per epoch for one run; a step logged twice (a retried epoch) keeps its last value."""
    per_step: dict[int, dict] = {}
    stamps: dict[tuple[int, str], int] = {}
    for key in METRICS:
        for m in client.get_metric_history(run_id, key):
            slot = (int(m.step), key)
            if slot in stamps and stamps[slot] > m.timestamp:
                continue
            stamps[slot] = m.timestamp
            per_step.setdefault(int(m.step), {})[key] = float(m.value)
    return [{"epoch": step, **values} for step, values in sorted(per_step.items())]


def load_runs(
    tracking_uri: str | None,
    experiment: str = DEFAULT_EXPERIMENT,
    job: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every trial run of `experiment` (optionally of one job) from MLflow.

    Returns ``(runs, epochs)``: ``runs`` has one row per trial run (columns :data:`RUN_COLUMNS`;
    ``label`` is the run name, made unique when two jobs reuse a name), sorted by model,
    schedule, seed and start; ``epochs`` has one row per (run, epoch) with every metric of
    :data:`METRICS` (NaN where a metric was not logged). Raises :class:`ReportError` for an
    unreachable server, an unknown experiment, or no trial runs.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    if job is not None and ("'" in job or "\\" in job or not job.strip()):
        raise ReportError(f"Invalid job id {job!r}: a job id has no quotes or backslashes.")
    uri = tracking_uri or mlflow.get_tracking_uri()
    where = tracking_uri or f"the default MLflow tracking URI ({uri})"
    _check_reachable(uri)
    _check_local_store(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments(max_results=50))
            known = ", ".join(names) if names else "none"
            raise ReportError(
                f"There is no MLflow experiment named {experiment!r} at {where} (experiments "
                f"there: {known}). Pass --experiment with the name used at submit time, or "
                "--tracking-uri for another server."
            )
        filt = f"tags.`{ROLE_TAG}` = 'trial'"
        if job is not None:
            filt += f" and tags.`{JOB_TAG}` = '{job}'"
        found, token = [], None
        while True:
            page = client.search_runs(
                [exp.experiment_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000, page_token=token,
            )
            found.extend(page)
            token = page.token
            if not token:
                break
        if not found:
            if job is None:
                raise ReportError(
                    f"Experiment {experiment!r} at {where} has no trial runs yet. Submit a sweep "
                    "with `mnistjobs submit`, or pick another --experiment."
                )
            others = client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'",
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
            )
            jobs = sorted({r.data.tags.get(JOB_TAG, "") for r in others} - {""})
            listed = ", ".join(jobs[:10]) + (", ..." if len(jobs) > 10 else "") if jobs else "none"
            raise ReportError(
                f"Job {job!r} has no trial runs in experiment {experiment!r} at {where} (jobs "
                f"with trial runs there: {listed}). Check the id with `mnistjobs list`."
            )
        with ThreadPoolExecutor(max_workers=min(8, len(found))) as pool:
            histories = list(pool.map(lambda r: _metric_history(client, r.info.run_id), found))
    except MlflowException as exc:
        if _file_store_folder(uri) is not None:
            raise ReportError(
                f"The MLflow tracking URI {uri} is a local folder (MLflow's old file store), which "
                "MLflow refuses to open (it is in maintenance mode: `mlflow migrate-filestore` "
                "moves it into a database, MLFLOW_ALLOW_FILE_STORE=true opens it anyway). "
                + _POINT_ELSEWHERE
            ) from None
        raise ReportError(f"MLflow at {where} could not be read: {exc.message}") from None

    rows = []
    for run in found:
        info, params, tags = run.info, run.data.params, run.data.tags
        start, end = info.start_time, info.end_time
        rows.append({
            "run_id": info.run_id,
            "run": info.run_name or info.run_id[:8],
            "job_id": tags.get(JOB_TAG, ""),
            "trial_id": tags.get(TRIAL_TAG, ""),
            "model": params.get("model", ""),
            "params": _to_int(params.get("params")),
            "schedule": params.get("schedule", ""),
            "seed": _to_int(params.get("seed")),
            "optimizer": params.get("optimizer", ""),
            "batch_size": _to_int(params.get("batch_size")),
            "epochs_planned": _to_int(params.get("epochs")),
            "device": params.get("device", tags.get(DEVICE_TAG, "")),
            "status": info.status,
            "start_time": _ms_to_time(start),
            "end_time": _ms_to_time(end),
            "wall_seconds": (end - start) / 1000.0 if start and end else math.nan,
        })
    runs = pd.DataFrame(rows)
    for col in ("params", "seed", "batch_size", "epochs_planned"):
        runs[col] = runs[col].astype("Int64")
    runs["label"] = _unique_labels(list(runs["run"]), list(runs["job_id"]), list(runs["run_id"]))
    runs = runs[RUN_COLUMNS]

    epoch_rows = []
    for run, history in zip(found, histories):
        for values in history:
            epoch_rows.append({"run_id": run.info.run_id, **values})
    epochs = pd.DataFrame(epoch_rows, columns=["run_id", "epoch", *METRICS])
    epochs["epoch"] = epochs["epoch"].astype("int64")
    for key in METRICS:
        epochs[key] = epochs[key].astype("float64")
    epochs = epochs.merge(runs[["run_id", "label"]], on="run_id", how="left")[EPOCH_COLUMNS]

    runs = runs.sort_values(
        ["model", "schedule", "seed", "start_time", "run"], na_position="last", kind="stable"
    ).reset_index(drop=True)
    order = {rid: i for i, rid in enumerate(runs["run_id"])}
    epochs = epochs.sort_values(
        ["run_id", "epoch"], key=lambda s: s.map(order) if s.name == "run_id" else s
    ).reset_index(drop=True)
    return runs, epochs


# ----------------------------------------------------------------------------- tables


def _labels(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(run_id, label) in the runs' order; label falls back to the run name."""
    if "label" in runs:
        labels = list(runs["label"])
    else:
        labels = _unique_labels(
            list(runs["run"]),
            list(runs["job_id"]) if "job_id" in runs else [""] * len(runs),
            list(runs["run_id"]),
        )
    return list(zip(runs["run_id"], labels))


def epoch_table(epochs: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The seed's side-by-side table: one row per epoch, "<run> Train Acc" / "<run> Test Acc".

    Values are percent rounded to 2 decimals (NaN where a run has no such epoch, e.g. one that
    failed early); :func:`render` prints them as ``99.41%``.
    """
    columns: dict[str, pd.Series] = {}
    for run_id, label in _labels(runs):
        mine = epochs[epochs["run_id"] == run_id].drop_duplicates("epoch", keep="last")
        mine = mine.set_index("epoch")
        columns[f"{label} Train Acc"] = mine["train_acc"]
        columns[f"{label} Test Acc"] = mine["test_acc"]
    if not columns:
        return pd.DataFrame(columns=["Epoch"])
    table = pd.DataFrame(columns).sort_index().round(2)
    table.index = table.index.astype("int64")
    table.index.name = "Epoch"
    return table.reset_index()


def target_column(target: float = DEFAULT_TARGET) -> str:
    return f"First Epoch >= {target:g}%"


def summary_table(
    runs: pd.DataFrame, epochs: pd.DataFrame, target: float = DEFAULT_TARGET
) -> pd.DataFrame:
    """One row per run: what it is, its final and best test accuracy, when it reached `target`.

    Columns: Run, Model, Params, Schedule, Seed, Status, Final Test Acc (last logged epoch),
    Best Test Acc, Best Epoch, First Epoch >= <target>% (NA, printed "-", when never reached),
    Epochs (logged), Wall Seconds (end - start of the run; sum of epoch seconds while running).
    """
    rows = []
    for (run_id, label), (_, run) in zip(_labels(runs), runs.iterrows()):
        mine = epochs[epochs["run_id"] == run_id].sort_values("epoch")
        mine = mine.drop_duplicates("epoch", keep="last")
        acc = mine.dropna(subset=["test_acc"])
        final = best = best_epoch = first = tta = pd.NA
        if "tta_test_acc" in mine and mine["tta_test_acc"].notna().any():
            tta = round(float(mine["tta_test_acc"].dropna().iloc[-1]), 2)
        if len(acc):
            final = round(float(acc["test_acc"].iloc[-1]), 2)
            best_row = acc.loc[acc["test_acc"].idxmax()]
            best, best_epoch = round(float(best_row["test_acc"]), 2), int(best_row["epoch"])
            reached = acc[acc["test_acc"] >= target - 1e-9]
            if len(reached):
                first = int(reached["epoch"].iloc[0])
        wall = run.get("wall_seconds", math.nan)
        if pd.isna(wall) and "epoch_seconds" in mine and mine["epoch_seconds"].notna().any():
            wall = float(mine["epoch_seconds"].sum())
        rows.append({
            "Run": label,
            "Model": run.get("model", ""),
            "Params": run.get("params", pd.NA),
            "Schedule": run.get("schedule", ""),
            "Seed": run.get("seed", pd.NA),
            "Status": run.get("status", ""),
            "Final Test Acc": final,
            "Final TTA Acc": tta,
            "Best Test Acc": best,
            "Best Epoch": best_epoch,
            target_column(target): first,
            "Epochs": int(len(mine)),
            "Wall Seconds": round(float(wall), 1) if not pd.isna(wall) else math.nan,
        })
    table = pd.DataFrame(rows, columns=[
        "Run", "Model", "Params", "Schedule", "Seed", "Status", "Final Test Acc", "Final TTA Acc",
        "Best Test Acc", "Best Epoch", target_column(target), "Epochs", "Wall Seconds",
    ])
    for col in ("Params", "Seed", "Best Epoch", target_column(target), "Epochs"):
        table[col] = table[col].astype("Int64")
    for col in ("Final Test Acc", "Final TTA Acc", "Best Test Acc", "Wall Seconds"):
        table[col] = pd.to_numeric(table[col]).astype("float64")
    return table


def group_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean/min/max final test accuracy per (model, schedule) over its FINISHED runs.

    "Runs" counts the finished runs averaged (two runs of one seed, e.g. from two jobs, count
    twice); only groups with two or more appear (empty frame when there are none). The TTA
    columns average the runs that logged a TTA accuracy, and "TTA Runs" says how many of the
    group's runs that is (0, with "-" means, when none did).
    """
    columns = ["Model", "Schedule", "Runs", "Mean Final Test Acc", "Min Final Test Acc",
               "Max Final Test Acc", "Mean Best Test Acc", "TTA Runs", "Mean Final TTA Acc",
               "Min Final TTA Acc"]
    done = summary[(summary["Status"] == "FINISHED") & summary["Final Test Acc"].notna()]
    rows = []
    for (model, schedule), grp in done.groupby(["Model", "Schedule"], sort=False):
        if len(grp) < 2:
            continue
        tta = grp["Final TTA Acc"].dropna()
        rows.append({
            "Model": model,
            "Schedule": schedule,
            "Runs": len(grp),
            "Mean Final Test Acc": round(float(grp["Final Test Acc"].mean()), 2),
            "Min Final Test Acc": round(float(grp["Final Test Acc"].min()), 2),
            "Max Final Test Acc": round(float(grp["Final Test Acc"].max()), 2),
            "Mean Best Test Acc": round(float(grp["Best Test Acc"].mean()), 2),
            "TTA Runs": len(tta),
            "Mean Final TTA Acc": round(float(tta.mean()), 2) if len(tta) else math.nan,
            "Min Final TTA Acc": round(float(tta.min()), 2) if len(tta) else math.nan,
        })
    table = pd.DataFrame(rows, columns=columns)
    for col in ("Runs", "TTA Runs"):
        table[col] = table[col].astype("int64")
    for col in ("Mean Final TTA Acc", "Min Final TTA Acc"):
        table[col] = table[col].astype("float64")
    return table


# ----------------------------------------------------------------------------- rendering


def _cell(column: str, value, fmt: str) -> str:
    """One value as text: accuracy 2 decimals (+ "%" outside CSV), Params with thousands
    separators outside CSV, seconds 1 decimal, missing "-" (empty in CSV)."""
    text_fmt = fmt != "csv"
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "-" if text_fmt else ""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if column.endswith("Acc"):
            return f"{float(value):.2f}%" if text_fmt else f"{float(value):.2f}"
        if column.endswith("Seconds"):
            return f"{float(value):.1f}"
        if isinstance(value, numbers.Integral):
            return f"{int(value):,}" if column == "Params" and text_fmt else str(int(value))
        return f"{float(value):g}"
    return str(value)


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def render(df: pd.DataFrame, fmt: str = "table") -> str:
    """`df` as aligned plain text ("table"), CSV ("csv") or a Markdown pipe table ("markdown").

    Accuracy columns (names ending in "Acc") get 2 decimals, plus "%" in table/markdown;
    missing values print "-" in table/markdown and empty in CSV. Ends with a newline.
    """
    if fmt not in FORMATS:
        raise ReportError(f"Unknown format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    headers = [str(c) for c in df.columns]
    cells = [[_cell(h, v, fmt) for h, v in zip(headers, row)] for row in df.itertuples(index=False)]
    if fmt == "csv":
        import csv

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(cells)
        return buf.getvalue()
    right = [_is_numeric(df[c]) for c in df.columns]
    if fmt == "markdown":
        def esc(s: str) -> str:
            return s.replace("|", "\\|")

        lines = ["| " + " | ".join(esc(h) for h in headers) + " |"]
        lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)] + [line(row) for row in cells]
    return "\n".join(out) + "\n"


def render_report(tables: Mapping[str, pd.DataFrame], fmt: str = "table") -> str:
    """Several titled tables in one text: a title line (``# title`` in CSV, ``## title`` in
    Markdown) then the table, separated by blank lines. One table renders without a title."""
    tables = {title: df for title, df in tables.items() if df is not None}
    if len(tables) == 1:
        return render(next(iter(tables.values())), fmt)
    parts = []
    for title, df in tables.items():
        head = {"csv": f"# {title}", "markdown": f"## {title}"}.get(fmt, f"{title}:")
        parts.append(head + "\n" + ("\n" if fmt == "markdown" else "") + render(df, fmt))
    return "\n".join(parts)


def check_output_path(path: str | os.PathLike) -> Path:
    """`path` as a Path, if a file can be written there: its folder must already exist (it is
    never created) and `path` must not be a folder. Raises :class:`ReportError` otherwise."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise ReportError(
            f"Cannot write {path}: the folder {folder} {what}. Create it first, or pick another "
            "path."
        )
    if path.is_dir():
        raise ReportError(f"Cannot write {path}: it is a folder. Give a file name.")
    return path


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    The folder must exist (:func:`check_output_path`). A new file gets the mode a plain
    ``open(path, "w")`` gives (0o666 less the umask); a replaced file keeps its mode.
    """
    path = check_output_path(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask, as for open()
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name next to {path}")
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.chmod(tmp, mode)
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- plot


def plot_accuracy(
    epochs: pd.DataFrame, runs: pd.DataFrame, path: str | os.PathLike,
    target: float | None = DEFAULT_TARGET,
) -> Path:
    """Test (solid) and train (dashed) accuracy per epoch of every run, one PNG at `path`.

    One colour per run; a dotted line marks `target`. Written atomically: on any error the
    previous file (if any) is untouched and no partial file is left.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    check_output_path(path)  # before drawing: a missing folder is an error, never created
    labels = _labels(runs)
    if epochs.empty or not labels:
        raise ReportError("There are no epoch metrics to plot yet (no run has logged an epoch).")
    many = len(labels) > 12
    fig = Figure(figsize=(11 + (3 if many else 0), 6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i}" for i in range(10)] if len(labels) <= 10 else None
    if colors is None:
        from matplotlib import colormaps

        cmap = colormaps["tab20"]
        colors = [cmap(i % 20) for i in range(len(labels))]
    handles = []
    for i, (run_id, label) in enumerate(labels):
        mine = epochs[epochs["run_id"] == run_id].sort_values("epoch")
        color = colors[i % len(colors)]
        if mine["test_acc"].notna().any():
            ax.plot(mine["epoch"], mine["test_acc"], color=color, marker="o", markersize=3,
                    linewidth=1.5)
        if mine["train_acc"].notna().any():
            ax.plot(mine["epoch"], mine["train_acc"], color=color, linestyle="--", linewidth=1,
                    alpha=0.8)
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
    max_epoch = int(epochs["epoch"].max())
    if max_epoch <= 30:
        ax.set_xticks(range(1, max_epoch + 1))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
              ncol=2 if many else 1, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------- tracking URI


def default_tracking_uri(home: str | os.PathLike) -> str | None:
    """The embedded default's MLflow URL for the state folder `home`, or None if unknown.

    Asks ``jobs.services.tracking_uri_for(home)`` when the service module provides it, else
    reads the ``mlflow_uri`` key of ``<home>/services.json``.
    """
    try:
        from jobs import services  # the service helper's module (embedded Ray + MLflow)
    except Exception:  # noqa: BLE001 - missing or broken: fall back to the state file
        services = None
    finder = getattr(services, "tracking_uri_for", None)
    if callable(finder):
        try:
            uri = finder(home)
        except Exception:  # noqa: BLE001 - fall back to the state file below
            uri = None
        if uri:
            return str(uri)
    state = Path(home) / "services.json"
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    uri = data.get("mlflow_uri") if isinstance(data, dict) else None
    return str(uri) if uri else None
