"""Search benchmark (issue 14): the same N sampled configs of one model, once with ASHA and once
with every trial trained to the end (FIFO), one run side by side, through the service.

Both jobs are `mnistjobs submit --search random --search-seed S --num-samples N --space ...`
with the same seed and space, so Tune's random search samples the same N configs for both; one
job adds `--scheduler asha`. They run one after the other on a fresh embedded service set (a
temp state folder), each with the same --max-concurrent. From MLflow it prints, per job, the
epochs its trials trained in all (goal: ASHA <= 0.4 x FIFO), the best final test accuracy it
found (the best trial's test_acc at its last logged epoch; goal: ASHA within 0.05 points of
FIFO), wall time, and a table of the configs with each job's outcome.

    python bench/search.py                                  # v2, 12 samples, 15 epochs, 20,000 training images
    python bench/search.py --quick                          # a smoke run: 4 samples, 3 epochs, 2,000 images
    python bench/search.py --models v3 --num-samples 16 --train-limit 0   # all 60,000 images (slow on a CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.service import CLEAN_VARS, default_data_dir, mnistjobs_cmd  # noqa: E402

DEFAULT_SPACE = ["lr=loguniform(0.02,1.0)", "weight_decay=loguniform(1e-5,1e-3)",
                 "label_smoothing=uniform(0.0,0.1)"]


def submit(base: list[str], args, home: Path, env: dict, scheduler: str, log) -> tuple[str, float]:
    cmd = [*base, "submit", "--models", args.models, "--search", "random", "--search-seed", str(args.search_seed),
           "--num-samples", str(args.num_samples), "--epochs", str(args.epochs), "--metric", "test_acc",
           "--mode", "max", "--scheduler", scheduler, "--max-concurrent", str(args.max_concurrent),
           "--cpus-per-trial", str(args.cpus_per_trial), "--data-dir", args.data_dir,
           "--experiment", f"bench-search-{scheduler}", "--no-register", "--wait", "--home", str(home)]
    for item in args.space:
        cmd += ["--space", item]
    if scheduler == "asha":
        cmd += ["--grace-period", str(args.grace_period), "--reduction-factor", str(args.reduction_factor)]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    if args.test_limit:
        cmd += ["--test-limit", str(args.test_limit)]
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t
    log.write(proc.stdout)
    log.flush()
    if proc.returncode != 0:
        raise SystemExit(f"`mnistjobs submit --scheduler {scheduler}` failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}")
    job = next(line.split()[2].rstrip(":") for line in proc.stdout.splitlines() if line.startswith("Submitted job"))
    return job, seconds


def read_job(mlf, job: str, keys: list[str]) -> dict:
    """The job's trials from MLflow: the searched values, epochs logged, the last test_acc."""
    from jobs import tracking
    from jobs.contract import (ROLE_SWEEP, TAG_BEST_RUN, TAG_ROLE, TAG_STOPPED_AT, TAG_STOPPED_EARLY,
                               best_metric_name)

    trials, parent = [], None
    for r in tracking.job_runs(mlf, job):
        if r.data.tags.get(TAG_ROLE) == ROLE_SWEEP:
            parent = r
            continue
        hist = tracking.metric_history(mlf, r.info.run_id, ["test_acc"])["test_acc"]
        trials.append({"name": r.info.run_name, "run_id": r.info.run_id, "status": r.info.status,
                       "config": tuple(r.data.params.get(k) for k in keys), "epochs": len(hist),
                       "final": hist[-1][1] if hist else float("nan"),
                       "stopped_at": (int(r.data.tags[TAG_STOPPED_AT])
                                      if r.data.tags.get(TAG_STOPPED_EARLY) == "true" else None)})
    scored = [t for t in trials if t["epochs"]]
    best = max(scored, key=lambda t: t["final"]) if scored else None
    return {"trials": trials, "epochs": sum(t["epochs"] for t in trials),
            "best": best, "parent_best_run": parent.data.tags.get(TAG_BEST_RUN) if parent else None,
            "parent_best": parent.data.metrics.get(best_metric_name("test_acc")) if parent else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default="v2", help="one model  [v2]")
    p.add_argument("--num-samples", type=int, default=12, help="sampled configs per job  [12]")
    p.add_argument("--search-seed", type=int, default=7, help="the random search's seed (both jobs)  [7]")
    p.add_argument("--space", action="append", default=None, metavar="KEY=DIST",
                   help=f"the space (repeatable)  [{' '.join(DEFAULT_SPACE)}]")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--grace-period", type=int, default=2, help="ASHA's first rung  [2]")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA's reduction factor  [3]")
    p.add_argument("--train-limit", type=int, default=20000, help="training images; 0: all 60,000  [20000]")
    p.add_argument("--test-limit", type=int, default=0, help="test images; 0: all 10,000  [0]")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once in each job  [2]")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--data-dir", default=default_data_dir(), help="the real MNIST  [../shared/data/mnist]")
    p.add_argument("--quick", action="store_true", help="4 samples, 3 epochs, 2,000/1,000 images, grace 1, rf 2")
    p.add_argument("--keep", action="store_true", help="keep the temp state folder afterwards")
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.epochs, args.train_limit, args.test_limit = 4, 3, 2000, 1000
        args.grace_period, args.reduction_factor = 1, 2
    args.space = args.space or DEFAULT_SPACE
    if not args.data_dir:
        raise SystemExit("no MNIST folder: give --data-dir (or MNISTJOBS_DATA_DIR)")
    keys = [item.split("=", 1)[0].strip() for item in args.space]

    from jobs import services, tracking

    work = Path(tempfile.mkdtemp(prefix="mnistjobs-bench-search-"))
    home = work / "home"
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    base = mnistjobs_cmd()
    log_path = REPO / "bench" / "out" / f"search-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out: dict = {"args": vars(args)}
    with open(log_path, "w") as log:
        try:
            subprocess.run([*base, "up", "--home", str(home), "--ray-port", "0", "--dashboard-port", "0",
                            "--mlflow-port", "0"], check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
            rec = services.load_record(home)
            mlf = tracking.client(rec.mlflow_url)
            for scheduler in ("fifo", "asha"):
                print(f"running the {scheduler} job ...", flush=True)
                job, seconds = submit(base, args, home, env, scheduler, log)
                out[scheduler] = {"job": job, "seconds": seconds, **read_job(mlf, job, keys)}
        finally:
            subprocess.run([*base, "down", "--home", str(home)], env=env, stdout=log, stderr=subprocess.STDOUT)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)

    fifo, asha = out["fifo"], out["asha"]
    same = sorted(t["config"] for t in fifo["trials"]) == sorted(t["config"] for t in asha["trials"])
    limits = f"train {args.train_limit or 'all 60,000'} / test {args.test_limit or 'all 10,000'} images"
    print()
    print(f"Search benchmark: {args.models}, {args.num_samples} random configs (search seed {args.search_seed}), "
          f"{args.epochs} epochs, {limits}, {args.max_concurrent} trials at once, {args.cpus_per_trial:g} CPU each")
    print(f"  space: {' '.join(args.space)}; ASHA grace {args.grace_period}, reduction {args.reduction_factor:g}")
    print(f"  the two jobs ran the same configs: {'yes' if same else 'NO'}")
    for name, r in (("FIFO (all to the end)", fifo), ("ASHA", asha)):
        b = r["best"]
        stopped = sum(t["stopped_at"] is not None for t in r["trials"])
        print(f"  {name:<22} job {r['job']}: {r['epochs']} epochs in all, {stopped} stopped early, "
              f"{r['seconds']:.0f} s; best final test accuracy {b['final']:.2f}% ({b['name']}, {b['epochs']} epochs)"
              + ("" if r["parent_best_run"] == b["run_id"] else "  [parent's best_run_id differs!]"))
    ratio = asha["epochs"] / fifo["epochs"]
    gap = fifo["best"]["final"] - asha["best"]["final"]
    print(f"  ASHA / FIFO epochs: {ratio:.2f}  (goal <= 0.4)   best final accuracy, FIFO - ASHA: {gap:+.2f} points "
          f"(goal <= 0.05)   wall time ratio {asha['seconds'] / fifo['seconds']:.2f}")
    print()
    by_config = {t["config"]: t for t in asha["trials"]}
    print(f"  {'config (' + ', '.join(keys) + ')':<52} {'FIFO final':>10} {'ASHA epochs':>11} {'ASHA last':>9}")
    for t in sorted(fifo["trials"], key=lambda t: -t["final"]):
        a = by_config.get(t["config"], {})
        cfg = ", ".join(f"{float(v):.3g}" if v is not None else "-" for v in t["config"])
        print(f"  {cfg:<52} {t['final']:>9.2f}% {a.get('epochs', 0):>11} {a.get('final', float('nan')):>8.2f}%")
    print(f"  log: {log_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
