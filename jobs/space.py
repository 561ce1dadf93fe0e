"""The search space of ``--space KEY=DIST`` (and ``space:`` in a sweep file): parsing, validation,
Ray Tune's search-space objects and a text for ``--dry-run``.

A space is one distribution per training setting::

    lr=loguniform(0.01,0.5)          a float, log-uniform between the bounds
    momentum=uniform(0.8,0.95)       a float, uniform between the bounds
    batch_size=randint(32,256)       an integer from a to b, both included
    optimizer=choice(sgd,adamw)      one of the items, sampled
    schedule=grid(onecycle,"cosine:warmup=1")   every item, a grid axis (as --schedules is)

Items are separated by commas; an item that holds commas (a schedule spec with several keys) is
quoted, with ' or ": ``choice("onecycle:max_lr=0.05,pct_start=0.2",cosine)``. For ``schedule``
an unquoted ``key=value`` item continues the spec before it, as ``--schedules`` reads commas, so
``choice(onecycle:max_lr=0.05,pct_start=0.2,cosine)`` is the same space. Numbers are numbers
(``64`` an int, ``0.1`` and ``1e-5`` floats; a float setting's items are floats), ``true`` /
``false`` are booleans; a quoted item is always a string.

Validation (:func:`parse_space`) raises :class:`SpaceError`, a ValueError naming the key, for
an unknown or unsearchable setting, an unknown distribution, a distribution the setting's type
cannot take (``batch_size=uniform(...)``), bounds reversed or equal, bounds outside the
setting's range (the ranges ``TrainConfig.validate`` enforces: lr > 0, weight_decay >= 0,
dropout in [0, 1), batch_size an integer >= 1, ...; a range is an interval, so bounds inside it
mean every sampled value is), a loguniform bound <= 0, and items that repeat or that the setting
refuses (an unknown optimizer, a bad schedule spec).

Pure: no Ray import unless :func:`to_tune` is called, and no torch; mnistnets (its torch-free
``config`` and schedule parser) for the schedule and
optimizer names (imported when a space is validated, as ``jobs.spec`` does).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from mnistnets.config import MAX_LR  # float32's largest value / 10: the largest lr a run accepts (no torch)

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
RANGE_KINDS = ("uniform", "loguniform", "randint")   # two bounds
ITEM_KINDS = ("choice", "grid")                       # a list of items

# The type of each searchable setting (TrainConfig's field of that name).
_FLOAT, _INT, _BOOL, _STR = "float", "int", "bool", "str"
SETTING_TYPES: dict[str, str] = {
    "lr": _FLOAT, "momentum": _FLOAT, "weight_decay": _FLOAT, "label_smoothing": _FLOAT,
    "rotation": _FLOAT, "translate": _FLOAT, "scale": _FLOAT, "shear": _FLOAT, "dropout": _FLOAT,
    "ema": _FLOAT,
    "batch_size": _INT, "clean_epochs": _INT,
    "nesterov": _BOOL, "augment": _BOOL,
    "optimizer": _STR, "schedule": _STR, "tta": _STR,
}

#: TrainConfig settings a space cannot search, and what sets them instead.
NOT_SEARCHABLE: dict[str, str] = {
    "model": "the models are --models (each model is searched)",
    "seed": "the seeds are --seeds",
    "epochs": "it is --epochs (every trial plans the same epochs: ASHA's last rung)",
    "device": "it is where trials run, not a training setting",
    "data_dir": "it is --data-dir",
    "train_limit": "it is --train-limit (the data, not the recipe)",
    "test_limit": "it is --test-limit (the data, not the recipe)",
    "eval_batch_size": "it changes how the test set is scored, not training",
}

# (lowest, lowest included, highest, highest included, in words) of each numeric setting: the
# ranges TrainConfig.validate enforces.
_RANGES: dict[str, tuple[float, bool, float, bool, str]] = {
    "lr": (0.0, False, MAX_LR, True, f"> 0 and at most {MAX_LR:.3g}"),
    "momentum": (0.0, True, math.inf, False, ">= 0"),
    "weight_decay": (0.0, True, math.inf, False, ">= 0"),
    "label_smoothing": (0.0, True, 1.0, False, "in [0, 1)"),
    "rotation": (0.0, True, math.inf, False, ">= 0 (degrees)"),
    "translate": (0.0, True, 1.0, False, "in [0, 1) (a fraction of the image side)"),
    "scale": (0.0, True, 1.0, False, "in [0, 1)"),
    "shear": (0.0, True, 90.0, False, "in [0, 90) (degrees)"),
    "dropout": (0.0, True, 1.0, False, "in [0, 1)"),
    "ema": (0.0, True, 1.0, False, "in [0, 1) (0: off)"),
    "batch_size": (1, True, math.inf, False, "an integer >= 1"),
    "clean_epochs": (0, True, math.inf, False, "an integer >= 0 (and at most --epochs)"),
}


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the key and how to fix it."""


@dataclass(frozen=True)
class Dist:
    """One setting's distribution: ``kind`` in DISTRIBUTIONS, ``args`` its bounds (a, b) or its items."""

    key: str
    kind: str
    args: tuple

    def text(self) -> str:
        """The DIST string that parses back to this distribution, e.g. ``loguniform(0.01,0.5)``."""
        return f"{self.kind}({','.join(_format_item(v) for v in self.args)})"

    def item(self) -> str:
        """``KEY=DIST``, as --space takes it."""
        return f"{self.key}={self.text()}"


Space = dict[str, Dist]


# ------------------------------------------------------------------------------------ parsing

def _split_items(inner: str, where: str) -> list[tuple[str, bool]]:
    """``a, "b,c" ,d`` -> [("a", False), ("b,c", True), ("d", False)] (item, was quoted)."""
    items: list[tuple[str, bool]] = []
    buf: list[str] = []
    quote: str | None = None
    quoted = False
    closed = False  # a quoted item ended: only spaces may follow before the comma
    for ch in inner:
        if quote is not None:
            if ch == quote:
                quote, closed = None, True
            else:
                buf.append(ch)
        elif ch == ",":
            text = "".join(buf) if quoted else "".join(buf).strip()
            if not quoted and not text:
                raise SpaceError(f"{where}: an empty item (two commas in a row, or a comma at an end); "
                                 f"items are separated by single commas")
            items.append((text, quoted))
            buf, quoted, closed = [], False, False
        elif ch in "'\"":
            if "".join(buf).strip() or quoted:
                raise SpaceError(f"{where}: a quote in the middle of an item; quote whole items, "
                                 f"e.g. choice(\"onecycle:max_lr=0.05,pct_start=0.2\",cosine)")
            buf, quote, quoted = [], ch, True
        elif closed:
            if not ch.isspace():
                raise SpaceError(f"{where}: text after a quoted item; separate items with commas")
        else:
            buf.append(ch)
    if quote is not None:
        raise SpaceError(f"{where}: a quote ({quote}) is not closed")
    text = "".join(buf) if quoted else "".join(buf).strip()
    if not quoted and not text:
        if items or inner.strip():
            raise SpaceError(f"{where}: an empty item (a comma at an end); items are separated by single commas")
        return []
    items.append((text, quoted))
    return items


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _value(text: str, quoted: bool) -> Any:
    """An unquoted item as a number or a boolean where it reads as one; else the string."""
    if quoted:
        return text
    if _NUMBER.fullmatch(text):
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _join_schedule_items(items: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """For ``schedule``: an unquoted ``key=value`` item continues the spec before it (as
    ``--schedules`` reads commas): onecycle:max_lr=0.05,pct_start=0.2 is one spec."""
    out: list[tuple[str, bool]] = []
    for text, quoted in items:
        if out and not quoted and "=" in text and ":" not in text.split("=", 1)[0]:
            out[-1] = (f"{out[-1][0]},{text}", out[-1][1])
        else:
            out.append((text, quoted))
    return out


def parse_dist(key: str, text: str, origin: str = "--space") -> Dist:
    """``DIST`` (e.g. ``loguniform(0.01,0.5)``) of ``key`` -> Dist, parsed but not validated."""
    where = f"{origin} {key}"
    text = str(text).strip()
    m = re.fullmatch(r"([A-Za-z_]\w*)\s*\((.*)\)", text, flags=re.S)
    if not m:
        raise SpaceError(
            f"{where}: {text!r} is not a distribution; write KEY=DIST with DIST one of "
            f"{', '.join(d + '(...)' for d in DISTRIBUTIONS)}, e.g. {key}=choice({text or 'a,b'})"
            + (" (a fixed value is set with its own option, not --space)" if "(" not in text else ""))
    kind, inner = m.group(1).lower(), m.group(2)
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {m.group(1)!r}; valid: {', '.join(DISTRIBUTIONS)} "
                         f"(e.g. {key}=choice(a,b))")
    items = _split_items(inner, f"{where}={text}")
    if key == "schedule":
        items = _join_schedule_items(items)
    return Dist(key, kind, tuple(_value(t, q) for t, q in items))


def parse_item(item: str, origin: str = "--space") -> Dist:
    """``KEY=DIST`` -> Dist, parsed but not validated."""
    key, eq, dist = str(item).partition("=")
    key = key.strip()
    if not eq or not key or not re.fullmatch(r"[A-Za-z_]\w*", key):
        raise SpaceError(f"{origin} {item!r} is not KEY=DIST; e.g. {origin} 'lr=loguniform(0.01,0.5)'")
    return parse_dist(key, dist, origin)


def parse_space(items: Iterable[str] | Mapping[str, str] | None, *, epochs: int | None = None,
                origin: str = "--space") -> Space:
    """Parse and validate a space: ``KEY=DIST`` strings (the --space values), or a mapping of
    KEY to DIST (``space:`` in a sweep file; a list of KEY=DIST strings there works too).
    ``epochs`` (when known) bounds clean_epochs. Returns {key: Dist} in the given order."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    if isinstance(items, Mapping):
        dists = [parse_dist(str(k).strip(), v, origin) for k, v in items.items()]
    else:
        dists = [parse_item(i, origin) for i in items]
    space: Space = {}
    for dist in dists:
        if dist.key in space:
            raise SpaceError(f"{origin} {dist.key}: given twice ({space[dist.key].text()} and {dist.text()}); "
                             f"give each setting one distribution")
        space[dist.key] = validate_dist(dist, epochs=epochs, origin=origin)
    return space


# --------------------------------------------------------------------------------- validation

def _check_key(key: str, origin: str) -> str:
    if key in SETTING_TYPES:
        return SETTING_TYPES[key]
    if key in NOT_SEARCHABLE:
        raise SpaceError(f"{origin} {key}: cannot be searched: {NOT_SEARCHABLE[key]}")
    raise SpaceError(f"{origin} {key}: unknown setting {key!r}; searchable settings: "
                     f"{', '.join(SETTING_TYPES)}")


def _in_range(key: str, value: float) -> bool:
    lo, lo_in, hi, hi_in, _ = _RANGES[key]
    return (value > lo or (lo_in and value == lo)) and (value < hi or (hi_in and value == hi))


def _number(dist: Dist, value: Any, typ: str, where: str) -> float | int:
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_num or not math.isfinite(value):
        raise SpaceError(f"{where}: {_format_item(value)} is not a finite number; {dist.key} takes "
                         f"{'integers' if typ == _INT else 'numbers'}")
    if typ == _INT:
        if not isinstance(value, int):
            raise SpaceError(f"{where}: {_format_item(value)} is not an integer; {dist.key} takes integers")
        return value
    return float(value)


def validate_dist(dist: Dist, *, epochs: int | None = None, origin: str = "--space") -> Dist:
    """``dist`` with its items typed for the setting (a float setting's numbers as floats), or
    SpaceError naming the key."""
    typ = _check_key(dist.key, origin)
    where = f"{origin} {dist.item()}"
    if dist.kind in RANGE_KINDS:
        if typ not in (_FLOAT, _INT):
            raise SpaceError(f"{where}: {dist.key} is not a number; use choice(...) or grid(...) of its values")
        if dist.kind in ("uniform", "loguniform") and typ == _INT:
            raise SpaceError(f"{where}: {dist.key} takes integers; use randint(a,b) or choice(...)")
        if len(dist.args) != 2:
            raise SpaceError(f"{where}: {dist.kind} takes two bounds, {dist.kind}(low,high), "
                             f"not {len(dist.args)} item(s)")
        a, b = (_number(dist, v, _INT if dist.kind == "randint" else typ, where) for v in dist.args)
        if a > b:
            raise SpaceError(f"{where}: the bounds are reversed; write {dist.key}={dist.kind}"
                             f"({_format_item(b)},{_format_item(a)})")
        if a == b:
            raise SpaceError(f"{where}: both bounds are {_format_item(a)}; give a range, or set one value "
                             f"with {dist.key}=choice({_format_item(a)})")
        if dist.kind == "loguniform" and a <= 0:
            raise SpaceError(f"{where}: loguniform needs bounds > 0 (it samples the log); use uniform for a "
                             f"range that starts at 0")
        for bound in (a, b):
            _check_value(dist.key, bound, typ, where, epochs)
        return Dist(dist.key, dist.kind, (a, b))
    # choice, grid
    if not dist.args:
        raise SpaceError(f"{where}: {dist.kind} needs at least one item, e.g. {dist.key}={dist.kind}(a,b)")
    values = []
    for value in dist.args:
        if typ in (_FLOAT, _INT):
            value = _number(dist, value, typ, where)
        elif typ == _BOOL:
            if not isinstance(value, bool):
                raise SpaceError(f"{where}: {_format_item(value)} is not true or false; {dist.key} is on or off")
        elif not isinstance(value, str):
            value = _format_item(value)  # e.g. an optimizer named 1: refused below as a string
        _check_value(dist.key, value, typ, where, epochs)
        if value in values:
            raise SpaceError(f"{where}: {_format_item(value)} is listed twice; list each value once")
        values.append(value)
    return Dist(dist.key, dist.kind, tuple(values))


def _check_value(key: str, value: Any, typ: str, where: str, epochs: int | None) -> None:
    """One bound or item against the setting's range (as TrainConfig.validate judges it)."""
    if typ in (_FLOAT, _INT):
        if not _in_range(key, value):
            raise SpaceError(f"{where}: {key} must be {_RANGES[key][4]}, not {_format_item(value)}")
        if key == "clean_epochs" and epochs is not None and value > epochs:
            raise SpaceError(f"{where}: clean_epochs must be at most the epochs ({epochs}), not {value}")
        return
    if typ == _BOOL:
        return
    if key == "optimizer":
        from mnistnets.config import OPTIMIZERS

        if value not in OPTIMIZERS:
            raise SpaceError(f"{where}: unknown optimizer {value!r}; valid: {', '.join(OPTIMIZERS)}")
    elif key == "tta":
        from mnistnets.config import TTA_VIEWS

        if value not in TTA_VIEWS:
            raise SpaceError(f"{where}: unknown tta {value!r}; valid: {', '.join(TTA_VIEWS)}")
    elif key == "schedule":
        from mnistnets.schedules import ScheduleError, parse_schedule

        try:
            parse_schedule(value)
        except ScheduleError as e:
            raise SpaceError(f"{where}: {e}") from None


def check_search(space: Space, search: str) -> None:
    """What a search algorithm can take: ``optuna`` samples every setting itself and cannot take a
    grid axis; ``grid`` (the default) only expands grid axes, so a sampled distribution needs
    ``--search random`` or ``optuna``."""
    if search == "optuna":
        grid = [d.item() for d in space.values() if d.kind == "grid"]
        if grid:
            raise SpaceError(f"--space {grid[0]}: a grid axis cannot be used with --search optuna (Optuna "
                             f"samples every setting); use choice(...) instead, or --search random")
    elif search == "grid":
        sampled = [d for d in space.values() if d.kind != "grid"]
        if sampled:
            raise SpaceError(f"--space {sampled[0].item()}: {sampled[0].kind} is sampled, and --search grid only "
                             f"runs grid(...) axes; add --search random or --search optuna (with --num-samples N), "
                             f"or make it grid(...)")


# ------------------------------------------------------------------------------ Tune and text

def to_tune(space: Space) -> dict[str, Any]:
    """Ray Tune's search-space objects: tune.uniform, tune.loguniform, tune.randint (its upper
    bound exclusive: ours is included, so b + 1), tune.choice and tune.grid_search."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.kind == "uniform":
            out[key] = tune.uniform(*d.args)
        elif d.kind == "loguniform":
            out[key] = tune.loguniform(*d.args)
        elif d.kind == "randint":
            out[key] = tune.randint(d.args[0], d.args[1] + 1)
        elif d.kind == "choice":
            out[key] = tune.choice(list(d.args))
        else:
            out[key] = tune.grid_search(list(d.args))
    return out


def describe_dist(d: Dist) -> str:
    """One setting's distribution for people, e.g. ``lr: log-uniform from 0.01 to 0.5``."""
    if d.kind == "uniform":
        what = f"uniform from {_format_item(d.args[0])} to {_format_item(d.args[1])}"
    elif d.kind == "loguniform":
        what = f"log-uniform from {_format_item(d.args[0])} to {_format_item(d.args[1])}"
    elif d.kind == "randint":
        what = f"an integer from {d.args[0]} to {d.args[1]} (both included)"
    elif d.kind == "choice":
        what = f"one of {' | '.join(_format_item(v, quote=False) for v in d.args)} (sampled)"
    else:
        n = len(d.args)
        what = f"every one of {' | '.join(_format_item(v, quote=False) for v in d.args)} (a grid axis: x{n})"
    return f"{d.key}: {what}"


def describe_space(space: Space) -> str:
    """The space for --dry-run: one line per setting, and how many grid points it multiplies by."""
    if not space:
        return "search space: none (every setting is fixed)"
    lines = ["search space:"] + [f"  {describe_dist(d)}" for d in space.values()]
    grid = grid_size(space)
    if grid > 1:
        lines.append(f"  grid axes: x{grid} (each sample runs every grid point)")
    return "\n".join(lines)


def grid_size(space: Space) -> int:
    """How many points the grid axes make (1 without any)."""
    n = 1
    for d in space.values():
        if d.kind == "grid":
            n *= len(d.args)
    return n


def space_items(space: Space) -> list[str]:
    """The space as ``KEY=DIST`` strings (for a spec's JSON): parse_space gives it back."""
    return [d.item() for d in space.values()]


def _format_item(value: Any, quote: bool = True) -> str:
    """An item as it is written: numbers with repr (so they parse back exactly), booleans as
    true/false, strings quoted where they hold a comma, a quote, a bracket or outer spaces, or
    would read as a number or boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if not quote:
        return text
    needs = (any(c in text for c in ",'\"()") or text != text.strip() or not text
             or _value(text, False) != text)
    if not needs:
        return text
    q = "'" if '"' in text else '"'
    return f"{q}{text}{q}"
