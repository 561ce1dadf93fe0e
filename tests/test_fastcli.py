"""A CLI that answers at once, and `train` to its first batch without torch._dynamo (issue 16).

`list`, `status`, `logs`, `cancel` and `queue` read the Ray job API and MLflow over plain HTTP
(jobs.rest): their processes import no Ray, MLflow, torch or pandas, and print what the Ray and
MLflow clients made them print (the same command, run with those clients, is the reference).
The optimizers of mnistnets.optim are torch's, minus the first torch._dynamo import: the same
updates and state_dict, bit for bit. Nothing here measures time (bench/cli_latency.py does).
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from _service_helpers import CLEAN_ENV, job_id_of, mlflow_client, run_cli, wait_for

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("mlflow", "ray", "torch", "pandas")


# ------------------------------------------------------------------------------ the optimizers

def _train(opt_cls, model, steps: int, seed: int, **kw):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    opt = opt_cls(model.parameters(), **kw)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_are_torchs_bit_for_bit(name):
    """Same parameters after every step, the same state_dict, and a state_dict of torch's own
    class loads into ours (and back), continuing identically: checkpoints stay interchangeable."""
    import torch

    from mnistnets import optim

    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    kw = ({"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4} if name == "sgd"
          else {"lr": 0.01, "weight_decay": 1e-2})
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    ours_m, theirs_m = copy.deepcopy(base), copy.deepcopy(base)
    ours = _train(optim.OPTIMIZER_CLASSES[name], ours_m, 7, seed=1, **kw)
    theirs = _train(torch_cls, theirs_m, 7, seed=1, **kw)
    assert isinstance(ours, torch_cls)
    for a, b in zip(ours_m.parameters(), theirs_m.parameters()):
        assert torch.equal(a, b)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours["param_groups"] == sd_theirs["param_groups"]
    assert sd_ours["state"].keys() == sd_theirs["state"].keys()
    for k in sd_ours["state"]:
        for field, value in sd_ours["state"][k].items():
            assert torch.equal(value, sd_theirs["state"][k][field]), (k, field)
    # torch's state into ours, ours into torch's: both continue the same way
    cont_ours_m, cont_theirs_m = copy.deepcopy(theirs_m), copy.deepcopy(theirs_m)
    cont_ours = optim.OPTIMIZER_CLASSES[name](cont_ours_m.parameters(), **kw)
    cont_ours.load_state_dict(sd_theirs)
    cont_theirs = torch_cls(cont_theirs_m.parameters(), **kw)
    cont_theirs.load_state_dict(sd_ours)
    for opt, model in ((cont_ours, cont_ours_m), (cont_theirs, cont_theirs_m)):
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(cont_ours_m.parameters(), cont_theirs_m.parameters()):
        assert torch.equal(a, b)


def test_training_and_schedule_checks_do_not_import_dynamo(synthetic_dir):
    """A fresh process: validating a config (its throwaway schedule check) and an epoch of fit()
    with each optimizer leave torch._dynamo unimported; with torch._dynamo imported first (as
    torch.compile does), the same fit() goes through torch's decorated methods and ends with the
    same weights."""
    code = (
        "import sys, torch\n"
        "dyn = sys.argv[1] == 'dynamo'\n"
        "if dyn: import torch._dynamo\n"
        "from mnistnets.data import load_mnist\n"
        "from mnistnets.train import recipe_for, fit\n"
        "data = load_mnist(sys.argv[2])\n"
        "sums = []\n"
        "for opt in ('sgd', 'adam', 'adamw'):\n"
        "    cfg = recipe_for('v2', optimizer=opt, epochs=1, train_limit=64, test_limit=32, batch_size=32,\n"
        "                     device='cpu', tta='none').validate()\n"
        "    last = list(fit(cfg, data=data))[-1]\n"
        "    sums.append(repr(last['test_loss']))\n"
        "print('DYNAMO' if 'torch._dynamo' in sys.modules else 'NO-DYNAMO', ' '.join(sums))\n")
    outs = {}
    for mode in ("plain", "dynamo"):
        out = subprocess.run([sys.executable, "-c", code, mode, str(synthetic_dir)], cwd=REPO, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr[-3000:]
        outs[mode] = out.stdout.split()
    assert outs["plain"][0] == "NO-DYNAMO" and outs["dynamo"][0] == "DYNAMO"
    assert outs["plain"][1:] == outs["dynamo"][1:]  # the same losses, to the last digit


# ----------------------------------------------------------------------------- plain HTTP (fast)

def test_ray_reader_names_an_unreachable_dashboard():
    from jobs.cluster import UnreachableError
    from jobs.rest import RayJobs

    with pytest.raises(UnreachableError, match=r"Cannot use the Ray job API at http://127\.0\.0\.1:9"):
        RayJobs("http://127.0.0.1:9", {}).list_jobs()


def test_mlflow_run_json_reads_as_mlflow_client_names():
    from jobs.rest import run_of

    run = run_of({"info": {"run_id": "r1", "run_name": "v2-cosine-s1", "experiment_id": 3, "status": "FINISHED",
                           "start_time": "1700000000000", "lifecycle_stage": "active"},
                  "data": {"tags": [{"key": "mnistjobs.job_id", "value": "mj-1"}],
                           "params": [{"key": "epochs", "value": "2"}],
                           "metrics": [{"key": "test_acc", "value": 97.5, "step": 2, "timestamp": 1}]}})
    assert (run.info.run_id, run.info.run_name, run.info.experiment_id, run.info.status) == (
        "r1", "v2-cosine-s1", "3", "FINISHED")
    assert run.info.start_time == 1700000000000 and run.info.end_time is None
    assert run.data.tags == {"mnistjobs.job_id": "mj-1"} and run.data.params == {"epochs": "2"}
    assert run.data.metrics == {"test_acc": 97.5}


# ------------------------------------------------------------------- with the embedded services

def _modules_imported(args, home) -> tuple[set[str], subprocess.CompletedProcess]:
    """Run `python -X importtime -m jobs.cli ARGS --home HOME` as a whole process; the top-level
    names of every module it imported."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "jobs.cli", *map(str, args), "--home", str(home)],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    names = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", out.stderr, re.M)}
    return names, out


@pytest.mark.slow
def test_fast_commands_import_no_ray_mlflow_torch_or_pandas(embedded, finished_sweep):
    job = finished_sweep.job_id
    for args in (["list"], ["status"], ["status", job], ["logs", job], ["queue"], ["cancel", job]):
        names, out = _modules_imported(args, embedded.home)
        assert out.returncode == 0, (args, out.stdout, out.stderr[-2000:])
        assert "jobs" in names and "click" in names, args  # the importtime lines were read
        assert not names & set(HEAVY), (args, sorted(names & set(HEAVY)))
    names, out = _modules_imported(["status", job], embedded.home)
    assert f"Job {job}: SUCCEEDED" in out.stdout and "v2-cosine-s1" in out.stdout


def _both(args, home, monkeypatch) -> tuple[str, str]:
    """The command's output through jobs.rest, and through Ray's and MLflow's own clients (the
    plain-HTTP reader swapped for JobSubmissionClient, which routes MLflow to MlflowClient)."""
    from jobs import cluster

    fast = run_cli(args, home=home)
    with monkeypatch.context() as m:
        m.setattr(cluster, "job_reader", cluster.job_client)
        full = run_cli(args, home=home)
    assert fast.exit_code == full.exit_code == 0, (args, fast.output, full.output)
    return fast.output, full.output


def _steady(text: str) -> str:
    """Output without what changes from one second to the next: a running job's run time."""
    return re.sub(r"\b\d+m\d\ds\b|\b\d+h\d\dm\b", "<time>", text)


def _both_of_a_running_job(args, home, monkeypatch, tries: int = 6) -> tuple[str, str]:
    """:func:`_both` while a job runs: its epochs go on between the two reads, so a pair that
    differs is read again (a difference in how the two print stays in every pair). Up to six
    pairs: with an epoch every second or so, three in a row once straddled an epoch each (CI on a
    loaded 2-core machine: "6/30" through one reader, "5/30" through the other)."""
    for _ in range(tries):
        fast, full = _both(args, home, monkeypatch)
        if _steady(fast) == _steady(full):
            break
    return _steady(fast), _steady(full)


@pytest.mark.slow
def test_fast_commands_print_what_the_ray_and_mlflow_clients_printed(embedded, finished_sweep, synthetic_dir,
                                                                       monkeypatch):
    """A finished job, a running one and a queued one: list, status, status JOB, logs JOB and
    queue print the same through plain HTTP as through Ray's and MLflow's clients; cancel of the
    queued job prints what it printed, and its run ends KILLED."""
    home, done = embedded.home, finished_sweep.job_id
    for args in (["status", done], ["logs", done], ["logs", done, "--full"]):
        fast, full = _both(args, home, monkeypatch)
        assert fast == full, args
    assert "[v0-cosine-s1] epoch 1/1" in _both(["logs", done], home, monkeypatch)[0]

    # A (two 2-CPU trials on 2 CPUs) runs its first trial while its second waits, so B, behind
    # it, stays queued (the next job is admitted once A has started all its trials).
    # (all 512 synthetic images an epoch, 32 batches of 16: several times the 8 steps it had, so
    # that most pairs of reads fall within one epoch)
    common = ["--cpus-per-trial", 2, "--train-limit", 512, "--test-limit", 64, "--batch-size", 16,
              "--schedules", "cosine", "--data-dir", synthetic_dir, "--experiment", "fastcli"]
    a = job_id_of(run_cli(["submit", "--models", "v0", "--seeds", 2, "--epochs", 30, *common], home=home).output)
    b = job_id_of(run_cli(["submit", "--models", "v2", "--epochs", 1, *common], home=home).output)
    mlf = mlflow_client(embedded)
    from jobs.tracking import job_runs

    wait_for(lambda: job_runs(mlf, a, role="trial"), 180, what="A's first trial to start")
    try:
        for args in (["list"], ["status"], ["status", a], ["status", b], ["queue"], ["logs", b]):
            fast, full = _both_of_a_running_job(args, home, monkeypatch)
            assert fast == full, args
        assert re.search(rf"Job {b}: QUEUED  \(place \d+ of \d+ in the queue, priority 0",
                         run_cli(["status", b], home=home).output)
        assert re.search(rf"{a}\s+RUNNING", run_cli(["list"], home=home).output)
        cancelled = run_cli(["cancel", b], home=home)
        assert cancelled.exit_code == 0 and cancelled.output == (
            f"Job {b}: STOPPED; taken out of the queue before it started.\n"
            f"Marked 1 MLflow run(s) that were still RUNNING or SCHEDULED as KILLED.\n"), cancelled.output
        (parent,) = job_runs(mlf, b, role="sweep")
        assert parent.info.status == "KILLED"
    finally:
        stopped = run_cli(["cancel", a], home=home)
    assert stopped.exit_code == 0 and f"Job {a}: STOPPED." in stopped.output, stopped.output
    assert {r.info.status for r in job_runs(mlf, a)} == {"KILLED"}
    for args in (["list"], ["queue"], ["status", a], ["status", b], ["logs", b]):  # ended: the same, at rest
        fast, full = _both(args, home, monkeypatch)
        assert _steady(fast) == _steady(full), args


@pytest.mark.slow
def test_the_plain_http_readers_need_the_credentials(embedded):
    """Ray's job API refuses no token (401) and a wrong one (403), MLflow a wrong password (401);
    with the right ones both answer; the CLI says which credential to fix (exit 2)."""
    from jobs.rest import AuthRefused, HttpFailure, MlflowRest, RayJobs

    with pytest.raises(AuthRefused, match="401"):
        RayJobs(embedded.dashboard_url, {}).list_jobs()
    with pytest.raises(AuthRefused, match="403"):
        RayJobs(embedded.dashboard_url, {"Authorization": "Bearer " + "0" * 64}).list_jobs()
    assert isinstance(RayJobs(embedded.dashboard_url, embedded.headers).list_jobs(), list)
    import base64

    wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:" + b"x" * 32).decode()}
    with pytest.raises(HttpFailure) as refused:
        MlflowRest(embedded.mlflow_url, wrong).search_experiments()
    assert refused.value.status == 401
    with pytest.raises(HttpFailure):
        MlflowRest(embedded.mlflow_url, {}).search_experiments()
    assert any(e.name == "Default" for e in MlflowRest(embedded.mlflow_url, embedded.mlflow_headers).search_experiments())
    # the CLI at this dashboard by another name (so not as the embedded cluster), a wrong token
    port = embedded.dashboard_url.rsplit(":", 1)[1]
    result = CliRunner().invoke(__import__("jobs.cli", fromlist=["main"]).main,
                                ["list", "--address", f"localhost:{port}", "--home", str(embedded.home)],
                                env={**CLEAN_ENV, "RAY_AUTH_TOKEN": "0" * 64}, catch_exceptions=False)
    assert result.exit_code == 2 and "403" in result.output and "RAY_AUTH_TOKEN" in result.output, result.output


def test_the_plain_http_client_marks_a_queued_parent_run_running_as_mlflows_own_does(embedded):
    """The sweep driver's first MLflow steps over plain HTTP: the queued (SCHEDULED) parent run
    found again and marked RUNNING with its Ray job, its tags set in one request."""
    from jobs import tracking
    from jobs.contract import TAG_RAY_JOB
    from jobs.rest import MlflowRest
    from jobs.spec import SweepSpec

    full = tracking.client(embedded.mlflow_url)
    lite = MlflowRest(embedded.mlflow_url, embedded.mlflow_headers)
    experiment_id = tracking.get_or_create_experiment(full, "plain-http-driver")
    spec = SweepSpec(models=["v2"], epochs=1).validate(deep=False)
    queued = tracking.open_sweep_run(full, spec, "plain-http-job", experiment_id, None, status="SCHEDULED")
    assert full.get_run(queued.run_id).info.status == "SCHEDULED"
    found = tracking.open_sweep_run(lite, spec, "plain-http-job", experiment_id, "plain-http-job-r1")
    assert found.run_id == queued.run_id and found.existing is not None
    tracking.set_tags(lite, found.run_id, {"a.tag": "x", "b.tag": 2})
    run = full.get_run(queued.run_id)
    assert run.info.status == "RUNNING" and run.info.end_time is None
    assert run.data.tags[TAG_RAY_JOB] == "plain-http-job-r1"
    assert run.data.tags["a.tag"] == "x" and run.data.tags["b.tag"] == "2"
    found.finish("FINISHED")
    assert full.get_run(queued.run_id).info.status == "FINISHED"


def test_the_drivers_later_mlflow_client_waits_for_the_first_trial_unless_asked(monkeypatch):
    """jobs.tracking.LaterClient makes MLflow's client only once a trial started, or at once
    when the job's end asks for it first (Tune returned without starting any trial)."""
    import threading

    from jobs import tracking

    made = []
    monkeypatch.setattr(tracking, "client", lambda uri=None: made.append(uri) or f"client of {uri}")
    monkeypatch.setattr(tracking, "_TRIALS_STARTED", threading.Event())
    later = tracking.LaterClient("http://mlflow.example", wait=3600)
    assert later._thread.is_alive() and made == []  # waiting for the first trial
    tracking.trials_started()
    later._thread.join(60)
    assert made == ["http://mlflow.example"] and later.get() == "client of http://mlflow.example"

    monkeypatch.setattr(tracking, "_TRIALS_STARTED", threading.Event())
    early = tracking.LaterClient("http://other.example", wait=3600)
    asker = threading.Thread(target=early.get, daemon=True)
    asker.start()
    asker.join(60)  # an hour's wait if get() did not end it
    assert not asker.is_alive() and made[-1] == "http://other.example"


def test_the_plain_http_client_retries_a_busy_or_absent_server_only_when_patient():
    """MlflowRest with ``patience`` (the sweep's driver) retries 5xx / 429 and a server that does
    not answer, as MLflow's own client does; without it (the CLI) one try; a 4xx is never retried."""
    import http.server
    import socket
    import threading

    from jobs.rest import HttpFailure, MlflowRest

    answers: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            code = answers.pop(0) if answers else 200
            body = b'{"run": {"info": {"run_id": "r1", "status": "RUNNING"}, "data": {}}}' if code == 200 else b"{}"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    late: list = []
    def serve(server):
        threading.Thread(target=server.serve_forever, daemon=True).start()

    try:
        answers[:] = [503, 429]
        assert MlflowRest(uri, {}, patience=60).get_run("r1").info.status == "RUNNING"
        assert answers == []  # both refusals were retried
        answers[:] = [503]
        with pytest.raises(HttpFailure) as failed:
            MlflowRest(uri, {}).get_run("r1")  # no patience: one try
        assert failed.value.status == 503
        answers[:] = [404, 200]
        with pytest.raises(HttpFailure) as failed:
            MlflowRest(uri, {}, patience=60).get_run("r1")
        assert failed.value.status == 404 and answers == [200]  # a 4xx is an answer, not retried
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        MlflowRest(f"http://127.0.0.1:{port}", {}).get_run("r1")  # refused: no patience, no retry

    def start_late():
        late.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler))
        serve(late[0])

    threading.Timer(1.5, start_late).start()  # the server comes back while the patient client retries
    try:
        assert MlflowRest(f"http://127.0.0.1:{port}", {}, patience=60).get_run("r1").info.status == "RUNNING"
    finally:
        for srv in late:
            srv.shutdown()
            srv.server_close()
