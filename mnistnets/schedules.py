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

Parsing a spec (``parse_schedule``, ``list_schedules``, ``SCHEDULES``) needs no torch: torch is
imported when a schedule is built or checked, so that validating a sweep's specs does not pay for
it (``mnistnets.config``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable



def _torch_schedulers():
    """``torch.optim.lr_scheduler``, imported on first use (parsing a spec needs no torch)."""
    from torch.optim import lr_scheduler

    return lr_scheduler


class ScheduleError(ValueError):
    """A schedule spec that cannot be built; the message lists what is valid."""


@dataclass(frozen=True)
class _Kind:
    per_batch: bool
    keys: dict[str, type]  # key -> type of its value
    build: Callable[..., Any]
    help: str
    # key -> (test, valid range in words): parse_schedule refuses a number outside the range, so
    # that every spec it accepts builds and steps (the ranges are torch's own limits, narrowed
    # to what makes sense for a decaying lr, e.g. gamma <= 1).
    ranges: dict[str, tuple[Callable[[Any], bool], str]] = field(default_factory=dict)


_POSITIVE = (lambda v: v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a finite number >= 0")
_AT_LEAST_1 = (lambda v: v >= 1, "a finite number >= 1")
_OPEN_UNIT = (lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")
_DECAY = (lambda v: 0 < v <= 1, "greater than 0 and at most 1")
_INT_AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
_INT_NON_NEGATIVE = (lambda v: v >= 0, "an integer >= 0")


def _parse_milestones(value: str) -> list[int]:
    parts = [p for p in value.replace(";", "/").split("/") if p.strip()]
    return [int(p) for p in parts]


def _onecycle_pct_start(pct_start: float, total_steps: int, three_phase: bool) -> float:
    """pct_start, nudged up by the least float step where needed so no 1cycle phase has length 0.

    torch's OneCycleLR ends its phases at steps ``pct_start*total - 1``, (three_phase:
    ``2*pct_start*total - 2``) and ``total - 1``, and divides by each phase's length: when
    ``pct_start * total_steps`` is exactly 1 (pct_start=0.2 over 5 steps, 0.1 over 10) the warmup
    phase has length 0 and the first step raises ZeroDivisionError. Moving pct_start up by one ulp
    gives that phase a length of ~1e-16 steps: step 0 is still the initial lr, and every other
    step's lr is the same as for the exact pct_start to within float rounding.
    """
    def ends(pct):  # the phases' end steps, computed exactly as torch computes them
        if three_phase:
            return [0.0, float(pct * total_steps) - 1, float(2 * pct * total_steps) - 2,
                    float(total_steps - 1)]
        return [0.0, float(pct * total_steps) - 1, float(total_steps - 1)]

    # One nudge is not always enough: 3 * nextafter(1/3) still rounds to 1.0, so pct_start=1/3
    # over 3 steps takes two (see the tests); the bound is a safeguard.
    for _ in range(64):
        points = ends(pct_start)
        if all(a != b for a, b in zip(points, points[1:])):
            break
        pct_start = math.nextafter(pct_start, 1.0)
    return pct_start


#: onecycle's default warmup fraction: the recipe's 0.2 (torch's own default is 0.25).
ONECYCLE_PCT_START = 0.2


def _onecycle(opt, epochs, steps, max_lr=None, pct_start=ONECYCLE_PCT_START, div_factor=25.0,
              final_div_factor=1e4, anneal="cos", three_phase=False):
    # anneal and pct_start were checked by parse_schedule, which every Scheduler goes through
    if max_lr is None:
        max_lr = [g["lr"] for g in opt.param_groups]
    total_steps = max(1, epochs * steps)
    return _torch_schedulers().OneCycleLR(
        opt, max_lr=max_lr, total_steps=total_steps,
        pct_start=_onecycle_pct_start(float(pct_start), total_steps, bool(three_phase)),
        div_factor=div_factor, final_div_factor=final_div_factor, anneal_strategy=anneal,
        three_phase=three_phase)


def _cosine(opt, epochs, steps, eta_min=0.0):
    return _torch_schedulers().CosineAnnealingLR(opt, T_max=max(1, epochs * steps), eta_min=eta_min)


def _step(opt, epochs, steps, step_size=6, gamma=0.1):
    return _torch_schedulers().StepLR(opt, step_size=step_size, gamma=gamma)


def _multistep(opt, epochs, steps, milestones="5/10", gamma=0.1):
    return _torch_schedulers().MultiStepLR(opt, milestones=_parse_milestones(milestones), gamma=gamma)


def _exponential(opt, epochs, steps, gamma=0.8):
    return _torch_schedulers().ExponentialLR(opt, gamma=gamma)


def _plateau(opt, epochs, steps, factor=0.1, patience=2, threshold=1e-4, min_lr=0.0):
    return _torch_schedulers().ReduceLROnPlateau(opt, mode="min", factor=factor, patience=patience,
                                                 threshold=threshold, min_lr=min_lr)


def _constant(opt, epochs, steps):
    return None


SCHEDULES: dict[str, _Kind] = {
    "onecycle": _Kind(True, {"max_lr": float, "pct_start": float, "div_factor": float,
                             "final_div_factor": float, "anneal": str, "three_phase": bool},
                      _onecycle, "1cycle policy per batch; max_lr defaults to the optimizer's lr, pct_start to 0.2 "
                      "(the recipe's; torch's own is 0.25)",
                      {"max_lr": _POSITIVE, "pct_start": _OPEN_UNIT, "div_factor": _AT_LEAST_1,
                       "final_div_factor": _AT_LEAST_1}),
    "cosine": _Kind(True, {"eta_min": float}, _cosine, "cosine annealing to eta_min per batch",
                    {"eta_min": _NON_NEGATIVE}),
    "step": _Kind(False, {"step_size": int, "gamma": float}, _step,
                  "multiply by gamma every step_size epochs",
                  {"step_size": _INT_AT_LEAST_1, "gamma": _DECAY}),
    "multistep": _Kind(False, {"milestones": str, "gamma": float}, _multistep,
                       "multiply by gamma at each milestone epoch (milestones=5/10)",
                       {"gamma": _DECAY}),
    "exponential": _Kind(False, {"gamma": float}, _exponential, "multiply by gamma every epoch",
                         {"gamma": _DECAY}),
    "plateau": _Kind(False, {"factor": float, "patience": int, "threshold": float, "min_lr": float},
                     _plateau, "reduce by factor when the test loss stops improving",
                     {"factor": _OPEN_UNIT, "patience": _INT_NON_NEGATIVE,
                      "threshold": (lambda v: 0 <= v < 1, "at least 0 and less than 1"),
                      "min_lr": _NON_NEGATIVE}),
    "constant": _Kind(False, {}, _constant, "the optimizer's lr throughout"),
}
COMMON_KEYS = {"warmup": float}
COMMON_RANGES = {"warmup": _NON_NEGATIVE}


def list_schedules() -> list[str]:
    return list(SCHEDULES)


def _convert(name: str, key: str, raw: str, typ: type,
             valid: tuple[Callable[[Any], bool], str] | None = None) -> Any:
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
    if typ in (int, float):
        test, words = valid or _NON_NEGATIVE
        if not math.isfinite(value) or not test(value):
            raise ScheduleError(f"schedule {name!r}: {key} must be {words}, not {raw}")
    return value


def _check_milestones(name: str, raw: str) -> None:
    try:
        milestones = _parse_milestones(raw)
    except ValueError:
        raise ScheduleError(f"schedule {name!r}: milestones must be epochs separated by '/' "
                            f"(e.g. milestones=5/10), not {raw!r}") from None
    if not milestones:
        raise ScheduleError(f"schedule {name!r}: milestones must list at least one epoch "
                            f"(e.g. milestones=5/10), not {raw!r}")
    if any(m < 1 for m in milestones) or any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ScheduleError(f"schedule {name!r}: milestones must be increasing epochs >= 1 "
                            f"(e.g. milestones=5/10), not {raw!r}")


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
    ranges = {**kind.ranges, **COMMON_RANGES}
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
        options[key] = _convert(name, key, raw.strip(), allowed[key], ranges.get(key))
    if name == "multistep" and "milestones" in options:
        _check_milestones(name, options["milestones"])
    if name == "onecycle":
        anneal = options.get("anneal", "cos")
        if anneal not in ("cos", "linear"):
            raise ScheduleError(f"schedule {name!r}: anneal must be 'cos' or 'linear', not {anneal!r}")
        pct_start = options.get("pct_start", ONECYCLE_PCT_START)
        if options.get("three_phase") and not pct_start < 0.5:
            # the down phase would end after the run does: the lr would never anneal to its minimum
            raise ScheduleError(f"schedule {name!r}: with three_phase, pct_start must be "
                                f"between 0 and 0.5 (exclusive), not {pct_start}")
    return name, options


class Scheduler:
    """One optimizer's schedule: the trainer calls step_batch() and step_epoch()."""

    def __init__(self, spec: str, optimizer: "torch.optim.Optimizer", epochs: int, steps_per_epoch: int):
        self.spec = spec
        self.name, options = parse_schedule(spec)
        kind = SCHEDULES[self.name]
        self.per_batch = kind.per_batch
        self.optimizer = optimizer
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
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
        lrs = _torch_schedulers()
        self._one_cycle = isinstance(self.main, lrs.OneCycleLR)
        self._plateau = isinstance(self.main, lrs.ReduceLROnPlateau)
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
            if (self._one_cycle
                    and self.main.last_epoch >= self.main.total_steps - 1):
                # The run's last batch used the cycle's last lr (its minimum); stepping once more
                # would extrapolate past the cycle's end (below min_lr, even negative with
                # anneal=linear on short runs), so the lr stays at that minimum instead.
                return
            self.main.step()

    def step_epoch(self, metric: float | None = None) -> None:
        if self.per_batch or self.main is None or self.in_warmup:
            return
        if self._plateau:
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


def build_scheduler(spec: str, optimizer: "torch.optim.Optimizer", epochs: int,
                    steps_per_epoch: int) -> Scheduler:
    return Scheduler(spec, optimizer, epochs, steps_per_epoch)


#: A run of at most this many batches is checked by stepping it whole, as the trainer does (a few
#: tens of ms); a longer run is checked at a bounded set of representative batches instead, so that
#: the check costs the same for 15 epochs as for 10**8.
CHECK_WHOLE_BATCHES = 20_000
#: A longer run's first batches, stepped whole like a short run: the warmup's start, the first
#: epochs' boundaries and every code path of the stepping, on the real scheduler.
CHECK_PREFIX_BATCHES = 4_000
#: ... then this many batches spread evenly over the whole run, plus the schedule's turning points
#: (the warmup's end, 1cycle's phase ends, step and milestone epochs, the last batches), each at the
#: lr torch's closed form gives it (the lr stepping would reach, to within float rounding).
CHECK_SAMPLES = 512


def _closed_form() -> tuple:
    """torch schedulers whose lr at step k has a closed form (OneCycleLR's get_lr reads its step
    number; the others have _get_closed_form_lr). Exact types: a subclass may compute otherwise."""
    lrs = _torch_schedulers()
    return (lrs.CosineAnnealingLR, lrs.StepLR, lrs.MultiStepLR, lrs.ExponentialLR)


def check_schedule(spec: str, *, lr: float, epochs: int, steps_per_epoch: int) -> None:
    """Build ``spec`` for a run of ``epochs`` x ``steps_per_epoch`` batches at ``lr`` on a
    throwaway optimizer (one parameter, SGD) and check the lr every batch would train at.

    Raises ScheduleError if the spec is bad, torch refuses it, or the lr it gives a batch is not
    a finite number >= 0: a training config can be checked before any training starts.

    A run of at most CHECK_WHOLE_BATCHES batches is stepped whole, as the trainer steps it. A
    longer one is built at its real length, its first CHECK_PREFIX_BATCHES batches are stepped,
    and the lr of CHECK_SAMPLES batches spread over the rest, plus every turning point of the
    schedule, is computed in closed form: the cost does not grow with the run's length (a few
    tens of ms either way). A main schedule with no closed form is checked by the prefix alone:
    plateau, whose lr torch only ever lowers and clamps at min_lr >= 0, and any kind added later.
    """
    name, _ = parse_schedule(spec)
    for what, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"schedule {name!r}: {what} must be an integer >= 1, not {value!r}")
    if (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr)
            or lr < 0):
        raise ScheduleError(f"schedule {name!r}: lr must be a finite number >= 0, not {lr!r}")
    total = epochs * steps_per_epoch
    where = "building it"
    try:
        with warnings.catch_warnings():
            # torch warns when a scheduler steps before its optimizer has: nothing trains here.
            warnings.simplefilter("ignore")
            sched = _throwaway(spec, lr, epochs, steps_per_epoch)
            group = sched.optimizer.param_groups[0]
            whole = total <= CHECK_WHOLE_BATCHES
            last = total if whole else CHECK_PREFIX_BATCHES
            for b in range(last):
                where = _batch_where(b, steps_per_epoch)
                _check_lr(group["lr"])
                sched.step_batch()
                if (b + 1) % steps_per_epoch == 0:
                    where = f"the end of epoch {(b + 1) // steps_per_epoch}"
                    sched.step_epoch(1.0)  # a loss that never improves: plateau reduces all it can
            if not whole:
                where = "building it"
                fresh = _throwaway(spec, lr, epochs, steps_per_epoch)
                for b in _representative_batches(fresh, epochs, steps_per_epoch):
                    where = _batch_where(b, steps_per_epoch)
                    value = lr_at(fresh, b)
                    if value is not None:
                        _check_lr(value)
    except ScheduleError:
        raise
    except Exception as exc:  # ValueError, ZeroDivisionError, ...: whatever torch raises
        raise ScheduleError(
            f"schedule {spec!r} fails at {where} of a run of {epochs} epochs x {steps_per_epoch} "
            f"batches at lr {lr}: {type(exc).__name__}: {exc}") from None


def _throwaway(spec: str, lr: float, epochs: int, steps_per_epoch: int) -> Scheduler:
    import torch

    from .optim import SGD  # torch's SGD without the first torch._dynamo import (mnistnets.optim)

    optimizer = SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(lr))
    return build_scheduler(spec, optimizer, epochs, steps_per_epoch)


def _check_lr(value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):  # also False for nan
        raise ValueError(f"the lr would be {value}")


def _batch_where(b: int, steps_per_epoch: int) -> str:
    """A run's batch (0-based) as the trainer counts it: ``epoch 3, batch 1``."""
    return f"epoch {b // steps_per_epoch + 1}, batch {b % steps_per_epoch + 1}"


def _first_counted_epoch(sched: Scheduler, steps_per_epoch: int) -> int:
    """The first epoch whose end steps a per-epoch main schedule (the ends within the warmup do not)."""
    return max(1, -(-sched.warmup_steps // steps_per_epoch))


def lr_at(sched: Scheduler, batch: int) -> float | None:
    """The lr that batch ``batch`` (0-based, counted over the whole run) trains at under a freshly
    built ``sched``, computed without stepping (the value stepping reaches, to within float
    rounding; the epochs' ends see a loss that never improves). None when the main schedule has
    no closed form (plateau, or a kind added later). Changes ``sched``'s step count: use it on a
    throwaway scheduler only (check_schedule)."""
    target = sched.target_lrs[0]
    warmup = sched.warmup_steps
    if batch < warmup:
        return target * min(1.0, (batch + 1) / warmup)
    main = sched.main
    if main is None:
        return target
    lr_scheduler = _torch_schedulers()
    if sched.per_batch:  # stepped once per batch after the warmup's last (the hand-over is not one)
        k = batch - warmup
        if type(main) is lr_scheduler.OneCycleLR:
            main.last_epoch = min(k, main.total_steps - 1)  # Scheduler stops it at the cycle's end
            with warnings.catch_warnings():  # "use get_last_lr()": this is the closed form on purpose
                warnings.simplefilter("ignore")
                return float(main.get_lr()[0])
    else:  # stepped at the end of each epoch out of the warmup
        steps = sched.steps_per_epoch
        k = max(0, batch // steps - _first_counted_epoch(sched, steps) + 1)
    if type(main) in _closed_form():
        main.last_epoch = k
        return float(main._get_closed_form_lr()[0])
    return None


def _representative_batches(sched: Scheduler, epochs: int, steps_per_epoch: int) -> list[int]:
    """CHECK_SAMPLES batches spread evenly over the run, plus the schedule's turning points."""
    total = epochs * steps_per_epoch
    picks = {round(i * (total - 1) / (CHECK_SAMPLES - 1)) for i in range(CHECK_SAMPLES)}
    picks.update(range(total - 3, total))  # the last batches: the cycle's end, the last epoch
    warmup = sched.warmup_steps
    picks.update(range(warmup - 2, warmup + 3))  # the warmup's end and the hand-over
    main = sched.main
    lr_scheduler = _torch_schedulers()
    if sched.per_batch and type(main) is lr_scheduler.OneCycleLR:
        for phase in main._schedule_phases:  # the phases' ends, as torch computes them
            end = warmup + math.floor(phase["end_step"])
            picks.update(range(end - 1, end + 3))
    elif not sched.per_batch and main is not None:
        # epochs where a per-epoch schedule turns: step_size multiples (the first and last few),
        # each milestone, the first and the last epochs
        first = _first_counted_epoch(sched, steps_per_epoch)
        turns = {1, 2, 3, epochs - 1, epochs}
        if type(main) is lr_scheduler.StepLR:
            size = main.step_size
            turns.update(size * n for n in (1, 2, 3))
            turns.update(size * n for n in range(max(1, epochs // size - 2), epochs // size + 2))
        if type(main) is lr_scheduler.MultiStepLR:
            turns.update(main.milestones)
        for k in turns:
            for step in (k - 1, k, k + 1):  # main's step count -> the first batch of that epoch
                epoch0 = step + first - 1
                picks.update((epoch0 * steps_per_epoch, epoch0 * steps_per_epoch - 1))
    return sorted(b for b in picks if 0 <= b < total)
