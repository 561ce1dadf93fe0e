"""One trial's training: ``fit(config)`` yields one result per epoch.

Training knows nothing of who listens: the CLI's progress bar, Ray Tune and
MLflow are listeners in ``jobs``. Randomness is a function of (seed, epoch):
the model's initialisation comes from the seed, and every epoch reseeds the
loader (order, augmentation) and the global RNG (dropout) from (seed, epoch)
(``mnistnets.seeds``), so a run resumed from the checkpoint of epoch k ends
with the same weights as an uninterrupted one.

Checkpoints are in ``mnistnets.checkpoints``, scoring (EMA, TTA) in
``mnistnets.evaluate``; their names are importable from here too.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .checkpoints import (CHECKPOINT_VERSION, CheckpointError, check_resumable, load_checkpoint,
                          prepare_checkpoint_dir, save_checkpoint)
from .data import MNIST, AugmentConfig, DeviceLoader, load_mnist
from .config import (MAX_LR, MODEL_RECIPES, OPTIMIZERS, TTA_VIEWS, TrainConfig, is_number, recipe_for,
                     settings_text)
from .evaluate import WeightEMA, evaluate, evaluate_tta, shift_images
from .models import create_model
from .schedules import Scheduler, build_scheduler
from .seeds import dropout_seed

__all__ = [
    "OPTIMIZERS", "TTA_VIEWS", "CHECKPOINT_VERSION", "MODEL_RECIPES", "TrainConfig", "recipe_for",
    "settings_text", "is_number", "resolve_device", "build_optimizer", "build_model", "fit",
    "WeightEMA", "evaluate", "evaluate_tta", "shift_images", "CheckpointError", "save_checkpoint",
    "load_checkpoint", "prepare_checkpoint_dir", "check_resumable", "Diverged", "MAX_LR",
]


class Diverged(RuntimeError):
    """The training loss became NaN or infinite: ``fit`` stops at the end of that epoch.

    ``str(exc)`` is one line that says which epoch, what became non-finite and what to try;
    ``epoch`` is the epoch that diverged (the epochs before it were yielded and checkpointed as
    usual; this one was not).
    """

    def __init__(self, epoch: int, reason: str):
        super().__init__(reason)
        self.epoch, self.reason = int(epoch), reason


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is visible to torch")
    return torch.device(device)


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """torch's SGD, Adam or AdamW (mnistnets.optim: the same classes, without the first
    ``torch._dynamo`` import, about 2 s before the first batch on a small CPU machine)."""
    from .optim import SGD, Adam, AdamW

    if config.optimizer == "sgd":
        return SGD(params, lr=config.lr, momentum=config.momentum,
                   nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_model(config: TrainConfig) -> torch.nn.Module:
    options = {} if config.dropout is None else {"dropout": config.dropout}
    return create_model(config.model, **options)


ProgressFn = Callable[[int, int, int, float, float], None]

_LOWER_LR = "the run stopped; try a lower lr (or the schedule's max_lr)"


@dataclass
class _Run:
    """What one ``fit`` trains: the model, its optimizer and schedule, the loaders and the EMA."""

    config: TrainConfig
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    ema: WeightEMA | None

    @classmethod
    def build(cls, config: TrainConfig, data: MNIST, device: torch.device) -> "_Run":
        torch.manual_seed(config.seed)  # the model's initialisation
        model = build_model(config).to(device)
        optimizer = build_optimizer(config, model.parameters())
        train_loader = DeviceLoader(data.train_images, data.train_labels, config.batch_size, device=device,
                                    shuffle=True, augment=config.augment_config(), seed=config.seed)
        test_loader = DeviceLoader(data.test_images, data.test_labels, config.eval_batch_size, device=device)
        scheduler = build_scheduler(config.schedule, optimizer, config.epochs, len(train_loader))
        ema = WeightEMA(model, config.ema) if config.ema > 0 else None
        return cls(config, device, model, optimizer, scheduler, train_loader, test_loader, ema)

    @property
    def scored(self) -> torch.nn.Module:
        """What is tested and checkpointed as "model": the average when EMA is on."""
        return self.model if self.ema is None else self.ema.model

    def restore(self, state: dict[str, Any]) -> tuple[int, float, list]:
        """Load a checkpoint; return (first epoch to train, best test accuracy, history)."""
        if self.ema is not None:  # "model" holds the evaluated (averaged) weights, "live" the trained ones
            self.model.load_state_dict(state["live"])
            self.ema.load_state_dict({"model": state["model"], "updates": state["ema_updates"]})
        else:
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        return int(state["epoch"]) + 1, float(state["best_test_acc"]), list(state.get("history", []))

    def train_epoch(self, epoch: int, augment: AugmentConfig | None, progress: ProgressFn | None,
                    progress_every: int, first_batch: Callable[[], None] | None = None
                    ) -> tuple[float, float, float, int]:
        """One epoch of training; (train loss, train accuracy %, the last step's lr, images seen)."""
        config, model, optimizer, scheduler, loader = (self.config, self.model, self.optimizer,
                                                       self.scheduler, self.train_loader)
        torch.manual_seed(dropout_seed(config.seed, epoch))  # dropout RNG
        loader.set_epoch(epoch)
        loader.augment = None if epoch > config.epochs - config.clean_epochs else augment
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen, n_batches = 0, len(loader)
        peak_lr = 0.0  # the largest lr of the epoch's steps, for the message of a divergence
        try:
            for i, (x, y) in enumerate(loader, 1):
                out = model(x)
                loss = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)  # out: log-probs
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                peak_lr = max(peak_lr, scheduler.get_lr())
                optimizer.step()
                if first_batch is not None:  # once: the caller's "training has begun" moment
                    first_batch()
                    first_batch = None
                if i == n_batches:
                    lr_used = scheduler.get_lr()  # the lr this epoch's last step used
                scheduler.step_batch()
                if self.ema is not None:
                    self.ema.update()
                loss_sum += loss.detach() * y.numel()
                correct += (out.detach().argmax(1) == y).sum()
                seen += y.numel()
                if progress is not None and (i % progress_every == 0 or i == n_batches):
                    progress(epoch, i, n_batches, loss_sum.item() / seen, 100.0 * correct.item() / seen)
        except RuntimeError as exc:  # torch refuses a step whose factor overflows float32
            if "overflow" not in str(exc):
                raise
            raise Diverged(epoch, f"training diverged in epoch {epoch}/{config.epochs}: an optimizer step at "
                                  f"lr {scheduler.get_lr():.4g}, weight decay {config.weight_decay:g} overflowed "
                                  f"float32 ({' '.join(str(exc).split())}); {_LOWER_LR} or weight decay") from None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # The loss sum is on the device: its one host sync per epoch (below) is also the divergence
        # check (NaN and inf propagate into the sum), so a NaN costs no extra sync per batch.
        train_loss = loss_sum.item() / max(seen, 1)
        if not math.isfinite(train_loss):
            raise Diverged(epoch, f"training diverged in epoch {epoch}/{config.epochs}: the epoch's training "
                                  f"loss is {train_loss} (lr up to {peak_lr:.4g} this epoch); {_LOWER_LR}")
        return train_loss, 100.0 * correct.item() / max(seen, 1), lr_used, seen

    def checkpoint(self, epoch: int, best_acc: float, history: list) -> dict[str, Any]:
        state = {
            "version": CHECKPOINT_VERSION, "epoch": epoch, "config": self.config.to_dict(),
            "model": self.scored.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "best_test_acc": best_acc,
            "history": history, "rng": {"torch": torch.get_rng_state()},
        }
        if self.ema is not None:
            state.update(live=self.model.state_dict(), ema_updates=self.ema.updates)
        return state


def fit(config: TrainConfig, *, data: MNIST | None = None, checkpoint_dir: str | os.PathLike | None = None,
        resume_from: str | os.PathLike | None = None, progress: ProgressFn | None = None,
        progress_every: int = 25, first_batch: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
    """Train one model; yield one result dict per epoch (see module docstring).

    ``data`` defaults to ``load_mnist(config.data_dir)``. ``progress(epoch, batch, n_batches,
    running_loss, running_acc)`` is called every ``progress_every`` batches and at the last one;
    it costs one host sync each time. ``first_batch()`` is called once, after the first optimizer
    step of this call (no host sync): when training has begun, for a caller that times its startup.

    Raises :class:`Diverged` at the end of an epoch whose training loss (the epoch's sum, read
    once per epoch anyway) or test loss is NaN or infinite, or in which an optimizer step
    overflowed: that epoch is neither yielded nor checkpointed.
    """
    config.validate()
    device = resolve_device(config.device)
    if data is None:
        if config.data_dir is None:
            raise ValueError("fit needs data (an MNIST) or config.data_dir (a folder of the four MNIST files)")
        data = load_mnist(config.data_dir, config.train_limit, config.test_limit)
    run = _Run.build(config, data.limit(config.train_limit, config.test_limit), device)
    augment = run.train_loader.augment
    start_epoch, best_acc, history = 1, -1.0, []
    ckpt_dir = prepare_checkpoint_dir(checkpoint_dir) if checkpoint_dir is not None else None
    if resume_from is not None:
        start_epoch, best_acc, history = run.restore(check_resumable(config, resume_from))

    for epoch in range(start_epoch, config.epochs + 1):
        start = time.perf_counter()
        train_loss, train_acc, lr_used, seen = run.train_epoch(epoch, augment, progress, progress_every,
                                                               first_batch if epoch == start_epoch else None)
        train_seconds = time.perf_counter() - start
        test_loss, test_acc = evaluate(run.scored, run.test_loader)
        if not math.isfinite(test_loss):  # e.g. BatchNorm's running statistics blew up
            raise Diverged(epoch, f"training diverged in epoch {epoch}/{config.epochs}: the test loss is "
                                  f"{test_loss} (the training loss was {train_loss:.4g}); {_LOWER_LR}")
        run.scheduler.step_epoch(test_loss)
        epoch_seconds = time.perf_counter() - start
        is_best = test_acc > best_acc
        best_acc = max(best_acc, test_acc)
        result = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "lr": lr_used,
            "epoch_seconds": epoch_seconds, "train_seconds": train_seconds,
            "images_per_second": seen / train_seconds if train_seconds > 0 else float("nan"),
            "checkpoint": None, "best": is_best,
        }
        if config.tta != "none" and epoch == config.epochs:
            result["tta_test_loss"], result["tta_test_acc"] = evaluate_tta(run.scored, run.test_loader, config.tta)
        history.append({k: v for k, v in result.items() if k not in ("checkpoint", "best")})
        if ckpt_dir is not None:
            state = run.checkpoint(epoch, best_acc, history)
            save_checkpoint(ckpt_dir / "last.pt", state)
            if is_best:
                save_checkpoint(ckpt_dir / "best.pt", state)
            result["checkpoint"] = str(ckpt_dir / "last.pt")
        yield result
