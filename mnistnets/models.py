"""The four seed MNIST CNNs (v0, v1, v2, v3) and the registry that names them.

Architectures only: no training, data or reporting code lives here.

Each class reproduces one of the seed's torchsummary tables in ``shared/seed-models.md``
exactly: the same leaf layers in the same order, the same output shapes and the same
parameter count per layer (totals 18,214 / 10,970 / 4,232 / 7,932). All convolutions have
``bias=False``. Every model returns log-probabilities of shape ``[B, 10]``
(``F.log_softmax(x.view(-1, 10), dim=1)``).

Use the registry, never ``if name == ...`` chains::

    from mnistnets.models import create_model, list_models
    model = create_model("v1", dropout=0.1)

Options understood by :func:`create_model`:

``dropout`` (float in [0, 1), default: the model's ``default_dropout``)
    The rate of every ``nn.Dropout2d`` layer of the model. v0 has no dropout layers: the
    option is accepted (so a sweep can pass it to every model) and ignored.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Type

import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MODEL_REGISTRY",
    "UnknownModelError",
    "register_model",
    "create_model",
    "list_models",
    "count_parameters",
    "SeedNet",
    "NetV0",
    "NetV1",
    "NetV2",
    "NetV3",
]

#: name -> model class, filled by :func:`register_model`.
MODEL_REGISTRY: Dict[str, Type["SeedNet"]] = {}

DEFAULT_DROPOUT = 0.05


class UnknownModelError(ValueError):
    """Raised by :func:`create_model` for a name that is not registered."""

    def __init__(self, name: str, valid: Optional[List[str]] = None):
        self.name = name
        self.valid = list(valid if valid is not None else list_models())
        super().__init__(
            f"unknown model {name!r}; valid models: {', '.join(self.valid)}"
        )


def register_model(name: str) -> Callable[[Type["SeedNet"]], Type["SeedNet"]]:
    """Class decorator: register a model class under ``name`` (must be unique)."""

    def decorator(cls: Type["SeedNet"]) -> Type["SeedNet"]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        MODEL_REGISTRY[name] = cls
        cls.model_name = name
        return cls

    return decorator


def list_models() -> List[str]:
    """The registered model names, sorted: ``["v0", "v1", "v2", "v3"]``."""
    return sorted(MODEL_REGISTRY)


def create_model(name: str, **options) -> nn.Module:
    """Build the model registered as ``name``.

    Options: ``dropout`` (rate of every Dropout2d; ``None`` means the model's default).
    Raises :class:`UnknownModelError` (a ``ValueError``) for an unknown name and
    ``TypeError`` for an unknown option.
    """
    try:
        cls = MODEL_REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModelError(str(name)) from None
    unknown = set(options) - {"dropout"}
    if unknown:
        raise TypeError(
            f"create_model({name!r}): unknown option(s) {', '.join(sorted(unknown))}; "
            "valid options: dropout"
        )
    return cls(dropout=options.get("dropout"))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------- building blocks


def _conv_bn_relu(cin: int, cout: int, kernel: int, padding: int = 0) -> List[nn.Module]:
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, as three leaf modules."""
    return [
        nn.Conv2d(cin, cout, kernel, padding=padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


def _check_dropout(rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {rate}")
    return rate


class SeedNet(nn.Module):
    """Base class: holds the dropout option; subclasses build their seed layers."""

    model_name: str = ""
    #: the Dropout2d rate used when ``dropout`` is not given (None: no dropout layers).
    default_dropout: Optional[float] = DEFAULT_DROPOUT

    def __init__(self, dropout: Optional[float] = None):
        super().__init__()
        rate = self.default_dropout if dropout is None else dropout
        self.dropout_rate = None if rate is None else _check_dropout(rate)

    def _dropout(self) -> nn.Dropout2d:
        return nn.Dropout2d(self.dropout_rate)


# ----------------------------------------------------------------------------- the four models


@register_model("v0")
class NetV0(SeedNet):
    """Seed ``model_v0.py`` (18,214 params): the seed's first table, 19 leaf layers.

    conv 1-4-8 (3x3, pad 1) + BN + ReLU, maxpool; 8-16-32, maxpool; 32-40; global average
    pooling (AdaptiveAvgPool2d); Linear 40-10. No dropout layers: the ``dropout`` option is
    accepted and ignored.
    """

    default_dropout = None

    def __init__(self, dropout: Optional[float] = None):
        super().__init__(dropout=None)  # v0 has no Dropout2d: the option is ignored
        self.block1 = nn.Sequential(
            *_conv_bn_relu(1, 4, 3, padding=1),  # 28x28
            *_conv_bn_relu(4, 8, 3, padding=1),  # 28x28
            nn.MaxPool2d(2, 2),  # 14x14
        )
        self.block2 = nn.Sequential(
            *_conv_bn_relu(8, 16, 3, padding=1),  # 14x14
            *_conv_bn_relu(16, 32, 3, padding=1),  # 14x14
            nn.MaxPool2d(2, 2),  # 7x7
        )
        self.block3 = nn.Sequential(
            *_conv_bn_relu(32, 40, 3, padding=1),  # 7x7
            nn.AdaptiveAvgPool2d(1),  # 1x1
        )
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(x)))
        x = self.fc(x.view(x.size(0), -1))
        return F.log_softmax(x.view(-1, 10), dim=1)


@register_model("v1")
class NetV1(SeedNet):
    """Seed ``model_v1.py`` (10,970 params): the seed's second table, 25 leaf layers.

    conv 1-10-10-20 (3x3, no pad) + BN + ReLU, Dropout2d, maxpool; 1x1 20-10; 10-10-20,
    Dropout2d; 1x1 20-10; a 7x7 conv 10-10 down to 1x1 (no BN/ReLU after it).
    """

    def __init__(self, dropout: Optional[float] = None):
        super().__init__(dropout)
        self.block1 = nn.Sequential(
            *_conv_bn_relu(1, 10, 3),  # 26x26
            *_conv_bn_relu(10, 10, 3),  # 24x24
            *_conv_bn_relu(10, 20, 3),  # 22x22
            self._dropout(),
            nn.MaxPool2d(2, 2),  # 11x11
        )
        self.transition1 = nn.Sequential(*_conv_bn_relu(20, 10, 1))  # 11x11
        self.block2 = nn.Sequential(
            *_conv_bn_relu(10, 10, 3),  # 9x9
            *_conv_bn_relu(10, 20, 3),  # 7x7
            self._dropout(),
        )
        self.transition2 = nn.Sequential(*_conv_bn_relu(20, 10, 1))  # 7x7
        self.head = nn.Conv2d(10, 10, 7, bias=False)  # 1x1

    def forward(self, x):
        x = self.transition1(self.block1(x))
        x = self.head(self.transition2(self.block2(x)))
        return F.log_softmax(x.view(-1, 10), dim=1)


@register_model("v2")
class NetV2(SeedNet):
    """Seed ``model_v2.py`` (4,232 params): the seed's third table, 27 leaf layers.

    conv 1-4-8 (3x3, pad 1), maxpool; 8-10, Dropout2d, 10-12, maxpool; 1x1 12-8; 8-12 (pad 1);
    1x1 12-10; 3x3 10-10 (no pad, 7 to 5, no BN/ReLU); AvgPool2d(5); Flatten. Block names
    follow the seed's architecture checker (input_conv, feature_block, pattern_block,
    classifier).
    """

    def __init__(self, dropout: Optional[float] = None):
        super().__init__(dropout)
        self.input_conv = nn.Sequential(
            *_conv_bn_relu(1, 4, 3, padding=1),  # 28x28
            *_conv_bn_relu(4, 8, 3, padding=1),  # 28x28
            nn.MaxPool2d(2, 2),  # 14x14
        )
        self.feature_block = nn.Sequential(
            *_conv_bn_relu(8, 10, 3, padding=1),  # 14x14
            self._dropout(),
            *_conv_bn_relu(10, 12, 3, padding=1),  # 14x14
            nn.MaxPool2d(2, 2),  # 7x7
        )
        self.pattern_block = nn.Sequential(
            *_conv_bn_relu(12, 8, 1),  # 7x7
            *_conv_bn_relu(8, 12, 3, padding=1),  # 7x7
        )
        self.classifier = nn.Sequential(
            *_conv_bn_relu(12, 10, 1),  # 7x7
            nn.Conv2d(10, 10, 3, bias=False),  # 5x5
            nn.AvgPool2d(5),  # 1x1
            nn.Flatten(),  # [B, 10]
        )

    def forward(self, x):
        x = self.classifier(self.pattern_block(self.feature_block(self.input_conv(x))))
        return F.log_softmax(x.view(-1, 10), dim=1)


@register_model("v3")
class NetV3(SeedNet):
    """Seed ``model_v3.py`` (7,932 params): the seed's fourth table, 27 leaf layers.

    conv 1-8-10 (3x3, pad 1), maxpool; 10-10, Dropout2d, 10-16, maxpool; 1x1 16-10;
    10-16 (pad 1); 16-10 (no pad, 7 to 5); 10-16 (no pad, 5 to 3, no BN/ReLU); AvgPool2d(3);
    1x1 16-10 (no BN/ReLU).
    """

    def __init__(self, dropout: Optional[float] = None):
        super().__init__(dropout)
        self.input_conv = nn.Sequential(
            *_conv_bn_relu(1, 8, 3, padding=1),  # 28x28
            *_conv_bn_relu(8, 10, 3, padding=1),  # 28x28
            nn.MaxPool2d(2, 2),  # 14x14
        )
        self.feature_block = nn.Sequential(
            *_conv_bn_relu(10, 10, 3, padding=1),  # 14x14
            self._dropout(),
            *_conv_bn_relu(10, 16, 3, padding=1),  # 14x14
            nn.MaxPool2d(2, 2),  # 7x7
        )
        self.pattern_block = nn.Sequential(
            *_conv_bn_relu(16, 10, 1),  # 7x7
            *_conv_bn_relu(10, 16, 3, padding=1),  # 7x7
            *_conv_bn_relu(16, 10, 3),  # 5x5
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(10, 16, 3, bias=False),  # 3x3
            nn.AvgPool2d(3),  # 1x1
            nn.Conv2d(16, 10, 1, bias=False),  # 1x1
        )

    def forward(self, x):
        x = self.classifier(self.pattern_block(self.feature_block(self.input_conv(x))))
        return F.log_softmax(x.view(-1, 10), dim=1)
