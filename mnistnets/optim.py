"""torch's own optimizers (SGD, Adam, AdamW), without the 2-3 s of the first ``torch._dynamo`` import.

Why: every ``torch.optim.Optimizer`` method that a training loop calls (``__init__`` through
``add_param_group``, ``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``) is wrapped by
torch so that ``torch.compile`` does not trace into it (``torch._disable_dynamo``, and
``_use_grad_for_differentiable`` around ``step``, which calls ``torch._dynamo.graph_break()``).
Those wrappers ``import torch._dynamo`` on their first call: on a 2-core CPU machine that import
(sympy, torch.fx's symbolic shapes, torch.distributed.fsdp, ...) took 1.9 s idle and 2-3 s under
load, before the first batch of `mnistjobs train` and again in every trial's process.

The classes here are subclasses of torch's (so ``isinstance(opt, torch.optim.Optimizer)`` holds,
the LR schedulers accept them, and their ``state_dict`` is torch's, byte for byte: checkpoints
stay interchangeable). Each of those methods runs torch's own undecorated function (the
``__wrapped__`` that ``functools.wraps`` keeps) while ``torch._dynamo`` is not imported. That
skips nothing that matters: without ``torch._dynamo`` in ``sys.modules`` nothing can be
compiling, so "do not trace into this" and ``graph_break()`` have nothing to act on. Once
anything has imported ``torch._dynamo`` (``torch.compile``), every call goes through torch's
decorated method, exactly as ``torch.optim.SGD`` does. Where a torch version keeps no
``__wrapped__``, the decorated method is used too (correct, only slower).
"""
from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = ["SGD", "Adam", "AdamW", "OPTIMIZER_CLASSES"]

_DYNAMO = "torch._dynamo"


def _plain(method):
    """The function under torch's dynamo wrapper(s), or None when there is none to unwrap."""
    inner = getattr(method, "__wrapped__", None)
    return inner if callable(inner) else None


class _NoDynamoImport:
    """Mixin before a torch optimizer class: its per-step methods without the dynamo import."""

    _base: type = torch.optim.Optimizer  # set by each subclass: the torch class it extends

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        plain = _plain(torch.optim.Optimizer.add_param_group)
        if plain is None or _DYNAMO in sys.modules:
            return torch.optim.Optimizer.add_param_group(self, param_group)
        return plain(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        plain = _plain(torch.optim.Optimizer.zero_grad)
        if plain is None or _DYNAMO in sys.modules:
            return torch.optim.Optimizer.zero_grad(self, set_to_none)
        return plain(self, set_to_none)

    def state_dict(self):
        plain = _plain(torch.optim.Optimizer.state_dict)
        if plain is None or _DYNAMO in sys.modules:
            return torch.optim.Optimizer.state_dict(self)
        return plain(self)

    def load_state_dict(self, state_dict) -> None:
        plain = _plain(torch.optim.Optimizer.load_state_dict)
        if plain is None or _DYNAMO in sys.modules:
            return torch.optim.Optimizer.load_state_dict(self, state_dict)
        return plain(self, state_dict)

    def step(self, closure=None):
        # torch's step is _use_grad_for_differentiable(step): grad mode set to the optimizer's
        # "differentiable" default around the update, with a graph break on each side.
        plain = _plain(self._base.step)
        if plain is None or _DYNAMO in sys.modules:
            return self._base.step(self, closure)
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return plain(self, closure)


class SGD(_NoDynamoImport, torch.optim.SGD):
    """``torch.optim.SGD`` (same arguments, same updates, same state_dict)."""

    _base = torch.optim.SGD


class Adam(_NoDynamoImport, torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments, same updates, same state_dict)."""

    _base = torch.optim.Adam


class AdamW(_NoDynamoImport, torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments, same updates, same state_dict)."""

    _base = torch.optim.AdamW


OPTIMIZER_CLASSES = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
