"""Speed benchmark: one training epoch, three pipelines side by side, in one run.

1. trainer   - mnistnets.train.fit: the device-resident loader, batched affine
               augmentation on the device (the project's default recipe);
2. seed      - a seed-style pipeline: torchvision's MNIST dataset, PIL
               RandomRotation(+-7), ToTensor, Normalize, a DataLoader with workers;
3. compute   - pure compute: the same model, optimizer and batch size on one fixed
               random tensor (no data, no augmentation), the same number of batches.

All three train the same model with the same optimizer (and the recipe's weight EMA, for the
models whose recipe has one) at the same batch size.
Rounds are interleaved (A B C, A B C, ...) and each pipeline's fastest round is
kept, because this machine is noisy. Prints seconds per epoch and the ratios
trainer/seed (goal <= 0.6) and trainer/compute (goal <= 1.1).

    python bench/speed.py --data-dir ../shared/data/mnist --models v0 --batch-size 64
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(model, config):
    from mnistnets.train import build_optimizer
    return build_optimizer(config, model.parameters())


def _time_training(config, batches, device) -> float:
    """Seconds for plain training steps over ``batches`` of (x, y), on a fresh seeded model: the
    recipe's model, optimizer and weight EMA (when the recipe has one), as the trainer steps them."""
    from mnistnets.train import WeightEMA, build_model

    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    opt = _optimizer(model, config)
    ema = WeightEMA(model, config.ema) if config.ema > 0 else None
    model.train()
    _sync(device)
    start = time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.nll_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update()
    _sync(device)
    return time.perf_counter() - start


def bench_trainer(config, data) -> float:
    from mnistnets.train import fit
    result = next(iter(fit(config, data=data)))
    return result["train_seconds"]


def _torchvision_root(data_dir: Path) -> Path:
    """torchvision's MNIST wants decompressed files in <root>/MNIST/raw."""
    from mnistnets.data import MNIST_FILES

    root = Path(tempfile.mkdtemp(prefix="mnistjobs-bench-"))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES.values():
        gz = data_dir / f"{name}.gz"
        if gz.exists():
            with gzip.open(gz, "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(data_dir / name, raw / name)
    return root


def bench_seed(config, root: Path, device, workers: int, limit: int | None) -> float:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from mnistnets.data import MNIST_MEAN, MNIST_STD

    tf = transforms.Compose([transforms.RandomRotation((-7.0, 7.0), fill=(0,)), transforms.ToTensor(),
                             transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    ds = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    if limit:
        ds = Subset(ds, range(limit))
    loader = DataLoader(ds, batch_size=config.batch_size, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    return _time_training(config, loader, device)


def bench_compute(config, n_images: int, device) -> float:
    x = torch.randn(config.batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (config.batch_size,), device=device)
    return _time_training(config, itertools.repeat((x, y), math.ceil(n_images / config.batch_size)), device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("MNISTJOBS_DATA_DIR", "../shared/data/mnist"))
    parser.add_argument("--models", default="v0", help="comma list or 'all'")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the fastest of each is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed-style pipeline")
    parser.add_argument("--limit", type=int, default=None, help="first N training images only (quick runs)")
    args = parser.parse_args(argv)

    from mnistnets import list_models
    from mnistnets.data import load_mnist
    from mnistnets.train import recipe_for, resolve_device

    device = resolve_device(args.device)
    models = list_models() if args.models == "all" else args.models.split(",")
    data_dir = Path(args.data_dir)
    data = load_mnist(data_dir, train_limit=args.limit, test_limit=1000)
    n = len(data.train_labels)
    root = _torchvision_root(data_dir)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    print(f"device: {dev_name}; torch {torch.__version__}; {n:,} training images per epoch; "
          f"batch {args.batch_size}; {args.rounds} round(s), fastest kept; seed-style loader workers {args.workers}")
    rows = []
    try:
        for name in models:
            # The model's recipe (EMA included), one augmented epoch at a constant LR.
            config = recipe_for(name, epochs=1, batch_size=args.batch_size, device=str(device),
                                schedule="constant", clean_epochs=0)
            best = {"trainer": math.inf, "seed": math.inf, "compute": math.inf}
            for r in range(args.rounds):
                t = {"trainer": bench_trainer(config, data),
                     "seed": bench_seed(config, root, device, args.workers, args.limit),
                     "compute": bench_compute(config, n, device)}
                print(f"  {name} round {r + 1}: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()), flush=True)
                best = {k: min(best[k], t[k]) for k in best}
            rows.append((name, best))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n| model | trainer s/epoch | seed-style s/epoch | pure compute s/epoch | trainer/seed (goal <= 0.6) "
          "| trainer/compute (goal <= 1.1) | trainer img/s |")
    print("|---|---|---|---|---|---|---|")
    for name, b in rows:
        print(f"| {name} | {b['trainer']:.1f} | {b['seed']:.1f} | {b['compute']:.1f} | "
              f"{b['trainer'] / b['seed']:.2f} | {b['trainer'] / b['compute']:.2f} | {n / b['trainer']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
