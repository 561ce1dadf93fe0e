"""The report's tables, from the frames :func:`jobs.report.load.load_runs` returns.

- :func:`epoch_table`: the seed's side-by-side table, one row per epoch;
- :func:`summary_table`: one row per run (final / best / first epoch at the target);
- :func:`group_table`: mean/min/max final test accuracy per (model, schedule) over finished runs;
- :func:`search_table`: a search job's trials, one row each with its searched values, sorted by
  the search's metric (best first), stopped and diverged trials marked; :func:`search_trials`
  is the same rows unformatted (what ``--plot`` draws).
"""
from __future__ import annotations

import math

import pandas as pd

from jobs.report.load import SearchJob, run_labels

DEFAULT_TARGET = 99.4


def epoch_table(epochs: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The seed's side-by-side table: one row per epoch, "<run> Train Acc" / "<run> Test Acc".

    Values are percent rounded to 2 decimals (NaN where a run has no such epoch, e.g. one that
    failed early); :func:`render` prints them as ``99.41%``.
    """
    columns: dict[str, pd.Series] = {}
    for run_id, label in run_labels(runs):
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
    for (run_id, label), (_, run) in zip(run_labels(runs), runs.iterrows()):
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


# ------------------------------------------------------------------------------- search jobs

_WORDS = {"acc": "Acc", "tta": "TTA", "lr": "LR"}


def metric_column(metric: str) -> str:
    """The search table's column for ``metric`` at the last epoch: test_acc -> "Final Test Acc"
    (a name ending in "Acc" prints as a percentage)."""
    return "Final " + " ".join(_WORDS.get(w, w.capitalize()) for w in metric.split("_") if w)


def _number(text: str):
    """A param string as MLflow stores it -> int, float, or None when it is no number."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def setting_values(raw: list) -> pd.Series:
    """One searched setting's values (strings, None where missing) as a column: Int64 when
    every value is an integer, float64 when every value is a number, else the strings."""
    present = [v for v in raw if v is not None]
    numbers = [_number(str(v)) for v in present]
    if present and all(n is not None for n in numbers):
        parsed = [None if v is None else _number(str(v)) for v in raw]
        if all(isinstance(n, int) for n in numbers):
            return pd.Series(parsed, dtype="Int64")
        return pd.Series([math.nan if v is None else float(v) for v in parsed], dtype="float64")
    return pd.Series([pd.NA if v is None else str(v) for v in raw], dtype="object")


def _status(run_id: str, status: str, search: SearchJob, trained: int) -> str:
    if run_id in search.diverged:
        return "diverged"
    if run_id in search.stopped_at:
        at = search.stopped_at[run_id]
        return f"stopped at {trained if at is None else at}"
    return (status or "unknown").lower()


def search_trials(runs: pd.DataFrame, epochs: pd.DataFrame, search: SearchJob) -> pd.DataFrame:
    """The trials of ``search``, sorted by its metric at each trial's last logged epoch (best
    first per ``search.mode``; trials without the metric last), unformatted.

    Columns: run_id, Trial (its label), model, seed, one per searched setting (parsed:
    :func:`setting_values`), metric (the last logged value of ``search.metric``), test_acc
    (last logged), epochs (logged), status (finished / stopped at E / diverged / failed /
    running / ...), stopped, diverged, best (the parent's TAG_BEST_RUN), wall_seconds.
    """
    mine = runs[runs["run_id"].isin(search.run_ids)]
    labels = dict(run_labels(runs))
    rows = []
    for _, run in mine.iterrows():
        rid = run["run_id"]
        ep = epochs[epochs["run_id"] == rid].sort_values("epoch").drop_duplicates("epoch", keep="last")
        last = {}
        for key in {search.metric, "test_acc"}:
            col = ep[key].dropna() if key in ep else pd.Series(dtype="float64")
            last[key] = float(col.iloc[-1]) if len(col) else math.nan
        wall = run.get("wall_seconds", math.nan)
        if pd.isna(wall) and "epoch_seconds" in ep and ep["epoch_seconds"].notna().any():
            wall = float(ep["epoch_seconds"].sum())
        rows.append({
            "run_id": rid, "Trial": labels.get(rid, run.get("run", rid)), "model": run.get("model", ""),
            "seed": run.get("seed", pd.NA), "metric": last[search.metric], "test_acc": last["test_acc"],
            "epochs": int(len(ep)), "status": _status(rid, run.get("status", ""), search, int(len(ep))),
            "stopped": rid in search.stopped_at, "diverged": rid in search.diverged,
            "best": rid == search.best_run_id, "wall_seconds": float(wall) if not pd.isna(wall) else math.nan,
        })
    base = ["run_id", "Trial", "model", "seed", *search.searched, "metric", "test_acc", "epochs", "status",
            "stopped", "diverged", "best", "wall_seconds"]
    table = pd.DataFrame(rows, columns=[c for c in base if c not in search.searched])
    for key in search.searched:
        table[key] = setting_values([search.values.get(rid, {}).get(key) for rid in table["run_id"]])
    table = table[list(dict.fromkeys(base))]
    if table.empty:
        return table
    table = table.sort_values(["metric", "Trial"], ascending=[search.mode == "min", True],
                              na_position="last", kind="stable")
    return table.reset_index(drop=True)


def search_table(runs: pd.DataFrame, epochs: pd.DataFrame, search: SearchJob) -> pd.DataFrame:
    """One row per trial of a search job, best first (see :func:`search_trials`).

    Columns: Rank, Trial, Model and Seed (only when the job has several), one per searched
    setting (its values: numbers as numbers), "Final <Metric>" (the metric at the last logged
    epoch; "Final Test Acc" for test_acc), "Final Test Acc" too when the metric is another one,
    Epochs (logged), Status (finished / stopped at E / diverged / failed / running), Best
    ("best" on the parent's best trial), Wall Seconds.
    """
    trials = search_trials(runs, epochs, search)
    metric_col = metric_column(search.metric)
    out = pd.DataFrame({"Rank": pd.Series(range(1, len(trials) + 1), dtype="int64"),
                        "Trial": trials["Trial"].astype("object")})
    if "model" not in search.searched and trials["model"].nunique() > 1:
        out["Model"] = trials["model"]
    if "seed" not in search.searched and trials["seed"].nunique() > 1:
        out["Seed"] = trials["seed"].astype("Int64")
    for key in search.searched:
        out[key] = trials[key]
    out[metric_col] = trials["metric"].round(4 if not metric_col.endswith("Acc") else 2).astype("float64")
    if search.metric != "test_acc":
        out["Final Test Acc"] = trials["test_acc"].round(2).astype("float64")
    out["Epochs"] = trials["epochs"].astype("int64")
    out["Status"] = trials["status"].astype("object")
    out["Best"] = ["best" if b else "" for b in trials["best"]]
    out["Wall Seconds"] = trials["wall_seconds"].round(1).astype("float64")
    return out
