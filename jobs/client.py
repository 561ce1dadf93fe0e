"""The job client under the CLI: queue a sweep, follow, wait for, cancel, reprioritise and
resume it, read its trials from MLflow. Functions return data; `jobs.cli` prints it (as
`ray job` does over ``JobSubmissionClient``).

``submit`` puts the job into the cluster's queue (``jobs.queue``: its parent run in MLflow,
SCHEDULED); the queue's admitter, on the cluster, starts it as a Ray job when its turn comes::

    entrypoint  python -m jobs.sweep --job-id ID --ray-job-id RID --experiment-id EID [--resume]
    env_vars    MNISTJOBS_SPEC (the sweep spec as JSON: its one copy in the job),
                MLFLOW_TRACKING_URI, PYTHONUNBUFFERED=1, and MNISTJOBS_HOME on the embedded cluster
    metadata    mnistjobs.job_id, .summary, .experiment, .experiment_id, .tracking_uri
                (and mnistjobs.resume_of for a resume)

The first Ray job of a job has the job's id (``mj-1a2b3c4d``); a resume, or a start again
after the Ray head was replaced, is ``<job id>-rN``. A job is found by either (``find_job``):
Ray knows it once it started, the queue's store (MLflow) from its submission on. The MLflow
experiment is created here, at submit time, and the driver is handed its id.

Imports neither torch nor click at module level; Ray and MLflow are imported when used.
"""
from __future__ import annotations

import asyncio
import re
import secrets
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

from jobs.contract import DONE_LINE, TAG_NEXT_RAY_JOB, TAG_RAY_JOB

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
        if is_not_found(exc):
            raise JobUsageError(f"No job {job_id!r} on the Ray cluster at {cluster.dashboard_url}. "
                                f"`mnistjobs list` shows the jobs there.") from None
        raise JobClientError(f"Cannot read job {job_id}: {exc}") from None


def is_not_found(exc: Exception) -> bool:
    """Whether the job API's error says the job does not exist (its 404)."""
    text = str(exc).lower()
    return "404" in text or "does not exist" in text or "not found" in text


def status_of(info: "JobDetails") -> str:
    """The job's state as a string: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(getattr(info.status, "value", info.status))


def has_ended(info: "JobDetails") -> bool:
    return status_of(info) in TERMINAL_JOB_STATES


def list_jobs(client: "JobSubmissionClient") -> list["JobDetails"]:
    """Every job on the cluster, oldest first (not the short jobs that start the queue's admitter)."""
    from jobs.queue import META_ROLE, ROLE_QUEUE

    return sorted((j for j in client.list_jobs() if (j.metadata or {}).get(META_ROLE) != ROLE_QUEUE),
                  key=lambda j: j.start_time or 0)


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


def trials(cluster: "Cluster", info: "JobDetails", *, lite: bool = False) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The job's trial rows from MLflow (``jobs.tracking.trial_rows``) and, when they cannot be
    read, why: ``(rows, None)``, ``(None, reason)``, or ``(None, None)`` with no tracking URI.
    ``lite``: read them over plain HTTP (jobs.rest), not with MLflow's client."""
    from jobs import rest, tracking

    uri = tracking_uri_of(cluster, info)
    if not uri:
        return None, None
    try:
        mlf = rest.mlflow_reader(uri) if lite else tracking.client(uri)
        return rest.trial_rows(mlf, logical_id(info)), None
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
    return build_submission_from(cluster, spec.to_json(), spec.summary(), spec.experiment, job_id, experiment_id,
                                 ray_job_id=ray_job_id, resume_of=resume_of)


def build_submission_from(cluster: "Cluster", spec_json: str, summary: str, experiment: str, job_id: str,
                          experiment_id: str, *, ray_job_id: str | None = None, resume_of: str | None = None,
                          home: str | None = None) -> dict[str, Any]:
    """``build_submission`` from the spec's JSON text (what the queue's admitter has: the parent
    run's ``spec.json``; it needs no SweepSpec, so no torch). ``home``: the embedded state folder
    (default: the cluster's services')."""
    ray_job_id = ray_job_id or job_id
    python = sys.executable if cluster.embedded else "python"
    entrypoint = (f"{shlex.quote(python)} -m jobs.sweep --job-id {shlex.quote(job_id)} "
                  f"--ray-job-id {shlex.quote(ray_job_id)} --experiment-id {shlex.quote(str(experiment_id))}"
                  + (" --resume" if resume_of else ""))
    env = {"MLFLOW_TRACKING_URI": cluster.tracking_uri, "PYTHONUNBUFFERED": "1", SPEC_VAR: spec_json}
    if home is None and cluster.embedded and cluster.services is not None:
        home = str(cluster.services.home)
    if cluster.embedded and home:
        env["MNISTJOBS_HOME"] = str(home)
    metadata = {META_JOB_ID: job_id, META_SUMMARY: summary, META_EXPERIMENT: experiment,
                META_EXPERIMENT_ID: str(experiment_id), META_TRACKING_URI: cluster.tracking_uri}
    if resume_of:
        metadata[META_RESUME_OF] = resume_of
    return {"entrypoint": entrypoint, "submission_id": ray_job_id, "runtime_env": {"env_vars": env},
            "metadata": metadata}


def _mlflow(client: "JobSubmissionClient", cluster: "Cluster"):
    """The MLflow client of the cluster's queue (the cluster's tracking URI, else the one its
    queue was started with); a JobUsageError when none is known. With the plain-HTTP job client
    of the fast commands (jobs.rest.RayJobs), MLflow's REST API over plain HTTP too."""
    from jobs import queue, rest, tracking

    if not cluster.tracking_uri:
        cluster.tracking_uri = queue.queue_tracking_uri(client)
    if not cluster.tracking_uri:
        raise JobUsageError("No MLflow tracking URI is known for this cluster's queue: give --tracking-uri "
                            "(MLFLOW_TRACKING_URI).")
    if rest.is_lite(client):
        return rest.mlflow_reader(cluster.tracking_uri)
    return tracking.client(cluster.tracking_uri)


def submit(client: "JobSubmissionClient", cluster: "Cluster", spec: "SweepSpec", job_id: str) -> dict[str, Any]:
    """Put the sweep into the cluster's queue: create (or find) its MLflow experiment, its parent
    run SCHEDULED (``jobs.queue.enqueue``), and make sure the queue's admitter runs. Returns
    ``{"job_id", "place", "length"}`` (its place in the queue, 1 = next)."""
    from jobs import queue, tracking

    mlf = tracking.client(cluster.tracking_uri)
    queue.ensure(client, cluster)
    experiment_id = tracking.get_or_create_experiment(mlf, spec.experiment)
    queue.enqueue(mlf, spec, job_id, experiment_id, priority=int(getattr(spec, "priority", 0) or 0))
    wake_admitter(cluster)
    where = queue.place_of(mlf, job_id) or (None, None)
    return {"job_id": job_id, "place": where[0], "length": where[1]}


def wake_admitter(cluster: "Cluster") -> None:
    """On the embedded cluster, wake the queue's admitter so that it looks at the queue now, not at
    its next poll (jobs.queue.wake; a client elsewhere cannot, and the job waits for that poll)."""
    from jobs import queue

    services = getattr(cluster, "services", None)
    if cluster.embedded and services is not None:
        queue.wake(services.home)


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
    """Queue the rest of an ended job again, to run as a new Ray job ``<job id>-rN`` with
    ``--resume``; return that id and the spec."""
    from jobs import queue

    view = find_job(client, cluster, job_id)
    if view.state in ("QUEUED", "RUNNING", "PENDING"):
        raise JobUsageError(f"Job {job_id} is {view.state}; resume it after it ends "
                            f"(or `mnistjobs cancel {job_id}`).")
    spec = stored_spec(view.info) if view.info is not None else None
    if view.run is None:
        raise JobUsageError(f"Job {job_id} has no sweep run in MLflow at {cluster.tracking_uri}, so the queue "
                            f"cannot take it again.")
    if spec is None:
        spec = _spec_of_run(view.mlf, view.run)
    logical = view.job_id
    taken = {j.submission_id for j in client.list_jobs()}
    last = view.run.data.tags.get(TAG_RAY_JOB, "")
    n = int(last.rsplit("-r", 1)[1]) if last.startswith(f"{logical}-r") and last.rsplit("-r", 1)[1].isdigit() else 0
    n += 1
    while f"{logical}-r{n}" in taken:
        n += 1
    queue.ensure(client, cluster)
    if view.run.info.status in ("RUNNING", "SCHEDULED"):
        # Its Ray job ended but its runs are still open (a killed driver): close them as the
        # admitter would, then give an admitter's look already under way time to finish, so
        # that its closing cannot land after the requeue below.
        from jobs import tracking

        tracking.end_job_runs(view.mlf, logical, "FAILED", role="trial")
        view.mlf.set_tag(view.run.info.run_id, queue.TAG_QUEUE_STATE, queue.ENDED)
        view.mlf.set_terminated(view.run.info.run_id, "FAILED")
        time.sleep(3 * queue.POLL_S)
        view.run = view.mlf.get_run(view.run.info.run_id)
    queue.requeue(view.mlf, view.run, f"{logical}-r{n}")
    wake_admitter(cluster)
    return f"{logical}-r{n}", spec


def _spec_of_run(mlf, run) -> "SweepSpec":
    import json
    import tempfile
    from pathlib import Path

    from jobs.contract import SPEC_ARTIFACT
    from jobs.spec import SpecError, SweepSpec

    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(mlf.download_artifacts(run.info.run_id, SPEC_ARTIFACT, tmp)).read_text()
        return SweepSpec.from_mapping(json.loads(text))
    except (OSError, ValueError, SpecError) as exc:
        raise JobUsageError(f"The stored spec of {run.info.run_name} is unusable: {exc}") from None


class JobView:
    """What is known of a job: its Ray job (``info``, None while queued or after its head was
    replaced), its parent run in MLflow (``run``), its queue entry (``entry``: queued or
    admitted), and the state a user sees (``state``)."""

    def __init__(self, job_id: str, info, run, entry, mlf) -> None:
        self.job_id, self.info, self.run, self.entry, self.mlf = job_id, info, run, entry, mlf

    @property
    def state(self) -> str:
        from jobs import queue

        if self.entry is not None and self.entry.queued:
            return "QUEUED"
        if self.info is not None:
            ray_state = status_of(self.info)
            if ray_state == "RUNNING" and self.closed_finished():
                return "SUCCEEDED"  # the driver closed the job and is exiting (what `--wait` returns on)
            return ray_state
        if self.run is not None:
            return queue.user_state(self.run)
        return "UNKNOWN"

    def closed_finished(self) -> bool:
        """Whether this Ray job's driver closed the parent run FINISHED (the job's last act)."""
        from jobs import queue

        run = self.run
        return (run is not None and self.info is not None and run.info.status == "FINISHED"
                and run.data.tags.get(queue.TAG_QUEUE_STATE) == queue.ENDED
                and run.data.tags.get(TAG_RAY_JOB) == self.info.submission_id)

    @property
    def ray_job_id(self) -> str | None:
        if self.info is not None:
            return self.info.submission_id
        if self.run is not None:
            return self.run.data.tags.get(TAG_RAY_JOB) or self.run.data.tags.get(TAG_NEXT_RAY_JOB)
        return None


def find_job(client: "JobSubmissionClient", cluster: "Cluster", job_id: str) -> JobView:
    """The job ``job_id`` (an mnistjobs job id or a Ray submission id like ``mj-1-r1``): from Ray
    and from the queue's store. Unknown to both: a JobUsageError."""
    from jobs import queue

    info = None
    try:
        info = job_info(client, cluster, job_id)
    except JobUsageError:
        pass
    logical = logical_id(info) if info is not None else job_id
    run = entry = mlf = None
    try:
        mlf = _mlflow(client, cluster)
        run = queue.find(mlf, logical)
    except JobUsageError:
        if info is None:
            raise
    except Exception as exc:  # noqa: BLE001 - MLflow away: Ray's view only
        if info is None:
            raise JobClientError(f"Cannot read job {job_id}: MLflow at {cluster.tracking_uri} did not answer "
                                 f"({type(exc).__name__}).") from None
    if info is None and run is None:
        raise JobUsageError(f"No job {job_id!r} on the Ray cluster at {cluster.dashboard_url} or in its queue. "
                            f"`mnistjobs list` shows the jobs there.")
    if run is not None:
        entry = next((e for e in queue.read(mlf) if e.job_id == logical), None)
        if info is None and run.data.tags.get(TAG_RAY_JOB) and run.data.tags.get(TAG_RAY_JOB) != job_id:
            try:  # the newest attempt of the job
                info = client.get_job_info(run.data.tags[TAG_RAY_JOB])
            except RuntimeError:
                info = None
    return JobView(logical, info, run, entry, mlf)


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


#: How often a local driver log is read for new lines (follow_file).
LOCAL_TAIL_PAUSE_S = 0.1


def local_log_file(cluster: "Cluster", job_id: str):
    """Where the driver log of ``job_id`` is on this machine, on the embedded cluster only (it runs
    here): ``<Ray's session folder>/logs/job-driver-<id>.log``, the file Ray's job API serves (it
    appears when the driver starts). None for any other cluster, or a Ray that no longer names its
    job logs so (then the log comes over Ray's websocket, as for any cluster)."""
    services = getattr(cluster, "services", None)
    if not cluster.embedded or services is None or not getattr(services, "temp_dir", None):
        return None
    from pathlib import Path

    try:
        from ray.dashboard.modules.job.common import JOB_LOGS_PATH_TEMPLATE
    except ImportError:  # pragma: no cover - another Ray's layout
        return None

    return Path(services.temp_dir) / "session_latest" / "logs" / JOB_LOGS_PATH_TEMPLATE.format(submission_id=job_id)


def follow_file(path, client: "JobSubmissionClient", job_id: str, *, pause: float = LOCAL_TAIL_PAUSE_S,
                status_every: float = 1.0) -> Iterator[str]:
    """The job's log read from its file on this machine (``local_log_file``), from its start, yielded
    as it grows (looked at every ``pause`` s), until the job ends. Ray's log stream reads the same
    file but looks for new lines once a second, and its job API passes them on after up to another
    second, so a line reached a follower up to 2 s after the driver wrote it. While nothing new comes,
    the job's state is asked every ``status_every`` s; once it has ended, the rest is read: from the
    file, or where it never appeared (a job that ended before its driver started, or ran under an
    earlier session of the services) from the job API, once."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two reads
    f = None
    checked = time.monotonic()
    try:
        while True:
            if f is None and path.is_file():
                f = open(path, "rb")
            data = f.read() if f is not None else b""
            if data:
                yield decoder.decode(data)
                continue
            if time.monotonic() - checked >= status_every:
                checked = time.monotonic()
                try:
                    ended = has_ended(client.get_job_info(job_id))
                except RuntimeError as exc:
                    raise JobClientError(f"Cannot read job {job_id}: {exc}") from None
                if ended:
                    if f is None and path.is_file():
                        f = open(path, "rb")
                    if f is None:
                        try:
                            text = client.get_job_logs(job_id)
                        except RuntimeError:
                            text = ""
                        if text:
                            yield text
                        return
                    rest = decoder.decode(f.read(), final=True)
                    if rest:
                        yield rest
                    return
            time.sleep(pause)
    finally:
        if f is not None:
            f.close()


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
    """Stop a job: a queued one leaves the queue and never starts; a running one is stopped
    (waiting up to ``timeout`` s for it to end). Its MLflow runs still RUNNING or SCHEDULED are
    marked KILLED. Returns ``{"before": state, "after": state, "killed_runs": n}``."""
    from jobs import queue
    from jobs.rest import end_job_runs

    view = find_job(client, cluster, job_id)
    before = view.state
    mlf = view.mlf
    if before == "QUEUED":
        queue.cancel_queued(mlf, view.run)
        # The admitter may have taken it in the same instant: stop what it started.
        started = view.run.data.tags.get(TAG_NEXT_RAY_JOB)
        try:
            late = client.get_job_info(started) if started else None
        except RuntimeError:
            late = None
        if late is not None and not has_ended(late):
            client.stop_job(started)
        killed = 1 + end_job_runs(mlf, view.job_id, "KILLED", role="trial")
        return {"before": before, "after": "STOPPED", "killed_runs": killed, "queued": True}
    info = view.info
    if info is not None and not has_ended(info):
        client.stop_job(info.submission_id)
        deadline = time.monotonic() + timeout
        while not has_ended(info) and time.monotonic() < deadline:
            time.sleep(0.5)
            info = job_info(client, cluster, info.submission_id)
    meta = (info.metadata if info is not None else None) or {}
    killed = 0
    if mlf is not None:
        if view.run is not None and view.run.info.status in ("RUNNING", "SCHEDULED"):
            mlf.set_tag(view.run.info.run_id, queue.TAG_QUEUE_STATE, queue.ENDED)
        exp_ids = [meta[META_EXPERIMENT_ID]] if meta.get(META_EXPERIMENT_ID) else None
        killed = end_job_runs(mlf, view.job_id, "KILLED", experiment_ids=exp_ids)
    after = status_of(info) if info is not None else ("STOPPED" if killed or before == "RUNNING" else before)
    return {"before": before, "after": after, "killed_runs": killed, "queued": False}


# ---------------------------------------------------------------------------------- reading logs

#: The prefix of the traceback lines a sweep's driver writes after a trial's one-line failure
#: (jobs.sweep.print_traceback): `submit --wait`, `logs` and `logs --follow` leave them out,
#: `logs --full` (and the dashboard) show them.
TRACE_PREFIX = "  | "


def readable(chunks, full: bool = False) -> Iterator[str]:
    """The log's text as it arrives, in whole lines (so a prefix split across two chunks is still
    recognised), without the traceback lines unless ``full``."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        lines = pending.split("\n")
        pending = lines.pop()
        kept = [line for line in lines if full or not _hidden(line)]
        if kept:
            yield "\n".join(kept) + "\n"
    if pending and (full or not _hidden(pending)):
        yield pending


def until_done(chunks, job_id: str, outcome: dict[str, str]) -> Iterator[str]:
    """Whole-line ``chunks`` of a job's log up to and including its driver's last line
    (``jobs.contract.DONE_LINE`` for ``job_id``), then no more: the caller stops reading (and closes
    the log's stream) as soon as the driver is done, instead of waiting for Ray to notice that the
    driver's process ended (1-3 s). ``outcome["state"]`` is then the state that line gives
    (SUCCEEDED or FAILED). A log without that line (a driver that was killed, or one of older code)
    is read to its end as before."""
    done = re.compile("^" + re.escape(DONE_LINE.format(job_id=job_id, state="")) + r"(SUCCEEDED|FAILED)$", re.M)
    for chunk in chunks:
        found = done.search(chunk)
        if found:
            outcome["state"] = found.group(1)
            yield chunk[:found.end()] + "\n"
            return
        yield chunk


def _hidden(line: str) -> bool:
    """A traceback line of the driver's, or Ray's own long notice of a dead worker (the driver's
    one line says it)."""
    return (line.startswith(TRACE_PREFIX) or "(raylet)" in line[:24] and "A worker died or was killed" in line)
