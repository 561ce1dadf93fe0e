"""The Ray job client under the CLI: submit a sweep as a Ray job, follow, wait for, cancel and
resume it, read its trials from MLflow. Functions return data; `jobs.cli` prints it (as
`ray job` does over ``JobSubmissionClient``).

A job, as this module queues it (``build_submission``)::

    entrypoint  python -m jobs.sweep --job-id ID --ray-job-id RID --experiment-id EID [--resume]
    env_vars    MNISTJOBS_SPEC (the sweep spec as JSON: its one copy in the job),
                MLFLOW_TRACKING_URI, PYTHONUNBUFFERED=1, and MNISTJOBS_HOME on the embedded cluster
    metadata    mnistjobs.job_id, .summary, .experiment, .experiment_id, .tracking_uri
                (and mnistjobs.resume_of for a resume)

The MLflow experiment is created here, at submit time (``submit``), and the driver is handed its
id. ``resume`` reads the spec back from the old job's runtime_env.

Imports neither torch nor click at module level; Ray and MLflow are imported when used.
"""
from __future__ import annotations

import asyncio
import secrets
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

    from jobs.cluster import Cluster
    from jobs.spec import SweepSpec

TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
SPEC_VAR = "MNISTJOBS_SPEC"
META_JOB_ID = "mnistjobs.job_id"
META_SUMMARY = "mnistjobs.summary"
META_EXPERIMENT = "mnistjobs.experiment"
META_EXPERIMENT_ID = "mnistjobs.experiment_id"
META_TRACKING_URI = "mnistjobs.tracking_uri"
META_RESUME_OF = "mnistjobs.resume_of"
CANCEL_TIMEOUT_S = 60.0


class JobUsageError(ValueError):
    """A job that cannot be used as asked (unknown id, still running, not ours): exit code 2."""


class JobClientError(RuntimeError):
    """The job API failed for another reason: exit code 1."""


# ----------------------------------------------------------------------------------- reading

def job_info(client: "JobSubmissionClient", cluster: "Cluster", job_id: str) -> "JobDetails":
    """The Ray job's info; an unknown id is a JobUsageError."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        text = str(exc).lower()
        if "404" in text or "does not exist" in text or "not found" in text:
            raise JobUsageError(f"No job {job_id!r} on the Ray cluster at {cluster.dashboard_url}. "
                                f"`mnistjobs list` shows the jobs there.") from None
        raise JobClientError(f"Cannot read job {job_id}: {exc}") from None


def status_of(info: "JobDetails") -> str:
    """The job's state as a string: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(getattr(info.status, "value", info.status))


def has_ended(info: "JobDetails") -> bool:
    return status_of(info) in TERMINAL_JOB_STATES


def list_jobs(client: "JobSubmissionClient") -> list["JobDetails"]:
    """Every job on the cluster, oldest first."""
    return sorted(client.list_jobs(), key=lambda j: j.start_time or 0)


def sweep_text(info: "JobDetails") -> str:
    """What the job runs, in a few words: the spec's summary (or the entrypoint's start)."""
    meta = info.metadata or {}
    what = meta.get(META_SUMMARY) or (info.entrypoint or "")[:60]
    if meta.get(META_RESUME_OF):
        what = f"resume of {meta[META_RESUME_OF]}: {what}"
    return what


def tracking_uri_of(cluster: "Cluster", info: "JobDetails") -> str | None:
    """Where the job's runs are: the cluster's tracking URI, else the one the job was given."""
    return cluster.tracking_uri or (info.metadata or {}).get(META_TRACKING_URI)


def job_links(cluster: "Cluster", info: "JobDetails") -> dict[str, str | None]:
    """The job's page on the Ray dashboard and its experiment's page in MLflow (None if unknown)."""
    from jobs import tracking

    meta = info.metadata or {}
    uri = tracking_uri_of(cluster, info)
    mlflow = (tracking.experiment_url(uri, meta[META_EXPERIMENT_ID])
              if uri and meta.get(META_EXPERIMENT_ID) else None)
    return {"dashboard": f"{cluster.dashboard_url}/#/jobs/{info.submission_id}", "mlflow": mlflow}


def trials(cluster: "Cluster", info: "JobDetails") -> tuple[list[dict[str, Any]] | None, str | None]:
    """The job's trial rows from MLflow (``jobs.tracking.trial_rows``) and, when they cannot be
    read, why: ``(rows, None)``, ``(None, reason)``, or ``(None, None)`` with no tracking URI."""
    from jobs import tracking

    uri = tracking_uri_of(cluster, info)
    if not uri:
        return None, None
    try:
        return tracking.trial_rows(tracking.client(uri), logical_id(info)), None
    except Exception as exc:  # noqa: BLE001 - the table is informative only
        return None, f"MLflow at {uri} could not be read: {type(exc).__name__}"


def logical_id(info: "JobDetails") -> str:
    """The mnistjobs job id (shared by a job and its resumes; its MLflow runs carry it)."""
    return (info.metadata or {}).get(META_JOB_ID, info.submission_id)


# -------------------------------------------------------------------------------- submitting

def new_job_id() -> str:
    return f"mj-{secrets.token_hex(4)}"


def build_submission(cluster: "Cluster", spec: "SweepSpec", job_id: str, experiment_id: str, *,
                     ray_job_id: str | None = None, resume_of: str | None = None) -> dict[str, Any]:
    """The keywords of ``JobSubmissionClient.submit_job`` for the sweep driver of ``spec``."""
    ray_job_id = ray_job_id or job_id
    python = sys.executable if cluster.embedded else "python"
    entrypoint = (f"{shlex.quote(python)} -m jobs.sweep --job-id {shlex.quote(job_id)} "
                  f"--ray-job-id {shlex.quote(ray_job_id)} --experiment-id {shlex.quote(str(experiment_id))}"
                  + (" --resume" if resume_of else ""))
    env = {"MLFLOW_TRACKING_URI": cluster.tracking_uri, "PYTHONUNBUFFERED": "1", SPEC_VAR: spec.to_json()}
    if cluster.embedded and cluster.services is not None:
        env["MNISTJOBS_HOME"] = str(cluster.services.home)
    metadata = {META_JOB_ID: job_id, META_SUMMARY: spec.summary(), META_EXPERIMENT: spec.experiment,
                META_EXPERIMENT_ID: str(experiment_id), META_TRACKING_URI: cluster.tracking_uri}
    if resume_of:
        metadata[META_RESUME_OF] = resume_of
    return {"entrypoint": entrypoint, "submission_id": ray_job_id, "runtime_env": {"env_vars": env},
            "metadata": metadata}


def submit(client: "JobSubmissionClient", cluster: "Cluster", spec: "SweepSpec", job_id: str, *,
           ray_job_id: str | None = None, resume_of: str | None = None) -> str:
    """Create (or find) the spec's MLflow experiment and queue the sweep driver as a Ray job;
    return the Ray submission id."""
    from jobs import tracking

    experiment_id = tracking.get_or_create_experiment(tracking.client(cluster.tracking_uri), spec.experiment)
    return client.submit_job(**build_submission(cluster, spec, job_id, experiment_id,
                                                ray_job_id=ray_job_id, resume_of=resume_of))


def stored_spec(info: "JobDetails") -> "SweepSpec":
    """The spec a job was submitted with, read back from its runtime_env (checked by from_json)."""
    from jobs.spec import SpecError, SweepSpec

    env = (info.runtime_env or {}).get("env_vars") or {}
    text = env.get(SPEC_VAR)
    if not text or not (info.metadata or {}).get(META_JOB_ID):
        raise JobUsageError(f"Job {info.submission_id} was not submitted by mnistjobs (its runtime "
                            f"environment has no sweep spec).")
    try:
        return SweepSpec.from_json(text)
    except SpecError as exc:
        raise JobUsageError(f"Job {info.submission_id}'s stored spec is unusable: {exc}") from None


def resume(client: "JobSubmissionClient", cluster: "Cluster", job_id: str) -> tuple[str, "SweepSpec"]:
    """Queue the rest of an ended job as a new Ray job ``<job id>-rN``; return its id and spec."""
    info = job_info(client, cluster, job_id)
    if not has_ended(info):
        raise JobUsageError(f"Job {job_id} is {status_of(info)}; resume it after it ends "
                            f"(or `mnistjobs cancel {job_id}`).")
    spec = stored_spec(info)
    logical = logical_id(info)
    if not cluster.tracking_uri:
        cluster.tracking_uri = (info.metadata or {}).get(META_TRACKING_URI)
    taken = {j.submission_id for j in client.list_jobs()}
    n = 1
    while f"{logical}-r{n}" in taken:
        n += 1
    ray_job_id = submit(client, cluster, spec, logical, ray_job_id=f"{logical}-r{n}", resume_of=job_id)
    return ray_job_id, spec


# ---------------------------------------------------------------------------------- following

def _tail(client: "JobSubmissionClient", job_id: str) -> Iterator[str]:
    """``client.tail_job_logs`` (an async generator over a websocket) as a plain iterator."""
    loop = asyncio.new_event_loop()
    chunks = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                yield loop.run_until_complete(chunks.__anext__())
            except StopAsyncIteration:
                return
    finally:
        try:
            loop.run_until_complete(chunks.aclose())
        except (RuntimeError, asyncio.CancelledError):
            pass  # interrupted mid-read (Ctrl-C): the read is abandoned with its connection
        finally:
            loop.close()


def follow_log(client: "JobSubmissionClient", job_id: str, *, reconnects: int = 3,
               pause: float = 1.0) -> Iterator[str]:
    """The job's log from its start, yielded as it grows, until the job ends.

    The log streams over the job API's websocket (``tail_job_logs``, which replays the log from
    its start and closes once the job has ended). A stream that breaks is reopened, skipping what
    was yielded already; at the end, whatever the stream did not carry (a job that ended before
    its driver started, a last line without a newline) comes from one ``get_job_logs``.
    """
    shown = 0
    for attempt in range(reconnects + 1):
        seen = 0
        try:
            for chunk in _tail(client, job_id):
                new = chunk[max(0, shown - seen):]
                seen += len(chunk)
                if new:
                    shown += len(new)
                    yield new
            break
        except RuntimeError:  # the websocket closed before the job ended
            if attempt == reconnects:
                break
            time.sleep(pause)
    try:
        while not has_ended(client.get_job_info(job_id)):  # only after a stream that kept breaking
            time.sleep(pause)
    except RuntimeError as exc:
        raise JobClientError(f"Cannot read job {job_id}: {exc}") from None
    try:
        text = client.get_job_logs(job_id)
    except RuntimeError:
        text = ""
    if len(text) > shown:
        yield text[shown:]


# ---------------------------------------------------------------------------------- stopping

def cancel(client: "JobSubmissionClient", cluster: "Cluster", job_id: str, *,
           timeout: float = CANCEL_TIMEOUT_S) -> dict[str, Any]:
    """Stop a job (if it still runs), wait up to ``timeout`` s for it to end, and mark its MLflow
    runs that are still RUNNING as KILLED. Returns ``{"before": state, "after": state,
    "killed_runs": n}``."""
    from jobs import tracking

    info = job_info(client, cluster, job_id)
    before = status_of(info)
    if not has_ended(info):
        client.stop_job(job_id)
        deadline = time.monotonic() + timeout
        while not has_ended(info) and time.monotonic() < deadline:
            time.sleep(0.5)
            info = job_info(client, cluster, job_id)
    meta = info.metadata or {}
    uri = tracking_uri_of(cluster, info)
    killed = 0
    if uri:
        exp_ids = [meta[META_EXPERIMENT_ID]] if meta.get(META_EXPERIMENT_ID) else None
        killed = tracking.end_job_runs(tracking.client(uri), logical_id(info), "KILLED", experiment_ids=exp_ids)
    return {"before": before, "after": status_of(info), "killed_runs": killed}
