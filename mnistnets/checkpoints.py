"""Checkpoints: written atomically, loaded with ``weights_only=True``, and checked before a resume.

A checkpoint is a dict holding at least ``_CHECKPOINT_KEYS`` (``fit`` writes more: history, rng,
and with EMA the live weights) and ``version``. A run may only be resumed with the settings it was
started with, except for where it runs (``_RESUME_FREE``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .files import write_atomic

CHECKPOINT_VERSION = 1
#: What every checkpoint holds (``fit`` writes more: history, rng, and with EMA the live weights).
_CHECKPOINT_KEYS = ("epoch", "config", "model", "optimizer", "scheduler", "best_test_acc")
# Settings that may differ between a run and its resumption: where it runs, not what it computes.
_RESUME_FREE = {"device", "data_dir", "eval_batch_size", "tta"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated, not ours) or a folder that cannot
    hold checkpoints."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f))


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
                              f"as training writes to last.pt and best.pt)")
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
                              f"folder you can write") from None
    return path


def check_resumable(config, path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``, after checking that ``config`` (a ``TrainConfig``) may continue
    it (CheckpointError naming each setting that differs)."""
    state = load_checkpoint(path)
    saved, current = state["config"], config.to_dict()
    defaults = type(config)  # a dataclass: its class attributes are the defaults
    changed = [f"{k}={saved.get(k)!r} there, {current[k]!r} here"
               for k in current if k not in _RESUME_FREE
               and saved.get(k, getattr(defaults, k, None)) != current[k]]  # older checkpoints lack newer settings
    if changed:
        raise CheckpointError(f"checkpoint {path} was written by a run with other settings "
                              f"({'; '.join(changed)}); resume it with the same settings")
    return state
