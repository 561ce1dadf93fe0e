"""The services record: what `mnistjobs up` started, in ``<home>/services.json`` (mode 0600).

``Services`` is enough for `status`, `down` and the CLI to talk to the embedded Ray head and
MLflow server; ``locked(home)`` lets one `up`/`down` run at a time per state folder.

MLflow's credentials: when the embedded server runs the basic-auth app, the record names its
user and the password file (``<home>/mlflow_password``). MLflow's client reads
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from the environment at every request, so
:func:`use_mlflow_credentials` (called by ``jobs.tracking.client``) sets them in this process when
it talks to an embedded server it knows of: one whose record this process read or wrote, or the
one of the state folder ($MNISTJOBS_HOME, which the Ray jobs of the embedded cluster carry, so
drivers, trials and the queue's admitter find the password file; it is never put into a Ray
job's runtime_env, which the dashboard shows). For any other tracking URI it restores what the
user had: a user-provided server works with the standard variables, and never gets ours.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from jobs.cluster import auth_headers
from jobs.state import read_secret, resolve_home
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
    mlflow_user: str | None = None           # MLflow's basic-auth app: its user (None: no auth)
    mlflow_password_path: str | None = None  # and the file with that user's password (0600)
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

    @property
    def mlflow_password(self) -> str | None:
        return read_secret(self.mlflow_password_path) if self.mlflow_user else None

    @property
    def mlflow_credentials(self) -> dict[str, str]:
        """MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for the server; {} without auth."""
        password = self.mlflow_password
        if not (self.mlflow_user and password):
            return {}
        return {"MLFLOW_TRACKING_USERNAME": self.mlflow_user, "MLFLOW_TRACKING_PASSWORD": password}

    @property
    def mlflow_headers(self) -> dict[str, str]:
        """HTTP headers for raw calls to the MLflow server (HTTP Basic); {} without auth."""
        creds = self.mlflow_credentials
        if not creds:
            return {}
        pair = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds['MLFLOW_TRACKING_PASSWORD']}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def record_path(home: Path) -> Path:
    return Path(home) / RECORD_NAME


def load_record(home: str | os.PathLike | None = None) -> Services | None:
    path = record_path(resolve_home(home))
    try:
        rec = Services.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    _remember(rec)
    return rec


def write_record(home: Path, services: Services) -> None:
    write_atomic(record_path(home), services.to_json(), mode=0o600)
    _remember(services)


# ------------------------------------------------------------------------ MLflow's credentials

CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
_known: dict[str, Services] = {}       # embedded servers this process has seen, by URL
_saved: dict[str, str | None] = {}     # the user's values of CREDENTIAL_VARS before ours were set


def _url_key(uri: str) -> str:
    return uri.strip().rstrip("/").lower()


def _remember(rec: Services) -> None:
    if rec.mlflow_url:
        _known[_url_key(rec.mlflow_url)] = rec


def embedded_record_for(uri: str | None, home: str | os.PathLike | None = None) -> Services | None:
    """The record of the embedded server at ``uri``: that of the state folder ``home``
    ($MNISTJOBS_HOME, ./.mnistjobs) when its URL is ``uri``, else one this process has seen."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    key = _url_key(uri)
    rec = load_record(home)  # the freshest word on the state folder's own server
    if rec is not None and _url_key(rec.mlflow_url) == key:
        return rec
    return _known.get(key)


def mlflow_credentials_for(uri: str | None, home: str | os.PathLike | None = None) -> dict[str, str]:
    """MLFLOW_TRACKING_USERNAME / _PASSWORD of the embedded server at ``uri``; {} when ``uri``
    is no embedded server known here, or that server asks for none."""
    rec = embedded_record_for(uri, home)
    return rec.mlflow_credentials if rec is not None else {}


def use_mlflow_credentials(uri: str | None, home: str | os.PathLike | None = None) -> dict[str, str]:
    """Point this process's MLflow credentials at the server ``uri`` (see the module's text).

    An embedded server's credentials are set in os.environ (replacing what the shell had, which
    may be another state folder's: the embedded admin is the one this folder's password file
    names); for any other URI, the values the user had before are put back. Returns what was set.
    """
    creds = mlflow_credentials_for(uri, home)
    if creds:
        for var, value in creds.items():
            _saved.setdefault(var, os.environ.get(var))
            os.environ[var] = value
    elif _saved:
        for var, value in _saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        _saved.clear()
    return creds


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
