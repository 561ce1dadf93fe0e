"""The cluster's job queue: FIFO within priority, durable in MLflow, moved by an actor on the cluster.

Ray Jobs has no queue (every submitted job starts at once), so mnistjobs keeps its own, built on
Ray's and MLflow's parts:

- **The store** is the MLflow tracking database. Each job is its parent run ``sweep-<job>``; the
  run's status is the queue state: ``SCHEDULED`` (queued), ``RUNNING`` (admitted: its Ray job
  runs), then ``FINISHED`` / ``FAILED`` / ``KILLED``. Tags (``jobs.contract``) hold the priority,
  the submission time and who submitted, the Ray submission id to use next, and, while it runs,
  the driver's count of trials not yet started. The MLflow UI shows the queue too.
- **The admitter** (:class:`Admitter`) runs on the cluster as a detached Ray actor named
  ``mnistjobs-queue`` (namespace ``mnistjobs``; restarted by Ray if its process dies). It reads the
  queue and starts at most one job through Ray's job API: once a second while a job waits to
  start (one MLflow request a look, two every ten seconds), every ten seconds otherwise, with the
  queue empty or its jobs all running (two MLflow requests a look, and one Ray request per running
  job), and at once when woken: it waits on a UDP socket on
  127.0.0.1 whose port it writes to ``<home>/queue_wake_port``, and :func:`wake` (called by the
  CLI after it changed the queue) sends it one datagram. `mnistjobs up` and `submit` start it
  when it is missing (:func:`ensure`), through a short Ray job (``python -m jobs.queue start``)
  since a client may only reach the dashboard's HTTP API. As it starts a job, it has the raylets
  of the cluster's nodes start the job's first trial workers (``jobs.rayconnect.prestart_for_job``),
  so they import torch, MLflow and Tune while Ray starts the job's driver and Tune sets up.

The order (:func:`run_order`): jobs already admitted keep their place, in the order they were
admitted (no preemption), then the queued ones by priority (higher first), submission time, id.
The rule: the first job in that order that is not running starts once every running job ahead of
it has no trial left to start (backfill: it gets what they leave free). So on room for one trial,
sweeps run strictly one after another.

`mnistjobs down` marks the admitted jobs held (``mnistjobs.held_by=down``) before it stops Ray: their
drivers then leave their runs as they are instead of marking them KILLED. After the Ray head
dies, or after such a `down`, (its job table goes with it), an admitted job whose Ray job is gone is
started again at its place with ``--resume`` as ``<job>-rN``: its Tune experiment continues from
the trials' checkpoints in the same MLflow runs. An admitted job whose Ray job ended without
closing its runs (a driver SIGKILLed) has them closed (FAILED, or KILLED for a stopped job): no
run stays RUNNING forever; `mnistjobs resume` queues it again.

Imports neither torch nor Ray at module level (the CLI reads the queue through this module).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import getpass
import json
import os
import select
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from jobs.client import JobUsageError
from jobs.contract import (ROLE_SWEEP, ROLE_TRIAL, SPEC_ARTIFACT, TAG_ADMITTED_AT, TAG_HELD, TAG_JOB, TAG_NEXT_RAY_JOB,
                           TAG_PRIORITY, TAG_QUEUE_NOTE, TAG_QUEUE_STATE, TAG_RAY_JOB, TAG_RESUME, TAG_ROLE,
                           TAG_SUBMITTED_AT, TAG_SUBMITTED_BY, TAG_SUMMARY, TAG_TOTAL_TRIALS, TAG_WAITING_TRIALS)

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

ACTOR_NAME = "mnistjobs-queue"
NAMESPACE = "mnistjobs"
META_ROLE = "mnistjobs.role"
ROLE_QUEUE = "queue"            # the metadata role of the short Ray jobs that start the admitter
POLL_S = 1.0                    # how often the admitter reads the queue while it holds jobs
IDLE_POLL_S = 10.0              # ... and while it is empty (a wake-up makes it look at once)
EXPERIMENTS_TTL_S = IDLE_POLL_S  # how long a busy admitter trusts its list of experiments
QUEUED, ADMITTED, CANCELLED, ENDED = "queued", "admitted", "cancelled", "ended"
ACTIVE_STATUSES = ("SCHEDULED", "RUNNING")
MAX_START_FAILURES = 3          # Ray refusing a job this many times in a row fails it
RAY_TO_RUN = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "STOPPED": "KILLED"}


class QueueError(JobUsageError):
    """A queue operation that cannot be done as asked (a usage error: exit code 2)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def who() -> str:
    """``user@host`` of the submitting process."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name (a container without passwd entry)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


# ------------------------------------------------------------------------------------ reading

@dataclass
class Entry:
    """One job in the queue (queued or admitted), read from its parent run."""

    job_id: str
    run_id: str
    experiment_id: str
    experiment: str
    status: str                 # the run's: SCHEDULED or RUNNING
    state: str                  # queued | admitted
    priority: int
    submitted_at: int           # ms
    submitted_by: str
    admitted_at: int | None
    ray_job_id: str | None      # the Ray job it runs as (admitted), or ran as last
    next_ray_job_id: str | None
    resume: bool
    waiting: int | None         # trials not yet started, as its driver reports (None: not yet)
    total: int | None
    summary: str
    place: int = 0

    @property
    def queued(self) -> bool:
        return self.state == QUEUED


def _int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


def entry_of(run, experiment: str = "") -> Entry | None:
    """The queue entry of a parent run, or None when the run is not in the queue."""
    tags = run.data.tags
    state = tags.get(TAG_QUEUE_STATE)
    status = run.info.status
    if (state, status) not in ((QUEUED, "SCHEDULED"), (ADMITTED, "RUNNING")):
        return None
    return Entry(job_id=tags.get(TAG_JOB, ""), run_id=run.info.run_id, experiment_id=run.info.experiment_id,
                 experiment=experiment, status=status, state=state, priority=_int(tags.get(TAG_PRIORITY), 0),
                 submitted_at=_int(tags.get(TAG_SUBMITTED_AT), run.info.start_time or 0),
                 submitted_by=tags.get(TAG_SUBMITTED_BY, "-"), admitted_at=_int(tags.get(TAG_ADMITTED_AT)),
                 ray_job_id=tags.get(TAG_RAY_JOB), next_ray_job_id=tags.get(TAG_NEXT_RAY_JOB),
                 resume=tags.get(TAG_RESUME) == "true", waiting=_int(tags.get(TAG_WAITING_TRIALS)),
                 total=_int(tags.get(TAG_TOTAL_TRIALS), _int(run.data.params.get("trials"))),
                 summary=tags.get(TAG_SUMMARY, ""))


def run_order(entries: list[Entry]) -> list[Entry]:
    """Admitted jobs in the order they were admitted, then queued ones by priority (higher
    first), submission time, job id; ``place`` numbered from 1 in that order."""
    admitted = sorted((e for e in entries if not e.queued), key=lambda e: (e.admitted_at or 0, e.job_id))
    queued = sorted((e for e in entries if e.queued), key=lambda e: (-e.priority, e.submitted_at, e.job_id))
    ordered = admitted + queued
    for i, e in enumerate(ordered, 1):
        e.place = i
    return ordered


def _experiments(mlf: "MlflowClient") -> dict[str, str]:
    from jobs.rest import experiments

    return experiments(mlf)


def read(mlf: "MlflowClient", names: dict[str, str] | None = None) -> list[Entry]:
    """The queue: every queued or admitted job of every active experiment, in run order. ``mlf``:
    MLflow's client or the CLI's plain-HTTP one (jobs.rest.MlflowRest); ``names``: the active
    experiments ({id: name}) when the caller knows them (one MLflow request fewer)."""
    from jobs.rest import search_all

    names = _experiments(mlf) if names is None else names
    if not names:
        return []
    flt = (f"tags.`{TAG_ROLE}` = '{ROLE_SWEEP}' and attributes.status != 'FINISHED' "
           f"and attributes.status != 'FAILED' and attributes.status != 'KILLED'")
    entries = [entry_of(r, names.get(r.info.experiment_id, "")) for r in search_all(mlf, list(names), flt)]
    return run_order([e for e in entries if e is not None])


def find(mlf: "MlflowClient", job_id: str):
    """The parent run of ``job_id`` (its mnistjobs id), or None."""
    from jobs.rest import job_runs

    runs = job_runs(mlf, job_id, role=ROLE_SWEEP)
    return runs[0] if runs else None


def place_of(mlf: "MlflowClient", job_id: str) -> tuple[int, int] | None:
    """(place, length of the queue) of a queued or admitted job; None when it is in neither."""
    entries = read(mlf)
    for e in entries:
        if e.job_id == job_id:
            return e.place, len(entries)
    return None


def user_state(run) -> str:
    """The state a user sees for a parent run: QUEUED, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    status = run.info.status
    if status == "SCHEDULED":
        return "QUEUED"
    return {"RUNNING": "RUNNING", "FINISHED": "SUCCEEDED", "FAILED": "FAILED", "KILLED": "STOPPED"}.get(status, status)


def when(ms: int | None) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


# ------------------------------------------------------------------------ changing (clients)

def enqueue(mlf: "MlflowClient", spec, job_id: str, experiment_id: str, *, priority: int = 0,
            submitted_by: str | None = None) -> str:
    """Put a new job into the queue: its parent run, SCHEDULED, with the sweep's params, the spec
    (``spec.json``) and the queue's tags. Returns the run id."""
    from jobs import tracking

    run = tracking.open_sweep_run(mlf, spec, job_id, experiment_id, None, status="SCHEDULED")
    total = spec.trial_count()
    mlf.log_batch(run.run_id, tags=_tags({
        TAG_PRIORITY: priority, TAG_SUBMITTED_AT: now_ms(), TAG_SUBMITTED_BY: submitted_by or who(),
        TAG_NEXT_RAY_JOB: job_id, TAG_TOTAL_TRIALS: total, TAG_SUMMARY: spec.summary()}))
    mlf.set_tag(run.run_id, TAG_QUEUE_STATE, QUEUED)  # last: from here on the admitter sees it
    return run.run_id


def _tags(values: dict[str, Any]):
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in values.items()]


def requeue(mlf: "MlflowClient", run, next_ray_job_id: str) -> None:
    """Queue an ended job again, to be admitted with ``--resume`` as ``next_ray_job_id`` (the
    back of its priority: a new submission time)."""
    run_id = run.info.run_id
    mlf.log_batch(run_id, tags=_tags({TAG_NEXT_RAY_JOB: next_ray_job_id, TAG_RESUME: "true",
                                      TAG_SUBMITTED_AT: now_ms(), TAG_SUBMITTED_BY: who()}))
    for key in (TAG_WAITING_TRIALS, TAG_ADMITTED_AT, TAG_QUEUE_NOTE):
        _delete_tag(mlf, run_id, key)
    mlf.update_run(run_id, status="SCHEDULED")
    mlf.set_tag(run_id, TAG_QUEUE_STATE, QUEUED)


def set_priority(mlf: "MlflowClient", job_id: str, priority: int) -> Entry:
    """Change a queued job's priority; return its entry with its new place."""
    run = find(mlf, job_id)
    if run is None:
        raise QueueError(f"No job {job_id!r} in the queue. `mnistjobs queue` shows the queued jobs.")
    entry = entry_of(run)
    if entry is None or not entry.queued:
        raise QueueError(f"Job {job_id} is {user_state(run)}, not queued: a priority orders only the jobs "
                         f"that wait (a job that has started keeps its place until it ends).")
    mlf.set_tag(run.info.run_id, TAG_PRIORITY, str(priority))
    for e in read(mlf):
        if e.job_id == job_id:
            return e
    raise QueueError(f"Job {job_id} left the queue meanwhile (`mnistjobs status {job_id}`).")


def cancel_queued(mlf: "MlflowClient", run) -> None:
    """Take a queued job out of the queue: its run ends KILLED and never starts."""
    mlf.set_tag(run.info.run_id, TAG_QUEUE_STATE, CANCELLED)
    mlf.set_terminated(run.info.run_id, "KILLED")


def hold_admitted(mlf: "MlflowClient") -> list[str]:
    """Before `mnistjobs down` stops the cluster: mark every admitted job as held, so that its
    driver, stopped with the head, leaves its runs as they are (not KILLED), and the admitter
    starts it again at its place after `up`. Returns the held jobs' ids."""
    held = []
    for e in read(mlf):
        if not e.queued:
            mlf.set_tag(e.run_id, TAG_HELD, "down")
            held.append(e.job_id)
    return held


def _delete_tag(mlf: "MlflowClient", run_id: str, key: str) -> None:
    try:
        mlf.delete_tag(run_id, key)
    except Exception:  # noqa: BLE001 - it was not there
        pass


# ---------------------------------------------------------------------------------- admitter

class Admitter:
    """Reads the queue and starts the next job when its turn comes (see the module's text).

    ``client`` is a ``JobSubmissionClient`` of the cluster's dashboard; ``cluster`` the
    ``jobs.cluster.Cluster`` its jobs are built for (its tracking URI, embedded or not); ``home``
    the embedded state folder (handed to the drivers as MNISTJOBS_HOME)."""

    def __init__(self, mlf: "MlflowClient", client, cluster, *, home: str | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.mlf, self.client, self.cluster, self.home, self.log = mlf, client, cluster, home, log
        self.failures: dict[str, int] = {}
        self.busy = False           # whether the last look found a job waiting to start
        self.ticks = 0              # looks taken by run_forever
        self.waker: Waker | None = None
        self._names: dict[str, str] | None = None  # the active experiments, as last read
        self._names_at = 0.0

    def _experiment_names(self, fresh: bool) -> dict[str, str]:
        """The active experiments: read again when ``fresh`` (the first look, a wake-up, after an
        error), while the queue is empty (those looks are ten seconds apart), when nobody can wake
        this admitter (no state folder: a client elsewhere may have made a new experiment), or
        after EXPERIMENTS_TTL_S; else (the 1 s looks while jobs wait) the list of the last read. So
        a job queued in a new experiment without a wake-up waits at most about ten seconds."""
        now = time.monotonic()
        if (fresh or not self.busy or self._names is None or self.home is None
                or now - self._names_at >= EXPERIMENTS_TTL_S):
            self._names, self._names_at = _experiments(self.mlf), now
        return self._names

    def _ray_job(self, ray_job_id: str | None):
        """The Ray job's info; None when the cluster has no such job (its head was replaced)."""
        if not ray_job_id:
            return None
        from jobs.client import is_not_found

        try:
            return self.client.get_job_info(ray_job_id)
        except RuntimeError as exc:
            if is_not_found(exc):
                return None
            raise

    def tick(self, fresh: bool = True) -> str | None:
        """One look at the queue: close what ended, start at most one job. Returns the Ray
        submission id started, or None. ``fresh``: read the list of experiments again (else the
        one of an earlier look may do, see _experiment_names)."""
        from jobs.client import status_of

        order = read(self.mlf, self._experiment_names(fresh))
        live: dict[str, bool] = {}
        for e in order:
            if e.queued:
                continue
            info = self._ray_job(e.ray_job_id)
            if info is None:
                live[e.job_id] = False
            elif status_of(info) in RAY_TO_RUN:
                self._close_ended(e, status_of(info))
                live[e.job_id] = None  # gone from the queue
            else:
                live[e.job_id] = True
        # Looks a second apart only while a job waits to start (queued, or admitted with its Ray
        # job gone); while the running jobs are all there is, a look every IDLE_POLL_S: each look
        # is an MLflow search and a Ray job request, CPU taken from the trials on a small node.
        self.busy = any(e.queued or live.get(e.job_id) is False for e in order)
        for e in order:
            state = live.get(e.job_id)
            if state is None and not e.queued:
                continue  # just closed
            if state:  # running: a job behind it waits while it still has trials to start
                if e.waiting is None or e.waiting > 0:
                    return None
                continue
            return self._start(e)
        return None

    def _close_ended(self, e: Entry, ray_status: str) -> None:
        """A Ray job that ended while its parent run is still RUNNING (its driver died without
        closing its runs): close them, so nothing stays RUNNING forever."""
        from jobs import tracking

        run = self.mlf.get_run(e.run_id)
        if run.info.status != "RUNNING":
            return
        status = RAY_TO_RUN[ray_status]
        n = tracking.end_job_runs(self.mlf, e.job_id, "KILLED" if status == "KILLED" else "FAILED",
                                  experiment_ids=[e.experiment_id], role=ROLE_TRIAL)
        self.mlf.set_tag(e.run_id, TAG_QUEUE_STATE, ENDED)
        self.mlf.set_terminated(e.run_id, status)
        self.log(f"{e.job_id}: its Ray job {e.ray_job_id} ended {ray_status} without closing its runs; "
                 f"closed the sweep run ({status}) and {n} trial run(s)")

    def _next_ray_job_id(self, e: Entry) -> str:
        """For a job whose Ray job is gone: ``<job>-rN``, the first N its cluster does not know."""
        last = e.ray_job_id or e.job_id
        n = _int(last.rsplit("-r", 1)[1], 0) if last.startswith(f"{e.job_id}-r") else 0
        while True:
            n += 1
            candidate = f"{e.job_id}-r{n}"
            if self._ray_job(candidate) is None:
                return candidate

    def _start(self, e: Entry) -> str | None:
        from jobs.client import build_submission_from
        from jobs.rayconnect import prestart_for_job

        run = self.mlf.get_run(e.run_id)
        current = entry_of(run, e.experiment)
        if current is None or current.state != e.state:
            return None  # cancelled (or changed) meanwhile: look again next tick
        if e.queued:
            ray_job_id = e.next_ray_job_id or e.job_id
            if self._ray_job(ray_job_id) is not None:  # a leftover: never reuse a Ray job id
                ray_job_id = self._next_ray_job_id(e)
            resume = e.resume
        else:  # admitted, but its Ray job is gone: back at its place, from its checkpoints
            ray_job_id, resume = self._next_ray_job_id(e), True
        try:
            spec_json = self._spec_json(e.run_id)
        except Exception as exc:  # noqa: BLE001 - an unreadable spec fails the job, not the queue
            return self._give_up(e, f"its spec could not be read from MLflow: {type(exc).__name__}: {exc}")
        try:
            submission = build_submission_from(
                self.cluster, spec_json, e.summary, e.experiment, e.job_id, e.experiment_id,
                ray_job_id=ray_job_id, resume_of=(e.ray_job_id or e.job_id) if resume else None, home=self.home)
        except Exception as exc:  # noqa: BLE001 - as a refused submission
            return self._not_taken(e, exc)
        # The raylet starts the job's first trial workers now, beside the MLflow writes below and
        # Ray's start of the driver (jobs.rayconnect.prestart_for_job; it sets the job's
        # MNISTJOBS_PRESTARTED, so it comes before the submission).
        # Not for a resumed job: fewer trials may be left than its spec has, and a worker no trial
        # takes stays until it ends itself (jobs.trial); its driver asks for its own, bound to it.
        prestarted = 0 if resume else prestart_for_job(spec_json, submission["runtime_env"]["env_vars"])
        tags = {TAG_RAY_JOB: ray_job_id, TAG_QUEUE_STATE: ADMITTED}
        if e.queued:
            tags[TAG_ADMITTED_AT] = now_ms()
        _delete_tag(self.mlf, e.run_id, TAG_WAITING_TRIALS)  # the new driver reports afresh
        _delete_tag(self.mlf, e.run_id, TAG_HELD)
        self.mlf.log_batch(e.run_id, tags=_tags(tags))
        self.mlf.update_run(e.run_id, status="RUNNING")
        try:
            self.client.submit_job(**submission)
        except Exception as exc:  # noqa: BLE001 - back into the queue; tried again next tick
            self.mlf.log_batch(e.run_id, tags=_tags({TAG_QUEUE_STATE: QUEUED if e.queued else ADMITTED}))
            if e.queued:
                self.mlf.update_run(e.run_id, status="SCHEDULED")
            return self._not_taken(e, exc)
        self.failures.pop(e.job_id, None)
        waited = (now_ms() - e.submitted_at) / 1000
        self.log(f"{e.job_id}: started as Ray job {ray_job_id}" + (" (resuming)" if resume else "")
                 + f", place {e.place}, priority {e.priority}, {waited:.1f} s after it was queued"
                 + (f"; {prestarted} trial worker(s) started ahead of it" if prestarted else ""))
        return ray_job_id

    def _not_taken(self, e: Entry, exc: Exception) -> None:
        """Ray did not take the job: counted; given up after MAX_START_FAILURES attempts."""
        n = self.failures[e.job_id] = self.failures.get(e.job_id, 0) + 1
        self.log(f"{e.job_id}: Ray did not take the job ({type(exc).__name__}: {exc}); attempt {n}")
        if n >= MAX_START_FAILURES:
            return self._give_up(e, f"Ray refused it {n} times: {' '.join(str(exc).split())[:300]}")
        return None

    def _give_up(self, e: Entry, why: str) -> None:
        self.mlf.log_batch(e.run_id, tags=_tags({TAG_QUEUE_NOTE: why[:5000], TAG_QUEUE_STATE: ENDED}))
        self.mlf.set_terminated(e.run_id, "FAILED")
        self.log(f"{e.job_id}: FAILED without starting: {why}")

    def _spec_json(self, run_id: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.mlf.download_artifacts(run_id, SPEC_ARTIFACT, tmp)).read_text()

    def listen(self) -> "Waker | None":
        """Bind the wake-up socket (once) and write its port to ``<home>/queue_wake_port`` (with
        a state folder); None when no socket could be bound (the loop then only polls)."""
        if self.waker is None:
            try:
                self.waker = Waker()
            except OSError as exc:
                self.log(f"queue: no wake-up socket ({exc}); polling only")
                return None
            if self.home:
                try:
                    from jobs.state import wake_port_path
                    from mnistnets.files import write_atomic

                    write_atomic(wake_port_path(self.home), f"{self.waker.port}\n", mode=0o600)
                except OSError as exc:
                    self.log(f"queue: cannot write the wake-up port into {self.home}: {exc}")
        return self.waker

    def _unlisten(self) -> None:
        waker, self.waker = self.waker, None
        if waker is None:
            return
        if self.home:
            from jobs.state import wake_port_path

            path = wake_port_path(self.home)
            try:
                if path.read_text().strip() == str(waker.port):
                    path.unlink()
            except OSError:
                pass
        waker.close()

    def run_forever(self, stop: threading.Event | None = None, interval: float = POLL_S,
                    idle_interval: float = IDLE_POLL_S) -> None:
        """Look at the queue every ``interval`` s while it holds jobs, every ``idle_interval`` s
        while it is empty, and at once when woken (:func:`wake`). ``stop``: set it, then wake the
        loop, to end it."""
        stop = stop or threading.Event()
        waker, fresh = self.listen(), True
        try:
            while not stop.is_set():
                try:
                    self.tick(fresh=fresh)
                except Exception as exc:  # noqa: BLE001 - MLflow or the dashboard away: try again
                    self._names = None
                    self.busy = True  # look again soon
                    self.log(f"queue: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
                self.ticks += 1
                if stop.is_set():
                    break
                timeout = interval if self.busy else idle_interval
                if waker is not None:
                    fresh = waker.wait(timeout)
                else:
                    stop.wait(timeout)
                    fresh = False
        finally:
            self._unlisten()


class Waker:
    """A UDP socket on 127.0.0.1 (a port the OS picks) the admitter waits on between its looks."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind(("127.0.0.1", 0))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]

    def wait(self, timeout: float) -> bool:
        """Up to ``timeout`` s until a datagram comes; True when one came (all waiting are read)."""
        try:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        except (OSError, ValueError):  # closed meanwhile
            time.sleep(min(timeout, POLL_S))
            return False
        if not ready:
            return False
        for _ in range(1000):
            try:
                self.sock.recv(64)
            except OSError:  # BlockingIOError: all read
                break
        return True

    def close(self) -> None:
        self.sock.close()


def wake(home: str | os.PathLike | None = None) -> None:
    """Wake the admitter of the state folder ``home`` (None: $MNISTJOBS_HOME or ./.mnistjobs), so
    that it looks at the queue now instead of at its next poll: one datagram to the port in
    ``<home>/queue_wake_port``. Never raises, never blocks; no such file (no admitter, or one on
    another machine) is a no-op."""
    try:
        from jobs.state import resolve_home, wake_port_path

        port = int(wake_port_path(resolve_home(home)).read_text().strip())
        if not 0 < port < 65536:
            return
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(b"wake", ("127.0.0.1", port))
    except Exception:  # noqa: BLE001 - waking is a courtesy: the admitter polls anyway
        pass


class QueueActor:
    """The admitter as a detached Ray actor (see :func:`start`); its loop runs in a thread."""

    def __init__(self, tracking_uri: str, dashboard_url: str, embedded: bool, home: str | None) -> None:
        from jobs import tracking
        from jobs.cluster import Cluster, auth_headers, job_client, remote_token

        self.tracking_uri, self.dashboard_url = tracking_uri, dashboard_url
        cluster = Cluster(dashboard_url, auth_headers(remote_token()), tracking_uri, embedded=embedded)
        self.admitter = Admitter(tracking.client(tracking_uri), job_client(cluster), cluster, home=home,
                                 log=lambda m: print(f"{_dt.datetime.now():%H:%M:%S} {m}", flush=True))
        self.started = time.time()
        self.admitter.listen()  # the wake-up port is written before the actor counts as created
        self.thread = threading.Thread(target=self.admitter.run_forever, name="mnistjobs-queue", daemon=True)
        self.thread.start()

    def info(self) -> dict[str, Any]:
        waker = self.admitter.waker
        return {"tracking_uri": self.tracking_uri, "dashboard_url": self.dashboard_url,
                "alive": self.thread.is_alive(), "since": self.started, "ticks": self.admitter.ticks,
                "wake_port": waker.port if waker is not None else None}


# ------------------------------------------------------------------------- starting the admitter

def actor_alive(cluster) -> bool:
    """Whether the admitter actor is ALIVE on the cluster (Ray's state API over HTTP)."""
    import urllib.request

    query = urllib.parse.urlencode([("filter_keys", "name"), ("filter_predicates", "="), ("filter_values", ACTOR_NAME),
                                    ("filter_keys", "state"), ("filter_predicates", "="), ("filter_values", "ALIVE"),
                                    ("detail", "false")])
    req = urllib.request.Request(f"{cluster.dashboard_url}/api/v0/actors?{query}", headers=dict(cluster.headers))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return False
    rows = (((body.get("data") or {}).get("result") or {}).get("result")) or []
    return any(row.get("name") == ACTOR_NAME for row in rows)


def queue_jobs(client) -> list:
    """The Ray jobs that started an admitter (metadata ``mnistjobs.role=queue``), oldest first."""
    jobs_ = [j for j in client.list_jobs() if (j.metadata or {}).get(META_ROLE) == ROLE_QUEUE]
    return sorted(jobs_, key=lambda j: j.start_time or 0)


def queue_tracking_uri(client) -> str | None:
    """The tracking URI of the cluster's queue (from the newest job that started its admitter)."""
    from jobs.client import META_TRACKING_URI

    found = queue_jobs(client)
    return (found[-1].metadata or {}).get(META_TRACKING_URI) if found else None


def ensure(client, cluster, *, wait: bool = False, timeout: float = 120.0) -> str | None:
    """Start the admitter when it is not ALIVE: a short Ray job ``python -m jobs.queue start``
    (idempotent: Ray's ``get_if_exists`` makes one actor however many start at once). Returns the
    Ray id of that job, or None when the admitter was running. With ``wait``, until it runs."""
    from jobs.client import JobClientError, META_TRACKING_URI, has_ended, status_of

    if actor_alive(cluster):
        known = queue_tracking_uri(client)
        if known and cluster.tracking_uri and known.rstrip("/") != cluster.tracking_uri.rstrip("/"):
            raise QueueError(f"This cluster's queue keeps its jobs in MLflow at {known}; give --tracking-uri "
                             f"{known} (MLFLOW_TRACKING_URI) to submit to it.")
        return None
    python = sys.executable if cluster.embedded else "python"
    home = str(cluster.services.home) if cluster.embedded and cluster.services is not None else None
    entry = (f"{python} -m jobs.queue start --tracking-uri {cluster.tracking_uri} "
             f"--dashboard-url {cluster.dashboard_url}" + (" --embedded" if cluster.embedded else "")
             + (f" --home {home}" if home else ""))
    env = {"PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": cluster.tracking_uri}
    if home:
        env["MNISTJOBS_HOME"] = home
    import secrets

    ray_job_id = f"mnistjobs-queue-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    ray_job_id = client.submit_job(entrypoint=entry, submission_id=ray_job_id, runtime_env={"env_vars": env},
                                   metadata={META_ROLE: ROLE_QUEUE, META_TRACKING_URI: cluster.tracking_uri})
    # Several clients may start one at once: Ray's get_if_exists makes them one actor.
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = client.get_job_info(ray_job_id)
            if has_ended(info):
                if status_of(info) != "SUCCEEDED":
                    raise JobClientError(f"The job queue's admitter did not start ({status_of(info)}): "
                                         f"{client.get_job_logs(ray_job_id)[-2000:]}")
                break
            time.sleep(0.3)
        else:
            raise JobClientError(f"The job queue's admitter did not start within {timeout:.0f} s "
                                 f"(Ray job {ray_job_id}).")
    return ray_job_id


def start(tracking_uri: str, dashboard_url: str, embedded: bool, home: str | None) -> dict[str, Any]:
    """Inside a Ray job: create (or find) the detached admitter actor, pinned to this node (the
    head, where the dashboard listens), and return its info."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ctx = ray.init(address="auto", namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
    url = f"http://{ctx.dashboard_url}" if getattr(ctx, "dashboard_url", None) else dashboard_url
    node = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(QueueActor)
    actor = actor_cls.options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                              max_restarts=-1, num_cpus=0,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)
                              ).remote(tracking_uri, url, embedded, home)
    return ray.get(actor.info.remote(), timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.queue", description="Start the mnistjobs queue's admitter.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="create the detached admitter actor (a no-op when it runs)")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--dashboard-url", required=True)
    p.add_argument("--embedded", action="store_true")
    p.add_argument("--home", default=None)
    args = parser.parse_args(argv)
    try:
        info = start(args.tracking_uri, args.dashboard_url, args.embedded, args.home)
    except Exception:  # noqa: BLE001 - the job's log says why
        traceback.print_exc()
        return 1
    print(f"mnistjobs queue: admitter running (MLflow {info['tracking_uri']}, dashboard {info['dashboard_url']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
