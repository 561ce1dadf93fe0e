"""Accuracy benchmark: every model, N seeds, each model's default recipe, real MNIST.

Prints the seed-style side-by-side epoch table (train/test accuracy per model
per epoch, seed 1) and a summary per model: final-epoch test accuracy (mean and
min over seeds), the same with test-time augmentation where the recipe asks for
it, best epoch (labelled best), and the first epoch at >= 99.4%. Results also go
to bench/out/accuracy-<stamp>.json and .md.

Three ways to get the runs:

    # through the service: one `mnistjobs submit --wait` sweep, then read back from MLflow
    python bench/accuracy.py --service --data-dir ../shared/data/mnist --models all --seeds 3
    # read the trial runs of an earlier sweep's MLflow experiment
    python bench/accuracy.py --from-experiment final --home .mnistjobs
    # mnistnets.train.fit directly (no Ray, no MLflow), one process per run, --workers at a time
    python bench/accuracy.py --data-dir ../shared/data/mnist --models all --seeds 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

TARGET = 99.4
SEED_LOG = {  # the seed's published epoch-15 test accuracy (seed-models.md)
    "v0": 99.41, "v1": 99.37, "v2": 99.16, "v3": 99.38,
}


#: What a run's history keeps of each epoch, whether it comes from fit() or from MLflow.
HISTORY_KEYS = ("epoch", "train_acc", "test_acc", "train_loss", "test_loss", "epoch_seconds", "lr", "tta_test_acc")


def _run(model: str, seed: int, epochs: int, data_dir: str, threads: int, overrides: dict) -> dict:
    import torch

    torch.set_num_threads(threads)
    from mnistnets.data import load_mnist
    from mnistnets.train import fit, recipe_for

    config = recipe_for(model, **{"seed": seed, "epochs": epochs, "device": "cpu", **overrides}).validate()
    data = load_mnist(data_dir)
    start = time.perf_counter()
    history = []
    for r in fit(config, data=data):
        history.append({k: r[k] for k in HISTORY_KEYS if k in r})
        print(f"  {model} s{seed} epoch {r['epoch']:2d}: train {r['train_acc']:.2f}% test {r['test_acc']:.2f}% "
              f"({r['epoch_seconds']:.1f}s)", flush=True)
    return {"model": model, "seed": seed, "config": config.to_dict(), "history": history,
            "seconds": time.perf_counter() - start}


def _from_mlflow(experiment: str, home: str | None, tracking_uri: str | None, job: str | None = None) -> list[dict]:
    """The FINISHED trial runs of an MLflow experiment, in this script's run format."""
    from jobs import report, services

    uri = tracking_uri or services.tracking_uri_for(home or ".mnistjobs")
    if not uri:
        raise SystemExit(f"no MLflow server known for the state folder {home}; pass --tracking-uri")
    runs, epochs = report.load_runs(uri, experiment, job)
    out = []
    for _, run in runs[runs["status"] == "FINISHED"].iterrows():
        mine = epochs[epochs["run_id"] == run["run_id"]].sort_values("epoch")
        history = [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()
                    if k in HISTORY_KEYS and v == v}  # v == v: not NaN
                   for row in mine.to_dict("records")]
        out.append({"model": run["model"], "seed": int(run["seed"]), "run": run["run"], "job_id": run["job_id"],
                    "history": history, "seconds": float(run["wall_seconds"])})
    return out


def _submit(args) -> str:
    """Run the sweep through the service (`mnistjobs submit --wait`); return the experiment name."""
    import subprocess

    experiment = args.experiment or f"accuracy-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "jobs.cli", "submit", "--models", args.models, "--seeds", str(args.seeds),
           "--epochs", str(args.epochs), "--experiment", experiment, "--data-dir", args.data_dir,
           "--cpus-per-trial", str(args.threads), "--wait"]
    for item in args.set:
        key, _, raw = item.partition("=")
        cmd.append("--" + key.replace("_", "-"))
        if raw:
            cmd.append(raw)
    env = dict(os.environ, **({"MNISTJOBS_HOME": args.home} if args.home else {}))
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
    if rc != 0:
        raise SystemExit(f"the sweep did not finish every trial (exit {rc}); see `mnistjobs compare "
                         f"--experiment {experiment}`")
    return experiment


def _default_setting(name):
    """A setting's TrainConfig default (for runs saved before the setting existed)."""
    from mnistnets.train import TrainConfig

    return getattr(TrainConfig(), name, None)


def summarize(runs: list[dict], models: list[str]) -> str:
    lines = []
    by_model: dict[str, list[dict]] = {m: sorted([r for r in runs if r["model"] == m], key=lambda r: r["seed"])
                                       for m in models}
    first_seed = {m: rs[0] for m, rs in by_model.items() if rs}
    epochs = max(len(r["history"]) for r in runs)
    head = "| Epoch | " + " | ".join(f"{m} Train Acc | {m} Test Acc" for m in first_seed) + " |"
    lines += [f"Side-by-side epoch table (seed {min(r['seed'] for r in runs)} of each model)", "", head,
              "|" + "---|" * (1 + 2 * len(first_seed))]
    for e in range(epochs):
        cells = []
        for m, r in first_seed.items():
            h = r["history"][e] if e < len(r["history"]) else None
            cells += [f"{h['train_acc']:.2f}%" if h else "", f"{h['test_acc']:.2f}%" if h else ""]
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    lines += ["", f"Summary (final = last epoch; best = best epoch, picked after the fact; "
                  f"first >= {TARGET}% = first epoch at or above it)", "",
              "| model | seeds | final test acc mean | final min | final with TTA mean | TTA min | best mean (best) "
              "| first epoch >= 99.4 (per seed) | seed's epoch-15 | s/epoch |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m, rs in by_model.items():
        if not rs:
            continue
        finals = [r["history"][-1]["test_acc"] for r in rs]
        bests = [max(h["test_acc"] for h in r["history"]) for r in rs]
        firsts = [next((h["epoch"] for h in r["history"] if h["test_acc"] >= TARGET), None) for r in rs]
        secs = statistics.mean(h["epoch_seconds"] for r in rs for h in r["history"])
        ttas = [r["history"][-1].get("tta_test_acc") for r in rs]
        tta = (f"{statistics.mean(ttas):.2f}% | {min(ttas):.2f}%" if all(t is not None for t in ttas)
               else "- | -")
        lines.append(f"| {m} | {len(rs)} | {statistics.mean(finals):.2f}% | {min(finals):.2f}% | {tta} | "
                     f"{statistics.mean(bests):.2f}% | {', '.join(str(f) if f else '-' for f in firsts)} | "
                     f"{SEED_LOG.get(m, float('nan')):.2f}% | {secs:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("MNISTJOBS_DATA_DIR", "../shared/data/mnist"))
    parser.add_argument("--models", default="all", help="comma list or 'all'")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 1..N")
    parser.add_argument("--first-seed", type=int, default=1, help="start the seeds here (N seeds from it)")
    parser.add_argument("--merge", action="append", default=[], metavar="JSON",
                        help="add the runs of an earlier bench/out/accuracy-*.json (same recipe) to the summary")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field (JSON value), e.g. --set rotation=8; with "
                             "--service, a `mnistjobs submit` option (--set weight_decay=5e-4)")
    parser.add_argument("--service", action="store_true",
                        help="run the sweep through the service (mnistjobs submit --wait), then read MLflow")
    parser.add_argument("--from-experiment", metavar="NAME", help="only read this MLflow experiment's runs")
    parser.add_argument("--experiment", help="MLflow experiment for --service (default: accuracy-<stamp>)")
    parser.add_argument("--job", help="with --from-experiment: only this job's runs")
    parser.add_argument("--home", default=os.environ.get("MNISTJOBS_HOME"), help="state folder of the service")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = parser.parse_args(argv)

    from mnistnets import list_models

    models = list_models() if args.models == "all" else args.models.split(",")
    if args.service or args.from_experiment:
        experiment = _submit(args) if args.service else args.from_experiment
        runs = _from_mlflow(experiment, args.home, args.tracking_uri, args.job)
        models = [m for m in models if any(r["model"] == m for r in runs)]
        if not runs:
            raise SystemExit(f"experiment {experiment!r} has no FINISHED trial runs")
        return _report(runs, models, args)
    overrides = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    jobs = [(m, s) for s in range(args.first_seed, args.first_seed + args.seeds) for m in models]
    print(f"{len(jobs)} runs, {args.workers} at a time, {args.threads} torch thread(s) each, "
          f"overrides {overrides or 'none'}", flush=True)
    runs = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(_run, m, s, args.epochs, args.data_dir, args.threads, overrides) for m, s in jobs]
        for f in as_completed(futures):
            runs.append(f.result())
    for path in args.merge:
        earlier = json.loads(Path(path).read_text())["runs"]
        from mnistnets.train import recipe_for

        def recipe(model):
            return recipe_for(model, **{"epochs": args.epochs, "device": "cpu", **overrides}).to_dict()

        same = [r for r in earlier if r["model"] in models and (r["model"], r["seed"]) not in set(jobs)
                and all(r["config"].get(k, _default_setting(k)) == v
                        for k, v in recipe(r["model"]).items() if k not in ("model", "seed"))]
        print(f"merged {len(same)} of {len(earlier)} runs from {path} (the others used another recipe)")
        runs += same
    return _report(runs, models, args)


def _report(runs: list[dict], models: list[str], args) -> int:
    report = summarize(runs, models)
    print("\n" + report)
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"accuracy-{stamp}.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    (out / f"accuracy-{stamp}.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
