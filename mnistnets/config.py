"""A run's settings, with no torch: ``TrainConfig`` (every setting of one run, its defaults the
shared recipe), each model's departures from it (``MODEL_RECIPES``, ``recipe_for``), and the names
and limits the settings are checked against.

Importing this module costs no torch import, so the service's client and its job driver can check
a sweep's settings in a fraction of a second. ``TrainConfig.validate()`` also builds and steps the
run's schedule on a throwaway optimizer (torch's own lr schedulers, ``mnistnets.schedules``);
``validate(check_schedule=False)`` leaves that one check out and imports no torch.
``mnistnets.train`` re-exports every name here.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["OPTIMIZERS", "MAX_LR", "MODEL_NAMES", "TTA_VIEWS", "MODEL_RECIPES", "TrainConfig", "recipe_for",
           "settings_text", "is_number", "check_augment"]

#: The four models of the seed (``mnistnets.models`` registers exactly these, in this order;
#: tests/test_models.py checks it), named here so that checking a setting needs no torch.
MODEL_NAMES = ("v0", "v1", "v2", "v3")

#: Test-time augmentation: the test image plus its one-pixel shifts (background fill); the
#: prediction is the mean of the views' probabilities. "shift4": left/right/up/down, "shift8": and
#: the four diagonals.
TTA_VIEWS = {"none": ((0, 0),),
             "shift4": ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0)),
             "shift8": ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))}


def check_augment(rotation: Any, translate: Any, scale: Any, shear: Any) -> None:
    """The random affine warp's limits (``mnistnets.data.AugmentConfig`` checks its fields with
    this): every value a number >= 0, translate and scale fractions < 1, shear < 90 degrees."""
    for name, v in (("rotation", rotation), ("translate", translate), ("scale", scale), ("shear", shear)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"AugmentConfig.{name} must be a number >= 0, got {v!r}")
    if translate >= 1:
        raise ValueError(f"AugmentConfig.translate is a fraction of the image side (< 1), got {translate}")
    if scale >= 1:
        raise ValueError(f"AugmentConfig.scale is a fraction (< 1), got {scale}")
    if shear >= 90:
        raise ValueError(f"AugmentConfig.shear must be < 90 degrees, got {shear}")


OPTIMIZERS = ("sgd", "adam", "adamw")

#: The largest lr (anywhere in the schedule) a run accepts. The weights are float32 and an optimizer
#: step turns the lr into a float32 factor: SGD's at most 3.4e38, Adam's first step at 10 x lr (its
#: bias correction 1 / (1 - 0.9)); above that torch fails in the middle of training
#: ("value cannot be converted to type float without overflow"). Any lr near it diverges anyway.
MAX_LR = 3.4028234663852886e38 / 10  # float(torch.finfo(torch.float32).max) / 10 (tests check it)


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

    def augment_config(self) -> "AugmentConfig | None":
        """The training images' random warp (``mnistnets.data.AugmentConfig``; imports torch)."""
        if not self.augment:
            return None
        from .data.loader import AugmentConfig

        return AugmentConfig(rotation=self.rotation, translate=self.translate,
                             scale=self.scale, shear=self.shear)

    def validate(self, *, check_schedule: bool = True) -> "TrainConfig":
        """Raise ValueError with a clear message for any bad setting.

        ``check_schedule=False`` leaves out the one check that needs torch: building the schedule
        and stepping it through the run on a throwaway optimizer (the spec is still parsed and its
        peak lr checked). The job's driver checks with it off: `mnistjobs submit` checked in full."""
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; valid models: {', '.join(MODEL_NAMES)}")
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
        try:  # the warp's own limits (translate and scale < 1, shear < 90)
            check_augment(self.rotation, self.translate, self.scale, self.shear)
        except ValueError as exc:
            raise ValueError(str(exc).replace("AugmentConfig.", "")) from None
        if not isinstance(self.schedule, str):
            raise ValueError(f"schedule must be a spec string such as 'onecycle', not {self.schedule!r}")
        # Parse the spec (ScheduleError, a ValueError, names what is wrong), then build and step it
        # through the whole run on a throwaway optimizer, so that a spec torch would refuse fails
        # here, before any training (train set size: MNIST's 60,000).
        n_train = min(self.train_limit or 60_000, 60_000)
        if check_schedule:
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

    name, options = parse_schedule(schedule)  # torch-free
    if name == "onecycle" and "max_lr" in options:
        return f"max_lr of the schedule {schedule!r}", float(options["max_lr"])
    if name == "cosine" and options.get("eta_min", 0.0) > lr:
        return f"eta_min of the schedule {schedule!r}", float(options["eta_min"])
    return "lr", lr


@functools.lru_cache(maxsize=256)
def _check_schedule(spec: str, lr: float, epochs: int, steps_per_epoch: int) -> None:
    """check_schedule, once per distinct run shape (a sweep validates many trials that share one)."""
    from .schedules import check_schedule

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
