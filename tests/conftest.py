"""Shared fixtures: tiny synthetic MNIST, the real MNIST when present, a state folder, and the
session's one embedded Ray + MLflow service set (``embedded``, started lazily on first use) with a
finished tiny sweep on it (``finished_sweep``); both are defined in tests/_service_helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from _service_helpers import embedded, finished_sweep  # noqa: F401  (registered for every test module)

REPO = Path(__file__).resolve().parents[1]


def real_mnist_dir() -> Path | None:
    """The real MNIST: $MNISTJOBS_DATA_DIR, else ../shared/data/mnist beside the checkout."""
    candidates = [os.environ.get("MNISTJOBS_DATA_DIR"), REPO.parent / "shared" / "data" / "mnist"]
    for c in candidates:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """Four IDX files of a tiny learnable fake MNIST (512 train / 256 test)."""
    from synthetic import make_synthetic_mnist

    return make_synthetic_mnist(tmp_path_factory.mktemp("synthetic-mnist"), n_train=512, n_test=256, seed=0)


@pytest.fixture(scope="session")
def synthetic_data(synthetic_dir):
    from mnistnets.data import load_mnist

    return load_mnist(synthetic_dir)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    d = real_mnist_dir()
    if d is None:
        pytest.skip("the real MNIST is not here (set MNISTJOBS_DATA_DIR or put it in ../shared/data/mnist)")
    return d


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private state folder for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("MNISTJOBS_HOME", str(h))
    return h
