"""Downloading MNIST once into a folder (torchvision), safe against parallel workers.

Which folder, and what the user should change when the download fails, is the caller's business
(``jobs.datadir``): this module says what went wrong in the folder it was given.
"""
from __future__ import annotations

import contextlib
import shutil
import socket
from pathlib import Path

from .idx import MNIST_FILES, DataError


def has_mnist(folder) -> bool:
    """True when the four files are directly in ``folder`` or torchvision's extracted raw files are
    in ``folder/MNIST/raw`` (torchvision extracts only after the md5 check, so those are complete)."""
    folder = Path(folder)
    if all((folder / b).is_file() or (folder / (b + ".gz")).is_file() for b in MNIST_FILES.values()):
        return True
    raw = folder / "MNIST" / "raw"
    return all((raw / b).is_file() for b in MNIST_FILES.values())


@contextlib.contextmanager
def _download_lock(folder: Path):
    """An exclusive lock, so that parallel workers sharing a folder download only once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / ".download.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _torchvision_download(folder: Path, timeout: float = 60.0) -> None:
    """Download MNIST with torchvision into ``folder/MNIST/raw`` (raises on any failure)."""
    from torchvision.datasets import MNIST as TorchvisionMNIST

    old = socket.getdefaulttimeout()
    if old is None:
        socket.setdefaulttimeout(timeout)  # a silent network fails in a minute, not never
    try:
        TorchvisionMNIST(root=str(folder), train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)


def ensure_downloaded(folder) -> Path:
    """``folder`` (which must exist), holding MNIST: downloaded with torchvision unless it is there.

    Parallel callers download once (a lock file in ``folder``). A failed download removes its
    partial files (``folder/MNIST``) and raises ``DataError`` with the reason (offline?).
    """
    folder = Path(folder)
    if has_mnist(folder):
        return folder
    with _download_lock(folder):
        if has_mnist(folder):  # another worker finished it while we waited
            return folder
        try:
            _torchvision_download(folder)
        except Exception as e:  # URLError, socket errors, torchvision's RuntimeError, md5 mismatch
            shutil.rmtree(folder / "MNIST", ignore_errors=True)  # torchvision's partial download
            reason = " ".join(str(e).split())
            if len(reason) > 300:
                reason = reason[:297] + "..."
            raise DataError(
                f"Could not download MNIST into {folder} (offline?): {type(e).__name__}: {reason}."
            ) from None
    if not has_mnist(folder):  # pragma: no cover - torchvision reported success without files
        raise DataError(f"The MNIST download into {folder} finished but the files are not there.")
    return folder
