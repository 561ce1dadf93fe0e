"""Accuracy benchmark: every model, N seeds, each model's default recipe, real MNIST.

Prints the seed-style side-by-side epoch table (train/test accuracy per model
per epoch, seed 1) and a summary per model: final-epoch test accuracy (mean and
min over seeds), best epoch (labelled best), and the first epoch at >= 99.4%.
Trains with mnistnets.train.fit directly (no Ray, no MLflow), one process per
run, --workers at a time. Results also go to bench/out/accuracy-<stamp>.json.

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
        history.append({k: r[k] for k in ("epoch", "train_acc", "test_acc", "train_loss", "test_loss",
                                           "epoch_seconds", "lr")})
        print(f"  {model} s{seed} epoch {r['epoch']:2d}: train {r['train_acc']:.2f}% test {r['test_acc']:.2f}% "
              f"({r['epoch_seconds']:.1f}s)", flush=True)
    return {"model": model, "seed": seed, "config": config.to_dict(), "history": history,
            "seconds": time.perf_counter() - start}


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
              "| model | seeds | final test acc mean | final min | best mean (best) | first epoch >= 99.4 "
              "(per seed) | seed's epoch-15 | s/epoch |",
              "|---|---|---|---|---|---|---|---|"]
    for m, rs in by_model.items():
        if not rs:
            continue
        finals = [r["history"][-1]["test_acc"] for r in rs]
        bests = [max(h["test_acc"] for h in r["history"]) for r in rs]
        firsts = [next((h["epoch"] for h in r["history"] if h["test_acc"] >= TARGET), None) for r in rs]
        secs = statistics.mean(h["epoch_seconds"] for r in rs for h in r["history"])
        lines.append(f"| {m} | {len(rs)} | {statistics.mean(finals):.2f}% | {min(finals):.2f}% | "
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
                        help="override a TrainConfig field (JSON value), e.g. --set rotation=8")
    args = parser.parse_args(argv)

    from mnistnets import list_models

    models = list_models() if args.models == "all" else args.models.split(",")
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
