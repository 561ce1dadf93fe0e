"""Which store a tracking URI names, and whether ``mnistjobs compare`` may read it.

``compare`` only reads: a store MLflow would create (a missing SQLite file, a missing
file-store folder) or change (a SQLite file without MLflow's tables) is refused with a message
that says what to point it at instead, and a server that does not answer is refused at once
(:func:`check_reachable`, the one MLflow health check ``jobs.cluster.mlflow_answers``) rather
than after MLflow's minutes of retries.
"""
from __future__ import annotations

import urllib.parse
import urllib.request
from pathlib import Path

from jobs.report.errors import ReportError


def check_reachable(tracking_uri: str) -> None:
    """Fail fast when an http(s) tracking server does not answer its health check."""
    from jobs import cluster

    if tracking_uri.startswith(("http://", "https://")) and not cluster.mlflow_answers(tracking_uri, timeout=5.0):
        raise ReportError(
            f"Cannot reach the MLflow tracking server at {tracking_uri} (GET /health did not answer "
            "200). Start the embedded default with `mnistjobs up`, or point --tracking-uri / "
            "MLFLOW_TRACKING_URI at a running server."
        )


POINT_ELSEWHERE = (
    "Point --tracking-uri (or MLFLOW_TRACKING_URI) at the MLflow tracking server the jobs log "
    "to, e.g. the MLflow URL that `mnistjobs up` prints (http://127.0.0.1:5000 by default), or "
    "at an existing MLflow database, e.g. sqlite:////absolute/path/to/mlflow.db."
)


def file_store_folder(uri: str) -> Path | None:
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


def check_local_store(uri: str) -> None:
    """Refuse a local store that MLflow would create (compare only reads) or cannot open.

    A file-store folder (plain path or file: URI) must exist; a sqlite URI must name an existing
    MLflow database (MLflow would otherwise create the file, or add its tables to it).
    """
    folder = file_store_folder(uri)
    if folder is not None:
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            raise ReportError(
                f"The MLflow tracking URI {uri} is a local path (MLflow's old file store), and "
                f"{folder} {what}; `mnistjobs compare` only reads, so it creates nothing there. "
                + POINT_ELSEWHERE
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
            f"the current folder ({Path.cwd()}). " + POINT_ELSEWHERE
        )
    if not path.is_file():
        raise ReportError(
            f"The MLflow database {path} (from {uri}) is not a file. " + POINT_ELSEWHERE
        )
    tables = _sqlite_tables(path)
    if tables is not None and not {"experiments", "runs"} <= tables:
        raise ReportError(
            f"{path} (from {uri}) is not an MLflow database (it has no MLflow tables), and "
            "`mnistjobs compare` only reads, so it adds none. " + POINT_ELSEWHERE
        )

