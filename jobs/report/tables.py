"""The report's tables, from the frames :func:`jobs.report.load.load_runs` returns.

- :func:`epoch_table`: the seed's side-by-side table, one row per epoch;
- :func:`summary_table`: one row per run (final / best / first epoch at the target);
- :func:`group_table`: mean/min/max final test accuracy per (model, schedule) over finished runs.
"""
from __future__ import annotations

import math

import pandas as pd

from jobs.report.load import run_labels

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
