"""Credentials on MLflow: the embedded server runs MLflow's basic-auth app (jobs.mlflow_server),
its admin password lives in the state folder (0600), every mnistjobs client passes it
(jobs.record.use_mlflow_credentials through jobs.tracking.client), and without it the REST API
answers 401 while /health stays open. The slow tests use the session's embedded services."""
from __future__ import annotations

import base64
import os
import shlex
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jobs import mlflow_server, record
from jobs.record import Services, use_mlflow_credentials, write_record
from jobs.state import MLFLOW_USER, mlflow_password_path

CREDS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _fake_record(home: Path, port: int, *, auth: bool = True) -> Services:
    return Services(home=str(home), service_id="x", host="127.0.0.1", temp_dir="/tmp/x",
                    token_path=str(home / "ray_auth_token"), ray_address="", ray_port=1, dashboard_port=2,
                    dashboard_url="http://127.0.0.1:2", mlflow_pid=0, mlflow_port=port,
                    mlflow_url=f"http://127.0.0.1:{port}", mlflow_user=MLFLOW_USER if auth else None,
                    mlflow_password_path=str(mlflow_password_path(home)) if auth else None)


@pytest.fixture
def clean_creds(monkeypatch):
    """No MLflow credentials in the environment, and none remembered from other tests."""
    for var in CREDS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(record, "_saved", {})
    monkeypatch.setattr(record, "_known", {})


# -------------------------------------------------------------------------------------- fast

def test_basic_auth_is_the_default_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.delenv(mlflow_server.SETTINGS_VAR, raising=False)
    settings = mlflow_server.load_mlflow_settings()
    assert settings["app_name"] == "basic-auth" and mlflow_server.basic_auth_on(settings)
    cmd = mlflow_server.mlflow_server_command(tmp_path, settings, host="127.0.0.1", port=5)
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth" and mlflow_server.command_uses_basic_auth(cmd)
    off = tmp_path / "plain.yaml"
    off.write_text("app_name: null\n")
    monkeypatch.setenv(mlflow_server.SETTINGS_VAR, str(off))  # how a user turns it off for `up`
    plain = mlflow_server.load_mlflow_settings()
    assert not mlflow_server.basic_auth_on(plain)
    cmd = mlflow_server.mlflow_server_command(tmp_path, plain, host="127.0.0.1", port=5)
    assert "--app-name" not in cmd and not mlflow_server.command_uses_basic_auth(cmd)
    monkeypatch.setenv(mlflow_server.SETTINGS_VAR, str(tmp_path / "missing.yaml"))
    with pytest.raises(mlflow_server.SettingsError, match="missing.yaml.*MNISTJOBS_MLFLOW_CONFIG"):
        mlflow_server.load_mlflow_settings()


def test_prepare_basic_auth_writes_what_mlflow_reads(tmp_path, monkeypatch):
    """The files are 0600; MLflow's own config reader finds the admin, its password, and the auth
    database in the state folder; a second start keeps the password; a deleted password file
    gives a new password and a new auth database (the old one holds a hash of the old one)."""
    from mlflow.server.auth.config import read_auth_config

    home = tmp_path / "h%ome"  # configparser's interpolation must not trip on a %
    home.mkdir(mode=0o700)
    env = mlflow_server.prepare_basic_auth(home)
    pw_file = mlflow_password_path(home)
    ini, db = home / "mlflow" / "basic_auth.ini", home / "mlflow" / "basic_auth.db"
    secret = home / "mlflow" / "flask_secret_key"
    for path in (pw_file, ini, db, secret):
        assert _mode(path) == 0o600, path
    password = pw_file.read_text().strip()
    assert len(password) >= 12
    assert env == {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secret.read_text().strip()}
    for var in mlflow_server.AUTH_OVERRIDES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    cfg = read_auth_config()
    assert (cfg.admin_username, cfg.admin_password) == (MLFLOW_USER, password)
    assert cfg.database_uri == f"sqlite:///{db}"

    db.write_bytes(b"users")  # stands for a database the admin was created in
    assert mlflow_server.prepare_basic_auth(home) == env and pw_file.read_text().strip() == password
    assert db.read_bytes() == b"users"

    pw_file.unlink()
    notes = []
    mlflow_server.prepare_basic_auth(home, log=notes.append)
    assert pw_file.read_text().strip() != password and db.read_bytes() == b""
    assert notes and "starts again" in notes[0]


def test_the_server_env_takes_the_auth_files_not_the_shell(monkeypatch):
    base = {"PATH": "/bin", "MLFLOW_AUTH_ADMIN_PASSWORD": "from-the-shell", "MLFLOW_AUTH_ADMIN_USERNAME": "bob"}
    env = mlflow_server.server_env(base, {"MLFLOW_AUTH_CONFIG_PATH": "/h/ini", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"})
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/h/ini" and env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "k"
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in env and "MLFLOW_AUTH_ADMIN_USERNAME" not in env
    assert mlflow_server.server_env(base)["MLFLOW_AUTH_ADMIN_USERNAME"] == "bob"  # no auth app: untouched


def test_the_ray_processes_inherit_no_mlflow_credentials(tmp_path, monkeypatch):
    from jobs import services

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "their-password")
    env = services._service_env(tmp_path, "id")
    assert not set(CREDS) & set(env)


def test_clients_use_the_embedded_password_and_give_it_to_nobody_else(tmp_path, monkeypatch, clean_creds):
    """tracking.client() of an embedded server known here sets the credentials (over a stale
    shell's); any other server gets back what the user had; without auth nothing is set."""
    from jobs import tracking

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    mlflow_server.prepare_basic_auth(home)
    password = mlflow_password_path(home).read_text().strip()
    rec = _fake_record(home, 5999)
    write_record(home, rec)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # e.g. from another server's setup
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alices-password")

    tracking.client(rec.mlflow_url + "/")
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (MLFLOW_USER, password)
    tracking.client("http://mlflow.example.com:5000")  # a user-provided server: the user's own
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice",
                                                                                              "alices-password")
    # found through $MNISTJOBS_HOME alone (how a Ray job process of the embedded cluster finds it)
    monkeypatch.setattr(record, "_known", {})
    monkeypatch.setenv("MNISTJOBS_HOME", str(home))
    assert use_mlflow_credentials(rec.mlflow_url)["MLFLOW_TRACKING_PASSWORD"] == password
    assert rec.mlflow_headers == {"Authorization": "Basic " + base64.b64encode(
        f"{MLFLOW_USER}:{password}".encode()).decode()}
    # a server recorded without the auth app: no credentials, the user's come back
    plain = tmp_path / "plain"
    plain.mkdir(mode=0o700)
    write_record(plain, _fake_record(plain, 5998, auth=False))
    assert use_mlflow_credentials("http://127.0.0.1:5998", plain) == {}
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"


def test_env_prints_the_mlflow_login(tmp_path):
    from jobs import cli_env

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    mlflow_server.prepare_basic_auth(home)
    rec = _fake_record(home, 5997)
    names = list(cli_env.service_env(rec))
    assert names[:3] == ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]
    lines = cli_env.export_lines(rec)
    assert f"export MLFLOW_TRACKING_PASSWORD={mlflow_password_path(home).read_text().strip()}" in lines
    help_text = cli_env.mlflow_login_help(rec)
    assert MLFLOW_USER in help_text and str(mlflow_password_path(home)) in help_text
    assert cli_env.mlflow_login_help(_fake_record(home, 5997, auth=False)) == ""


# -------------------------------------------------------------------------------------- slow

def _status(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, headers={"Content-Type": "application/json", **(headers or {})}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_without_the_password_mlflow_answers_401(embedded):
    url = embedded.mlflow_url
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert embedded.mlflow_user == MLFLOW_USER
    assert _mode(embedded.mlflow_password_path) == 0o600
    for name in ("basic_auth.ini", "basic_auth.db", "flask_secret_key"):
        assert _mode(Path(embedded.home) / "mlflow" / name) == 0o600, name
    assert _status(search) == 401
    assert _status(f"{url}/ajax-api/2.0/mlflow/experiments/search?max_results=5") == 401  # what the UI calls
    assert _status(f"{url}/api/2.0/mlflow/runs/create", data=b'{"experiment_id": "0"}') == 401
    assert _status(f"{url}/api/2.0/mlflow-artifacts/artifacts") == 401
    assert _status(f"{url}/") == 401  # the UI: the browser asks for the login
    wrong = base64.b64encode(f"{MLFLOW_USER}:{'x' * 32}".encode()).decode()
    assert _status(search, {"Authorization": f"Basic {wrong}"}) == 401
    assert _status(search, embedded.mlflow_headers) == 200
    assert _status(f"{url}/health") == 200  # the health checks need no login


@pytest.mark.slow
def test_after_eval_env_mlflow_tools_and_the_registry_just_work(embedded, tmp_path):
    """A user's shell: `eval "$(mnistjobs env)"`, then MLflow's CLI and a fresh Python process
    (no mnistjobs code) log, register and load a model through the protected server; the same
    commands without the lines are refused."""
    from jobs import cli_env

    saved = tmp_path / "env.sh"
    saved.write_text(cli_env.export_lines(embedded))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "MNISTJOBS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    script = tmp_path / "fresh.py"
    script.write_text(
        "import mlflow, mlflow.pyfunc, pandas as pd\n"
        "class Twice(mlflow.pyfunc.PythonModel):\n"
        "    def predict(self, context, model_input, params=None):\n"
        "        return model_input * 2\n"
        "mlflow.set_experiment('auth-fresh-process')\n"
        "with mlflow.start_run():\n"
        "    info = mlflow.pyfunc.log_model(name='twice', python_model=Twice(), pip_requirements=['mlflow'],\n"
        "                                   registered_model_name='auth-twice')\n"
        "model = mlflow.pyfunc.load_model(f'models:/auth-twice/{info.registered_model_version}')\n"
        "print('PREDICTED', model.predict(pd.DataFrame({'x': [1, 2]}))['x'].tolist())\n")
    q = shlex.quote
    refused = subprocess.run(["bash", "-c", f"MLFLOW_TRACKING_URI={q(embedded.mlflow_url)} mlflow experiments search"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    out = subprocess.run(["bash", "-c", f"eval \"$(cat {q(str(saved))})\" && mlflow experiments search "
                                        f"&& {q(sys.executable)} {q(str(script))}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "Default" in out.stdout and "PREDICTED [2, 4]" in out.stdout
    assert not (tmp_path / "mlruns").exists()
