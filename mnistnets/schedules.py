"""Learning-rate schedules from spec strings.

A spec is ``name`` or ``name:key=value,key=value``, for example::

    onecycle:max_lr=0.05,pct_start=0.2
    step:step_size=6,gamma=0.1
    multistep:milestones=5/10,gamma=0.1
    cosine:warmup=1

Every schedule takes ``warmup=E``: a linear warmup over E epochs (a float) in
front of it. Whether a schedule steps per batch or per epoch is its own
business: the trainer calls ``step_batch()`` after every batch and
``step_epoch(metric)`` after every epoch, and the wrapper decides which one
moves the learning rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim import lr_scheduler


class ScheduleError(ValueError):
    """A schedule spec that cannot be built; the message lists what is valid."""


@dataclass(frozen=True)
class _Kind:
    per_batch: bool
    keys: dict[str, type]  # key -> type of its value
    build: Callable[..., Any]
    help: str


def _parse_milestones(value: str) -> list[int]:
    parts = [p for p in value.replace(";", "/").split("/") if p.strip()]
    return [int(p) for p in parts]


def _onecycle(opt, epochs, steps, max_lr=None, pct_start=0.25, div_factor=25.0,
              final_div_factor=1e4, anneal="cos", three_phase=False):
    if max_lr is None:
        max_lr = [g["lr"] for g in opt.param_groups]
    if anneal not in ("cos", "linear"):
        raise ScheduleError(f"onecycle: anneal must be 'cos' or 'linear', not {anneal!r}")
    return lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=max(1, epochs * steps), pct_start=pct_start,
        div_factor=div_factor, final_div_factor=final_div_factor, anneal_strategy=anneal,
        three_phase=three_phase)


def _cosine(opt, epochs, steps, eta_min=0.0):
    return lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps), eta_min=eta_min)


def _step(opt, epochs, steps, step_size=6, gamma=0.1):
    return lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)


def _multistep(opt, epochs, steps, milestones="5/10", gamma=0.1):
    return lr_scheduler.MultiStepLR(opt, milestones=_parse_milestones(milestones), gamma=gamma)


def _exponential(opt, epochs, steps, gamma=0.8):
    return lr_scheduler.ExponentialLR(opt, gamma=gamma)


def _plateau(opt, epochs, steps, factor=0.1, patience=2, threshold=1e-4, min_lr=0.0):
    return lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=factor, patience=patience,
                                          threshold=threshold, min_lr=min_lr)


def _constant(opt, epochs, steps):
    return None


SCHEDULES: dict[str, _Kind] = {
    "onecycle": _Kind(True, {"max_lr": float, "pct_start": float, "div_factor": float,
                             "final_div_factor": float, "anneal": str, "three_phase": bool},
                      _onecycle, "1cycle policy per batch; max_lr defaults to the optimizer's lr"),
    "cosine": _Kind(True, {"eta_min": float}, _cosine, "cosine annealing to eta_min per batch"),
    "step": _Kind(False, {"step_size": int, "gamma": float}, _step,
                  "multiply by gamma every step_size epochs"),
    "multistep": _Kind(False, {"milestones": str, "gamma": float}, _multistep,
                       "multiply by gamma at each milestone epoch (milestones=5/10)"),
    "exponential": _Kind(False, {"gamma": float}, _exponential, "multiply by gamma every epoch"),
    "plateau": _Kind(False, {"factor": float, "patience": int, "threshold": float, "min_lr": float},
                     _plateau, "reduce by factor when the test loss stops improving"),
    "constant": _Kind(False, {}, _constant, "the optimizer's lr throughout"),
}
COMMON_KEYS = {"warmup": float}


def list_schedules() -> list[str]:
    return list(SCHEDULES)


def describe_schedules() -> str:
    lines = []
    for name, kind in SCHEDULES.items():
        keys = ", ".join(list(kind.keys) + list(COMMON_KEYS)) or "-"
        lines.append(f"  {name:<12} {kind.help} (keys: {keys})")
    return "\n".join(lines)


def _convert(name: str, key: str, raw: str, typ: type) -> Any:
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        value = typ(raw)
    except ValueError:
        raise ScheduleError(
            f"schedule {name!r}: {key}={raw!r} is not a valid {typ.__name__}") from None
    if typ in (int, float) and (not math.isfinite(value) or value < 0):
        raise ScheduleError(f"schedule {name!r}: {key}={raw} must be a finite number >= 0")
    return value


def parse_schedule(spec: str) -> tuple[str, dict[str, Any]]:
    """``"onecycle:max_lr=0.05"`` -> ``("onecycle", {"max_lr": 0.05})``, validated."""
    if not isinstance(spec, str) or not spec.strip():
        raise ScheduleError(f"empty schedule spec; valid schedules: {', '.join(SCHEDULES)}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in SCHEDULES:
        raise ScheduleError(
            f"unknown schedule {name!r} in {spec!r}; valid schedules: {', '.join(SCHEDULES)} "
            f"(e.g. 'onecycle:max_lr=0.05,pct_start=0.2')")
    kind = SCHEDULES[name]
    allowed = {**kind.keys, **COMMON_KEYS}
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not raw.strip():
            raise ScheduleError(f"schedule {name!r}: {item!r} is not key=value "
                                f"(valid keys: {', '.join(allowed) or 'none'})")
        if key not in allowed:
            raise ScheduleError(f"schedule {name!r} has no key {key!r}; "
                                f"valid keys: {', '.join(allowed)}")
        options[key] = _convert(name, key, raw.strip(), allowed[key])
    if name == "multistep" and "milestones" in options:
        try:
            _parse_milestones(options["milestones"])
        except ValueError:
            raise ScheduleError(f"multistep: milestones={options['milestones']!r} must be epochs "
                                "separated by '/', e.g. milestones=5/10") from None
    return name, options


def schedule_name(spec: str) -> str:
    return parse_schedule(spec)[0]


class Scheduler:
    """One optimizer's schedule: the trainer calls step_batch() and step_epoch()."""

    def __init__(self, spec: str, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
        self.spec = spec
        self.name, options = parse_schedule(spec)
        kind = SCHEDULES[self.name]
        self.per_batch = kind.per_batch
        self.optimizer = optimizer
        warmup_epochs = options.pop("warmup", 0.0)
        self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))
        # The warmup's steps come out of the main schedule's length.
        main_epochs = epochs
        main_steps = steps_per_epoch
        if self.per_batch:
            total = max(1, epochs * steps_per_epoch - self.warmup_steps)
            main_epochs, main_steps = 1, total
        try:
            self.main = kind.build(optimizer, main_epochs, main_steps, **options)
        except (ValueError, TypeError) as exc:
            raise ScheduleError(f"schedule {spec!r}: {exc}") from None
        self.target_lrs = [g["lr"] for g in optimizer.param_groups]
        self.batches = 0
        if self.warmup_steps:
            self._set_warmup_lr()

    def _set_warmup_lr(self) -> None:
        frac = min(1.0, (self.batches + 1) / self.warmup_steps)
        for group, target in zip(self.optimizer.param_groups, self.target_lrs):
            group["lr"] = target * frac

    @property
    def in_warmup(self) -> bool:
        return self.batches < self.warmup_steps

    def step_batch(self) -> None:
        self.batches += 1
        if self.in_warmup:
            self._set_warmup_lr()
            return
        if self.batches == self.warmup_steps:  # warmup just ended: hand over at the target
            for group, target in zip(self.optimizer.param_groups, self.target_lrs):
                group["lr"] = target
            return
        if self.per_batch and self.main is not None:
            self.main.step()

    def step_epoch(self, metric: float | None = None) -> None:
        if self.per_batch or self.main is None or self.in_warmup:
            return
        if isinstance(self.main, lr_scheduler.ReduceLROnPlateau):
            self.main.step(metric if metric is not None else 0.0)
        else:
            self.main.step()

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"batches": self.batches, "target_lrs": list(self.target_lrs),
                "main": self.main.state_dict() if self.main is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
        self.target_lrs = list(state["target_lrs"])
        if self.main is not None and state.get("main") is not None:
            self.main.load_state_dict(state["main"])


def build_scheduler(spec: str, optimizer: torch.optim.Optimizer, epochs: int,
                    steps_per_epoch: int) -> Scheduler:
    return Scheduler(spec, optimizer, epochs, steps_per_epoch)
