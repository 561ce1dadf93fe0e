"""The services record: what `mnistjobs up` started, in ``<home>/services.json`` (mode 0600).

``Services`` is enough for `status`, `down` and the CLI to talk to the embedded Ray head and
MLflow server; ``locked(home)`` lets one `up`/`down` run at a time per state folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from jobs.cluster import auth_headers
from jobs.state import resolve_home
from mnistnets.files import write_atomic

RECORD_NAME = "services.json"
LAST_RECORD_NAME = "services.last.json"  # what `down` stopped: `up` takes the same ports again


@dataclass
class Services:
    """What `up` started: enough for `status`, `down`, and the CLI to talk to them."""

    home: str
    service_id: str
    host: str
    temp_dir: str
    token_path: str
    ray_address: str          # the GCS address, host:port (what `ray start --address` takes)
    ray_port: int
    dashboard_port: int
    dashboard_url: str        # the dashboard and the job API
    mlflow_pid: int
    mlflow_port: int
    mlflow_url: str           # the tracking URI
    mlflow_command: list[str] = field(default_factory=list)  # what restart_mlflow runs again
    ray_client_port: int = 0
    num_cpus: int | None = None
    num_gpus: int | None = None
    started_at: float = 0.0
    logs: dict[str, str] = field(default_factory=dict)
    reused: bool = False      # set by up() when it found them running; not stored

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("reused")
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Services":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def token(self) -> str | None:
        try:
            return Path(self.token_path).read_text().strip() or None
        except OSError:
            return None

    @property
    def headers(self) -> dict[str, str]:
        return auth_headers(self.token)


def record_path(home: Path) -> Path:
    return Path(home) / RECORD_NAME


def load_record(home: str | os.PathLike | None = None) -> Services | None:
    path = record_path(resolve_home(home))
    try:
        return Services.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(home: Path, services: Services) -> None:
    write_atomic(record_path(home), services.to_json(), mode=0o600)


def forget_record(home: Path) -> None:
    """`down`: services.json goes; its copy ``services.last.json`` stays, so that the next `up`
    takes the same ports when they are free (the URLs in MLflow runs and queued jobs stay valid)."""
    path = record_path(home)
    if path.is_file():
        os.replace(path, Path(home) / LAST_RECORD_NAME)


def load_last_record(home: str | os.PathLike | None = None) -> Services | None:
    path = resolve_home(home) / LAST_RECORD_NAME
    try:
        return Services.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def locked(home: Path) -> Iterator[None]:
    """One `up`/`down` at a time per state folder (two `submit`s at once start one service set)."""
    fd = os.open(Path(home) / "services.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
