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

import functools
import math
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .checkpoints import (CHECKPOINT_VERSION, CheckpointError, check_resumable, load_checkpoint,
                          prepare_checkpoint_dir, save_checkpoint)
from .data import MNIST, AugmentConfig, DeviceLoader, load_mnist
from .evaluate import TTA_VIEWS, WeightEMA, evaluate, evaluate_tta, shift_images
from .models import create_model, list_models
from .schedules import Scheduler, build_scheduler, check_schedule
from .seeds import dropout_seed

__all__ = [
    "OPTIMIZERS", "TTA_VIEWS", "CHECKPOINT_VERSION", "MODEL_RECIPES", "TrainConfig", "recipe_for",
    "settings_text", "is_number", "resolve_device", "build_optimizer", "build_model", "fit",
    "WeightEMA", "evaluate", "evaluate_tta", "shift_images", "CheckpointError", "save_checkpoint",
    "load_checkpoint", "prepare_checkpoint_dir", "check_resumable", "Diverged", "MAX_LR",
]

OPTIMIZERS = ("sgd", "adam", "adamw")

#: The largest lr (anywhere in the schedule) a run accepts. The weights are float32 and an optimizer
#: step turns the lr into a float32 factor: SGD's at most 3.4e38, Adam's first step at 10 x lr (its
#: bias correction 1 / (1 - 0.9)); above that torch fails in the middle of training
#: ("value cannot be converted to type float without overflow"). Any lr near it diverges anyway.
MAX_LR = float(torch.finfo(torch.float32).max) / 10


class Diverged(RuntimeError):
    """The training loss became NaN or infinite: ``fit`` stops at the end of that epoch.

    ``str(exc)`` is one line that says which epoch, what became non-finite and what to try;
    ``epoch`` is the epoch that diverged (the epochs before it were yielded and checkpointed as
    usual; this one was not).
    """

    def __init__(self, epoch: int, reason: str):
        super().__init__(reason)
        self.epoch, self.reason = int(epoch), reason


def is_number(value: Any) -> bool:
    """A finite real number (int or float), not a bool: the one such check of mnistnets and jobs."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    """Everything that defines one run. The defaults are the project's recipe."""

    model: str = "v0"
    epochs: int = 15
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1  # the peak of the default onecycle schedule
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    schedule: str = "onecycle:pct_start=0.2"
    augment: bool = True
    rotation: float = 8.0
    translate: float = 0.08
    scale: float = 0.08
    shear: float = 3.0
    dropout: float | None = None
    clean_epochs: int = 0   # the last N epochs train on un-augmented images
    ema: float = 0.0        # decay of an exponential moving average of the weights (0: off);
    #                         when on, test metrics and checkpoints' "model" come from the average
    tta: str = "shift8"     # after the last epoch, also test with test-time augmentation (TTA_VIEWS)
    seed: int = 1
    device: str = "auto"
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    eval_batch_size: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}; "
                             f"valid settings: {', '.join(sorted(known))}")
        return cls(**values)

    def augment_config(self) -> AugmentConfig | None:
        if not self.augment:
            return None
        return AugmentConfig(rotation=self.rotation, translate=self.translate,
                             scale=self.scale, shear=self.shear)

    def validate(self) -> "TrainConfig":
        """Raise ValueError with a clear message for any bad setting."""
        if self.model not in list_models():
            raise ValueError(f"unknown model {self.model!r}; valid models: {', '.join(list_models())}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        if not isinstance(self.clean_epochs, int) or isinstance(self.clean_epochs, bool) \
                or not 0 <= self.clean_epochs <= self.epochs:
            raise ValueError(f"clean_epochs must be an integer from 0 to epochs ({self.epochs}), "
                             f"not {self.clean_epochs!r}")
        if not is_number(self.ema) or not 0 <= self.ema < 1:
            raise ValueError(f"ema must be a decay in [0, 1) (0: off; e.g. 0.999), not {self.ema!r}")
        if self.tta not in TTA_VIEWS:
            raise ValueError(f"unknown tta {self.tta!r}; valid: {', '.join(TTA_VIEWS)}")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or unset), not {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        for name in ("lr", "momentum", "weight_decay", "label_smoothing", "rotation",
                     "translate", "scale", "shear"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, not {self.lr!r}")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing!r}")
        if self.dropout is not None and (not is_number(self.dropout) or not 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), not {self.dropout!r}")
        for name in ("nesterov", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            raise ValueError(f"data_dir must be a folder path, not {self.data_dir!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        try:
            self.augment_config()  # the warp's own limits (translate and scale < 1, shear < 90)
        except ValueError as exc:
            raise ValueError(str(exc).replace("AugmentConfig.", "")) from None
        if not isinstance(self.schedule, str):
            raise ValueError(f"schedule must be a spec string such as 'onecycle', not {self.schedule!r}")
        # Parse the spec (ScheduleError, a ValueError, names what is wrong), then build and step it
        # through the whole run on a throwaway optimizer, so that a spec torch would refuse fails
        # here, before any training (train set size: MNIST's 60,000).
        n_train = min(self.train_limit or 60_000, 60_000)
        _check_schedule(self.schedule, float(self.lr), self.epochs, math.ceil(n_train / self.batch_size))
        what, peak = _peak_lr(self.schedule, float(self.lr))
        if peak > MAX_LR:
            raise ValueError(f"{what} is {peak:g}: more than float32 weights can take (an optimizer step at "
                             f"that lr overflows); the largest lr accepted is {MAX_LR:.3g}, and lrs that train "
                             f"MNIST are about 0.001 to 1")
        return self


def _peak_lr(schedule: str, lr: float) -> tuple[str, float]:
    """(what sets it, the largest lr the schedule gives any batch) for a valid spec: the schedules
    only lower the lr from its start, except onecycle (up to max_lr) and cosine (to eta_min)."""
    from .schedules import parse_schedule

    name, options = parse_schedule(schedule)
    if name == "onecycle" and "max_lr" in options:
        return f"max_lr of the schedule {schedule!r}", float(options["max_lr"])
    if name == "cosine" and options.get("eta_min", 0.0) > lr:
        return f"eta_min of the schedule {schedule!r}", float(options["eta_min"])
    return "lr", lr


@functools.lru_cache(maxsize=256)
def _check_schedule(spec: str, lr: float, epochs: int, steps_per_epoch: int) -> None:
    """check_schedule, once per distinct run shape (a sweep validates many trials that share one)."""
    check_schedule(spec, lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)


#: Each model's departures from TrainConfig's defaults. TrainConfig's defaults plus these are the
#: model's default recipe: what `mnistjobs train` and `mnistjobs submit` run unless told otherwise.
#: Found by sweeps through the service on the real data (README, "The default recipe"): v1 and v3
#: reach 99.4% with the shared defaults; v0 (no dropout) needs more regularisation and batch 64
#: (twice the steps), v2 (4,232 params) less regularisation, a higher peak and the last epochs
#: un-augmented; both gain from weight EMA.
MODEL_RECIPES: dict[str, dict[str, Any]] = {
    "v0": {"batch_size": 64, "weight_decay": 5e-4, "label_smoothing": 0.05, "ema": 0.999},
    "v2": {"lr": 0.3, "weight_decay": 5e-5, "dropout": 0.0, "clean_epochs": 2, "ema": 0.999},
}


def settings_text(settings: dict[str, Any]) -> str:
    """Settings in one line for people, e.g. "lr 0.3, dropout 0, ema 0.999"."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())


def recipe_for(model: str, **settings: Any) -> TrainConfig:
    """The default recipe of ``model`` (TrainConfig's defaults, then ``MODEL_RECIPES[model]``), with
    ``settings`` given explicitly on top. Unknown settings raise ValueError; values are not validated.

    A recipe's ``clean_epochs`` is capped at the run's epochs (``epochs=1`` trains v2 one clean
    epoch instead of failing); an explicit ``clean_epochs`` is left for ``validate`` to judge."""
    recipe = dict(MODEL_RECIPES.get(model, {}))
    epochs = settings.get("epochs", recipe.get("epochs", TrainConfig.epochs))
    if "clean_epochs" in recipe and "clean_epochs" not in settings and isinstance(epochs, int):
        recipe["clean_epochs"] = max(0, min(recipe["clean_epochs"], epochs))
    return TrainConfig.from_dict({**recipe, **settings, "model": model})


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
