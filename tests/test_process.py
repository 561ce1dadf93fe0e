"""jobs.process: the fast exit of the CLI and the sweep driver does what an ordinary exit does that
matters (threads joined, atexit functions run, output flushed, the exit status), in its order."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from jobs.process import fast_exit

    def late():
        time.sleep(0.3)
        print("thread done", flush=True)

    threading.Thread(target=late).start()          # not a daemon: joined before the exit
    atexit.register(lambda: print("atexit ran"))   # unflushed: flushed before the exit
    sys.stdout.write("no newline yet")
    fast_exit({code}, last_words={last!r})
    print("never printed")
""")


@pytest.mark.parametrize("code, status", [(0, 0), (None, 0), (3, 3), ("a message", 1)])
def test_fast_exit_joins_threads_runs_atexit_and_flushes(code, status):
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(code=repr(code), last="the end")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "no newline yetthread done\natexit ran\nthe end\n"
    assert proc.stderr == ("a message\n" if status == 1 else "")


def test_the_console_script_keeps_the_exit_codes():
    run = [sys.executable, "-c", "from jobs.cli import run; run()"]
    ok = subprocess.run([*run, "models"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "v0" in ok.stdout, ok.stderr
    bad = subprocess.run([*run, "submit", "--models", "v9", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "v9" in bad.stderr and bad.stdout == "", (bad.stdout, bad.stderr)
    usage = subprocess.run([*run, "submit", "--no-such-option"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "No such option" in usage.stderr


def test_free_ports_of_one_process_are_all_different():
    from jobs.services import free_port

    ports = [free_port() for _ in range(200)]  # the OS offered the same one twice in CI's ray start
    assert len(set(ports)) == len(ports)


# ------------------------------------------------------------------------- fork_call (submit's checks)
# Each in a fresh process: fork_call forks only a single-threaded process, and this test session's
# may have threads (torch's pool) by the time these run.

def _python(script: str, env: dict | None = None, *, prelude: str = "") -> subprocess.CompletedProcess:
    """Run ``script`` (dedented) in a fresh Python, ``prelude`` (e.g. ``_RAYLET_WORKERS``) first."""
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


#: For the scripts of the prestart tests (a Ray started by the script itself): ``workers()``, the
#: pids of the raylet's worker processes (its agents aside).
_RAYLET_WORKERS = """
    import psutil

    def workers():
        raylet = next(p for p in psutil.Process().children(recursive=True) if p.name() == "raylet")
        found = set()
        for p in raylet.children():
            try:
                line = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "default_worker.py" in line or line.startswith("ray::"):
                found.add(p.pid)
        return found
"""


def test_fork_call_runs_in_a_child_and_hands_back_values_errors_and_crashes():
    proc = _python("""
        import os
        from jobs.process import ChildFailed, fork_call
        from jobs.spec import SpecError

        result = fork_call(lambda: {"pid": os.getpid(), "data_dir": "/data"})
        assert result.in_child
        value = result()
        assert value["data_dir"] == "/data" and value["pid"] != os.getpid(), value

        def bad_spec():
            raise SpecError("Unknown model 'v9' (--models)")

        try:
            fork_call(bad_spec, (SpecError,))()
        except ChildFailed as exc:
            assert str(exc) == "Unknown model 'v9' (--models)" and exc.kind == "SpecError"
        else:
            raise AssertionError("no ChildFailed")
        for fn, words in ((lambda: 1 / 0, "ZeroDivisionError"), (lambda: object(), "JSON cannot carry")):
            try:
                fork_call(fn, (SpecError,))()
            except RuntimeError as exc:  # a bug, not a usage error: raised with the child's traceback
                assert words in str(exc), exc
            else:
                raise AssertionError("no RuntimeError")
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_fork_call_runs_here_when_another_thread_runs():
    """A fork copies the locks other threads hold (a child forked after torch's thread pool started
    hangs): with a second thread alive fork_call runs the function in this process."""
    proc = _python("""
        import os, threading
        from jobs.process import fork_call, single_threaded

        assert single_threaded()
        stop = threading.Event()
        threading.Thread(target=stop.wait).start()
        assert not single_threaded()
        result = fork_call(lambda: os.getpid())
        assert not result.in_child and result() == os.getpid()
        stop.set()
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


#: cosine patched to an lr below 0 at the run's end: what only the stepping check sees (as a change
#: in torch could make it); torch is imported in the schedule's builder, as in mnistnets.schedules.
NEGATIVE_COSINE = """
    import dataclasses
    from mnistnets.schedules import SCHEDULES

    def build(opt, epochs, steps, **kw):
        from torch.optim import lr_scheduler

        return lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps, eta_min=-0.05)

    SCHEDULES["cosine"] = dataclasses.replace(SCHEDULES["cosine"], build=build)
"""


def test_submit_refuses_a_schedule_only_stepping_catches_and_creates_nothing(tmp_path, synthetic_dir):
    """`submit` steps the schedules in a forked child while it imports Ray's and MLflow's clients:
    a schedule that only the stepping check refuses still exits 2 with that check's message, and
    nothing is created."""
    home = tmp_path / "home"
    proc = _python(NEGATIVE_COSINE + f"""
    import sys
    from jobs.cli import run

    sys.argv = ["mnistjobs", "submit", "--models", "v2", "--schedules", "cosine", "--epochs", "1",
                "--data-dir", {str(synthetic_dir)!r}, "--home", {str(home)!r}]
    run()
    """, env={"MNISTJOBS_STARTUP_TRACE": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "checks forked" in output  # the check ran in the child
    assert "Trial v2-cosine-s1" in output and "the lr would be -" in output
    assert "Traceback" not in output
    assert not home.exists()


def test_the_drivers_checks_import_no_torch(synthetic_dir):
    """The job's driver validates its spec shallow and only finds the data files: no torch (about
    2 s of its start on a 2-core machine); the deep check is submit's."""
    script = textwrap.dedent(f"""
        import sys
        from jobs.spec import SweepSpec
        from jobs.datadir import find_data
        import jobs.sweep  # the driver's module, Ray Tune and the trial function included
        spec = SweepSpec.from_json(SweepSpec(models=["all"], schedules=["onecycle", "cosine:warmup=1"],
                                             seeds=2).to_json()).validate(deep=False)
        assert spec.trial_count() == 16
        find_data({str(synthetic_dir)!r})
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_submit_refuses_a_bad_spec_or_data_folder_before_it_imports_torch(tmp_path):
    """What the torch-free checks refuse (an unknown model, a data folder that is not there) is
    refused before torch is imported: the answer comes in a fraction of a second."""
    proc = _python(f"""
        import sys
        from jobs.cli import main

        for args in (["--models", "v9"], ["--data-dir", {str(tmp_path / "nowhere")!r}]):
            try:
                main.main(["submit", *args, "--home", {str(tmp_path / "home")!r}], standalone_mode=False)
            except Exception as exc:
                print(type(exc).__name__, "torch" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["UsageFailure", "False", "UsageFailure", "False"], proc.stdout
    assert not (tmp_path / "home").exists()


@pytest.mark.slow
def test_tune_in_the_driver_imports_no_torch():
    """With the driver's Tune settings (jobs.sweep._tune_environment) Tuner.fit() adds none of
    Tune's default result loggers, whose TensorBoard one imports tensorboardX and torch."""
    proc = _python("""
        import sys
        import jobs.sweep
        import ray
        from ray import tune

        jobs.sweep._tune_environment()
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
        results = tune.Tuner(lambda config: {"x": 1}, run_config=tune.RunConfig(verbose=0)).fit()
        assert results.num_errors == 0 and len(results) == 1
        ray.shutdown()
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "tensorboardX"))))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_shallow_validation_leaves_out_only_the_stepping(monkeypatch):
    import dataclasses

    from torch.optim import lr_scheduler

    from jobs.spec import SpecError, SweepSpec
    from mnistnets import config
    from mnistnets.schedules import SCHEDULES

    monkeypatch.setitem(SCHEDULES, "cosine", dataclasses.replace(
        SCHEDULES["cosine"], build=lambda opt, epochs, steps, **kw: lr_scheduler.CosineAnnealingLR(
            opt, T_max=epochs * steps, eta_min=-0.05)))
    config._check_schedule.cache_clear()  # the checked run shapes: none yet with the patched cosine
    try:
        SweepSpec(models=["v2"], schedules=["cosine"], epochs=1).validate(deep=False)  # not stepped
        with pytest.raises(SpecError, match="the lr would be -"):
            SweepSpec(models=["v2"], schedules=["cosine"], epochs=1).validate()
    finally:
        config._check_schedule.cache_clear()
    # everything else is checked either way
    for deep in (False, True):
        with pytest.raises(SpecError, match="no key 'peak'"):
            SweepSpec(models=["v2"], schedules=["onecycle:peak=0.1"]).validate(deep=deep)
        with pytest.raises(SpecError, match="more than float32"):
            SweepSpec(models=["v2"], schedules=["onecycle:max_lr=1e308"]).validate(deep=deep)


def test_warm_worker_imports_what_a_trial_needs_and_never_raises():
    """Ray's setup hook for a sweep's workers (jobs.trial.warm_worker) imports torch, the trainer
    and Tune, and records when; MLflow is left to the trial (imported after its first batch); an
    import that fails leaves it quiet (a raising hook would make Ray end the worker) with nothing
    recorded."""
    proc = _python("""
        import sys
        import jobs.trial as t

        assert "torch" not in sys.modules and "mlflow" not in sys.modules
        t.warm_worker()
        print(all(m in sys.modules for m in ("torch", "mnistnets.train", "ray.tune")),
              t._WARMED["began"] <= t._WARMED["ended"])
        for reader in t._PREFETCH:
            reader.join()
        print("mlflow" not in sys.modules)
        t._WARMED.clear()
        sys.modules["mnistnets.train"] = None  # an import that fails
        t.warm_worker()
        print(t._WARMED == {})
    """, env={"MNISTJOBS_SPEC": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "True", "True"], proc.stdout


def test_warm_worker_reads_the_jobs_mnist_ahead_of_the_trial_and_never_downloads(tmp_path):
    """The hook reads MNIST from the folder the job's spec names (its env var) into the worker's
    cache, so the trial's own read finds it there (the same object); with no folder it would have
    to download, it reads nothing (the trial downloads, with its own errors)."""
    from tests.synthetic import make_synthetic_mnist

    folder = make_synthetic_mnist(tmp_path / "mnist", n_train=64, n_test=32)
    script = """
        import json, os, sys
        import jobs.trial as t

        t.warm_worker()
        t._PREFETCH[0].join()
        cached = dict(t._DATA_CACHE)
        print(sorted(cached) == ([str(os.path.realpath(sys.argv[1]))] if sys.argv[1] != "-" else []))
        if cached:
            folder, data = t._DataReader(json.loads(os.environ["MNISTJOBS_SPEC"])["data_dir"]).result("here")
            print(data is cached[folder], len(data.train_labels))
        print(not any(os.scandir(os.environ["MNISTJOBS_HOME"])))
    """
    home = tmp_path / "home"
    home.mkdir()
    env = {"MNISTJOBS_HOME": str(home), "MNISTJOBS_DATA_DIR": ""}
    given = _python(script.replace("sys.argv[1]", repr(str(folder))),
                    env={**env, "MNISTJOBS_SPEC": json.dumps({"data_dir": str(folder)})})
    assert given.returncode == 0, given.stderr[-3000:]
    assert given.stdout.split() == ["True", "True", "64", "True"], given.stdout
    none = _python(script.replace("sys.argv[1]", repr("-")), env={**env, "MNISTJOBS_SPEC": json.dumps({})})
    assert none.returncode == 0, none.stderr[-3000:]
    assert none.stdout.split() == ["True", "True"], none.stdout


@pytest.mark.slow
def test_the_drivers_workers_are_warmed_before_the_trial_begins():
    """The driver's ray.init (jobs.sweep.connect_ray) names warm_worker as the job's worker setup
    hook: the trial function finds torch imported and the hook's record there when it begins (and
    MLflow not: a trial imports it once it trains, jobs.trial._RunOpener)."""
    proc = _python("""
        import sys
        import jobs.sweep
        import ray
        from ray import tune

        def probe(config):
            import sys
            import jobs.trial
            return {"torch": "torch" in sys.modules, "mlflow": "mlflow" in sys.modules,
                    "warmed": "ended" in jobs.trial._WARMED}

        jobs.sweep._tune_environment()
        jobs.sweep.connect_ray(num_cpus=1, include_dashboard=False)
        results = tune.Tuner(probe, run_config=tune.RunConfig(verbose=0)).fit()
        assert results.num_errors == 0, results.errors
        r = results[0].metrics
        print(r["torch"], r["mlflow"], r["warmed"])
        ray.shutdown()
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # torch in, the hook's record there, and MLflow not yet: the trial imports it after its first batch
    assert proc.stdout.strip().splitlines()[-1].split() == ["True", "False", "True"], proc.stdout


def test_tunes_trial_env_vars_are_the_ones_rayconnect_predicts():
    """jobs.rayconnect copies the env_vars Tune gives its trainables' actor class (so the driver
    can predict a trial's runtime_env before it imports Tune): the copy matches Tune's own."""
    from ray.tune.execution import class_cache

    from jobs import rayconnect

    assert rayconnect.TUNE_DEFAULT_ENV_VARS == class_cache.DEFAULT_ENV_VARS
    assert rayconnect.TUNE_PROPAGATED_ENV_VARS == frozenset(class_cache.ENV_VARS_TO_PROPAGATE)
    assert rayconnect.tune_actor_env_vars({"AWS_SESSION_TOKEN": "t", "HOME": "/h"}) == {
        "PL_DISABLE_FORK": "1", "AWS_SESSION_TOKEN": "t"}


def test_trial_workers_at_once_is_bounded_by_trials_concurrency_cpus_and_gpus():
    from jobs.rayconnect import trial_workers_at_once
    from jobs.spec import SweepSpec

    four = SweepSpec(models=["v0", "v1", "v2", "v3"], epochs=1)  # 4 trials, 1 CPU each
    assert trial_workers_at_once(four, {"CPU": 16.0}) == 4
    assert trial_workers_at_once(four, {"CPU": 2.0}) == 2
    assert trial_workers_at_once(four, {"CPU": 0.5}) == 0
    assert trial_workers_at_once(SweepSpec(models=["v0", "v1", "v2", "v3"], epochs=1, max_concurrent=1),
                                 {"CPU": 16.0}) == 1
    assert trial_workers_at_once(SweepSpec(models=["v0", "v1", "v2", "v3"], epochs=1, cpus_per_trial=2),
                                 {"CPU": 5.0}) == 2
    # on a GPU node each trial takes its share of a GPU (a quarter by default): one GPU, 4 trials
    assert trial_workers_at_once(SweepSpec(models=["v0", "v1", "v2", "v3"], seeds=2, epochs=1),
                                 {"CPU": 16.0, "GPU": 1.0}) == 4
    assert trial_workers_at_once(SweepSpec(models=["v0", "v1"], epochs=1, gpus_per_trial=1),
                                 {"CPU": 16.0, "GPU": 1.0}) == 1


def test_the_prestart_plan_fills_every_node_this_one_first_up_to_the_trials_at_once():
    """jobs.rayconnect.prestart_plan: each node as many workers as trials can start there, in the
    order given (this node first), no more than the sweep starts at once in all; a node where no
    trial fits gets none, and a trial's GPU share is the cluster's, not the node's."""
    from jobs.rayconnect import prestart_plan
    from jobs.spec import SweepSpec

    def node(name, cpus, gpus=0.0):
        res = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        return {"NodeID": name, "Resources": res, "Free": dict(res)}

    def plan(spec, nodes):
        return [(n["NodeID"], k) for n, k in prestart_plan(spec, nodes)]

    four = SweepSpec(models=["v0", "v1", "v2", "v3"], epochs=1)  # 4 trials, 1 CPU each
    assert plan(four, [node("head", 1), node("b", 1)]) == [("head", 1), ("b", 1)]
    assert plan(four, [node("head", 3), node("b", 8)]) == [("head", 3), ("b", 1)]
    assert plan(four, [node("head", 8), node("b", 8)]) == [("head", 4)]
    assert plan(four, [node("head", 0.5), node("b", 2)]) == [("b", 2)]
    limited = SweepSpec(models=["v0", "v1", "v2", "v3"], epochs=1, max_concurrent=3)
    assert plan(limited, [node("head", 2), node("b", 2)]) == [("head", 2), ("b", 1)]
    # A cluster with a GPU: every trial asks a quarter of one, so a node without any runs none.
    assert plan(four, [node("head", 8), node("gpu", 8, 1.0)]) == [("gpu", 4)]
    busy = node("head", 4)
    busy["Free"] = {"CPU": 1.0}
    assert plan(four, [busy, node("b", 2)]) == [("head", 1), ("b", 2)]


@pytest.mark.slow
def test_the_runtime_env_predicted_for_a_trial_is_the_one_ray_gives_it():
    """jobs.rayconnect.trial_runtime_env: from the job's runtime_env (the driver's ray.init, with
    env_vars of its own and one Tune propagates), the exact string Ray gives an actor of Tune's
    trainable class (the raylet hands a prestarted worker only to an actor whose string hashes
    the same)."""
    proc = _python("""
        import ray
        from ray.tune.execution.class_cache import _ActorClassCache
        from jobs import rayconnect

        ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": rayconnect.WARM_HOOK,
                              "env_vars": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "SPEC": '{"a": "é"}'}})

        class Probe:
            def env(self):
                return ray.get_runtime_context().get_runtime_env_string()

        actor = _ActorClassCache().get(Probe).options(num_cpus=0).remote()
        actual = ray.get(actor.env.remote())
        job = ray._private.worker.global_worker.core_worker.get_job_config()
        predicted = rayconnect.trial_runtime_env(job.runtime_env_info.serialized_runtime_env)
        print(predicted == actual)
        print(actual)
        ray.shutdown()
    """, env={"AWS_ACCESS_KEY_ID": "key id"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "True", proc.stdout
    assert '"AWS_ACCESS_KEY_ID":"key id"' in lines[-1] and '"PL_DISABLE_FORK":"1"' in lines[-1], lines[-1]


@pytest.mark.slow
def test_the_drivers_first_trial_runs_in_a_worker_the_driver_had_started():
    """jobs.rayconnect.connect_driver: ray.init, then the raylet starts the first trials' workers
    (bound to the job, with the trial's runtime_env) before Tune asks for anything, and Tune's
    trial runs in one of them. Without the prestart no worker of the job exists before
    Tuner.fit() (the wait below fails), and the trial would run in a worker started for it."""
    proc = _python("""
        import os
        import time
        import ray
        from ray import tune
        import jobs.sweep
        from jobs import rayconnect
        from jobs.spec import SweepSpec

        def probe(config):
            import os
            return {"pid": os.getpid()}

        jobs.sweep._tune_environment()
        spec = SweepSpec(models=["v2"], epochs=1).validate(deep=False)
        rayconnect.connect_ray(num_cpus=1, include_dashboard=False)
        before = workers()
        asked = rayconnect.prestart_trial_workers(spec)
        for _ in range(600):  # until the raylet has started it (a minute at most)
            started = workers() - before
            if started:
                break
            time.sleep(0.1)
        results = tune.Tuner(probe, run_config=tune.RunConfig(verbose=0)).fit()
        assert results.num_errors == 0, results.errors
        print(asked, len(started), results[0].metrics["pid"] in started)
        ray.shutdown()
    """, env={"RAY_prestart_worker_first_driver": "0"}, prelude=_RAYLET_WORKERS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].split() == ["1", "1", "True"], proc.stdout


#: The sweep driver's part in the admitter test below: jobs.sweep's Tune settings, connect_driver,
#: one trial that reports its worker's pid.
_PRESTARTED_DRIVER = """
import os, ray
from ray import tune
import jobs.sweep
from jobs import rayconnect
from jobs.spec import SweepSpec
def probe(config):
    import os
    return {"pid": os.getpid()}
jobs.sweep._tune_environment()
spec = SweepSpec.from_json(os.environ["MNISTJOBS_SPEC"]).validate(deep=False)
print("asked by the driver:", rayconnect.connect_driver(spec))
results = tune.Tuner(probe, run_config=tune.RunConfig(verbose=0)).fit()
assert results.num_errors == 0, results.errors
print("trial pid:", results[0].metrics["pid"])
"""


@pytest.mark.slow
def test_a_trial_runs_in_the_worker_the_queues_admitter_started_before_its_driver():
    """jobs.rayconnect.prestart_for_job (the queue's admitter, another Ray job): before the sweep's
    driver exists, the raylet starts a worker bound to no job with the runtime_env the driver's
    trials will have: Ray's job config of a submitted job (RAY_JOB_CONFIG_JSON, as Ray's job
    supervisor hands it to the driver) merged by the driver's ray.init with the setup hook, then
    Tune's env_vars. The driver, told so by MNISTJOBS_PRESTARTED, asks for none, and Tune's
    trial runs in that worker. With a wrong prediction (or none) the trial's worker is one Ray
    started for it, not in the set, and the test fails."""
    proc = _python("""
        import json, os, subprocess, sys, time
        import ray
        from jobs import rayconnect
        from jobs.spec import SweepSpec

        ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")  # the admitter's job
        spec_json = SweepSpec(models=["v2"], epochs=1).validate(deep=False).to_json()
        env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "PYTHONUNBUFFERED": "1", "MNISTJOBS_SPEC": spec_json}
        before = workers()
        asked = rayconnect.prestart_for_job(spec_json, env)
        for _ in range(600):  # until the raylet has started it (a minute at most)
            started = workers() - before
            if started:
                break
            time.sleep(0.1)
        driver = os.environ["DRIVER_SCRIPT"]
        address = ray.get_runtime_context().gcs_address
        out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=120, env={
            **os.environ, **env, "RAY_ADDRESS": address,
            "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": env}})})
        assert out.returncode == 0, out.stderr[-3000:]
        lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
        print(asked, env.get("MNISTJOBS_PRESTARTED"), len(started), lines["asked by the driver"],
              int(lines["trial pid"]) in started)
        ray.shutdown()
    """, env={"RAY_prestart_worker_first_driver": "0", "DRIVER_SCRIPT": _PRESTARTED_DRIVER},
                   prelude=_RAYLET_WORKERS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].split() == ["1", "1", "1", "0", "True"], proc.stdout


@pytest.mark.slow
def test_a_worker_started_ahead_that_no_trial_takes_ends_itself():
    """A worker the admitter had started ahead of a job belongs to no job until a trial takes it,
    and the raylet keeps idle workers up to one a CPU: one that no trial took ends itself once
    its wait is over (jobs.trial.warm_worker; a short wait here), and the cluster goes on."""
    proc = _python("""
        import json, time
        import ray
        from ray.core.generated import runtime_environment_pb2
        from jobs import rayconnect

        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        env = json.loads(rayconnect.job_runtime_env({"MNISTJOBS_UNUSED_WORKER_EXIT_S": "2"}))
        info = runtime_environment_pb2.RuntimeEnvInfo(serialized_runtime_env=json.dumps(env))
        info.runtime_env_config.setup_timeout_seconds = 600
        before = workers()
        rayconnect._ask_raylet(rayconnect._alive_nodes()[0], info, 1, None)  # this node first
        seen, gone = set(), False
        for _ in range(1200):  # two minutes at most
            now = workers() - before
            seen |= now
            if seen and not now:
                gone = True
                break
            time.sleep(0.1)

        @ray.remote(num_cpus=1)
        def one():
            return 1

        print(len(seen), gone, ray.get(one.remote()))
        ray.shutdown()
    """, env={"RAY_prestart_worker_first_driver": "0"}, prelude=_RAYLET_WORKERS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].split() == ["1", "True", "1"], proc.stdout


def test_a_trial_opens_its_mlflow_run_in_a_thread_once_its_first_batch_is_done(tmp_path):
    """jobs.trial._RunOpener: in a process that has not imported MLflow, the trial's MLflow side
    waits for its first batch (training_started), then opens the run in its thread with the node
    and device tags, the params, the layer table and the tags given meanwhile; run() hands over that
    run. A failure to open it (an experiment that does not exist) is raised by run(), in the
    trial's thread."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlf = MlflowClient(uri)
    exp = mlf.create_experiment("opener", artifact_location=str(tmp_path / "artifacts"))
    parent = mlf.create_run(exp).info.run_id
    proc = _python(f"""
        import sys, time
        from jobs import trial
        from mnistnets.train import TrainConfig

        cfg = TrainConfig(model="v2", epochs=1)
        facts = trial._describe(cfg)
        job = {{"experiment_id": "{exp}", "parent_run_id": "{parent}", "job_id": "j1", "log_model": False}}
        opener = trial._RunOpener("{uri}", job, cfg, facts, name="v2-t", trial_id="t1", run_id=None, resumed=None)
        time.sleep(1.0)
        print("waits", "mlflow" not in sys.modules and opener._mlf is None)
        opener.tags_once_open({{"mnistjobs.data_dir": "/data"}})
        opener.training_started()
        run = opener.run()
        print("run", run.run_id)
        opener.stop_system_metrics()
        bad = trial._RunOpener("{uri}", {{**job, "experiment_id": "999"}}, cfg, facts, name="v2-u", trial_id="t2",
                               run_id=None, resumed=None)
        bad.training_started()
        try:
            bad.run()
        except Exception as exc:
            print("raised", type(exc).__name__)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["waits"] == "True", proc.stdout
    assert lines["raised"] == "MlflowException", proc.stdout
    run = mlf.get_run(lines["run"])
    tags, params = run.data.tags, run.data.params
    assert tags["mnistjobs.trial_id"] == "t1" and tags["mlflow.parentRunId"] == parent, tags
    assert tags["mnistjobs.data_dir"] == "/data" and tags["mnistjobs.device"] == "cpu" and tags["mnistjobs.node"]
    assert params["model"] == "v2" and params["params"] == "4232" and params["device"] == "cpu", params
    assert [a.path for a in mlf.list_artifacts(run.info.run_id, "model")] == ["model/layers.txt"]


def test_a_resumed_trial_that_trained_every_epoch_asks_whether_its_run_finished(tmp_path):
    """jobs.trial._RunOpener.finished_already, for a trial restored from the checkpoint of its
    last epoch: True when its MLflow run is FINISHED (nothing to repeat); else the run is reopened
    (RUNNING again) with the epochs of the checkpoint's history it lacks."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlf = MlflowClient(uri)
    exp = mlf.create_experiment("resumed", artifact_location=str(tmp_path / "artifacts"))
    parent = mlf.create_run(exp).info.run_id
    done = mlf.create_run(exp).info.run_id
    mlf.set_terminated(done, "FINISHED")
    cut = mlf.create_run(exp).info.run_id
    mlf.set_terminated(cut, "FAILED")
    proc = _python(f"""
        from jobs import trial
        from mnistnets.train import TrainConfig

        cfg = TrainConfig(model="v2", epochs=1)
        facts = trial._describe(cfg)
        job = {{"experiment_id": "{exp}", "parent_run_id": "{parent}", "job_id": "j1", "log_model": False}}
        resumed = {{"epoch": 1, "history": [{{"epoch": 1, "test_acc": 91.5, "train_loss": 0.3}}]}}
        for run_id in ("{done}", "{cut}"):
            opener = trial._RunOpener("{uri}", job, cfg, facts, name="v2-t", trial_id="t1", run_id=run_id,
                                      resumed=resumed)
            print(opener.finished_already())
            opener.stop_system_metrics()
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "False"], proc.stdout
    assert mlf.get_run(done).info.status == "FINISHED"
    reopened = mlf.get_run(cut)
    assert reopened.info.status == "RUNNING" and reopened.data.metrics["test_acc"] == 91.5
    assert reopened.data.params["model"] == "v2"
