"""The embedded default: a local Ray head (with its dashboard) and an MLflow tracking server.

``up()`` starts both (or reuses them when the ones recorded in the state folder still answer),
``down()`` stops them, ``status()`` says what runs. They live in the state folder (jobs.state);
what runs is recorded in ``<home>/services.json`` (pids, ports, URLs; mode 0600), their output
goes to ``<home>/logs/``.

Every process started here gets ``MNISTJOBS_SERVICE_ID=<id>`` in its environment; Ray hands the
environment down to its workers and job drivers, so ``down()`` finds exactly this service set's
processes (jobs.procs; never another user's Ray on the same machine: ``ray stop`` would stop
them all). The MLflow server's settings and command line are jobs.mlflow_server's; talking to a
running cluster is jobs.cluster's.
"""
from __future__ import annotations

import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from jobs import procs
from jobs.cluster import mlflow_answers, ray_answers
from jobs.mlflow_server import (DEFAULT_HOST, DEFAULT_PORT as DEFAULT_MLFLOW_PORT, SettingsError, basic_auth_on,
                                command_uses_basic_auth, load_mlflow_settings, make_store_dirs,
                                mlflow_server_command, prepare_basic_auth, server_env)
from jobs.record import (CREDENTIAL_VARS, RECORD_NAME, Services, forget_record, load_last_record,  # noqa: F401
                         load_record, locked, record_path, use_mlflow_credentials, write_record)
from jobs.state import (MLFLOW_USER, StateError, ensure_home, ensure_token, mlflow_password_path, ray_auth_env,
                        ray_temp_dir, resolve_home, wake_port_path)

DEFAULT_RAY_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
OBJECT_STORE_MEMORY = 512 * 1024**2  # the sweeps put little in Ray's object store
SERVICE_ID_VAR = "MNISTJOBS_SERVICE_ID"

# Ray's idle cost (issue 16; Ray 2.60, each measured side by side on idle sets, % of one core on
# a 2-core machine): what the embedded head runs with unless the environment of `mnistjobs up`
# sets the variable itself. None of them touches the Jobs API, job logs, token auth or Tune.
RAY_IDLE_SETTINGS = {
    # No workers prestarted when the first driver (the dashboard agent) connects: they have no
    # runtime_env, so a sweep's trials (whose job sets env_vars) never use them, and each idle
    # Ray worker costs ~0.9% (its task loop checks for signals every 10 ms). -1.8%, -90 MB PSS.
    "RAY_prestart_worker_first_driver": "0",
    # log_monitor lists the log folder once a second instead of every 0.1 s (a new worker's log
    # is still read from its first line). -0.6%.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "1",
    # The dashboard agent and the runtime-env agent look for their raylet every 2 s, not 0.4 s
    # (they exit 10 s after it died, not 2 s), and the agent reports node stats (the dashboard's
    # node CPU/memory) every 15 s, not 5 s. Dashboard agent -0.5%.
    "RAY_DASHBOARD_AGENT_CHECK_PARENT_INTERVAL_S": "2",
    "REPORTER_UPDATE_INTERVAL_MS": "15000",
    # No Prometheus metrics (nothing here scrapes them; the dashboard's Metrics page needs a
    # Prometheus anyway): not recorded, not exported, and the dashboard head samples its own
    # processes' CPU once a minute. Dashboard head, raylet, GCS together -0.7%.
    "RAY_enable_metrics_collection": "0",
    "RAY_metrics_report_interval_ms": "60000",
    "METRICS_RECORD_INTERVAL_S": "60",
    "RAY_event_stats": "0",
    # The raylet's checks of the object store's use (for a global GC) and of the disk (for
    # spilling), once a second instead of every 0.1 s: the sweeps put little in the store.
    "RAY_raylet_check_gc_period_milliseconds": "1000",
    "RAY_local_fs_monitor_interval_ms": "1000",
}

# Per port: what listens there, the variable that sets it, and the options named in errors.
PORTS = {
    "ray": ("the Ray head (GCS)", "MNISTJOBS_RAY_PORT", "--ray-port or MNISTJOBS_RAY_PORT"),
    "dashboard": ("the Ray dashboard", "MNISTJOBS_DASHBOARD_PORT", "--dashboard-port or MNISTJOBS_DASHBOARD_PORT"),
    "mlflow": ("the MLflow server", "MNISTJOBS_MLFLOW_PORT", "--mlflow-port or MNISTJOBS_MLFLOW_PORT"),
}


class ServiceError(RuntimeError):
    """A service would not start, stop or answer (a runtime failure: exit code 1)."""


class PortInUseError(ServiceError):
    """A port the embedded services need is taken (a usage error: exit code 2)."""

    def __init__(self, port: int, what: str, option: str):
        self.port, self.what, self.option = port, what, option
        super().__init__(
            f"Port {port} ({what}) is already in use on this machine, so the embedded services "
            f"cannot start. Choose another port with {option} (0 picks a free one), or stop what "
            f"listens there. If it is an earlier `mnistjobs up` with another state folder, stop it "
            f"with `mnistjobs down --home <that folder>`.")


# ----------------------------------------------------------------------------------------- ports

def port_is_free(port: int, host: str = DEFAULT_HOST) -> bool:
    """Whether a server could listen on ``host:port`` now (and on all interfaces, as Ray's GCS does)."""
    for addr in {host, "0.0.0.0"} if host not in ("0.0.0.0", "") else {"0.0.0.0"}:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, port))
            except OSError:
                return False
    return True


#: The ports free_port handed out in this process: the OS may offer a port again as soon as its probe
#: socket closed, and two components of one `ray start` given the same port fail it ("Ray component
#: dashboard_agent_http is trying to use a port number ... that is used by other components").
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nobody listens on now (the OS picks it), never one this process was given before."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _choose_port(name: str, explicit: int | None, default: int, host: str, previous: int | None = None) -> int:
    """The argument > its MNISTJOBS_*_PORT variable > ``default``; 0 picks a free one. When the
    services come back after dying (``previous``: the port they had), a port left to choose (none
    given, or 0) is the one they had when it is free, so the URLs the queue's jobs hold still work."""
    what, var, option = PORTS[name]
    port = explicit
    if port is None and os.environ.get(var) not in (None, ""):
        try:
            port = int(os.environ[var])
        except ValueError:
            raise ServiceError(f"{var}={os.environ[var]!r} is not a port number") from None
    if previous and (port is None or port == 0) and port_is_free(previous, host):
        return previous
    port = default if port is None else port
    if port == 0:
        return free_port()
    if not 0 < port < 65536:
        raise ServiceError(f"{port} is not a port number for {what}; set {option} to 1-65535 (or 0).")
    if not port_is_free(port, host):
        raise PortInUseError(port, what, option)
    return port


def _choose_ports(host: str, settings: dict[str, Any], ray: int | None, dashboard: int | None,
                  mlflow: int | None, previous: "Services | None" = None) -> dict[str, int]:
    before = previous or Services("", "", "", "", "", "", 0, 0, "", 0, 0, "")
    ports = {
        "ray": _choose_port("ray", ray, DEFAULT_RAY_PORT, host, before.ray_port),
        "dashboard": _choose_port("dashboard", dashboard, DEFAULT_DASHBOARD_PORT, host, before.dashboard_port),
        "mlflow": _choose_port("mlflow", mlflow, int(settings.get("port") or DEFAULT_MLFLOW_PORT), host,
                               before.mlflow_port),
    }
    if len(set(ports.values())) < 3:
        raise ServiceError(f"The three service ports must differ: {ports}")
    return ports


# ------------------------------------------------------------------------------------ processes

def service_pids(services: Services) -> set[int]:
    """Every live process of this service set: those carrying our MNISTJOBS_SERVICE_ID (the Ray
    and MLflow servers, Ray's workers and job drivers) and their descendants (Ray's agents)."""
    return procs.marked_pids(SERVICE_ID_VAR, services.service_id)


def _stop(services: Services, grace: float = 5.0) -> None:
    """Ray first (its job drivers mark their MLflow runs KILLED on SIGTERM, so MLflow must still
    answer), then the MLflow server."""
    pids = service_pids(services)
    procs.terminate(pids - procs.descendants(services.mlflow_pid), grace)
    procs.terminate(service_pids(services), grace)


def _service_env(home: Path, service_id: str) -> dict[str, str]:
    """The environment of the set's servers: ours, without another cluster's address or token
    (nor MLflow credentials, the user's or ours: the Ray processes inherit this environment, and
    the embedded cluster's read the password file), with the set's token, its service id,
    Ray's usage stats off and RAY_IDLE_SETTINGS."""
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", *CREDENTIAL_VARS, "MLFLOW_TRACKING_TOKEN"):
        env.pop(var, None)
    env.update(ray_auth_env(home))
    env[SERVICE_ID_VAR] = service_id
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for var, value in RAY_IDLE_SETTINGS.items():
        env.setdefault(var, value)  # a value in the environment of `mnistjobs up` wins
    return env


def _launch(cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session, its output appended to ``log_path``."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)


def _tail(path: Path | str, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no output)"
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------------- what runs

def _both_answer(rec: Services) -> bool:
    return ray_answers(rec.dashboard_url, rec.headers) and mlflow_answers(rec.mlflow_url)


def status(home: str | os.PathLike | None = None) -> dict[str, Any]:
    """What runs: ``{"home", "running", "ray": {...}, "mlflow": {...}}``."""
    home_path = resolve_home(home)
    rec = load_record(home_path)
    if rec is None:
        return {"home": str(home_path), "running": False, "ray": None, "mlflow": None}
    ray_ok, mlflow_ok = ray_answers(rec.dashboard_url, rec.headers), mlflow_answers(rec.mlflow_url)
    return {
        "home": str(home_path), "running": ray_ok and mlflow_ok, "services": rec,
        "ray": {"running": ray_ok, "address": rec.ray_address, "dashboard_url": rec.dashboard_url},
        "mlflow": {"running": mlflow_ok, "url": rec.mlflow_url, "pid": rec.mlflow_pid},
    }


def tracking_uri_for(home: str | os.PathLike | None = None) -> str | None:
    """The embedded MLflow server's URL recorded for the state folder ``home`` (None if none);
    this process's MLflow credentials are set for it (jobs.record.use_mlflow_credentials)."""
    rec = load_record(home)
    if rec is None:
        return None
    use_mlflow_credentials(rec.mlflow_url, home)
    return rec.mlflow_url


def running(home: str | os.PathLike | None = None) -> Services | None:
    """The recorded services if both answer now, else None."""
    rec = load_record(home)
    return rec if rec is not None and _both_answer(rec) else None


# ------------------------------------------------------------------------------------ up / down

def up(home: str | os.PathLike | None = None, *, host: str | None = None, ray_port: int | None = None,
       dashboard_port: int | None = None, mlflow_port: int | None = None, num_cpus: int | None = None,
       num_gpus: int | None = None, mlflow_settings: str | os.PathLike | None = None,
       timeout: float = 180.0, log: Callable[[str], None] | None = None) -> Services:
    """Start the local Ray head and MLflow server, or reuse the running ones; return them.

    Ports: argument > ``MNISTJOBS_RAY_PORT`` / ``MNISTJOBS_DASHBOARD_PORT`` /
    ``MNISTJOBS_MLFLOW_PORT`` > mlflow/server.yaml (MLflow) > Ray's defaults; 0 picks a free one.
    Raises PortInUseError (a usage error) or ServiceError.
    """
    log = log or (lambda msg: None)
    try:
        home_path = ensure_home(home)
    except StateError as e:
        raise ServiceError(str(e)) from None
    with locked(home_path):
        rec = previous = load_record(home_path)
        if previous is None:
            previous = load_last_record(home_path)  # after `down`: the same ports, when free
        if rec is not None:
            if _both_answer(rec):
                rec.reused = True
                use_mlflow_credentials(rec.mlflow_url, home_path)
                return rec
            log("The recorded services do not answer any more; stopping what is left of them.")
            _stop(rec)
            record_path(home_path).unlink(missing_ok=True)
        try:
            settings = load_mlflow_settings(mlflow_settings)
        except SettingsError as e:
            raise ServiceError(str(e)) from None
        host = host or settings.get("host") or DEFAULT_HOST
        ports = _choose_ports(host, settings, ray_port, dashboard_port, mlflow_port, previous)
        services = _start(home_path, settings, host, ports, num_cpus=num_cpus, num_gpus=num_gpus,
                          timeout=timeout, log=log)
        write_record(home_path, services)
        use_mlflow_credentials(services.mlflow_url, home_path)  # this process's MLflow calls log in
        return services


def _ray_head_command(host: str, ports: dict[str, int], temp_dir: Path, *, client_port: int,
                      num_cpus: int | None, num_gpus: int | None) -> list[str]:
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    ray = Path(sys.executable).with_name("ray")
    cmd = [*([str(ray)] if ray.exists() else [sys.executable, "-m", "ray.scripts.scripts"]), "start", "--head",
           "--node-ip-address", url_host, "--port", str(ports["ray"]), "--dashboard-host", host,
           "--dashboard-port", str(ports["dashboard"]), "--ray-client-server-port", str(client_port),
           # Ray's other fixed-default ports would collide with another Ray on this machine.
           "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp_dir),
           "--object-store-memory", str(OBJECT_STORE_MEMORY), "--disable-usage-stats",
           "--num-cpus", str(num_cpus if num_cpus is not None else (os.cpu_count() or 1))]
    return cmd + (["--num-gpus", str(num_gpus)] if num_gpus is not None else [])


def _start(home: Path, settings: dict[str, Any], host: str, ports: dict[str, int], *, num_cpus: int | None,
           num_gpus: int | None, timeout: float, log: Callable[[str], None]) -> Services:
    """Start MLflow (first: it takes longest) and the Ray head, wait until both answer; on any
    failure stop what did start."""
    token = ensure_token(home)
    temp_dir = ray_temp_dir(home)
    temp_dir.mkdir(mode=0o700, exist_ok=True)
    logs_dir = home / "logs"
    logs_dir.mkdir(mode=0o700, exist_ok=True)
    make_store_dirs(home, settings)
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    env = _service_env(home, secrets.token_hex(8))
    mlflow_cmd = mlflow_server_command(home, settings, host=host, port=ports["mlflow"])
    auth = prepare_basic_auth(home, log=log) if basic_auth_on(settings) else None
    client_port = free_port()
    ray_cmd = _ray_head_command(host, ports, temp_dir, client_port=client_port, num_cpus=num_cpus,
                                num_gpus=num_gpus)
    logs = {"mlflow": str(logs_dir / "mlflow.log"), "ray": str(logs_dir / "ray-start.log"),
            "ray_session": str(temp_dir / "session_latest" / "logs")}

    log(f"Starting MLflow: {shlex.join(mlflow_cmd)}")
    mlflow_proc = _launch(mlflow_cmd, server_env(env, auth), home, Path(logs["mlflow"]))
    services = Services(
        home=str(home), service_id=env[SERVICE_ID_VAR], host=host, temp_dir=str(temp_dir), token_path=str(token),
        ray_address="", ray_port=ports["ray"], dashboard_port=ports["dashboard"],
        dashboard_url=f"http://{url_host}:{ports['dashboard']}", mlflow_pid=mlflow_proc.pid,
        mlflow_port=ports["mlflow"], mlflow_url=f"http://{url_host}:{ports['mlflow']}", mlflow_command=mlflow_cmd,
        ray_client_port=client_port, num_cpus=num_cpus, num_gpus=num_gpus, started_at=time.time(), logs=logs,
        mlflow_user=MLFLOW_USER if auth else None,
        mlflow_password_path=str(mlflow_password_path(home)) if auth else None)
    try:
        log(f"Starting Ray: {shlex.join(ray_cmd)}")
        deadline = time.monotonic() + timeout
        _wait_ray_start(_launch(ray_cmd, env, home, Path(logs["ray"])), logs["ray"], deadline)
        _wait_answers(services, mlflow_proc, deadline, timeout)
        try:
            services.ray_address = (temp_dir / "ray_current_cluster").read_text().strip()
        except OSError:
            services.ray_address = f"{url_host}:{ports['ray']}"
    except BaseException:
        _stop(services, grace=3.0)
        raise
    if auth:
        log(f"MLflow asks for a login (its basic-auth app): user {MLFLOW_USER}, password in "
            f"{services.mlflow_password_path}; `mnistjobs env` prints both for MLflow's own tools.")
    return services


def _wait_ray_start(ray_proc: subprocess.Popen, ray_log: str, deadline: float) -> None:
    """`ray start --head` returns once the head's processes run; fail with its output if it fails."""
    try:
        rc = ray_proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`ray start` did not finish in time; its output ({ray_log}):\n{_tail(ray_log)}") from None
    if rc != 0:
        raise ServiceError(f"`ray start` failed (exit code {rc}); its output ({ray_log}):\n{_tail(ray_log)}")


def _wait_answers(services: Services, mlflow_proc: subprocess.Popen, deadline: float, timeout: float,
                  ray: bool = True) -> None:
    """Poll until the dashboard (when ``ray``) and MLflow answer; an MLflow that exits fails at once."""
    mlflow_log = services.logs["mlflow"]
    ray_ok, mlflow_ok = not ray, False
    while True:
        ray_ok = ray_ok or ray_answers(services.dashboard_url, services.headers)
        mlflow_ok = mlflow_ok or mlflow_answers(services.mlflow_url)
        if mlflow_proc.poll() is not None:
            raise ServiceError(f"The MLflow server exited (code {mlflow_proc.returncode}); "
                               f"its output ({mlflow_log}):\n{_tail(mlflow_log)}")
        if (ray_ok and mlflow_ok) or time.monotonic() >= deadline:
            break
        time.sleep(0.3)
    if not ray_ok:
        raise ServiceError(f"The Ray dashboard did not answer at {services.dashboard_url} within "
                           f"{timeout:.0f} s; see {services.logs['ray_session']}")
    if not mlflow_ok:
        raise ServiceError(f"The MLflow server did not answer at {services.mlflow_url} within "
                           f"{timeout:.0f} s; its output ({mlflow_log}):\n{_tail(mlflow_log)}")


def restart_mlflow(home: str | os.PathLike | None = None, timeout: float = 120.0) -> Services:
    """Start the recorded set's MLflow server again after it stopped (the same command: port,
    store, settings; the same service id, so `down` stops it); Ray is left as it runs."""
    home_path = resolve_home(home)
    with locked(home_path):
        rec = load_record(home_path)
        if rec is None or not rec.mlflow_command:
            raise ServiceError(f"No embedded MLflow server is recorded in {home_path}; start one with `mnistjobs up`.")
        if mlflow_answers(rec.mlflow_url):
            return rec
        auth = prepare_basic_auth(home_path) if command_uses_basic_auth(rec.mlflow_command) else None
        proc = _launch(rec.mlflow_command, server_env(_service_env(home_path, rec.service_id), auth), home_path,
                       Path(rec.logs["mlflow"]))
        rec.mlflow_pid = proc.pid
        try:
            _wait_answers(rec, proc, time.monotonic() + timeout, timeout, ray=False)
        except BaseException:
            procs.terminate(procs.descendants(proc.pid), grace=3.0)
            raise
        write_record(home_path, rec)
        return rec


def down(home: str | os.PathLike | None = None, grace: float = 5.0) -> Services | None:
    """Stop the recorded services (and the Ray workers and job drivers they started); forget them.
    Returns what was stopped, or None when nothing was recorded."""
    home_path = resolve_home(home)
    if not home_path.is_dir():
        return None
    with locked(home_path):
        rec = load_record(home_path)
        if rec is None:
            return None
        rec.held_jobs = _hold_running_jobs(rec)
        _stop(rec, grace=grace)
        wake_port_path(home_path).unlink(missing_ok=True)  # the admitter's, gone with Ray
        forget_record(home_path)
        return rec


def _hold_running_jobs(rec: Services) -> list[str]:
    """The queue's running jobs, marked to start again after `up` (jobs.queue.hold_admitted);
    nothing when MLflow does not answer (their drivers then mark their runs KILLED)."""
    if not mlflow_answers(rec.mlflow_url):
        return []
    try:
        from jobs import queue, tracking

        return queue.hold_admitted(tracking.client(rec.mlflow_url))
    except Exception:  # noqa: BLE001 - stopping must not fail on the queue's store
        return []
