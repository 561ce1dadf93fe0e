"""MNIST data: the IDX files and their checks (``idx``), the download (``download``), and the
device-resident training loader (``loader``).

Reading: ``read_idx`` parses one IDX file and ``load_mnist`` finds and validates the four
standard files in a folder (also torchvision's ``<dir>/MNIST/raw`` layout); ``locate_mnist`` only
finds them (no torch). Every problem is a ``DataError`` whose message names the file and says what
is wrong with it.

Download: ``ensure_downloaded(folder)`` fills a folder once with torchvision's download. Which
folder to use (a CLI option, a variable, the state folder) is decided in ``jobs.datadir``.

Training: ``DeviceLoader`` keeps a whole split as one uint8 tensor on the device and augments each
batch with one random affine warp; shuffling and augmentation are a function of ``(seed, epoch)``.

The loader's names load on first use (PEP 562), so that finding the files or naming a DataError
imports no torch.
"""
from .download import ensure_downloaded, has_mnist
from .idx import (KNOWN_MD5, MNIST, MNIST_FILES, DataError, check_mnist, format_check_report, load_mnist, locate_mnist,
                  read_idx, write_idx)

__all__ = [
    "DataError",
    "read_idx",
    "write_idx",
    "MNIST",
    "load_mnist",
    "locate_mnist",
    "check_mnist",
    "format_check_report",
    "has_mnist",
    "ensure_downloaded",
    "AugmentConfig",
    "DeviceLoader",
    "MNIST_MEAN",
    "MNIST_STD",
    "MNIST_FILES",
    "KNOWN_MD5",
]

_LOADER_NAMES = ("AugmentConfig", "DeviceLoader", "MNIST_MEAN", "MNIST_STD")


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'mnistnets.data' has no attribute {name!r}")
