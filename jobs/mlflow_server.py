"""The MLflow tracking server: its settings (mlflow/server.yaml), its command line, its
environment, and a foreground launcher for a cluster head::

    python -m jobs.mlflow_server [--home H] [--config mlflow/server.yaml] [--host H] [--port P]

``mnistjobs up`` (jobs.services) starts the same command in the background.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
SETTINGS_FILE = Path(__file__).resolve().parents[1] / "mlflow" / "server.yaml"
DEFAULTS: dict[str, Any] = {
    "host": DEFAULT_HOST, "port": DEFAULT_PORT,
    "backend_store_uri": "sqlite:///{home}/mlflow/mlflow.db",
    "artifacts_destination": "{home}/mlflow/artifacts", "serve_artifacts": True,
    "workers": 1, "app_name": None, "extra_args": [],
}


class SettingsError(ValueError):
    """mlflow/server.yaml (or the file given) cannot be used."""


def load_mlflow_settings(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """mlflow/server.yaml (or ``path``) as a dict, with defaults for anything it leaves out."""
    import yaml

    settings = dict(DEFAULTS)
    path = Path(path) if path else SETTINGS_FILE
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


def server_env(base: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: ``base`` with MLflow's job execution off unless ``base`` says.

    MLflow 3.17 otherwise starts eight huey "job execution" consumer processes (about 1.7 GB) for
    its GenAI jobs, which this project never uses. A user who sets
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION keeps their value.
    """
    env = dict(base)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the tracking server in the foreground (what a cluster head runs): exec `mlflow server`."""
    from jobs.state import StateError, ensure_home

    parser = argparse.ArgumentParser(prog="python -m jobs.mlflow_server", description=main.__doc__)
    parser.add_argument("--home", default=None, help="the state folder (default: $MNISTJOBS_HOME or ./.mnistjobs)")
    parser.add_argument("--config", default=None, help=f"the settings file (default: {SETTINGS_FILE})")
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
    print(shlex.join(cmd), flush=True)
    os.execve(cmd[0], cmd, server_env(os.environ))
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
