"""`mnistjobs env` and `mnistjobs token` (jobs.cli_env): the commands are invoked as click command
objects (jobs.cli registers them on the group). The slow tests use the session's embedded services
and Ray's and MLflow's own CLIs from .venv/bin, in bash, as a user would."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs import cli_env
from jobs.record import Services, write_record

BIN = Path(sys.executable).parent
# What a user's shell may hold from elsewhere: none of it may leak into what is checked.
FOREIGN = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI",
           "MNISTJOBS_HOME")


def invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args], env={k: None for k in FOREIGN})


def user_shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def bash(script: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=timeout)


# -------------------------------------------------------------------------------------- fast

@pytest.mark.parametrize("command", [cli_env.env_cmd, cli_env.token_cmd])
def test_not_running_is_a_usage_error(command, tmp_path):
    result = invoke(command, "--home", tmp_path / "nothing")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "no embedded services are recorded" in text and "mnistjobs up" in text
    assert str(tmp_path / "nothing") in text and "Traceback" not in result.output
    # recorded, but nothing answers there any more (the machine restarted)
    home = tmp_path / "stale"
    home.mkdir()
    write_record(home, Services(home=str(home), service_id="x", host="127.0.0.1", temp_dir="/tmp/x",
                                token_path=str(home / "ray_auth_token"), ray_address="127.0.0.1:1",
                                ray_port=1, dashboard_port=1, dashboard_url="http://127.0.0.1:1",
                                mlflow_pid=0, mlflow_port=1, mlflow_url="http://127.0.0.1:1"))
    result = invoke(command, "--home", home)
    assert result.exit_code == 2, result.output
    assert "do not answer" in " ".join(result.output.split())
    assert result.stdout == ""  # nothing for eval to run


def test_export_lines_quote_values_and_leave_a_seam_for_mlflow_credentials(tmp_path, monkeypatch):
    home = tmp_path / "it's here"  # a quote and a space: shlex.quote must keep it one word
    rec = Services(home=str(home), service_id="x", host="127.0.0.1", temp_dir="/tmp/x",
                   token_path=str(home / "ray_auth_token"), ray_address="127.0.0.1:6379", ray_port=6379,
                   dashboard_port=8265, dashboard_url="http://127.0.0.1:8265", mlflow_pid=0,
                   mlflow_port=5000, mlflow_url="http://127.0.0.1:5000")
    text = cli_env.export_lines(rec)
    env = {"PATH": os.environ["PATH"], "RAY_AUTH_TOKEN": "stale"}
    out = bash(text + "env | grep -E '^(RAY|MLFLOW)_' | sort", env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == sorted([
        "MLFLOW_TRACKING_URI=http://127.0.0.1:5000", "RAY_ADDRESS=http://127.0.0.1:8265",
        "RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN_PATH={home}/ray_auth_token"])  # RAY_AUTH_TOKEN unset
    monkeypatch.setattr(cli_env, "mlflow_credentials",
                        lambda r: {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "p w"})
    names = [ln.split("=")[0].split()[1] for ln in cli_env.export_lines(rec).splitlines() if ln.startswith("export")]
    assert names == ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                     "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"]
    assert "export MLFLOW_TRACKING_PASSWORD='p w'" in cli_env.export_lines(rec)


def test_token_help_matches_the_installed_dashboard():
    """The help text names what Ray's own dashboard shows and does: the dialog's title and field,
    the cookie it sets. If a Ray upgrade changes them, this fails and the text must change."""
    import ray.dashboard
    from ray._private.authentication import authentication_constants

    build = Path(ray.dashboard.__file__).parent / "client" / "build" / "static" / "js"
    bundle = "".join(p.read_text(errors="replace") for p in build.glob("main.*.js"))
    for shown in ("Authentication Token Required", "Authentication Token", "ray get-auth-token"):
        assert shown in bundle
    assert authentication_constants.AUTHENTICATION_TOKEN_COOKIE_NAME == "ray-authentication-token"
    assert authentication_constants.AUTHENTICATION_TOKEN_COOKIE_MAX_AGE == 30 * 24 * 3600
    rec = Services(home="/h", service_id="x", host="127.0.0.1", temp_dir="/tmp/x", token_path="/h/ray_auth_token",
                   ray_address="", ray_port=1, dashboard_port=2, dashboard_url="http://127.0.0.1:2", mlflow_pid=0,
                   mlflow_port=3, mlflow_url="http://127.0.0.1:3")
    text = cli_env.dashboard_token_help(rec)
    assert "Authentication Token Required" in text and "30 days" in text and "http://127.0.0.1:2" in text


# -------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_env_then_ray_and_mlflow_clis_just_work(embedded, tmp_path):
    result = invoke(cli_env.env_cmd, "--home", embedded.home)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    exports = dict(shlex.split(ln)[1].split("=", 1) for ln in lines if ln.startswith("export "))
    assert exports == {"MLFLOW_TRACKING_URI": embedded.mlflow_url, "RAY_ADDRESS": embedded.dashboard_url,
                       "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": embedded.token_path,
                       **embedded.mlflow_credentials}
    assert "unset RAY_AUTH_TOKEN" in lines

    env = user_shell_env()
    env["RAY_AUTH_TOKEN"] = "0" * 64  # a stale token of another cluster in the user's shell
    # Without the lines, Ray's CLI cannot list the jobs of the token-protected dashboard ...
    bare = bash(f"RAY_ADDRESS={shlex.quote(embedded.dashboard_url)} ray job list", env)
    assert bare.returncode != 0, bare.stdout
    # ... with them it can, and MLflow's CLI reaches the embedded server.
    saved = tmp_path / "env.sh"
    saved.write_text(result.stdout)
    script = (f"eval \"$(cat {shlex.quote(str(saved))})\" && ray job list "
              f"&& ray get-auth-token && echo && mlflow experiments search")
    out = bash(script, env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert embedded.token in out.stdout  # ray get-auth-token found our token
    assert "Default" in out.stdout  # mlflow experiments search listed the server's experiments


@pytest.mark.slow
def test_env_through_the_real_command_line(embedded):
    """`eval "$(mnistjobs env)"` as typed, via the console script when jobs.cli registers `env`,
    else via the command object; then `ray job list` exits 0."""
    from jobs.cli import main

    if "env" in main.commands:
        command = f"mnistjobs env --home {shlex.quote(embedded.home)}"
    else:
        command = (f"{shlex.quote(sys.executable)} -c 'from jobs.cli_env import env_cmd; "
                   f"env_cmd(prog_name=\"mnistjobs\")' --home {shlex.quote(embedded.home)}")
    out = bash(f'eval "$({command})" && ray job list', user_shell_env())
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_token_prints_the_token_that_opens_the_dashboard(embedded):
    result = invoke(cli_env.token_cmd, "--home", embedded.home)
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token == Path(embedded.token_path).read_text().strip() and "\n" not in token
    help_text = " ".join(result.stderr.split())
    assert embedded.dashboard_url in help_text and "Authentication Token Required" in help_text
    # What the dashboard's dialog does with a pasted token: POST /api/authenticate, which sets the
    # cookie; with the cookie (and nothing else) the dashboard's API answers.
    url = embedded.dashboard_url
    assert _status(f"{url}/api/jobs/") == 401
    req = urllib.request.Request(f"{url}/api/authenticate", data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "authenticated"
        cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("ray-authentication-token=") and "HttpOnly" in cookie
    value = cookie.split(";")[0]
    assert _status(f"{url}/api/jobs/", {"Cookie": value}) == 200
    assert _status(f"{url}/api/jobs/", {"Cookie": "ray-authentication-token=" + "0" * 64}) == 403


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
