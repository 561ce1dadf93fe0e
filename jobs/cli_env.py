"""`mnistjobs env` and `mnistjobs token`: how MLflow's and Ray's own tools reach the embedded services.

``env`` prints shell ``export`` lines; after ``eval "$(mnistjobs env)"`` the standard clients of
the running embedded services just work in that shell (``ray job list``, ``ray get-auth-token``,
``mlflow experiments search``, ``mlflow models serve``, a notebook's ``MlflowClient()``: the
embedded MLflow server's basic-auth login is among the lines). ``token`` prints the Ray
dashboard's token and how a browser user gives it to the dashboard (and logs in to MLflow's UI).

jobs.cli registers both commands on its group. Both read what runs from the state folder
(jobs.services.running: the record, and both services answering now); neither starts anything.
"""
from __future__ import annotations

import shlex

import click

from jobs.cli_options import CONTEXT_SETTINGS, UsageFailure, home_option
from jobs.state import ray_auth_env

# Ray's own token lookup: $RAY_AUTH_TOKEN wins over $RAY_AUTH_TOKEN_PATH, so a token left in the
# shell from another cluster would shadow ours. `env` unsets it.
SHADOWING_VARS = ("RAY_AUTH_TOKEN",)


def _running_services(home):
    """The running embedded services of ``home`` or a usage error that says how to start them."""
    from jobs import services
    from jobs.state import resolve_home

    rec = services.running(home)
    if rec is not None:
        return rec
    where = resolve_home(home)
    if services.load_record(home) is None:
        why = f"no embedded services are recorded in the state folder {where}"
    else:
        why = (f"the embedded services recorded in {where} do not answer (stopped, or the machine "
               "restarted)")
    raise UsageFailure(f"Nothing to connect to: {why}. Start them with `mnistjobs up` (with the "
                       "same --home / MNISTJOBS_HOME), or pass the --home of a running set.")


def mlflow_credentials(rec) -> dict[str, str]:
    """MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for the embedded MLflow server: its
    basic-auth app's user and the password from ``<home>/mlflow_password`` (jobs.record); {} when
    the server runs without the basic-auth app (``app_name: null`` in mlflow/server.yaml)."""
    return rec.mlflow_credentials


def mlflow_login_help(rec) -> str:
    """How to log in to the MLflow UI (for `up` and `token`); empty without the basic-auth app."""
    if not rec.mlflow_user:
        return ""
    return (f"The MLflow UI at {rec.mlflow_url} asks for a login: user {rec.mlflow_user}, the password "
            f"is in {rec.mlflow_password_path} (mode 0600). MLflow's own tools and notebooks take both "
            "from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: `eval \"$(mnistjobs env)\"`.")


def service_env(rec) -> dict[str, str]:
    """The variables that point MLflow's and Ray's own clients at the running services ``rec``
    (jobs.record.Services), in the order `env` prints them.

    RAY_ADDRESS is the dashboard URL (the job API, what `ray job` and JobSubmissionClient take);
    RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH are what every process of the embedded cluster gets
    (jobs.state.ray_auth_env), so `ray job ...` and `ray get-auth-token` find the token.
    """
    env = {"MLFLOW_TRACKING_URI": rec.mlflow_url}
    env.update(mlflow_credentials(rec))
    env["RAY_ADDRESS"] = rec.dashboard_url
    env.update(ray_auth_env(rec.home))
    return env


def export_lines(rec) -> str:
    """``export NAME=value`` lines (values shell-quoted) and ``unset`` lines for a POSIX shell."""
    lines = [f"# The embedded services of {rec.home}; use them with: eval \"$(mnistjobs env)\""]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in service_env(rec).items()]
    lines += [f"unset {name}" for name in SHADOWING_VARS]
    return "\n".join(lines) + "\n"


def dashboard_token_help(rec) -> str:
    """How a browser user passes the token to the Ray dashboard (Ray 2.60), for `token` and `up`.

    What the dashboard does (ray/dashboard/client: TokenAuthenticationDialog, and
    http_server_head's /api/authenticate): when a request answers 401, it opens an
    "Authentication Token Required" dialog; the token pasted there is checked by
    ``POST /api/authenticate`` and kept in an HttpOnly cookie (``ray-authentication-token``,
    30 days, this host only). No URL parameter carries the token.
    """
    return (
        f"Open the Ray dashboard at {rec.dashboard_url}. The first time, it shows "
        "\"Authentication Token Required\": paste the token into the \"Authentication Token\" "
        "field and press Submit. The browser then keeps it in a cookie for 30 days, so the "
        "dashboard asks again only in a new browser profile, after the cookie is cleared, or when "
        "the token changed.\n"
        "The dialog's hint, `ray get-auth-token`, finds this token only in a shell that ran "
        "`eval \"$(mnistjobs env)\"` (it reads RAY_AUTH_TOKEN_PATH); HTTP clients send "
        "`Authorization: Bearer <token>`.\n"
        f"The token lives in {rec.token_path} (mode 0600)."
    )


@click.command("env", context_settings=CONTEXT_SETTINGS)
@home_option
def env_cmd(home):
    """Print the shell lines that point MLflow's and Ray's own tools at the embedded services.

    \b
    Run it through eval, in a POSIX shell (bash, zsh):
      eval "$(mnistjobs env)"
      ray job list                  # the Ray job API, with the token
      mlflow experiments search     # the embedded MLflow server

    It exports MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the
    MLflow server's basic-auth login, from <home>/mlflow_password), RAY_ADDRESS (the dashboard
    URL, what `ray job` takes), RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (the token file), and
    unsets RAY_AUTH_TOKEN (which would override the token file). The output holds a password:
    eval it, do not paste it anywhere. The services must be running (`mnistjobs up`).
    """
    rec = _running_services(home)
    click.echo(export_lines(rec), nl=False)


@click.command("token", context_settings=CONTEXT_SETTINGS)
@home_option
def token_cmd(home):
    """Print the Ray dashboard's token, and how to give it to the dashboard in a browser.

    The token alone goes to standard output (`mnistjobs token | xclip -selection clipboard`
    copies it); how to use it goes to standard error. The services must be running
    (`mnistjobs up`).
    """
    rec = _running_services(home)
    token = rec.token
    if not token:
        raise click.ClickException(f"The Ray token file {rec.token_path} is missing or empty, although "
                                   "the services answer. Restart them: `mnistjobs down`, then `mnistjobs up`.")
    click.echo(token)
    click.echo("", err=True)
    click.echo(dashboard_token_help(rec), err=True)
    login = mlflow_login_help(rec)
    if login:
        click.echo("", err=True)
        click.echo(login, err=True)
