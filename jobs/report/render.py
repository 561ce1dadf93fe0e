"""Rendering tables as text: aligned plain text, CSV or Markdown, and writing them to a file.

Files are written through :func:`mnistnets.files.write_atomic` (the one atomic writer) into a
folder that must already exist (:func:`check_output_path`): a report never creates folders.
"""
from __future__ import annotations

import io
import numbers
import os
from pathlib import Path
from typing import Mapping

import pandas as pd

from jobs.report.errors import ReportError
from mnistnets.files import write_atomic

FORMATS = ("table", "csv", "markdown")


def _cell(column: str, value, fmt: str) -> str:
    """One value as text: accuracy 2 decimals (+ "%" outside CSV), Params with thousands
    separators outside CSV, seconds 1 decimal, other numbers (a search's lr, weight decay, ...)
    4 significant digits outside CSV and in full in CSV, missing "-" (empty in CSV)."""
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
        return f"{float(value):.4g}" if text_fmt else repr(float(value))
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
    """Several titled tables in one text: a title line (``title:`` in text, ``## title`` in
    Markdown) then the table, separated by blank lines. One table renders without a title.

    CSV holds exactly one table (what pandas and spreadsheets read back): more than one raises
    :class:`ReportError`.
    """
    tables = {title: df for title, df in tables.items() if df is not None}
    if len(tables) == 1:
        return render(next(iter(tables.values())), fmt)
    if fmt == "csv":
        raise ReportError(
            f"CSV holds one table, but {len(tables)} were asked for ({', '.join(tables)}). "
            "Pick one (with `compare`: --table epochs, summary or groups), or use --format "
            "table or markdown for several."
        )
    parts = []
    for title, df in tables.items():
        head = f"## {title}" if fmt == "markdown" else f"{title}:"
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


def write_output(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, once :func:`check_output_path` allows it. A new
    file gets the mode a plain ``open(path, "w")`` gives (0o666 less the umask); a replaced file
    keeps its mode."""
    return write_atomic(check_output_path(path), text)
