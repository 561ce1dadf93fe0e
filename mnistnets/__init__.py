"""mnistnets: the four compact MNIST CNNs, their data, schedules and trainer. Pure PyTorch.

The package's names load on first use (PEP 562), so that importing a torch-free module of it
(``mnistnets.files``) does not import torch: the service's job commands stay fast.
"""
from __future__ import annotations

__all__ = ["create_model", "list_models", "count_parameters"]


def __getattr__(name: str):
    if name in __all__:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'mnistnets' has no attribute {name!r}")
