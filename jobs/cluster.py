"""Talking to a cluster: the embedded one of a state folder or one given by address.

``connect()`` answers "where do jobs go": the Ray dashboard's job API (with the auth headers it
asks for) and the MLflow tracking URI. With an address, that cluster (it must answer); without,
the embedded services of the state folder (``jobs.services``), started when asked to.

The HTTP checks live here too: ``http_status`` (one GET) and ``mlflow_answers`` (THE MLflow
health check, ``GET <uri>/health == 200``).
"""
from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # jobs.services imports this module; connect() imports it back when it runs
    from jobs.services import Services


class UnreachableError(RuntimeError):
    """A given address (Ray dashboard, MLflow) does not answer (a usage error: exit code 2)."""


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


def mlflow_answers(uri: str, timeout: float = 3.0) -> bool:
    """Whether the MLflow tracking server at ``uri`` is up: ``GET <uri>/health`` answers 200."""
    return http_status(f"{uri.rstrip('/')}/health", timeout=timeout) == 200


def check_tracking_uri(uri: str) -> None:
    """Raise UnreachableError when an http(s) tracking URI does not answer."""
    if uri.startswith(("http://", "https://")) and not mlflow_answers(uri, timeout=5.0):
        raise UnreachableError(f"Nothing answers at the MLflow tracking URI {uri} (--tracking-uri / "
                               f"MLFLOW_TRACKING_URI). Check it, or leave it unset to use the embedded server.")


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers for the Ray dashboard / job API: ``Authorization: Bearer <token>``."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def ray_answers(dashboard_url: str, headers: dict[str, str]) -> bool:
    """Whether the Ray dashboard's job API answers (with these credentials)."""
    return http_status(f"{dashboard_url}/api/jobs/", headers) == 200


# --------------------------------------------------------------------------------------- clusters

@dataclass
class Cluster:
    """Where the CLI sends jobs: the dashboard (job API) with its auth headers, and MLflow."""

    dashboard_url: str
    headers: dict[str, str]
    tracking_uri: str | None
    embedded: bool
    services: "Services | None" = None


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
    from jobs import services  # it imports this module's HTTP checks
    from jobs.state import resolve_home

    if address:
        url = dashboard_url_of(address)
        rec = services.load_record(home)
        if rec is not None and rec.dashboard_url.rstrip("/") == url:  # our own embedded head
            return _embedded(rec, tracking_uri)
        if http_status(f"{url}/api/gcs_healthz") is None:
            raise UnreachableError(f"Nothing answers at the Ray address {url} (--address / RAY_ADDRESS). "
                                   f"Check the address and that the cluster is up, or leave --address "
                                   f"unset to use the embedded local Ray.")
        return Cluster(url, auth_headers(remote_token()), tracking_uri, embedded=False)
    if start:
        rec = services.up(home, log=log, **up_options)
    else:
        rec = services.running(home)
        if rec is None:
            raise UnreachableError(
                f"The embedded Ray and MLflow of the state folder {resolve_home(home)} are not running, so "
                f"there are no jobs to see. Start them with `mnistjobs up` (or `mnistjobs submit`), "
                f"or give --address (RAY_ADDRESS) of another Ray cluster.")
    return _embedded(rec, tracking_uri)


def _embedded(rec: "Services", tracking_uri: str | None) -> Cluster:
    """The Cluster of the embedded services ``rec``; this process's MLflow credentials are set
    for its tracking URI (jobs.record.use_mlflow_credentials: the embedded server's login, or,
    for another --tracking-uri, the user's own)."""
    from jobs.record import use_mlflow_credentials

    uri = tracking_uri or rec.mlflow_url
    use_mlflow_credentials(uri, rec.home)
    return Cluster(rec.dashboard_url, rec.headers, uri, embedded=True, services=rec)


def job_client(cluster: Cluster):
    """A ray.job_submission.JobSubmissionClient for the cluster, with its token."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(cluster.dashboard_url, headers=dict(cluster.headers))
    except (ConnectionError, RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())
        raise UnreachableError(f"Cannot use the Ray job API at {cluster.dashboard_url}: {detail}") from None


def job_reader(cluster: Cluster):
    """The job API for the commands that answer at once (`list`, `status`, `logs`, `cancel`,
    `queue`): jobs.rest.RayJobs, plain HTTP with the cluster's token, no Ray import."""
    from jobs.rest import RayJobs

    return RayJobs(cluster.dashboard_url, cluster.headers)
