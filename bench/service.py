"""Service-overhead benchmark: the same small sweep (a) through the service and (b) as the bare
trainer in a loop, one run each, printed as a ratio (issue 3's goal: <= 1.05 for the 15-epoch
real-data sweep).

(a) service - a fresh embedded service set in a temp state folder: `mnistjobs up` (timed: the
              services' startup), then `mnistjobs submit ... --wait` (timed: from submit to every
              trial FINISHED), then `mnistjobs down`. Per-trial epoch seconds and when each trial
              ran come from MLflow; the trial workers' OMP_NUM_THREADS is read from /proc.
(b) bare    - mnistnets.train.fit for each trial of the same spec, one after another in this
              process, torch threads = --cpus-per-trial (what Ray gives each trial worker).

By default the sweep runs one trial at a time (--max-concurrent 1), like the bare loop, so the
ratio is the service's overhead alone. With --max-concurrent 0, Ray runs as many trials at
once as it has CPUs for; the report says how many overlapped, and the ratio then also holds the
gain from running them side by side.

    python bench/service.py                                   # v0,v2, 1 seed, 2 epochs, 6000/2000 images
    python bench/service.py --epochs 15 --full                # the real figure (slow on a CPU)
    python bench/service.py --max-concurrent 0                # let trials run side by side
    python bench/service.py --only service --footprint        # + the idle services' CPU and memory, CLI latency
    python bench/service.py --only service --baseline /tmp/base  # another checkout's code first, then this one's
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLEAN_VARS = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MNISTJOBS_HOME", "MNISTJOBS_RAY_PORT",
              "MNISTJOBS_DASHBOARD_PORT", "MNISTJOBS_MLFLOW_PORT")


def default_data_dir() -> str | None:
    for c in (os.environ.get("MNISTJOBS_DATA_DIR"), REPO.parent / "shared" / "data" / "mnist"):
        if c and Path(c).is_dir():
            return str(Path(c).resolve())
    return None


def build_spec(args):
    from jobs.spec import SweepSpec

    spec = SweepSpec()
    spec.update({"models": [args.models], "schedules": args.schedules or None, "seeds": args.seeds,
                 "epochs": args.epochs, "batch_size": args.batch_size, "train_limit": args.train_limit,
                 "test_limit": args.test_limit, "data_dir": args.data_dir, "cpus_per_trial": args.cpus_per_trial,
                 "max_concurrent": args.max_concurrent, "experiment": "bench-service"})
    return spec.validate()


def submit_args(args) -> list[str]:
    out = ["--models", args.models, "--seeds", str(args.seeds), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--cpus-per-trial", str(args.cpus_per_trial),
           "--max-concurrent", str(args.max_concurrent), "--data-dir", args.data_dir,
           "--experiment", "bench-service"]
    for s in args.schedules:
        out += ["--schedules", s]
    if args.train_limit:
        out += ["--train-limit", str(args.train_limit)]
    if args.test_limit:
        out += ["--test-limit", str(args.test_limit)]
    return out


def mnistjobs_cmd() -> list[str]:
    script = Path(sys.executable).with_name("mnistjobs")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from jobs.cli import run; run()"]


class WorkerThreads(threading.Thread):
    """Samples /proc while the sweep runs: the Ray trial workers of our service set (found by
    their MNISTJOBS_SERVICE_ID) and the CPU seconds of each of their threads. A thread with at
    least a quarter of the busiest one's CPU time is a compute thread; Ray's own use far less."""

    def __init__(self, service_id: str):
        super().__init__(daemon=True)
        self.marker = f"MNISTJOBS_SERVICE_ID={service_id}".encode()
        self.cpu: dict[int, dict[int, float]] = {}   # pid -> tid -> CPU seconds (last seen)
        self.title: dict[int, str] = {}
        self.stop = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")

    def _cpu_seconds(self, path: str) -> float:
        raw = Path(path).read_text()
        fields = raw[raw.rfind(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def run(self) -> None:
        while not self.stop.is_set():
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                pid = int(d)
                try:
                    if pid not in self.title:
                        cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                        if not cmd.startswith("ray::ImplicitFunc") and "train_trial" not in cmd:
                            continue
                        if self.marker not in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                            continue
                        self.title[pid] = cmd.split()[0][:40]
                    threads = self.cpu.setdefault(pid, {})
                    for tid in os.listdir(f"/proc/{d}/task"):
                        threads[int(tid)] = self._cpu_seconds(f"/proc/{d}/task/{tid}/stat")
                except (OSError, ValueError, IndexError):
                    continue
            self.stop.wait(0.5)

    def summary(self) -> list[dict]:
        out = []
        for pid, threads in sorted(self.cpu.items()):
            top = max(threads.values(), default=0.0)
            busy = sorted((round(s, 1) for s in threads.values() if s > max(1.0, 0.25 * top)), reverse=True)
            out.append({"pid": pid, "title": self.title[pid], "cpu_s": sum(threads.values()), "busy_threads": busy})
        return out


def _process_kind(cmdline: str) -> str:
    """A short name for one process of the service set (what the footprint's rows are)."""
    import re

    for pattern, kind in ((r"uvicorn|gunicorn|huey", "mlflow server"), (r"-m mlflow server", "mlflow launcher"),
                          (r"QueueActor|mnistjobs-queue", "queue admitter"), (r"ray-dashboard-(\w+)", "dashboard {}"),
                          (r"ray::(\w+)", "ray::{}"), (r"dashboard/dashboard\.py", "dashboard head"),
                          (r"log_monitor\.py", "log_monitor"), (r"raylet/raylet", "raylet"),
                          (r"gcs_server", "gcs_server"),
                          (r"ray\.util\.client\.server", "ray client server"),
                          (r"autoscaler/_private/monitor\.py", "autoscaler monitor"),
                          (r"multiprocessing\.(forkserver|resource_tracker)", "multiprocessing helper")):
        m = re.search(pattern, cmdline)
        if m:
            return kind.format(*m.groups()) if m.groups() else kind
    return "ray " + (cmdline.split()[0].split("/")[-1] if cmdline else "?")


def footprint(rec, seconds: float = 60.0, top: int = 12) -> dict:
    """The idle service set's cost (psutil): CPU (user + system seconds of every process of the
    set over ``seconds``, as % of one core) and memory (proportional set size, so pages shared
    between processes count once), per process kind, and the ``top`` processes by CPU."""
    import psutil

    from jobs import services

    def snapshot() -> dict[int, tuple[str, float, int]]:
        out = {}
        for pid in services.service_pids(rec):
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    t = p.cpu_times()
                    name = " ".join(p.cmdline()).strip()[:300] or p.name()
                    out[pid] = (name, t.user + t.system, p.memory_full_info().pss)
            except (psutil.Error, OSError):
                continue
        return out

    a = snapshot()
    t0 = time.perf_counter()
    time.sleep(seconds)
    b = snapshot()
    wall = time.perf_counter() - t0
    # A process that started during the window counts from its start; one that ended counts no more.
    used = {p: b[p][1] - a.get(p, (None, 0.0, 0))[1] for p in b}
    kinds: dict[str, dict[str, float]] = {}
    procs = []
    for pid, (name, _, pss) in b.items():
        kind = _process_kind(name)
        k = kinds.setdefault(kind, {"n": 0, "pss_gb": 0.0, "cpu_percent": 0.0})
        k["n"] += 1
        k["pss_gb"] += pss / 1e9
        k["cpu_percent"] += 100.0 * used[pid] / wall
        procs.append({"pid": pid, "kind": kind, "cpu_percent": 100.0 * used[pid] / wall, "pss_gb": pss / 1e9,
                      "command": name[:120]})
    procs.sort(key=lambda r: -r["cpu_percent"])
    return {"seconds": wall, "cpu_percent_of_one_core": 100.0 * sum(used.values()) / wall,
            "pss_total_gb": sum(x[2] for x in b.values()) / 1e9, "processes": len(b),
            "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["cpu_percent"])),
            "top_cpu": procs[:top]}


def cli_latency(base: list[str], home: Path, job: str, env: dict, runs: int = 3) -> dict[str, list[float]]:
    """Seconds of whole `mnistjobs` processes on the running, idle services (each run ``runs``
    times): what a user waits for at the prompt."""
    commands = {"list": ["list"], "status JOB": ["status", job], "queue": ["queue"], "logs JOB": ["logs", job],
                "cancel JOB (ended)": ["cancel", job], "compare --help": ["compare", "--help"], "--help": ["--help"]}
    out = {}
    for name, cmd in commands.items():
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([*base, *cmd, *(["--home", str(home)] if cmd[-1] != "--help" else [])], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append(time.perf_counter() - t)
        out[name] = times
    return out


def startup_marks(text: str, t0: float) -> list[tuple[float, str]]:
    """The ``[startup] <unix time> <what>`` lines of submit's output (its own, the driver's and, forwarded
    by Ray, the trials'), as (seconds after ``t0``, what), in time order."""
    import re

    out = []
    for m in re.finditer(r"^(?:\((\S+) pid=(\d+)[^)]*\) )?\[startup\] (\d+\.\d+) (.*)$", text, re.M):
        who = f" [{m.group(1)} pid {m.group(2)}]" if m.group(1) else ""
        out.append((float(m.group(3)) - t0, m.group(4) + who))
    return sorted(out)


def code_cmd(code: Path) -> list[str]:
    """`mnistjobs` from the checkout ``code`` (run with PYTHONPATH=code from a neutral folder, so its
    `jobs` and `mnistnets` win over the installed ones): its console-script function, `run` where it
    has one (the fast exit), else `main`."""
    entry = "run" if "\ndef run() -> None:" in (code / "jobs" / "cli.py").read_text() else "main"
    return [sys.executable, "-c", f"from jobs.cli import {entry}; {entry}()"]


def run_service(args, spec, home: Path, code: Path | None = None) -> dict:
    """(a): the sweep through a fresh service set in ``home``; ``code``: another checkout's mnistjobs
    (--baseline), for the CLI, the services, the driver and the trials alike."""
    from jobs import services, tracking
    from jobs.contract import ROLE_SWEEP, TAG_ROLE

    env = {k: v for k, v in os.environ.items() if k not in CLEAN_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env["MNISTJOBS_STARTUP_TRACE"] = "1"  # the driver, the trials and submit print [startup] marks
    base = mnistjobs_cmd()
    if code is not None:
        env["PYTHONPATH"] = str(code)
        base = code_cmd(code)
    log = open(home.parent / "service.log", "w")
    out: dict = {}
    try:
        t0 = time.perf_counter()
        subprocess.run([*base, "up", "--home", str(home), "--ray-port", "0", "--dashboard-port", "0",
                        "--mlflow-port", "0", *(["--num-cpus", str(args.num_cpus)] if args.num_cpus else [])],
                       check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        out["startup_s"] = time.perf_counter() - t0
        rec = services.load_record(home)
        sampler = WorkerThreads(rec.service_id)
        sampler.start()
        t1, wall1 = time.perf_counter(), time.time()
        proc = subprocess.run([*base, "submit", *submit_args(args), "--wait", "--home", str(home)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out["submit_s"] = time.perf_counter() - t1
        wall2 = time.time()
        sampler.stop.set()
        sampler.join()
        log.write(proc.stdout)
        if proc.returncode != 0:
            raise SystemExit(f"`mnistjobs submit --wait` failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
        out["workers"] = sampler.summary()
        out["ray_cpus"] = rec.num_cpus or os.cpu_count()

        mlf = tracking.client(rec.mlflow_url)
        job = next(line.split()[2].rstrip(":") for line in proc.stdout.splitlines() if line.startswith("Submitted job"))
        runs = tracking.job_runs(mlf, job)
        trials, parent = [], None
        for r in runs:
            if r.data.tags.get(TAG_ROLE) == ROLE_SWEEP:
                parent = r
                continue
            hist = tracking.metric_history(mlf, r.info.run_id, ["epoch_seconds"])["epoch_seconds"]
            trials.append({"name": r.info.run_name, "status": r.info.status, "start": r.info.start_time / 1000,
                           "end": (r.info.end_time or 0) / 1000, "epoch_seconds": [value for _, value in hist]})
        trials.sort(key=lambda t: t["name"])
        out["trials"] = trials
        if parent is not None:
            out["mlflow_span_s"] = max(t["end"] for t in trials) - parent.info.start_time / 1000
        # Where the time went, seconds after `submit` started (wall clock, this machine).
        ray_job = {}
        try:
            import urllib.request

            req = urllib.request.Request(f"{rec.dashboard_url}/api/jobs/{job}", headers=rec.headers)
            with urllib.request.urlopen(req, timeout=10) as r:
                ray_job = json.load(r)
        except OSError:
            pass
        from jobs.contract import TAG_ADMITTED_AT

        admitted = int((parent.data.tags.get(TAG_ADMITTED_AT) or 0) if parent else 0) / 1000
        marks = [("queued (its MLflow run created)", parent.info.start_time / 1000 if parent else 0),
                 ("started by the queue's admitter", admitted),
                 ("Ray job accepted", (ray_job.get("start_time") or 0) / 1000),
                 ("first trial started", min(t["start"] for t in trials)),
                 ("last trial ended", max(t["end"] for t in trials)),
                 ("sweep driver closed its MLflow run", (parent.info.end_time or 0) / 1000 if parent else 0),
                 ("Ray job ended", (ray_job.get("end_time") or 0) / 1000),
                 ("`submit --wait` returned", wall2)]
        out["timeline"] = [(name, t - wall1) for name, t in marks if t > 0]
        out["startup"] = startup_marks(proc.stdout, wall1)
        # How many trials ran at once: the most that overlapped in time.
        events = sorted([(t["start"], 1) for t in trials] + [(t["end"], -1) for t in trials])
        now = peak = 0
        for _, d in events:
            now += d
            peak = max(peak, now)
        out["max_parallel"] = peak
        if args.footprint:
            time.sleep(5)  # the job's processes wind down
            out["footprint"] = footprint(rec, args.footprint_seconds)
            out["cli"] = cli_latency(base, home, job, env)
        return out
    finally:
        rec = services.load_record(home)
        subprocess.run([*base, "down", "--home", str(home)], env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if rec is not None:
            left = services.service_pids(rec)
            if left:
                print(f"WARNING: processes of the benchmark's services still run: {sorted(left)}", file=sys.stderr)
            shutil.rmtree(rec.temp_dir, ignore_errors=True)


def run_bare(args, spec) -> dict:
    import torch

    from mnistnets.data import load_mnist
    from mnistnets.train import TrainConfig, fit

    before = torch.get_num_threads()
    torch.set_num_threads(args.bare_threads or max(1, int(args.cpus_per_trial)))
    try:
        t0 = time.perf_counter()
        data = load_mnist(args.data_dir)  # like a trial: the whole set once, fit() applies the limits
        load_s = time.perf_counter() - t0
        trials = []
        t1, cpu1 = time.perf_counter(), time.process_time()
        for name, cfg in spec.trials():
            ts = time.perf_counter()
            results = list(fit(TrainConfig.from_dict(dict(cfg)), data=data))
            trials.append({"name": name, "seconds": time.perf_counter() - ts,
                           "epoch_seconds": [r["epoch_seconds"] for r in results],
                           "test_acc": results[-1]["test_acc"]})
        loop_s = time.perf_counter() - t1
        return {"load_s": load_s, "loop_s": loop_s, "trials": trials, "threads": torch.get_num_threads(),
                "cores_used": (time.process_time() - cpu1) / loop_s}
    finally:
        torch.set_num_threads(before)


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def report(args, spec, svc: dict | None, bare: dict | None) -> None:
    limits = (f"train {args.train_limit or 'all (60000)'} / test {args.test_limit or 'all (10000)'} images "
              f"from {args.data_dir}")
    print()
    print("Service overhead benchmark (one run; this machine is shared with other work and noisy)")
    print(f"  machine: {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}, no GPU used")
    print(f"  sweep:   {spec.summary()}; batch {spec.batch_size}; {limits}")
    print(f"           {spec.cpus_per_trial:g} CPU per trial; max concurrent trials "
          f"{args.max_concurrent or 'unlimited (as many as the CPUs allow)'}")
    if svc:
        print(f"(a) service: startup (`mnistjobs up`, fresh state folder) {svc['startup_s']:.1f} s")
        print(f"             submit -> all trials FINISHED (`submit --wait` returns) {svc['submit_s']:.1f} s"
              + (f"  [MLflow: sweep run start -> last trial end {svc['mlflow_span_s']:.1f} s]"
                 if "mlflow_span_s" in svc else ""))
        print(f"             Ray CPUs {svc['ray_cpus']}; trials running at once: at most {svc['max_parallel']}")
        for w in svc["workers"]:
            print(f"             trial worker {w['title']} (pid {w['pid']}): {w['cpu_s']:.1f} CPU s, "
                  f"{len(w['busy_threads'])} compute thread(s), CPU s each: {w['busy_threads']}")
        print("             timeline (s after submit): " + "; ".join(f"{n} {t:.1f}" for n, t in svc["timeline"]))
        if svc.get("startup"):
            print("             startup breakdown, [startup] marks (s after submit started; step since the mark before):")
            last = 0.0
            for t, what in svc["startup"]:
                print(f"               {t:7.2f}  (+{t - last:5.2f})  {what}")
                last = t
        for t in svc["trials"]:
            print(f"             {t['name']:<16} {t['status']:<9} ran {t['start'] - svc['trials'][0]['start']:6.1f}"
                  f" -> {t['end'] - svc['trials'][0]['start']:6.1f} s (relative)")
    if svc and svc.get("footprint"):
        f = svc["footprint"]
        print(f"  idle services after one job ({f['seconds']:.0f} s, {f['processes']} processes): "
              f"{f['cpu_percent_of_one_core']:.1f}% of one core, {f['pss_total_gb']:.2f} GB (PSS)   "
              f"(goals: <= 2% and <= 1.5 GB)")
        for kind, v in f["by_kind"].items():
            print(f"             {kind:<28} {v['n']:>2} process(es)  {v['pss_gb']:.3f} GB  "
                  f"{v.get('cpu_percent', 0.0):5.2f}% CPU")
        print("           the busiest processes (% of one core over the window):")
        for r in f.get("top_cpu", []):
            print(f"             {r['cpu_percent']:5.2f}%  {r['kind']:<28} pid {r['pid']:<7} {r['pss_gb']:.3f} GB")
        print("  CLI, whole processes on the idle services (s, each run; goal <= 1 s): "
              + "; ".join(f"{k} {' '.join(f'{t:.2f}' for t in v)}" for k, v in svc["cli"].items()))
    if bare:
        print(f"(b) bare:    {len(bare['trials'])} fit() calls one after another, torch threads {bare['threads']}: "
              f"{bare['loop_s']:.1f} s (+ {bare['load_s']:.1f} s loading MNIST once); "
              f"{bare['cores_used']:.2f} cores busy on average")
    if svc and bare:
        busiest = max((len(w["busy_threads"]) for w in svc["workers"]), default=0)
        if busiest > bare["threads"]:
            print(f"  note: a trial worker had {busiest} threads doing real work (torch's intra-op threads and the "
                  f"trial's own) while (b) ran torch with {bare['threads']}; Ray's {spec.cpus_per_trial:g} CPU per "
                  f"trial is a scheduling label, not a limit on torch. --bare-threads N matches it by hand.")
        b = bare["loop_s"] + bare["load_s"]
        print(f"ratio (a)/(b): {svc['submit_s'] / b:.3f} without the startup, "
              f"{(svc['submit_s'] + svc['startup_s']) / b:.3f} with it   (goal <= 1.05 for the 15-epoch real-data sweep)")
        if svc["max_parallel"] > 1:
            print(f"  note: up to {svc['max_parallel']} trials ran at once in (a) and one at a time in (b), so "
                  f"the ratio also holds the gain from running side by side; --max-concurrent 1 isolates the overhead")
    print()
    print(f"  {'trial':<16} {'epochs':>6}  {'service s/epoch':>15}  {'bare s/epoch':>12}  {'ratio':>6}   per-epoch seconds")
    names = [n for n, _ in spec.trials()]
    svc_t = {t["name"]: t for t in (svc or {}).get("trials", [])}
    bare_t = {t["name"]: t for t in (bare or {}).get("trials", [])}
    for name in names:
        s = svc_t.get(name, {}).get("epoch_seconds", [])
        b = bare_t.get(name, {}).get("epoch_seconds", [])
        ratio = mean(s) / mean(b) if s and b else float("nan")
        detail = "service " + " ".join(f"{x:.2f}" for x in s) + " | bare " + " ".join(f"{x:.2f}" for x in b)
        print(f"  {name:<16} {max(len(s), len(b)):>6}  {mean(s):>15.2f}  {mean(b):>12.2f}  {ratio:>6.3f}   {detail}")


def _span(svc: dict, start: str, end: str) -> float | None:
    marks = dict(svc["timeline"])
    return marks[end] - marks[start] if start in marks and end in marks else None


def _first_batch(svc: dict) -> float | None:
    return next((t for t, what in svc.get("startup", []) if what.startswith("trial: first batch")), None)


def compare_timelines(before: dict, after: dict) -> None:
    """The job's fixed costs, the baseline code's next to this code's (one run, one machine)."""
    rows = [("submit -> Ray job accepted", lambda s: _span(s, "queued (its MLflow run created)", "Ray job accepted")
             + dict(s["timeline"])["queued (its MLflow run created)"]),
            ("submit -> first trial's first batch (goal <= 6 s)", _first_batch),
            ("last trial ended -> driver closed its MLflow run",
             lambda s: _span(s, "last trial ended", "sweep driver closed its MLflow run")),
            ("last trial ended -> Ray job ended", lambda s: _span(s, "last trial ended", "Ray job ended")),
            ("last trial ended -> `submit --wait` returned (goal <= 1 s)",
             lambda s: _span(s, "last trial ended", "`submit --wait` returned")),
            ("submit -> all trials FINISHED (`submit --wait` returns)", lambda s: s["submit_s"])]
    print()
    print(f"  {'fixed cost of the job (s)':<58} {'baseline':>9} {'this code':>10}")
    for name, get in rows:
        vals = []
        for svc in (before, after):
            try:
                vals.append(get(svc))
            except (KeyError, TypeError):
                vals.append(None)
        print(f"  {name:<58} " + " ".join(f"{v:>9.1f} " if v is not None else f"{'-':>9} " for v in vals))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default="v0,v2", help="models, comma-separated or 'all'  [v0,v2]")
    p.add_argument("--schedules", action="append", default=[], help="schedule spec (repeatable)  [the recipe's]")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-limit", type=int, default=6000, help="0: all 60000  [6000]")
    p.add_argument("--test-limit", type=int, default=2000, help="0: all 10000  [2000]")
    p.add_argument("--full", action="store_true", help="all of MNIST (same as --train-limit 0 --test-limit 0)")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="the four MNIST IDX files  [$MNISTJOBS_DATA_DIR, else ../shared/data/mnist]")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="Ray CPUs per trial = bare torch threads  [1]")
    p.add_argument("--bare-threads", type=int, default=None,
                   help="torch threads of (b)  [--cpus-per-trial, what each trial is given]")
    p.add_argument("--max-concurrent", type=int, default=1,
                   help="trials at once in (a); 0: as many as Ray's CPUs allow  [1, like the bare loop]")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the benchmark's Ray head  [all]")
    p.add_argument("--only", choices=("both", "service", "bare"), default="both")
    p.add_argument("--keep", action="store_true", help="keep the temp state folder (logs, MLflow) afterwards")
    p.add_argument("--footprint", action="store_true",
                   help="after the sweep, measure the idle services (CPU, PSS memory) and the CLI's latency")
    p.add_argument("--footprint-seconds", type=float, default=60.0, help="how long to sample the idle services  [60]")
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers as JSON")
    p.add_argument("--baseline", metavar="DIR",
                   help="another checkout of mnistjobs (e.g. `git worktree add /tmp/base HEAD~3`): run (a) with "
                        "its code first, then with this code, each on a fresh service set, and print their "
                        "fixed costs side by side (and each one's per-epoch ratio to the bare loop, run once after both)")
    args = p.parse_args(argv)
    if args.full:
        args.train_limit = args.test_limit = 0
    if not args.data_dir:
        p.error("no MNIST folder: give --data-dir or set MNISTJOBS_DATA_DIR")
    args.data_dir = str(Path(args.data_dir).resolve())
    args.train_limit = args.train_limit or None
    args.test_limit = args.test_limit or None
    spec = build_spec(args)

    tmp = Path(tempfile.mkdtemp(prefix="mnistjobs-bench-service-"))
    svc = bare = base_svc = None
    try:
        if args.baseline:
            print(f"(a) service, baseline code {args.baseline}: a fresh service set in {tmp / 'base-home'} ...",
                  flush=True)
            os.chdir(tmp)  # so that no checkout's folder is on the processes' sys.path by accident
            base_svc = run_service(args, spec, tmp / "base-home", code=Path(args.baseline))
            print(f"(a) service, this code {REPO}: a fresh service set in {tmp / 'home'} ...", flush=True)
            svc = run_service(args, spec, tmp / "home", code=REPO)
        elif args.only in ("both", "service"):
            print(f"(a) service: a fresh embedded service set in {tmp / 'home'} ...", flush=True)
            svc = run_service(args, spec, tmp / "home")
        if args.only in ("both", "bare"):
            print("(b) bare trainer loop ...", flush=True)
            bare = run_bare(args, spec)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if base_svc is not None:
        print("\n==== baseline code:", args.baseline)
        report(args, spec, base_svc, bare)  # the same bare loop: each code's per-epoch ratio
        print("\n==== this code:", REPO)
    report(args, spec, svc, bare)
    if base_svc is not None:
        compare_timelines(base_svc, svc)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "service": svc, "bare": bare,
                                               "baseline": base_svc}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
