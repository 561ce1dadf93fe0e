"""The embedded default: a local Ray head (with its dashboard) and an MLflow tracking server.

``up()`` starts both (or reuses them when the ones recorded in the state folder still answer),
``down()`` stops them, ``status()`` says what runs. Everything lives in the state folder
(``--home`` / ``$MNISTJOBS_HOME`` / ``./.mnistjobs``, mode 0700):

    <home>/services.json        what runs: pids, process groups, ports, URLs (mode 0600)
    <home>/ray_auth_token       Ray's token (mode 0600); Ray reads it through RAY_AUTH_TOKEN_PATH
    <home>/mlflow/              the MLflow SQLite database and artifacts (see mlflow/server.yaml)
    <home>/ray_results/         Tune's storage: experiment state and trial checkpoints
    <home>/logs/                the servers' own output

Ray's session folder (its Unix sockets, whose paths must stay under 107 bytes) is the exception:
it lives in a short folder under /tmp named after the state folder.

Every process started here gets ``MNISTJOBS_SERVICE_ID=<id>`` in its environment; Ray hands the
environment down to its workers and job drivers, so ``down()`` finds exactly this service set's
processes (never another user's Ray on the same machine; ``ray stop`` would stop them all).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

DEFAULT_HOME = "./.mnistjobs"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_RAY_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_MLFLOW_PORT = 5000
OBJECT_STORE_MEMORY = 512 * 1024**2  # the sweeps put little in Ray's object store
RECORD_NAME = "services.json"
TOKEN_NAME = "ray_auth_token"
SERVICE_ID_VAR = "MNISTJOBS_SERVICE_ID"
MLFLOW_SETTINGS = Path(__file__).resolve().parents[1] / "mlflow" / "server.yaml"

# The option that changes each port, named in the "port in use" error.
PORT_OPTIONS = {
    "ray": ("the Ray head (GCS)", "--ray-port or MNISTJOBS_RAY_PORT"),
    "dashboard": ("the Ray dashboard", "--dashboard-port or MNISTJOBS_DASHBOARD_PORT"),
    "mlflow": ("the MLflow server", "--mlflow-port or MNISTJOBS_MLFLOW_PORT"),
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


# ---------------------------------------------------------------------------------- state folder

def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """``home`` > ``$MNISTJOBS_HOME`` > ``./.mnistjobs``, as an absolute path (not created)."""
    value = home if home not in (None, "") else (os.environ.get("MNISTJOBS_HOME") or DEFAULT_HOME)
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
        raise ServiceError(f"Cannot create the state folder {path} ({e.strerror or e}). Set "
                           f"--home or MNISTJOBS_HOME to a folder you can write.") from None
    if path.stat().st_mode & 0o002:
        raise ServiceError(f"The state folder {path} is world-writable and not ours to fix; "
                           f"choose another with --home or MNISTJOBS_HOME.")
    return path


def token_path(home: Path) -> Path:
    return Path(home) / TOKEN_NAME


def ensure_token(home: Path) -> Path:
    """The Ray auth token file: created once with 64 random hex digits, mode 0600."""
    path = token_path(home)
    if path.is_file() and path.stat().st_size > 0:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def read_token(home: Path) -> str | None:
    path = token_path(home)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ray_auth_env(home: Path) -> dict[str, str]:
    """What every Ray process (and Ray client) of the embedded cluster gets in its environment."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path(home))}


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers for the Ray dashboard / job API: ``Authorization: Bearer <token>``."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def ray_temp_dir(home: Path) -> Path:
    """A short per-state-folder dir under /tmp for Ray's session (socket paths < 107 bytes)."""
    base = Path("/tmp") if Path("/tmp").is_dir() and os.access("/tmp", os.W_OK) else Path(tempfile.gettempdir())
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:10]
    return base / f"mnistjobs-{os.getuid()}-{digest}"


# -------------------------------------------------------------------------------------- settings

def load_mlflow_settings(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """mlflow/server.yaml (or ``path``) as a dict, with defaults for anything it leaves out."""
    import yaml

    settings: dict[str, Any] = {
        "host": DEFAULT_HOST, "port": DEFAULT_MLFLOW_PORT,
        "backend_store_uri": "sqlite:///{home}/mlflow/mlflow.db",
        "artifacts_destination": "{home}/mlflow/artifacts", "serve_artifacts": True,
        "workers": 1, "app_name": None, "extra_args": [],
    }
    path = Path(path) if path else MLFLOW_SETTINGS
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ServiceError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ServiceError(f"{path} must hold a mapping of settings, not {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(settings))
        if unknown:
            raise ServiceError(f"{path}: unknown setting(s) {', '.join(unknown)}; "
                               f"valid: {', '.join(settings)}")
        settings.update(loaded)
    return settings


def mlflow_server_command(home: Path, settings: dict[str, Any], *, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line for these settings."""
    def fill(value: str) -> str:
        return str(value).replace("{home}", str(home))

    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", fill(settings["backend_store_uri"]),
           "--workers", str(settings["workers"])]
    if settings.get("serve_artifacts", True):
        cmd += ["--serve-artifacts", "--artifacts-destination", fill(settings["artifacts_destination"])]
    else:
        cmd += ["--no-serve-artifacts", "--default-artifact-root", fill(settings["artifacts_destination"])]
    if settings.get("app_name"):
        cmd += ["--app-name", str(settings["app_name"])]
    cmd += [fill(a) for a in settings.get("extra_args") or []]
    return cmd


def _local_store_dirs(home: Path, settings: dict[str, Any]) -> list[Path]:
    dirs = []
    uri = str(settings["backend_store_uri"]).replace("{home}", str(home))
    if uri.startswith("sqlite:///"):
        dirs.append(Path(uri[len("sqlite:///"):]).parent)
    dest = str(settings["artifacts_destination"]).replace("{home}", str(home))
    if "://" not in dest:
        dirs.append(Path(dest))
    return dirs


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


def free_port() -> int:
    """A port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _env_port(var: str) -> int | None:
    value = os.environ.get(var)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ServiceError(f"{var}={value!r} is not a port number") from None


# ---------------------------------------------------------------------------------------- record

@dataclass
class Services:
    """What `up` started: enough for `status`, `down`, and the CLI to talk to them."""

    home: str
    service_id: str
    host: str
    temp_dir: str
    token_path: str
    ray_pgid: int
    ray_address: str          # the GCS address, host:port (what `ray start --address` takes)
    ray_port: int
    dashboard_port: int
    dashboard_url: str        # the dashboard and the job API
    mlflow_pid: int
    mlflow_port: int
    mlflow_url: str           # the tracking URI
    ray_client_port: int = 0
    num_cpus: int | None = None
    num_gpus: int | None = None
    started_at: float = 0.0
    logs: dict[str, str] = field(default_factory=dict)
    reused: bool = False      # set by up() when it found them running; not stored

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("reused")
        d["mlflow_uri"] = self.mlflow_url  # the name jobs.report falls back to
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


def _write_record(home: Path, services: Services) -> None:
    path = record_path(home)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(services.to_json())
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One `up`/`down` at a time per state folder (two `submit`s at once start one service set)."""
    import fcntl

    fd = os.open(Path(home) / "services.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ------------------------------------------------------------------------------------ processes

def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) from /proc, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[2])


def pid_alive(pid: int | None) -> bool:
    """Alive and not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in "ZX"


def _all_pids() -> list[int]:
    try:
        return [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []


def service_pids(services: Services) -> set[int]:
    """Every live process of this service set: those carrying our MNISTJOBS_SERVICE_ID (the Ray
    and MLflow servers, Ray's workers and job drivers) and their descendants (Ray's agents)."""
    marker = f"{SERVICE_ID_VAR}={services.service_id}".encode()
    me = {os.getpid(), os.getppid()}
    found: set[int] = set()
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in "ZX":
            continue
        children.setdefault(stat[1], []).append(pid)
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in env.split(b"\0"):
            found.add(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found - me


def _terminate(pids: set[int], groups: set[int], grace: float = 8.0) -> None:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL."""
    def send(sig: int) -> None:
        for g in groups:
            with contextlib.suppress(OSError):
                os.killpg(g, sig)
        for p in pids:
            with contextlib.suppress(OSError):
                os.kill(p, sig)

    def any_alive() -> bool:
        if groups:
            for g in groups:
                with contextlib.suppress(OSError):
                    os.killpg(g, 0)
                    return True
        return any(pid_alive(p) for p in pids)

    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any_alive():
        time.sleep(0.2)
    if any_alive():
        pids = {p for p in pids if pid_alive(p)}
        send(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any_alive():
            time.sleep(0.1)


def _descendants_of(root: int, pids: set[int]) -> set[int]:
    out = {root} & pids
    grew = True
    while grew:
        grew = False
        for pid in pids - out:
            stat = _proc_stat(pid)
            if stat is not None and stat[1] in out:
                out.add(pid)
                grew = True
    return out


def _stop(services: Services, grace: float = 5.0) -> None:
    """Ray first (its job drivers mark their MLflow runs KILLED on SIGTERM, so MLflow must still
    answer), then the MLflow server."""
    if Path("/proc").is_dir():
        pids = service_pids(services)
        mlflow_tree = _descendants_of(services.mlflow_pid, pids)
        _terminate(pids - mlflow_tree, set(), grace)
        _terminate(service_pids(services), set(), grace)
    else:  # no /proc (macOS): the process groups we started
        for group in (services.ray_pgid, services.mlflow_pid):
            if group and group != os.getpgid(0):
                _terminate(set(), {group}, grace)


# ------------------------------------------------------------------------------------------ HTTP

def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def ray_answers(services: Services) -> bool:
    return http_status(f"{services.dashboard_url}/api/jobs/", services.headers) == 200


def mlflow_answers(url: str) -> bool:
    return http_status(f"{url}/health") == 200


def status(home: str | os.PathLike | None = None) -> dict[str, Any]:
    """What runs: ``{"home", "running", "ray": {...}, "mlflow": {...}}``."""
    home_path = resolve_home(home)
    rec = load_record(home_path)
    if rec is None:
        return {"home": str(home_path), "running": False, "ray": None, "mlflow": None}
    ray_ok, mlflow_ok = ray_answers(rec), mlflow_answers(rec.mlflow_url)
    return {
        "home": str(home_path), "running": ray_ok and mlflow_ok, "services": rec,
        "ray": {"running": ray_ok, "address": rec.ray_address, "dashboard_url": rec.dashboard_url},
        "mlflow": {"running": mlflow_ok, "url": rec.mlflow_url, "pid": rec.mlflow_pid},
    }


def tracking_uri_for(home: str | os.PathLike | None = None) -> str | None:
    """The embedded MLflow server's URL recorded for the state folder ``home`` (None if none)."""
    rec = load_record(home)
    return rec.mlflow_url if rec is not None else None


def running(home: str | os.PathLike | None = None) -> Services | None:
    """The recorded services if both answer now, else None."""
    rec = load_record(home)
    if rec is not None and ray_answers(rec) and mlflow_answers(rec.mlflow_url):
        return rec
    return None


# ------------------------------------------------------------------------------------ up / down

def _tail(path: Path | str, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no output)"
    return "\n".join(lines[-n:])


def _choose_port(name: str, explicit: int | None, env_var: str, default: int, host: str) -> int:
    port = explicit if explicit is not None else _env_port(env_var)
    port = default if port is None else port
    if port == 0:
        return free_port()
    if not 0 < port < 65536:
        what, option = PORT_OPTIONS[name]
        raise ServiceError(f"{port} is not a port number for {what}; set {option} to 1-65535 (or 0).")
    if not port_is_free(port, host):
        what, option = PORT_OPTIONS[name]
        raise PortInUseError(port, what, option)
    return port


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
    home_path = ensure_home(home)
    with _locked(home_path):
        rec = load_record(home_path)
        if rec is not None:
            if ray_answers(rec) and mlflow_answers(rec.mlflow_url):
                rec.reused = True
                return rec
            log("The recorded services do not answer any more; stopping what is left of them.")
            _stop(rec)
            record_path(home_path).unlink(missing_ok=True)

        settings = load_mlflow_settings(mlflow_settings)
        host = host or settings.get("host") or DEFAULT_HOST
        ports = {
            "ray": _choose_port("ray", ray_port, "MNISTJOBS_RAY_PORT", DEFAULT_RAY_PORT, host),
            "dashboard": _choose_port("dashboard", dashboard_port, "MNISTJOBS_DASHBOARD_PORT",
                                      DEFAULT_DASHBOARD_PORT, host),
            "mlflow": _choose_port("mlflow", mlflow_port, "MNISTJOBS_MLFLOW_PORT",
                                   int(settings.get("port") or DEFAULT_MLFLOW_PORT), host),
        }
        if len(set(ports.values())) < 3:
            raise ServiceError(f"The three service ports must differ: {ports}")
        # Ray's other fixed-default ports would collide with another Ray on this machine.
        client_port, agent_port = free_port(), free_port()

        token = ensure_token(home_path)
        service_id = secrets.token_hex(8)
        temp_dir = ray_temp_dir(home_path)
        temp_dir.mkdir(mode=0o700, exist_ok=True)
        logs_dir = home_path / "logs"
        logs_dir.mkdir(mode=0o700, exist_ok=True)
        for d in _local_store_dirs(home_path, settings):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

        env = dict(os.environ)
        for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"):
            env.pop(var, None)
        env.update(ray_auth_env(home_path))
        env[SERVICE_ID_VAR] = service_id
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

        # MLflow first: it takes longest, and starts while Ray does.
        mlflow_log = logs_dir / "mlflow.log"
        cmd = mlflow_server_command(home_path, settings, host=host, port=ports["mlflow"])
        log(f"Starting MLflow: {shlex.join(cmd)}")
        with open(mlflow_log, "ab") as out:
            mlflow_proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           env=env, cwd=home_path, start_new_session=True)

        ray_cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head",
                   "--node-ip-address", "127.0.0.1" if host == DEFAULT_HOST else url_host,
                   "--port", str(ports["ray"]), "--dashboard-host", host,
                   "--dashboard-port", str(ports["dashboard"]), "--ray-client-server-port", str(client_port),
                   "--dashboard-agent-listen-port", str(agent_port), "--temp-dir", str(temp_dir),
                   "--object-store-memory", str(OBJECT_STORE_MEMORY), "--disable-usage-stats",
                   "--num-cpus", str(num_cpus if num_cpus is not None else (os.cpu_count() or 1))]
        if not Path(ray_cmd[0]).exists():
            ray_cmd[0:1] = [sys.executable, "-m", "ray.scripts.scripts"]
        if num_gpus is not None:
            ray_cmd += ["--num-gpus", str(num_gpus)]
        ray_log = logs_dir / "ray-start.log"
        log(f"Starting Ray: {shlex.join(ray_cmd)}")
        with open(ray_log, "ab") as out:
            ray_proc = subprocess.Popen(ray_cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, cwd=home_path, start_new_session=True)
        services = Services(
            home=str(home_path), service_id=service_id, host=host, temp_dir=str(temp_dir),
            token_path=str(token), ray_pgid=ray_proc.pid, ray_address="", ray_port=ports["ray"],
            dashboard_port=ports["dashboard"], dashboard_url=f"http://{url_host}:{ports['dashboard']}",
            mlflow_pid=mlflow_proc.pid, mlflow_port=ports["mlflow"],
            mlflow_url=f"http://{url_host}:{ports['mlflow']}", ray_client_port=client_port,
            num_cpus=num_cpus, num_gpus=num_gpus, started_at=time.time(),
            logs={"mlflow": str(mlflow_log), "ray": str(ray_log), "ray_session": str(temp_dir / "session_latest" / "logs")})
        try:
            deadline = time.monotonic() + timeout
            rc = ray_proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                raise ServiceError(f"`ray start` failed (exit code {rc}); its output ({ray_log}):\n{_tail(ray_log)}")
            ray_ok = mlflow_ok = False
            while time.monotonic() < deadline and not (ray_ok and mlflow_ok):
                ray_ok = ray_ok or ray_answers(services)
                mlflow_ok = mlflow_ok or mlflow_answers(services.mlflow_url)
                if mlflow_proc.poll() is not None:
                    raise ServiceError(f"The MLflow server exited (code {mlflow_proc.returncode}); "
                                       f"its output ({mlflow_log}):\n{_tail(mlflow_log)}")
                if not (ray_ok and mlflow_ok):
                    time.sleep(0.3)
            if not ray_ok:
                raise ServiceError(f"The Ray dashboard did not answer at {services.dashboard_url} within "
                                   f"{timeout:.0f} s; see {services.logs['ray_session']}")
            if not mlflow_ok:
                raise ServiceError(f"The MLflow server did not answer at {services.mlflow_url} within "
                                   f"{timeout:.0f} s; its output ({mlflow_log}):\n{_tail(mlflow_log)}")
            try:
                services.ray_address = (temp_dir / "ray_current_cluster").read_text().strip()
            except OSError:
                services.ray_address = f"{url_host}:{ports['ray']}"
        except BaseException:
            _stop(services, grace=3.0)
            raise
        _write_record(home_path, services)
        return services


def down(home: str | os.PathLike | None = None, grace: float = 5.0) -> Services | None:
    """Stop the recorded services (and the Ray workers and job drivers they started); forget them.
    Returns what was stopped, or None when nothing was recorded."""
    home_path = resolve_home(home)
    if not home_path.is_dir():
        return None
    with _locked(home_path):
        rec = load_record(home_path)
        if rec is None:
            return None
        _stop(rec, grace=grace)
        record_path(home_path).unlink(missing_ok=True)
        return rec


# ------------------------------------------------------------------------- talking to a cluster

class UnreachableError(ServiceError):
    """A given address (Ray dashboard, MLflow) does not answer (a usage error: exit code 2)."""


@dataclass
class Cluster:
    """Where the CLI sends jobs: the dashboard (job API) with its auth headers, and MLflow."""

    dashboard_url: str
    headers: dict[str, str]
    tracking_uri: str | None
    embedded: bool
    services: Services | None = None


def remote_token() -> str | None:
    """The token for a cluster given by address: $RAY_AUTH_TOKEN, the file named by
    $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (Ray's own lookup order)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            with contextlib.suppress(OSError):
                return Path(path).read_text().strip() or None
    return None


def dashboard_url_of(address: str) -> str:
    """``host:port`` or ``http(s)://host:port`` -> the dashboard's base URL."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise UnreachableError(
            f"--address {address}: give the Ray dashboard's HTTP address (http://HOST:8265), as for "
            f"`ray job submit`; ray:// client addresses are not used for jobs.")
    return address if "://" in address else f"http://{address}"


def connect(address: str | None, tracking_uri: str | None, home: str | os.PathLike | None, *,
            start: bool, log: Callable[[str], None] | None = None, **up_options: Any) -> Cluster:
    """The cluster to use: ``address`` (with MLflow at ``tracking_uri``), else the embedded
    services of ``home``, started when ``start`` (else they must be running)."""
    if address:
        url = dashboard_url_of(address)
        rec = load_record(home)
        if rec is not None and rec.dashboard_url.rstrip("/") == url:  # our own embedded head
            return Cluster(url, rec.headers, tracking_uri or rec.mlflow_url, embedded=True, services=rec)
        if http_status(f"{url}/api/gcs_healthz") is None:
            raise UnreachableError(f"Nothing answers at the Ray address {url} (--address / RAY_ADDRESS). "
                                   f"Check the address and that the cluster is up, or leave --address "
                                   f"unset to use the embedded local Ray.")
        return Cluster(url, auth_headers(remote_token()), tracking_uri, embedded=False)
    if start:
        rec = up(home, log=log, **up_options)
    else:
        rec = running(home)
        if rec is None:
            raise UnreachableError(
                f"The embedded Ray and MLflow of the state folder {resolve_home(home)} are not running, so "
                f"there are no jobs to see. Start them with `mnistjobs up` (or `mnistjobs submit`), "
                f"or give --address (RAY_ADDRESS) of another Ray cluster.")
    return Cluster(rec.dashboard_url, rec.headers, tracking_uri or rec.mlflow_url, embedded=True, services=rec)


def check_tracking_uri(uri: str) -> None:
    """Raise UnreachableError when an http(s) tracking URI does not answer."""
    if uri.startswith(("http://", "https://")) and http_status(f"{uri.rstrip('/')}/health", timeout=5) is None:
        raise UnreachableError(f"Nothing answers at the MLflow tracking URI {uri} (--tracking-uri / "
                               f"MLFLOW_TRACKING_URI). Check it, or leave it unset to use the embedded server.")


def job_client(cluster: Cluster):
    """A ray.job_submission.JobSubmissionClient for the cluster, with its token."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(cluster.dashboard_url, headers=dict(cluster.headers))
    except (ConnectionError, RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())
        raise UnreachableError(f"Cannot use the Ray job API at {cluster.dashboard_url}: {detail}") from None


# --------------------------------------------------------------------------- foreground launcher

def _serve_mlflow(argv: list[str]) -> int:
    """``python -m jobs.services mlflow-server [--home H] [--config mlflow/server.yaml] [--host]
    [--port]``: run the tracking server in the foreground (what a cluster head runs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jobs.services mlflow-server",
                                     description=_serve_mlflow.__doc__)
    parser.add_argument("--home", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    home = ensure_home(args.home)
    settings = load_mlflow_settings(args.config)
    for d in _local_store_dirs(home, settings):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = mlflow_server_command(home, settings, host=args.host or settings["host"],
                                port=args.port or int(settings["port"]))
    print(shlex.join(cmd), flush=True)
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) > 1 and sys.argv[1] == "mlflow-server":
        sys.exit(_serve_mlflow(sys.argv[2:]))
    print("usage: python -m jobs.services mlflow-server [--home H] [--config F] [--host H] [--port P]")
    sys.exit(2)
