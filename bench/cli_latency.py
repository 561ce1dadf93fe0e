"""How fast the CLI answers, as whole processes (issue 16: <= 1 s for list/status/logs/cancel/queue,
`mnistjobs train` to its first batch in <= 4 s).

In a temp state folder: `mnistjobs up` (free ports), one tiny job on synthetic data
(tests/synthetic.py) submitted with --wait so that the commands have a job to show, then each
command run N times as its own process (`python -m jobs.cli ...`), the median printed; then
`mnistjobs down`. With --reference, each command also runs through Ray's JobSubmissionClient and
MLflow's MlflowClient (the reader of jobs.rest swapped for them, as before issue 16), for a
before/after in one run. Last, `mnistjobs train --epochs 1 --train-limit 512` N times: the time
from starting the process to the end of its first training batch (fit() is wrapped to report
after batch 1 and the process exits there).

    python bench/cli_latency.py                 # 5 runs per command
    python bench/cli_latency.py -n 9 --reference
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

CLEAN = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MNISTJOBS_DATA_DIR", "MNISTJOBS_RAY_PORT", "MNISTJOBS_DASHBOARD_PORT",
         "MNISTJOBS_MLFLOW_PORT", "MNISTJOBS_HOME")
REFERENCE = ("import sys, jobs.cluster as c; c.job_reader = c.job_client; from jobs.cli import main; "
             "sys.argv[0] = 'mnistjobs'; main()")
FIRST_BATCH = """
import os, sys, time
import mnistnets.train as T
if os.environ.get("CLI_BENCH_TORCH_OPTIM"):  # the reference: torch's classes, with their torch._dynamo import
    import torch, mnistnets.optim as O
    O.SGD, O.Adam, O.AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
fit = T.fit
def first_batch_fit(*args, progress=None, progress_every=25, **kw):
    def report(*a):
        sys.stdout.write("FIRST-BATCH %.6f\\n" % time.time()); sys.stdout.flush(); os._exit(0)
    return fit(*args, progress=report, progress_every=1, **kw)
T.fit = first_batch_fit
from jobs.cli import main
sys.argv[0] = "mnistjobs"
main()
"""


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in CLEAN}
    e["PYTHONPATH"] = str(REPO)
    return e


def cli(args, *, check=True, code=None) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "jobs.cli"] if code is None else [sys.executable, "-c", code]
    t = time.perf_counter()
    out = subprocess.run([*cmd, *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env(), timeout=600)
    dt = time.perf_counter() - t
    if check and out.returncode != 0:
        raise SystemExit(f"`mnistjobs {' '.join(map(str, args))}` failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return dt, out


def first_batch(data_dir: Path, home: Path, *, reference: bool = False) -> float:
    args = ["train", "--epochs", 1, "--train-limit", 512, "--test-limit", 256, "--data-dir", data_dir,
            "--home", home, "--quiet"]
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", FIRST_BATCH, *map(str, args)], cwd=REPO, capture_output=True,
                         text=True, env={**env(), **({"CLI_BENCH_TORCH_OPTIM": "1"} if reference else {})},
                         timeout=600)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("FIRST-BATCH")), None)
    if line is None:
        raise SystemExit(f"train printed no first batch:\n{out.stdout}\n{out.stderr}")
    return float(line.split()[1]) - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--runs", type=int, default=5, help="runs per command (the median is printed)")
    p.add_argument("--reference", action="store_true",
                   help="also run each command through Ray's and MLflow's own clients (the code before issue 16)")
    p.add_argument("--data-dir", default=None, help="MNIST for `train` (default: synthetic, 512/256 images)")
    p.add_argument("--train-only", action="store_true", help="only `train` to its first batch (no services)")
    args = p.parse_args(argv)
    from synthetic import make_synthetic_mnist

    rows = []
    with tempfile.TemporaryDirectory(prefix="mj-cli-") as tmp:
        tmp = Path(tmp)
        data = make_synthetic_mnist(tmp / "data", n_train=512, n_test=256, seed=0)
        if not args.train_only:
            rows = services_part(args, tmp, data)
        train_home = tmp / "train-home"
        data_dir = Path(args.data_dir) if args.data_dir else data
        fb, fb_ref = [], []
        for _ in range(args.runs):  # interleaved, so that a change in the machine's load hits both
            fb.append(first_batch(data_dir, train_home))
            if args.reference:
                fb_ref.append(first_batch(data_dir, train_home, reference=True))
    print(f"\nCLI latency, whole processes, median of {args.runs} (min-max):")
    print("| command | median | min-max |" + (" with Ray's + MLflow's clients / torch.optim's classes |"
                                             if args.reference else ""))
    print("| --- | --- | --- |" + (" --- |" if args.reference else ""))
    for name, fast, ref in rows:
        print(f"| `mnistjobs {name}` | {statistics.median(fast):.2f} s | {min(fast):.2f}-{max(fast):.2f} s |"
              + ((f" {statistics.median(ref):.2f} s |" if ref else " - |") if args.reference else ""))
    print(f"| `mnistjobs train --epochs 1 --train-limit 512` to its first batch | {statistics.median(fb):.2f} s | "
          f"{min(fb):.2f}-{max(fb):.2f} s |" + (f" {statistics.median(fb_ref):.2f} s |" if args.reference else ""))
    return 0


def services_part(args, tmp: Path, data: Path) -> list:
    """Up, one job, each command N times, down; the rows (name, seconds, reference seconds)."""
    home = tmp / "home"
    dt, _ = cli(["up", "--home", home, "--ray-port", 0, "--dashboard-port", 0, "--mlflow-port", 0])
    print(f"services up in {dt:.1f} s ({home})", flush=True)
    try:
        dt, out = cli(["submit", "--models", "v2", "--epochs", 1, "--train-limit", 256, "--test-limit", 64,
                       "--batch-size", 32, "--schedules", "cosine", "--data-dir", data, "--experiment", "cli-bench",
                       "--wait", "--home", home])
        job = next(ln.split()[2].rstrip(":") for ln in out.stdout.splitlines() if ln.startswith("Submitted job"))
        print(f"job {job} SUCCEEDED (submit --wait {dt:.1f} s)", flush=True)
        commands = [["list"], ["status"], ["status", job], ["logs", job], ["queue"], ["cancel", job],
                    ["compare", "--help"], ["--help"]]
        rows = []
        for command in commands:
            fast = [cli([*command, "--home", home] if command[-1] != "--help" else command)[0]
                    for _ in range(args.runs)]
            ref = None
            if args.reference and command[-1] != "--help":
                ref = [cli([*command, "--home", home], code=REFERENCE)[0] for _ in range(args.runs)]
            rows.append((" ".join(command).replace(job, "JOB"), fast, ref))
            print(f"  {rows[-1][0]:<16} median {statistics.median(fast):.2f} s"
                  + (f"   (Ray+MLflow clients: {statistics.median(ref):.2f} s)" if ref else ""), flush=True)
    finally:
        cli(["down", "--home", home], check=False)
    return rows


if __name__ == "__main__":
    sys.exit(main())
