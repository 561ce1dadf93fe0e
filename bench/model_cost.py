"""What a model per trial (+ system metrics + the registry) costs: the same tiny sweep (v0 + v2, 1 epoch, 256/64
synthetic images) run with it off and on, in turn, on one service set: python bench/model_cost.py off on off on"""
import os, subprocess, sys, tempfile, time, json
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from synthetic import make_synthetic_mnist
from jobs import services, tracking
from jobs.spec import SweepSpec
from jobs.state import ray_auth_env

DRIVER = """
import sys, time
from jobs.spec import SweepSpec
from jobs.sweep import run_sweep
spec = SweepSpec.from_json(sys.argv[1]).validate()
t = time.perf_counter()
rc = run_sweep(spec, sys.argv[2], experiment_id=sys.argv[3], log_models=sys.argv[4] == '1')
print(f"DRIVER_WALL {time.perf_counter() - t:.2f}")
sys.exit(rc)
"""
tmp = Path(tempfile.mkdtemp(prefix="D-bench-"))
data = make_synthetic_mnist(tmp / "data", n_train=512, n_test=256, seed=0)
home = tmp / "home"
rec = services.up(home, ray_port=0, dashboard_port=0, mlflow_port=0, num_cpus=2)
try:
    mlf = tracking.client(rec.mlflow_url)
    exp = tracking.get_or_create_experiment(mlf, "bench-D")
    env = {**os.environ, **ray_auth_env(home), "RAY_ADDRESS": rec.ray_address, "MLFLOW_TRACKING_URI": rec.mlflow_url,
           "MNISTJOBS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("MNISTJOBS_STORAGE_PATH", None)
    from jobs.record import mlflow_credentials_for
    env.update(mlflow_credentials_for(rec.mlflow_url, home) or {})
    rows = []
    order = sys.argv[1:] or ["off", "on", "off", "on"]
    for i, mode in enumerate(order):
        spec = SweepSpec(models=["v0", "v2"], schedules=["cosine"], seeds=1, epochs=1, batch_size=32, train_limit=256,
                         test_limit=64, data_dir=str(data), cpus_per_trial=1,
                         system_metrics_interval=10.0 if mode == "on" else 0.0,
                         register=mode == "on").validate()
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", DRIVER, spec.to_json(), f"bench-{i}-{mode}", exp, "1" if mode == "on" else "0"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t
        out = p.stdout + p.stderr
        drv = [l for l in out.splitlines() if l.startswith("DRIVER_WALL")]
        print(f"{mode}: rc {p.returncode}, process {wall:.1f} s, {drv}", flush=True)
        for l in out.splitlines():
            if "model logged" in l or "registered" in l or "registry" in l or "best trial" in l or "note" in l or "Error" in l:
                print("   ", l[:300])
        if p.returncode:
            print(out[-3000:])
        rows.append((mode, wall))
    print(json.dumps(rows))
finally:
    services.down(home, grace=3.0)
