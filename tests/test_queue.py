"""The job queue (jobs.queue): FIFO within priority, QUEUED jobs, cancel and reprioritise, and a
queue that outlives its Ray head.

The order tests run on the session's shared services (2 CPUs): every trial asks for both CPUs,
so there is room for one trial at a time and the jobs' trial runs in MLflow (their start and end
times, from the trials' own clock) show the order the queue ran them in. The head-kill test runs
on a private service set (it kills that set's Ray head).
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from _faults_helpers import EPOCH_METRICS, job_client, kill, service_processes, steps, trial_runs
from _service_helpers import job_id_of, mlflow_client, run_cli, wait_for
from jobs.contract import (TAG_JOB, TAG_PRIORITY, TAG_QUEUE_STATE, TAG_RAY_JOB, TAG_ROLE, TAG_SUBMITTED_AT,
                           TAG_WAITING_TRIALS)

ROOM_FOR_ONE = ["--cpus-per-trial", 2, "--train-limit", 256, "--test-limit", 64, "--batch-size", 32,
                "--schedules", "cosine"]


# ------------------------------------------------------------------------------ the order (fast)

def _run(job, status, *, priority=0, submitted=0, state=None, admitted=None):
    from jobs.queue import ADMITTED, QUEUED

    tags = {TAG_JOB: job, TAG_ROLE: "sweep", TAG_PRIORITY: str(priority), TAG_SUBMITTED_AT: str(submitted),
            TAG_QUEUE_STATE: state or (QUEUED if status == "SCHEDULED" else ADMITTED)}
    if admitted is not None:
        tags["mnistjobs.admitted_at"] = str(admitted)
    return SimpleNamespace(info=SimpleNamespace(run_id=f"run-{job}", experiment_id="1", status=status, start_time=0),
                           data=SimpleNamespace(tags=tags, params={"trials": "2"}))


def test_run_order_is_running_jobs_first_then_priority_then_submission_time():
    from jobs.queue import entry_of, run_order

    runs = [_run("a", "SCHEDULED", submitted=10), _run("b", "SCHEDULED", priority=5, submitted=30),
            _run("c", "RUNNING", submitted=40, admitted=50), _run("d", "SCHEDULED", submitted=20),
            _run("e", "RUNNING", submitted=5, admitted=45), _run("f", "SCHEDULED", priority=-1, submitted=1)]
    order = run_order([entry_of(r) for r in runs])
    assert [e.job_id for e in order] == ["e", "c", "b", "a", "d", "f"]
    assert [e.place for e in order] == [1, 2, 3, 4, 5, 6]
    assert order[2].total == 2 and order[2].waiting is None  # no driver report yet: it blocks those behind


def test_only_queued_or_admitted_runs_are_in_the_queue():
    from jobs.queue import CANCELLED, ENDED, entry_of

    assert entry_of(_run("a", "KILLED", state=CANCELLED)) is None
    assert entry_of(_run("a", "RUNNING", state=ENDED)) is None   # its driver is closing it
    assert entry_of(_run("a", "RUNNING", state="queued")) is None  # being created: not yet queued
    legacy = _run("a", "RUNNING")
    del legacy.data.tags[TAG_QUEUE_STATE]
    assert entry_of(legacy) is None  # a job from before the queue
    assert entry_of(_run("a", "SCHEDULED")).queued


def test_the_followed_log_leaves_tracebacks_out_even_split_across_chunks():
    from jobs.client import TRACE_PREFIX, readable

    log = (f"[v0-cosine-s1] epoch 1/3 ...\n\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task "
           f"by an unexpected system error. ...\n[v0-cosine-s1] its worker process died; retrying from epoch 1's "
           f"checkpoint (failure 1)\n{TRACE_PREFIX}Traceback (most recent call last):\n{TRACE_PREFIX}  File x\n"
           f"{TRACE_PREFIX}ray.exceptions.ActorDiedError: ...\n[v0-cosine-s1] epoch 2/3 ...\n")
    for size in (1, 3, 7, len(log)):
        chunks = [log[i:i + size] for i in range(0, len(log), size)]
        shown = "".join(readable(chunks))
        assert shown == ("[v0-cosine-s1] epoch 1/3 ...\n[v0-cosine-s1] its worker process died; retrying from "
                         "epoch 1's checkpoint (failure 1)\n[v0-cosine-s1] epoch 2/3 ...\n"), size
        assert "".join(readable(chunks, full=True)) == log


def test_queue_and_priority_help_read_like_documentation():
    for command in (["queue", "--help"], ["priority", "--help"], ["submit", "--help"]):
        result = run_cli(command)
        assert result.exit_code == 0, result.output
    assert "higher runs first" in run_cli(["submit", "--help"]).output
    assert "in the order they run" in run_cli(["queue", "--help"]).output


def test_priority_out_of_range_is_a_usage_error(tmp_path):
    result = run_cli(["priority", "mj-x", "5000"], home=tmp_path / "home")
    assert result.exit_code == 2 and "-1000 to 1000" in result.output


# ----------------------------------------------------------------------- the order (real services)

def _parent(mlf, job):
    from jobs.tracking import job_runs

    (run,) = job_runs(mlf, job, role="sweep")
    return run


def _queue_rows(home) -> list[tuple[str, str, str]]:
    """`mnistjobs queue` as (place, job, state) rows."""
    result = run_cli(["queue"], home=home)
    assert result.exit_code == 0, result.output
    return [tuple(line.split()[:3]) for line in result.output.splitlines()[1:] if re.match(r"\s*\d+\s", line)]


@pytest.mark.slow
def test_queue_runs_jobs_in_priority_then_fifo_order_with_cancel_and_reprioritise(embedded, synthetic_dir):
    """Room for one trial: A runs; B, C (priority 5) and D queue behind it. `queue` lists C, B, D;
    D moved to priority 3 goes before B; B cancelled never starts. The trial runs in MLflow ran
    A, C, D, one after another."""
    home, mlf = embedded.home, mlflow_client(embedded)
    common = [*ROOM_FOR_ONE, "--data-dir", synthetic_dir, "--experiment", "queue-order"]
    # A has two trials: while its first trains, its second waits, so nothing behind A starts yet
    # (the next job is admitted once A has started all its trials).
    result = run_cli(["submit", "--models", "v0", "--seeds", 2, "--epochs", 30, *common], home=home)
    assert result.exit_code == 0, result.output
    a = job_id_of(result.output)
    assert re.search(r"Queued: +place \d+ of \d+", result.output), result.output
    wait_for(lambda: trial_runs(mlf, a), 180, what="A's first trial to start")

    jobs_ = {}
    for name, extra in (("B", []), ("C", ["--priority", 5]), ("D", [])):
        result = run_cli(["submit", "--models", "v2", "--epochs", 1, *common, *extra], home=home)
        assert result.exit_code == 0, result.output
        jobs_[name] = job_id_of(result.output)
    b, c, d = jobs_["B"], jobs_["C"], jobs_["D"]
    ours = {a, b, c, d}  # the session's services may still hold other tests' jobs ahead of these
    rows = [row for row in _queue_rows(home) if row[1] in ours]
    assert [(job, state) for _, job, state in rows] == [(a, "RUNNING"), (c, "QUEUED"), (b, "QUEUED"), (d, "QUEUED")]
    places = [int(place) for place, _, _ in rows]
    assert places == list(range(places[0], places[0] + 4)), rows
    place = dict((job, p) for p, (_, job, _) in zip(places, rows))

    status = run_cli(["status", b], home=home)
    assert status.exit_code == 0 and re.search(
        rf"Job {b}: QUEUED  \(place {place[b]} of \d+ in the queue, priority 0", status.output), status.output
    listed = run_cli(["list"], home=home)
    assert re.search(rf"{d}\s+QUEUED .*place {place[d]} in the queue", listed.output), listed.output
    logs = run_cli(["logs", b], home=home)
    assert logs.exit_code == 0 and f"is QUEUED (place {place[b]} in the queue); it has no log yet" in logs.output

    moved = run_cli(["priority", d, 3], home=home)
    assert moved.exit_code == 0 and f"Job {d}: priority 3; now place {place[b]} in the queue." in moved.output, \
        moved.output
    assert [job for _, job, _ in _queue_rows(home) if job in ours] == [a, c, d, b]
    refused = run_cli(["priority", a, 9], home=home)
    assert refused.exit_code == 2 and "not queued" in refused.output and "keeps its place" in refused.output

    cancelled = run_cli(["cancel", b], home=home)
    assert cancelled.exit_code == 0 and "taken out of the queue before it started" in cancelled.output
    assert _parent(mlf, b).info.status == "KILLED"
    assert [job for _, job, _ in _queue_rows(home) if job in ours] == [a, c, d]

    from _faults_helpers import job_status

    for job in (a, c, d):
        wait_for(lambda j=job: job_status(embedded, j) in ("SUCCEEDED", "FAILED", "STOPPED"), 420,
                 what=f"job {job} to end")
        assert job_status(embedded, job) == "SUCCEEDED", job
    assert job_status(embedded, b) == "QUEUED"  # Ray never heard of it
    assert trial_runs(mlf, b) == {} and _parent(mlf, b).info.status == "KILLED"
    spans = []
    for job, epochs, n in ((a, 30, 2), (c, 1, 1), (d, 1, 1)):
        assert _parent(mlf, job).info.status == "FINISHED"
        runs = sorted(trial_runs(mlf, job).values(), key=lambda r: r.info.start_time)
        assert len(runs) == n
        for run in runs:
            assert run.info.status == "FINISHED"
            for key in EPOCH_METRICS:
                assert steps(mlf, run.info.run_id, key) == list(range(1, epochs + 1)), (job, key)
            spans.append((job, run.info.start_time, run.info.end_time))
    for (_, _, end), (job, start, _) in zip(spans, spans[1:]):
        assert start >= end, f"{job} started before the job ahead of it ended: {spans}"
    assert [row for row in _queue_rows(home) if row[1] in ours] == []
    t0 = spans[0][1]
    print("\nFIGURE queue order (trial runs, ms after the first started): "
          + ", ".join(f"{name} {start - t0}-{end - t0}" for name, (_, start, end) in zip(
              ("A seed 1", "A seed 2", "C (priority 5)", "D (priority 3)"), spans))
          + "; B (cancelled while queued) never started")


@pytest.mark.slow
def test_a_queued_job_follows_with_wait_and_reports_waiting_trials(embedded, synthetic_dir):
    """`submit --wait` of a job queued behind another waits its turn, then streams its log; the
    driver reported its trials not yet started to the queue (0 once all had started)."""
    home, mlf = embedded.home, mlflow_client(embedded)
    common = [*ROOM_FOR_ONE, "--data-dir", synthetic_dir, "--experiment", "queue-wait"]
    first = run_cli(["submit", "--models", "v0", "--epochs", 8, *common], home=home)
    assert first.exit_code == 0, first.output
    a = job_id_of(first.output)
    wait_for(lambda: trial_runs(mlf, a), 180, what="A's trial to start")
    result = run_cli(["submit", "--models", "v2", "--epochs", 2, *common, "--wait"], home=home)
    assert result.exit_code == 0, result.output
    b = job_id_of(result.output)
    assert re.search(r"place \d+ of \d+", result.output), result.output
    epochs = [line for line in result.output.splitlines() if line.startswith("[v2-cosine-s1] epoch")]
    assert [line.split()[2] for line in epochs] == ["1/2", "2/2"], result.output
    assert f"Job {b} SUCCEEDED" in result.output
    (a_run,) = trial_runs(mlf, a).values()
    (b_run,) = trial_runs(mlf, b).values()
    assert b_run.info.start_time >= mlf.get_run(a_run.info.run_id).info.end_time
    for job in (a, b):
        tags = _parent(mlf, job).data.tags
        assert tags[TAG_WAITING_TRIALS] == "0" and tags[TAG_RAY_JOB] == job and tags[TAG_QUEUE_STATE] == "ended"


# --------------------------------------------------------------------- a head killed, then `up`

@pytest.fixture(scope="module")
def private_set(tmp_path_factory):
    from _faults_helpers import service_set

    base = tmp_path_factory.mktemp("queue-head")
    # Tune's storage is the state folder's (no MNISTJOBS_STORAGE_PATH): `up` after the kill starts
    # the head from this process's environment, as a user's `up` would from theirs.
    with service_set(base / "home", num_cpus=2) as rec:
        yield rec


@pytest.fixture(scope="module")
def head_data(tmp_path_factory):
    from synthetic import make_synthetic_mnist

    return make_synthetic_mnist(tmp_path_factory.mktemp("queue-data"), n_train=1024, n_test=256, seed=0)


def _interrupted_then_up(rec, data, experiment, interrupt) -> str:
    """Job A (two trials, room for one) trains its first trial with job B queued behind it;
    ``interrupt(rec)`` stops the cluster; then `mnistjobs up`: A starts again at its place as
    A-r1 from its checkpoints, B runs after it; every epoch is logged once, no run is duplicated,
    nothing stays RUNNING. Returns a line with the figures."""
    from jobs import services
    from jobs.cluster import ray_answers
    from jobs.tracking import job_runs

    home, mlf = rec.home, mlflow_client(rec)
    epochs = 3
    common = ["--cpus-per-trial", 2, "--test-limit", 256, "--batch-size", 16, "--schedules", "cosine",
              "--data-dir", data, "--experiment", experiment]
    result = run_cli(["submit", "--models", "v0", "--seeds", 2, "--epochs", epochs, "--train-limit", 1024, *common],
                     home=home)
    assert result.exit_code == 0, result.output
    a = job_id_of(result.output)
    result = run_cli(["submit", "--models", "v2", "--epochs", 2, "--train-limit", 256, *common], home=home)
    assert result.exit_code == 0, result.output
    b = job_id_of(result.output)

    def a_trained_an_epoch():
        runs = trial_runs(mlf, a)
        return runs and steps(mlf, next(iter(runs.values())).info.run_id) and runs

    wait_for(a_trained_an_epoch, 240, 0.2, what="A's first epoch in MLflow")
    assert [(job, state) for _, job, state in _queue_rows(home)] == [(a, "RUNNING"), (b, "QUEUED")]
    before = {name: (r.info.run_id, steps(mlf, r.info.run_id)) for name, r in trial_runs(mlf, a).items()}
    interrupt(rec)
    wait_for(lambda: not ray_answers(rec.dashboard_url, rec.headers), 60, what="the Ray head to be gone")

    result = run_cli(["up"], home=home)
    assert result.exit_code == 0, result.output
    assert "admitter started" in result.output
    new = services.load_record(home)
    assert (new.dashboard_port, new.mlflow_port) == (rec.dashboard_port, rec.mlflow_port)  # the same URLs
    assert _parent(mlf, b).info.status in ("SCHEDULED", "RUNNING")  # still queued: the store outlived the head
    wait_for(lambda: all(_parent(mlf, j).info.status in ("FINISHED", "FAILED", "KILLED") for j in (a, b)), 420,
             what="both jobs to end after `up`")
    a_ray = _parent(mlf, a).data.tags[TAG_RAY_JOB]
    assert _parent(mlf, a).info.status == "FINISHED", (a_ray, job_client(new).get_job_logs(a_ray)[-4000:])
    assert _parent(mlf, b).info.status == "FINISHED", job_client(new).get_job_logs(b)[-4000:]
    assert a_ray == f"{a}-r1"  # started again, as a resume
    assert _parent(mlf, b).data.tags[TAG_RAY_JOB] == b
    for job, n_trials, n_epochs in ((a, 2, epochs), (b, 1, 2)):
        runs = job_runs(mlf, job)
        assert len(runs) == 1 + n_trials and {r.info.status for r in runs} == {"FINISHED"}, job  # none duplicated
        for run in trial_runs(mlf, job).values():
            for key in EPOCH_METRICS:
                assert steps(mlf, run.info.run_id, key) == list(range(1, n_epochs + 1)), (job, key)  # each once
    after = trial_runs(mlf, a)
    for name, (run_id, _) in before.items():
        assert after[name].info.run_id == run_id  # the same runs continued
    (b_run,) = trial_runs(mlf, b).values()
    assert b_run.info.start_time >= max(r.info.end_time for r in after.values())  # B still ran after A
    log = job_client(new).get_job_logs(f"{a}-r1")
    name, (_, logged) = next((n, v) for n, v in before.items() if v[1])
    resumed = [int(m) for m in re.findall(rf"\[{name}\] epoch (\d+)/{epochs}", log)]
    assert not resumed or resumed == list(range(resumed[0], epochs + 1)), log[-2000:]
    assert not resumed or resumed[0] >= max(logged), (resumed, logged)  # from its checkpoint, not from scratch
    return (f"A's {name} after epoch {max(logged)}/{epochs} logged (B queued): after `up`, A started again as "
            f"{a}-r1 at its place" + (f", {name} trained epochs {resumed[0]}-{epochs} from its checkpoint"
                                      if resumed else "") + "; B ran after A; every epoch logged once, no run duplicated")


@pytest.mark.slow
def test_ray_head_killed_mid_sweep_then_up_both_jobs_finish_each_epoch_once(private_set, head_data):
    """SIGKILL every Ray process of the head (MLflow stays), then `mnistjobs up`."""
    from jobs import procs, services

    def kill_head(rec):
        head = sorted(set(services.service_pids(rec)) - procs.descendants(rec.mlflow_pid))
        assert service_processes(rec, "gcs_server") and head
        for pid in head:
            kill(pid)

    print(f"\nFIGURE Ray head SIGKILLed with {_interrupted_then_up(private_set, head_data, 'queue-head', kill_head)}")


@pytest.mark.slow
def test_down_then_up_puts_the_running_job_back_at_its_place(private_set, head_data):
    """`mnistjobs down` while a job runs and one waits: the running one is held (its runs stay
    as they are, not KILLED), the queued one stays queued; `up` runs both, in order."""
    from jobs import services

    def down(rec):
        result = run_cli(["down"], home=rec.home)
        assert result.exit_code == 0, result.output
        assert "start again at their place in the queue after `mnistjobs up`" in result.output, result.output
        assert services.load_record(rec.home) is None

    print(f"\nFIGURE `down` with {_interrupted_then_up(private_set, head_data, 'queue-down', down)}")


# ------------------------------------------------------------------ the admitter's idle cost (fast)

class _Store:
    """A stand-in for MLflow's client (the plain-HTTP kind) that counts the admitter's requests."""

    lite = True

    def __init__(self, runs=()):
        self.runs, self.calls = list(runs), []

    def search_experiments(self):
        self.calls.append("search_experiments")
        return [SimpleNamespace(experiment_id="1", name="exp")]

    def search_all(self, experiment_ids, filter_string=""):
        self.calls.append("search_runs")
        return list(self.runs)

    def get_run(self, run_id):
        self.calls.append("get_run")
        run = next(r for r in self.runs if r.info.run_id == run_id)
        return SimpleNamespace(info=run.info, data=SimpleNamespace(
            tags={**run.data.tags, TAG_QUEUE_STATE: "cancelled"}, params=run.data.params))  # cancelled meanwhile


def test_a_look_at_an_empty_queue_costs_two_mlflow_requests_and_a_busy_one_reuses_the_experiments(tmp_path):
    from jobs.queue import Admitter

    store = _Store()
    admitter = Admitter(store, None, None, home=str(tmp_path))
    assert admitter.tick() is None and store.calls == ["search_experiments", "search_runs"]
    assert admitter.busy is False
    store.calls.clear()
    admitter.tick(fresh=False)  # an idle look (ten seconds apart) reads the experiments again
    assert store.calls == ["search_experiments", "search_runs"]

    store.runs = [_run("a", "SCHEDULED")]
    admitter.tick(fresh=False)
    assert admitter.busy is True  # a queued job: the next look comes after the short interval
    store.calls.clear()
    admitter.tick(fresh=False)  # a busy look: the experiments of the last one (a wake-up reads them again)
    assert store.calls == ["search_runs", "get_run"]
    store.calls.clear()
    admitter.tick(fresh=True)
    assert store.calls == ["search_experiments", "search_runs", "get_run"]

    nobody_wakes_it = Admitter(store, None, None, home=None)  # a cluster elsewhere: its clients cannot wake it
    nobody_wakes_it.tick()
    store.calls.clear()
    nobody_wakes_it.tick(fresh=False)
    assert store.calls == ["search_experiments", "search_runs", "get_run"]


def test_the_admitter_looks_often_only_while_a_job_waits_to_start(tmp_path):
    """A job that runs (its Ray job there) and nothing behind it: the looks stay ten seconds apart
    (each costs an MLflow search and a Ray request, CPU a small node's trials would lose); a queued
    job, or an admitted one whose Ray job is gone (started again at the next look), makes them fast."""
    from jobs.queue import Admitter

    class RayJobs:
        jobs = {"run-job": SimpleNamespace(status="RUNNING")}

        def get_job_info(self, ray_job_id):
            if ray_job_id not in self.jobs:
                raise RuntimeError(f"Request failed with status code 404: Job {ray_job_id} does not exist.")
            return self.jobs[ray_job_id]

    running = _run("a", "RUNNING", admitted=1)
    running.data.tags["mnistjobs.ray_job_id"] = "run-job"
    running.data.tags["mnistjobs.waiting_trials"] = "0"
    store = _Store([running])
    admitter = Admitter(store, RayJobs(), None, home=str(tmp_path))
    assert admitter.tick() is None and admitter.busy is False
    store.runs.append(_run("b", "SCHEDULED", submitted=2))
    admitter._start = lambda e: None  # Ray would be asked to start b here: the look's outcome is what counts
    admitter.tick()
    assert admitter.busy is True
    store.runs = [running]
    RayJobs.jobs = {}  # the head was replaced: a started again at the next look
    admitter.tick()
    assert admitter.busy is True


def test_the_admitter_polls_slowly_while_the_queue_is_empty_and_fast_while_it_holds_jobs(tmp_path):
    import threading

    from jobs.queue import Admitter

    stop = threading.Event()
    busy = iter([False, True, False])
    admitter = Admitter(None, None, None, home=None)

    def tick(fresh=True):
        admitter.busy = next(busy)

    class Waker:
        port, timeouts = 1, []

        def wait(self, timeout):
            self.timeouts.append(timeout)
            if len(self.timeouts) == 3:
                stop.set()
            return False

        def close(self):
            pass

    admitter.tick, admitter.waker = tick, Waker()
    admitter.run_forever(stop, interval=1.0, idle_interval=10.0)
    assert Waker.timeouts == [10.0, 1.0, 10.0] and admitter.ticks == 3


def test_wake_makes_an_idle_admitter_look_again_at_once(tmp_path):
    """interval 3600 s: without the wake-up the loop would sleep for an hour after its first look
    and the join below would give up with one look taken."""
    import threading

    from jobs.queue import Admitter, wake
    from jobs.state import wake_port_path

    stop, looks = threading.Event(), []
    admitter = Admitter(None, None, None, home=str(tmp_path))

    def tick(fresh=True):
        looks.append(fresh)
        if len(looks) == 2:
            stop.set()

    admitter.tick = tick
    waker = admitter.listen()
    assert wake_port_path(tmp_path).read_text().strip() == str(waker.port)
    assert oct(wake_port_path(tmp_path).stat().st_mode & 0o777) == "0o600"
    loop = threading.Thread(target=admitter.run_forever, args=(stop, 3600.0, 3600.0), daemon=True)
    loop.start()
    wake(tmp_path)
    loop.join(timeout=120)
    assert not loop.is_alive() and looks == [True, True]  # the woken look reads the experiments afresh
    assert not wake_port_path(tmp_path).exists()  # the loop's end takes its port away


def test_wake_never_fails_without_an_admitter(tmp_path):
    from jobs.queue import Waker, wake
    from jobs.state import wake_port_path

    assert wake(tmp_path / "no-such-home") is None
    path = wake_port_path(tmp_path)
    for text in ("", "not a port", "0", "70000", "-5"):
        path.write_text(text)
        assert wake(tmp_path) is None
    gone = Waker()
    port = gone.port
    gone.close()
    path.write_text(str(port))  # a stale file: its admitter died
    assert wake(tmp_path) is None
    waker = Waker()
    path.write_text(str(waker.port))
    try:
        for _ in range(3):
            wake(tmp_path)
        assert waker.wait(60) is True  # every datagram waiting is read at once
        assert waker.wait(0) is False
    finally:
        waker.close()
