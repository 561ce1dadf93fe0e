"""Scoring a model: test loss and accuracy, test-time augmentation (TTA), and weight EMA.

``evaluate`` and ``evaluate_tta`` return (mean NLL per sample, accuracy in percent) with one host
sync per call. ``WeightEMA`` keeps the exponential moving average of the weights that, when on, is
what gets tested and checkpointed as "model".
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .config import TTA_VIEWS
from .data import MNIST_MEAN, MNIST_STD, DeviceLoader


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
        self._live = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
        self._avg = list(self.model.parameters()) + [b for b in self.model.buffers() if b.is_floating_point()]
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
