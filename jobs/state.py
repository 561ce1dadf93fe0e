"""The state folder and what lives in it: where it is, its mode, the Ray token, Ray's temp folder.

``--home`` > ``$MNISTJOBS_HOME`` > ``./.mnistjobs`` (mode 0700)::

    <home>/services.json        what runs: pids, ports, URLs (mode 0600; jobs.services)
    <home>/ray_auth_token       Ray's token (mode 0600); Ray reads it through RAY_AUTH_TOKEN_PATH
    <home>/mlflow_password      the MLflow admin's password (mode 0600; user ``admin``), when the
                                server runs MLflow's basic-auth app (the default, mlflow/server.yaml)
    <home>/mlflow/              the MLflow database and artifacts (see mlflow/server.yaml), and the
                                basic-auth app's files: basic_auth.ini, basic_auth.db, flask_secret_key
                                (mode 0600; jobs.mlflow_server)
    <home>/ray_results/         Tune's storage: experiment state and trial checkpoints
    <home>/data/mnist/          MNIST, downloaded once (jobs.datadir)
    <home>/logs/                the servers' own output
    <home>/queue_wake_port      the UDP port (on 127.0.0.1) the queue's admitter waits on between
                                its looks; `jobs.queue.wake` sends it a datagram (jobs.queue)

Ray's session folder (its Unix sockets, whose paths must stay under 107 bytes) is the exception:
it lives in a short folder under /tmp named after the state folder (``ray_temp_dir``).
"""
from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from pathlib import Path

from mnistnets.files import write_atomic

HOME_VAR = "MNISTJOBS_HOME"
DEFAULT_HOME = "./.mnistjobs"
TOKEN_NAME = "ray_auth_token"
MLFLOW_PASSWORD_NAME = "mlflow_password"
MLFLOW_USER = "admin"  # the embedded MLflow server's one user, its admin
WAKE_PORT_NAME = "queue_wake_port"


class StateError(RuntimeError):
    """The state folder cannot be made or used (a runtime failure: exit code 1)."""


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """``home`` > ``$MNISTJOBS_HOME`` > ``./.mnistjobs``, as an absolute path (not created)."""
    value = home if home not in (None, "") else (os.environ.get(HOME_VAR) or DEFAULT_HOME)
    return Path(value).expanduser().resolve()


def ensure_home(home: str | os.PathLike | None = None) -> Path:
    """Create the state folder (mode 0700) if needed and return it; refuse a world-writable one."""
    path = resolve_home(home)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o700)
    except OSError as e:
        raise StateError(f"Cannot create the state folder {path} ({e.strerror or e}). Set "
                         f"--home or {HOME_VAR} to a folder you can write.") from None
    if path.stat().st_mode & 0o002:
        raise StateError(f"The state folder {path} is world-writable and not ours to fix; "
                         f"choose another with --home or {HOME_VAR}.")
    return path


def token_path(home: str | os.PathLike) -> Path:
    return Path(home) / TOKEN_NAME


def _ensure_secret(path: Path, nbytes: int) -> Path:
    """A secret file: created once with ``2 * nbytes`` random hex digits, mode 0600 (made 0600
    again when found looser)."""
    if path.is_file() and path.stat().st_size > 0:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path
    return write_atomic(path, secrets.token_hex(nbytes), mode=0o600)


def ensure_token(home: str | os.PathLike) -> Path:
    """The Ray auth token file: created once with 64 random hex digits, mode 0600."""
    return _ensure_secret(token_path(home), 32)


def read_secret(path: str | os.PathLike | None) -> str | None:
    """The stripped text of a secret file (token, password), or None when missing or empty."""
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def mlflow_password_path(home: str | os.PathLike) -> Path:
    return Path(home) / MLFLOW_PASSWORD_NAME


def wake_port_path(home: str | os.PathLike) -> Path:
    """The file holding the admitter's wake-up port (jobs.queue.wake)."""
    return Path(home) / WAKE_PORT_NAME


def ensure_mlflow_password(home: str | os.PathLike) -> Path:
    """The embedded MLflow admin's password file: created once with 32 random hex digits (MLflow
    wants at least 12 characters), mode 0600. Beside the Ray token; never put into a Ray job's
    runtime_env (the dashboard shows those): the processes of the embedded cluster read it here."""
    return _ensure_secret(mlflow_password_path(home), 16)


def ray_auth_env(home: str | os.PathLike) -> dict[str, str]:
    """What every Ray process (and Ray client) of the embedded cluster gets in its environment."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path(home))}


def ray_temp_dir(home: str | os.PathLike) -> Path:
    """A short per-state-folder dir under /tmp for Ray's session (socket paths < 107 bytes)."""
    base = Path("/tmp") if Path("/tmp").is_dir() and os.access("/tmp", os.W_OK) else Path(tempfile.gettempdir())
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:10]
    return base / f"mnistjobs-{os.getuid()}-{digest}"
