"""The MLflow tracking server: its settings (mlflow/server.yaml), its command line, its
environment, and a foreground launcher for a cluster head::

    python -m jobs.mlflow_server [--home H] [--config mlflow/server.yaml] [--host H] [--port P]

``mnistjobs up`` (jobs.services) starts the same command in the background.

Credentials: with ``app_name: basic-auth`` (the default in mlflow/server.yaml) the server runs
MLflow's basic-auth app. Its files live in the state folder, all mode 0600
(:func:`prepare_basic_auth`): ``<home>/mlflow_password`` (the admin's password, generated once,
beside the Ray token), ``<home>/mlflow/basic_auth.ini`` (what MLFLOW_AUTH_CONFIG_PATH names: the
admin user ``admin``, its password, the auth database), ``<home>/mlflow/basic_auth.db`` (MLflow's
users and permissions) and ``<home>/mlflow/flask_secret_key`` (MLFLOW_FLASK_SERVER_SECRET_KEY, for
the app's CSRF checks). Every REST call then needs HTTP Basic credentials (401 without);
``/health`` and the UI's static files stay open. ``app_name: null`` turns it off.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
SETTINGS_FILE = Path(__file__).resolve().parents[1] / "mlflow" / "server.yaml"
SETTINGS_VAR = "MNISTJOBS_MLFLOW_CONFIG"  # another settings file for `mnistjobs up` (and --config's default)
DEFAULTS: dict[str, Any] = {
    "host": DEFAULT_HOST, "port": DEFAULT_PORT,
    "backend_store_uri": "sqlite:///{home}/mlflow/mlflow.db",
    "artifacts_destination": "{home}/mlflow/artifacts", "serve_artifacts": True,
    "workers": 1, "app_name": "basic-auth", "extra_args": [],
}
BASIC_AUTH = "basic-auth"
AUTH_INI = "basic_auth.ini"
AUTH_DB = "basic_auth.db"
SECRET_KEY_NAME = "flask_secret_key"
# Set in a user's shell they would override the ini (MLflow reads them first): the embedded
# server's admin is the one of its state folder, so the server never sees them.
AUTH_OVERRIDES = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")


class SettingsError(ValueError):
    """mlflow/server.yaml (or the file given) cannot be used."""


def load_mlflow_settings(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``path`` > $MNISTJOBS_MLFLOW_CONFIG > mlflow/server.yaml as a dict, with defaults for
    anything it leaves out. A file named by ``path`` or the variable must exist."""
    import yaml

    settings = dict(DEFAULTS)
    given = path or os.environ.get(SETTINGS_VAR) or None
    path = Path(given).expanduser() if given else SETTINGS_FILE
    if given and not path.is_file():
        raise SettingsError(f"The MLflow settings file {path} (given directly or by {SETTINGS_VAR}) "
                            f"is not a file; give an existing YAML file like {SETTINGS_FILE}.")
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SettingsError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path} must hold a mapping of settings, not {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(settings))
        if unknown:
            raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(settings)}")
        settings.update(loaded)
    return settings


def _fill(value: Any, home: Path) -> str:
    return str(value).replace("{home}", str(home))


def mlflow_server_command(home: Path, settings: dict[str, Any], *, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line for these settings."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", _fill(settings["backend_store_uri"], home),
           "--workers", str(settings["workers"])]
    if settings.get("serve_artifacts", True):
        cmd += ["--serve-artifacts", "--artifacts-destination", _fill(settings["artifacts_destination"], home)]
    else:
        cmd += ["--no-serve-artifacts", "--default-artifact-root", _fill(settings["artifacts_destination"], home)]
    if settings.get("app_name"):
        cmd += ["--app-name", str(settings["app_name"])]
    cmd += [_fill(a, home) for a in settings.get("extra_args") or []]
    return cmd


def basic_auth_on(settings: Mapping[str, Any]) -> bool:
    """Whether these settings run MLflow's basic-auth app."""
    return settings.get("app_name") == BASIC_AUTH


def command_uses_basic_auth(cmd: list[str]) -> bool:
    """Whether an ``mlflow server`` command line (a recorded one) runs the basic-auth app."""
    return any(a == "--app-name" and b == BASIC_AUTH for a, b in zip(cmd, cmd[1:]))


def _secret_file(path: Path, make) -> str:
    """The secret in ``path``, created (mode 0600) when missing or empty; the mode set to 0600."""
    from jobs.state import read_secret
    from mnistnets.files import write_atomic

    value = read_secret(path)
    if value is None:
        value = make()
        write_atomic(path, value, mode=0o600)
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return value


def prepare_basic_auth(home: Path, log=None) -> dict[str, str]:
    """Write the basic-auth app's files into the state folder (see the module's text) and return
    the variables the server needs: MLFLOW_AUTH_CONFIG_PATH and MLFLOW_FLASK_SERVER_SECRET_KEY.

    MLflow reads the ini's admin password only when it creates the admin user, in an empty auth
    database. So when the password file is new (first start, or it was deleted) an old auth
    database, made for a password nobody has any more, is removed: the admin is created again
    with the new password (other users made in it are lost; said in ``log``)."""
    from jobs.state import MLFLOW_USER, ensure_mlflow_password, mlflow_password_path, read_secret

    home = Path(home)
    folder = home / "mlflow"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = folder / AUTH_DB
    had_password = read_secret(mlflow_password_path(home)) is not None
    password = read_secret(ensure_mlflow_password(home))
    if not had_password and db.exists():
        db.unlink()
        if log:
            log(f"New MLflow admin password ({mlflow_password_path(home)}): the old auth database {db} "
                f"was made for another one, so it starts again (the admin user '{MLFLOW_USER}' only).")
    if not db.exists():  # SQLite takes an empty file as an empty database: this one is ours, 0600
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
    elif db.stat().st_mode & 0o077:
        db.chmod(0o600)
    esc = lambda v: str(v).replace("%", "%%")  # noqa: E731 - configparser's interpolation
    ini = ("# Written by mnistjobs (jobs/mlflow_server.py) for MLflow's basic-auth app; read through\n"
           "# MLFLOW_AUTH_CONFIG_PATH. The admin password is also in ../mlflow_password.\n"
           "[mlflow]\n"
           "default_permission = READ\n"
           f"database_uri = {esc('sqlite:///' + str(db))}\n"
           f"admin_username = {MLFLOW_USER}\n"
           f"admin_password = {esc(password)}\n"
           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
           "# Every request is a password check (PBKDF2, tens of ms of CPU): cache a good one for 10\n"
           "# minutes, or the queue's admitter and the trials' logging keep the server busy.\n"
           "auth_cache_ttl_seconds = 600\n")
    from mnistnets.files import write_atomic

    write_atomic(folder / AUTH_INI, ini, mode=0o600)
    secret_key = _secret_file(folder / SECRET_KEY_NAME, lambda: secrets.token_hex(32))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(folder / AUTH_INI), "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key}


def make_store_dirs(home: Path, settings: dict[str, Any]) -> None:
    """Create the local folders the settings name (the SQLite database's, the artifacts'), 0700."""
    dirs = []
    uri = _fill(settings["backend_store_uri"], home)
    if uri.startswith("sqlite:///"):
        dirs.append(Path(uri[len("sqlite:///"):]).parent)
    dest = _fill(settings["artifacts_destination"], home)
    if "://" not in dest:
        dirs.append(Path(dest))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)


def server_env(base: Mapping[str, str], auth: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``base`` with MLflow's job execution off unless ``base`` says,
    and with ``auth`` (what :func:`prepare_basic_auth` returned) when it runs the basic-auth app.

    MLflow 3.17 otherwise starts eight huey "job execution" consumer processes (about 1.7 GB) for
    its GenAI jobs, which this project never uses. A user who sets
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION keeps their value.
    """
    env = dict(base)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if auth:
        for var in AUTH_OVERRIDES:
            env.pop(var, None)
        env.update(auth)
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the tracking server in the foreground (what a cluster head runs): exec `mlflow server`."""
    from jobs.state import StateError, ensure_home

    parser = argparse.ArgumentParser(prog="python -m jobs.mlflow_server", description=main.__doc__)
    parser.add_argument("--home", default=None, help="the state folder (default: $MNISTJOBS_HOME or ./.mnistjobs)")
    parser.add_argument("--config", default=None,
                        help=f"the settings file (default: ${SETTINGS_VAR}, else {SETTINGS_FILE})")
    parser.add_argument("--host", default=None, help="the address to bind (default: the settings' host)")
    parser.add_argument("--port", type=int, default=None, help="the port (default: the settings' port)")
    args = parser.parse_args(argv)
    try:
        home = ensure_home(args.home)
        settings = load_mlflow_settings(args.config)
    except (StateError, SettingsError) as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    make_store_dirs(home, settings)
    cmd = mlflow_server_command(home, settings, host=args.host or settings["host"],
                                port=args.port or int(settings["port"]))
    auth = prepare_basic_auth(home, log=print) if basic_auth_on(settings) else None
    print(shlex.join(cmd), flush=True)
    if auth:
        from jobs.state import MLFLOW_USER, mlflow_password_path

        print(f"MLflow's basic-auth app is on: user {MLFLOW_USER}, password in {mlflow_password_path(home)} "
              f"(clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)", flush=True)
    os.execve(cmd[0], cmd, server_env(os.environ, auth))
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
