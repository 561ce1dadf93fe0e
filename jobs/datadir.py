"""Where MNIST comes from: ``--data-dir`` > ``$MNISTJOBS_DATA_DIR`` > ``<home>/data/mnist``.

``home`` is the state folder (``--home`` > ``$MNISTJOBS_HOME`` > ``./.mnistjobs``, see
``jobs.state``); the state folder's copy is downloaded there once (``mnistnets.data``). mnistnets
says what is wrong with a folder or file; this module adds which option or variable to change,
so every ``DataError`` that reaches a user names ``--data-dir`` / ``MNISTJOBS_DATA_DIR``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from jobs.state import HOME_VAR, resolve_home
from mnistnets.data import (MNIST, MNIST_FILES, DataError, check_mnist, ensure_downloaded, has_mnist, load_mnist,
                            locate_mnist)

DATA_VAR = "MNISTJOBS_DATA_DIR"
DATA_OPTION = "--data-dir"
_NAMES = list(MNIST_FILES.values())
_LISTED = ", ".join(_NAMES)                                  # "a, b, c, d"
_FILES = f"{', '.join(_NAMES[:-1])} and {_NAMES[-1]}"        # "a, b, c and d"
#: What to change when a data folder is wrong: appended to mnistnets' DataError messages.
FIX_HINT = (
    f"Point {DATA_OPTION} or {DATA_VAR} at a folder holding the four MNIST files "
    f"({_LISTED}; each raw or .gz), or leave both unset to download MNIST into the state folder."
)


def with_hint(exc: DataError) -> DataError:
    """``exc``'s message with ``FIX_HINT`` appended (one paragraph)."""
    return DataError(f"{exc} {FIX_HINT}")


@contextlib.contextmanager
def hinted() -> Iterator[None]:
    """Re-raise a DataError from mnistnets with ``FIX_HINT`` appended."""
    try:
        yield
    except DataError as exc:
        raise with_hint(exc) from None


def _given_folder(data_dir) -> Path | None:
    """The folder named by ``data_dir`` or ``$MNISTJOBS_DATA_DIR`` (checked to exist), else None."""
    for value, origin in ((data_dir, DATA_OPTION), (os.environ.get(DATA_VAR), DATA_VAR)):
        if value is None or str(value) == "":
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"MNIST data folder {folder} (from {origin}) does "
                f"{'not exist' if not folder.exists() else 'not name a folder'}. Point {origin} at "
                f"a folder holding the four MNIST IDX files ({_LISTED}; raw or .gz), or unset it to "
                f"download MNIST into the state folder."
            )
        return folder
    return None


def resolve_data_dir(data_dir=None, home=None, download: bool = True) -> Path:
    """The folder to read MNIST from: ``data_dir`` > ``$MNISTJOBS_DATA_DIR`` > ``<home>/data/mnist``.

    A given folder (argument or variable) is returned as is once it exists (``load_mnist`` checks
    its files). The state folder's is filled once with torchvision's download when it lacks the
    files and ``download`` is true; a failed download leaves nothing behind, and its DataError
    says how to point at a local copy.
    """
    given = _given_folder(data_dir)
    if given is not None:
        return given
    home = resolve_home(home)
    folder = home / "data" / "mnist"
    if has_mnist(folder):
        return folder
    if not download:
        raise DataError(
            f"No MNIST in {folder} and downloading is off. Set {DATA_VAR} or {DATA_OPTION} "
            f"to a folder holding the four MNIST IDX files (raw or .gz), or allow the download."
        )
    # The first of home, home/data, home/data/mnist that does not exist yet: removed again if the
    # download fails, so that a failed download leaves nothing behind.
    created = next((p for p in (home, home / "data", folder) if not p.exists()), None)
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)  # the state folder is private
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"Cannot create the MNIST download folder {folder} ({e.strerror or e}). Set "
            f"{HOME_VAR} (or --home) to a writable folder, or set {DATA_VAR} or "
            f"{DATA_OPTION} to a local copy of MNIST."
        ) from None
    try:
        return ensure_downloaded(folder)
    except DataError as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise DataError(
            f"{e} Set {DATA_VAR} or {DATA_OPTION} to a local copy of MNIST (a folder holding "
            f"{_FILES}, raw or .gz), or put those files into {folder}."
        ) from None


def load_data(data_dir=None, home=None, *, train_limit: int | None = None, test_limit: int | None = None,
              download: bool = True) -> MNIST:
    """``load_mnist`` of ``resolve_data_dir(data_dir, home, download)``; every DataError names
    the option and variable to change."""
    folder = resolve_data_dir(data_dir, home=home, download=download)
    with hinted():
        return load_mnist(folder, train_limit, test_limit)


def find_data(data_dir=None, home=None, *, download: bool = True) -> Path:
    """``resolve_data_dir``, then the four files found in it (``locate_mnist``: not read, no
    torch); every DataError names the option and variable to change. What the job's driver checks
    before it starts any trial (`mnistjobs submit` on the embedded cluster loads them in full)."""
    folder = resolve_data_dir(data_dir, home=home, download=download)
    with hinted():
        locate_mnist(folder)
    return folder


def check_data(data_dir=None, home=None) -> dict:
    """``check_mnist`` of ``resolve_data_dir(data_dir, home)`` (for ``mnistjobs data``); every
    DataError names the option and variable to change."""
    folder = resolve_data_dir(data_dir, home=home)
    with hinted():
        return check_mnist(folder)
