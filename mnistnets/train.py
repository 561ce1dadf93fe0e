"""One trial's training: ``fit(config)`` yields one result per epoch.

Training knows nothing of who listens: the CLI's progress bar, Ray Tune and
MLflow are listeners in ``jobs``. Randomness is a function of (seed, epoch):
the model's initialisation comes from the seed, and every epoch reseeds the
loader (order, augmentation) and the global RNG (dropout) from (seed, epoch),
so a run resumed from the checkpoint of epoch k ends with the same weights as
an uninterrupted one.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .data import MNIST, MNIST_MEAN, MNIST_STD, AugmentConfig, DeviceLoader, load_mnist, resolve_data_dir
from .models import create_model, list_models
from .schedules import build_scheduler, check_schedule

OPTIMIZERS = ("sgd", "adam", "adamw")
#: Test-time augmentation: the test image plus its one-pixel shifts (background fill); the
#: prediction is the mean of the views' probabilities. "shift4": left/right/up/down, "shift8": and
#: the four diagonals.
TTA_VIEWS = {"none": ((0, 0),),
             "shift4": ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0)),
             "shift8": ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))}
CHECKPOINT_VERSION = 1


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
        if not _is_number(self.ema) or not 0 <= self.ema < 1:
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
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, not {self.lr!r}")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing!r}")
        if self.dropout is not None and (not _is_number(self.dropout) or not 0 <= self.dropout < 1):
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
        return self


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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

    A recipe's ``clean_epochs`` is capped at the run's epochs (``--epochs 1`` trains v2 one clean
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
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_model(config: TrainConfig) -> torch.nn.Module:
    options = {} if config.dropout is None else {"dropout": config.dropout}
    return create_model(config.model, **options)


class WeightEMA:
    """Exponential moving average of a model's weights, updated after every optimizer step.

    The average starts as a copy of the model; step t uses decay ``min(decay, (1 + t) / (10 + t))``
    so that early steps are not dominated by the random initialisation. Float buffers (BatchNorm's
    running statistics) are averaged too; integer ones are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0
        self._pairs(model)

    def _pairs(self, model: torch.nn.Module) -> None:
        live = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
        avg = list(self.model.parameters()) + [b for b in self.model.buffers() if b.is_floating_point()]
        self._live, self._avg = live, avg
        self._live_int = [b for b in model.buffers() if not b.is_floating_point()]
        self._avg_int = [b for b in self.model.buffers() if not b.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._avg, self._live, 1.0 - d)
        for a, b in zip(self._avg_int, self._live_int):
            a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


# --- checkpoints -------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated, not ours) or a folder that cannot
    hold checkpoints."""


#: What every checkpoint holds (``fit`` writes more: history, rng, and with EMA the live weights).
_CHECKPOINT_KEYS = ("epoch", "config", "model", "optimizer", "scheduler", "best_test_acc")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"checkpoint {path} cannot be read: it is truncated, corrupt or not a "
                              f"PyTorch checkpoint ({type(exc).__name__}: {reason})") from None
    missing = [k for k in _CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(_CHECKPOINT_KEYS)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or missing:
        raise CheckpointError(f"{path} is not a mnistjobs checkpoint (version {CHECKPOINT_VERSION}, "
                              f"as `mnistjobs train` writes to last.pt and best.pt)")
    return state


def prepare_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that checkpoints can be written there; raise
    CheckpointError saying why not (before any training, not after the first epoch)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoints to {path} ({exc.strerror or exc}); choose a "
                              f"folder you can write (--checkpoint-dir)") from None
    return path


def check_resumable(config: "TrainConfig", path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``, after checking that ``config`` may continue it (CheckpointError)."""
    state = load_checkpoint(path)
    _check_resumable(state["config"], config, path)
    return state


# --- training ----------------------------------------------------------------

def _limit(data: MNIST, config: TrainConfig) -> MNIST:
    def cut(x, n):
        return x if n is None else x[:n]
    return MNIST(cut(data.train_images, config.train_limit), cut(data.train_labels, config.train_limit),
                 cut(data.test_images, config.test_limit), cut(data.test_labels, config.test_limit))


@torch.no_grad()
def _score(model: torch.nn.Module, loader: DeviceLoader,
           log_probs: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """(mean NLL per sample, accuracy in percent) of the predictions ``log_probs(x)`` over ``loader``;
    one host sync at the end."""
    model.eval()
    loss_sum = correct = None
    n = 0
    for x, y in loader:
        out = log_probs(x)
        batch_loss = F.nll_loss(out, y, reduction="sum")
        batch_correct = (out.argmax(1) == y).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        n += y.numel()
    if n == 0:
        return float("nan"), float("nan")
    return loss_sum.item() / n, 100.0 * correct.item() / n


def evaluate(model: torch.nn.Module, loader: DeviceLoader) -> tuple[float, float]:
    """Return (mean NLL per sample, accuracy in percent)."""
    return _score(model, loader, model)


def shift_images(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``x`` [B,C,H,W] moved by (dy, dx) pixels; uncovered pixels get ``fill``."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), value=fill)
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + h, left:left + w]


def evaluate_tta(model: torch.nn.Module, loader: DeviceLoader, tta: str) -> tuple[float, float]:
    """Like ``evaluate``, predicting from the mean probability over the ``TTA_VIEWS[tta]`` views."""
    fill = -MNIST_MEAN / MNIST_STD  # a blank (0) pixel after normalisation

    def log_probs(x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([model(shift_images(x, dy, dx, fill)).exp() for dy, dx in TTA_VIEWS[tta]]).mean(0)
        return prob.clamp_min(1e-12).log()

    return _score(model, loader, log_probs)


# Settings that may differ between a run and its resumption: where it runs, not what it computes.
_RESUME_FREE = {"device", "data_dir", "eval_batch_size", "tta"}


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path) -> None:
    current = config.to_dict()
    changed = [f"{k}={saved.get(k)!r} there, {current[k]!r} here"
               for k in current if k not in _RESUME_FREE
               and saved.get(k, getattr(TrainConfig, k, None)) != current[k]]  # older checkpoints lack newer settings
    if changed:
        raise CheckpointError(f"checkpoint {path} was written by a run with other settings "
                              f"({'; '.join(changed)}); resume it with the same settings")


ProgressFn = Callable[[int, int, int, float, float], None]


def fit(config: TrainConfig, *, data: MNIST | None = None, checkpoint_dir: str | os.PathLike | None = None,
        resume_from: str | os.PathLike | None = None, progress: ProgressFn | None = None,
        progress_every: int = 25) -> Iterator[dict[str, Any]]:
    """Train one model; yield one result dict per epoch (see module docstring).

    ``progress(epoch, batch, n_batches, running_loss, running_acc)`` is called every
    ``progress_every`` batches and at the last one; it costs one host sync each time.
    """
    config.validate()
    device = resolve_device(config.device)
    if data is None:
        data = load_mnist(resolve_data_dir(config.data_dir), config.train_limit, config.test_limit)
    data = _limit(data, config)

    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    optimizer = build_optimizer(config, model.parameters())
    train_loader = DeviceLoader(data.train_images, data.train_labels, config.batch_size, device=device,
                                shuffle=True, augment=config.augment_config(), seed=config.seed)
    test_loader = DeviceLoader(data.test_images, data.test_labels, config.eval_batch_size, device=device)
    scheduler = build_scheduler(config.schedule, optimizer, config.epochs, len(train_loader))
    ema = WeightEMA(model, config.ema) if config.ema > 0 else None
    scored = model if ema is None else ema.model  # what is tested and checkpointed as "model"
    augment = train_loader.augment

    start_epoch, best_acc, history = 1, -1.0, []
    ckpt_dir = prepare_checkpoint_dir(checkpoint_dir) if checkpoint_dir is not None else None
    if resume_from is not None:
        state = check_resumable(config, resume_from)
        if ema is not None:  # "model" holds the evaluated (averaged) weights, "live" the trained ones
            model.load_state_dict(state["live"])
            ema.load_state_dict({"model": state["model"], "updates": state["ema_updates"]})
        else:
            model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best_acc = float(state["best_test_acc"])
        history = list(state.get("history", []))
        torch.set_rng_state(state["rng"]["torch"])

    n_batches = len(train_loader)
    for epoch in range(start_epoch, config.epochs + 1):
        torch.manual_seed(_epoch_seed(config.seed, epoch))  # dropout RNG
        train_loader.set_epoch(epoch)
        train_loader.augment = None if epoch > config.epochs - config.clean_epochs else augment
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for i, (x, y) in enumerate(train_loader, 1):
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)  # out: log-probs
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i == n_batches:
                lr_used = scheduler.get_lr()  # the lr this epoch's last step used
            scheduler.step_batch()
            if ema is not None:
                ema.update()
            loss_sum += loss.detach() * y.numel()
            correct += (out.detach().argmax(1) == y).sum()
            seen += y.numel()
            if progress is not None and (i % progress_every == 0 or i == n_batches):
                progress(epoch, i, n_batches, loss_sum.item() / seen, 100.0 * correct.item() / seen)
        train_loss, train_acc = loss_sum.item() / max(seen, 1), 100.0 * correct.item() / max(seen, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - start
        test_loss, test_acc = evaluate(scored, test_loader)
        scheduler.step_epoch(test_loss)
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
            result["tta_test_loss"], result["tta_test_acc"] = evaluate_tta(scored, test_loader, config.tta)
        history.append({k: v for k, v in result.items() if k not in ("checkpoint", "best")})
        if ckpt_dir is not None:
            state = {
                "version": CHECKPOINT_VERSION, "epoch": epoch, "config": config.to_dict(),
                "model": scored.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "best_test_acc": best_acc,
                "history": history, "rng": {"torch": torch.get_rng_state()},
            }
            if ema is not None:
                state.update(live=model.state_dict(), ema_updates=ema.updates)
            save_checkpoint(ckpt_dir / "last.pt", state)
            if is_best:
                save_checkpoint(ckpt_dir / "best.pt", state)
            result["checkpoint"] = str(ckpt_dir / "last.pt")
        yield result
