"""mnistnets.data: IDX reading/writing, validation errors, download, the loader; jobs.datadir: where
the data comes from and what the user is told to change; the synthetic test digits."""
from __future__ import annotations

import ast
import gzip
import hashlib
import os
import re
import socket
import struct
from pathlib import Path

import pytest
import torch
from synthetic import make_synthetic_mnist

from jobs.datadir import FIX_HINT, check_data, load_data, resolve_data_dir
from mnistnets.data import (
    MNIST_FILES,
    AugmentConfig,
    DataError,
    DeviceLoader,
    check_mnist,
    format_check_report,
    load_mnist,
    read_idx,
    write_idx,
)
from mnistnets.data import download as download_mod

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = 0.1307, 0.3081


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_mnist(tmp_path_factory.mktemp("synth"), n_train=200, n_test=100, seed=3)


@pytest.fixture(scope="module")
def synth_data(synth):
    return load_mnist(synth)


def _idx_bytes(t: torch.Tensor, magic: int | None = None) -> bytes:
    magic = (0x08 << 8) | t.dim() if magic is None else magic
    return struct.pack(f">I{t.dim()}I", magic, *t.shape) + t.contiguous().numpy().tobytes()


def _copy_set(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# ---------------------------------------------------------------- IDX round trip


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (3, 4, 5, 6)])
def test_idx_round_trip(tmp_path, name, shape):
    t = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = write_idx(tmp_path / name, t)
    assert p.read_bytes()[:2] == b"\x1f\x8b" if name.endswith(".gz") else p.read_bytes()[:4] == bytes(
        [0, 0, 8, len(shape)]
    )
    back = read_idx(p)
    assert back.dtype == torch.uint8 and tuple(back.shape) == shape
    assert torch.equal(back, t)


def test_write_idx_rejects_non_uint8(tmp_path):
    with pytest.raises(TypeError):
        write_idx(tmp_path / "f", torch.zeros(3, dtype=torch.float32))


def test_read_idx_ndim_is_checked(tmp_path):
    p = write_idx(tmp_path / "labels-idx1-ubyte", torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(DataError, match="labels-idx1-ubyte.*0x00000803"):
        read_idx(p, ndim=3)


# ---------------------------------------------------------------- bad inputs name the file


def test_missing_file_names_file_and_folder(tmp_path, synth):
    d = _copy_set(synth, tmp_path / "d")
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_mnist(d)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and str(d) in msg
    assert "\n" not in msg  # one paragraph
    assert "MNISTJOBS_DATA_DIR" not in msg and "--data-dir" not in msg  # mnistnets knows no option
    with pytest.raises(DataError) as e:  # the jobs layer adds which option to change
        load_data(d)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and str(d) in msg
    assert "MNISTJOBS_DATA_DIR" in msg and "--data-dir" in msg
    assert "\n" not in msg  # one paragraph


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nope")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file(tmp_path, gz):
    t = torch.zeros(10, 28, 28, dtype=torch.uint8)
    raw = _idx_bytes(t)[:-100]
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    p = tmp_path / name
    p.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError) as e:
        read_idx(p)
    msg = str(e.value)
    assert name in msg and "truncated" in msg
    assert "7856" in msg and "7756" in msg  # expected vs actual byte counts (16 + 7840 header+data)


def test_trailing_bytes(tmp_path):
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(_idx_bytes(torch.zeros(10, dtype=torch.uint8)) + b"xyz")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*3 trailing bytes.*18 bytes.*21"):
        read_idx(p)


def test_wrong_magic(tmp_path):
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(_idx_bytes(torch.zeros(2, 28, 28, dtype=torch.uint8), magic=0x00000D03))
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert "t10k-images-idx3-ubyte" in str(e.value) and "magic" in str(e.value)
    assert "0x00000D03" in str(e.value)


def test_wrong_magic_in_set_names_file(tmp_path, synth):
    d = _copy_set(synth, tmp_path / "d")
    (d / "train-labels-idx1-ubyte.gz").unlink()
    # an images header where labels belong
    (d / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(torch.zeros(200, 28, 28, dtype=torch.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: wrong IDX magic.*0x00000801.*0x00000803"):
        load_mnist(d)


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    good = gzip.compress(_idx_bytes(torch.zeros(1000, dtype=torch.uint8)))
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: corrupt or truncated gzip"):
        read_idx(p)


def test_count_mismatch(tmp_path, synth):
    d = _copy_set(synth, tmp_path / "d")
    write_idx(d / "train-labels-idx1-ubyte.gz", torch.zeros(199, dtype=torch.uint8))
    with pytest.raises(DataError) as e:
        load_mnist(d)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert "200" in msg and "199" in msg


def test_label_out_of_range(tmp_path, synth):
    d = _copy_set(synth, tmp_path / "d")
    labels = read_idx(d / "t10k-labels-idx1-ubyte.gz").clone()
    labels[17] = 11
    write_idx(d / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: label 11 at index 17"):
        load_mnist(d)


def test_wrong_image_size(tmp_path, synth):
    d = _copy_set(synth, tmp_path / "d")
    write_idx(d / "t10k-images-idx3-ubyte.gz", torch.zeros(100, 32, 32, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: images are 32x32"):
        load_mnist(d)


# ---------------------------------------------------------------- load_mnist


def test_load_mnist_shapes_and_limits(synth, synth_data):
    m = synth_data
    assert m.train_images.shape == (200, 28, 28) and m.train_images.dtype == torch.uint8
    assert m.train_labels.shape == (200,) and m.train_labels.dtype == torch.int64
    assert m.test_images.shape == (100, 28, 28) and m.test_labels.shape == (100,)
    lim = load_mnist(synth, train_limit=50, test_limit=7)
    assert lim.train_images.shape == (50, 28, 28) and lim.test_labels.shape == (7,)
    assert torch.equal(lim.train_images, m.train_images[:50])
    assert torch.equal(lim.test_labels, m.test_labels[:7])
    big = load_mnist(synth, train_limit=10**6)
    assert len(big.train_labels) == 200
    with pytest.raises(ValueError):
        load_mnist(synth, train_limit=0)
    cut = m.limit(50, 7)  # the one way to cut a split, also fit()'s
    assert all(torch.equal(getattr(cut, k), getattr(lim, k)) for k in MNIST_FILES)
    assert m.limit() == m and len(m.limit(test_limit=10**6).test_labels) == 100
    with pytest.raises(ValueError, match="test_limit"):
        m.limit(test_limit=True)


def test_load_raw_and_torchvision_layout(tmp_path, synth_data):
    raw = tmp_path / "t" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for key, base in MNIST_FILES.items():
        t = getattr(synth_data, key)
        write_idx(raw / base, t.to(torch.uint8))
    m = load_mnist(tmp_path / "t")
    assert torch.equal(m.train_images, synth_data.train_images)
    assert torch.equal(m.test_labels, synth_data.test_labels)


# ---------------------------------------------------------------- synthetic data


def test_synthetic_shapes_classes_determinism(tmp_path):
    a = make_synthetic_mnist(tmp_path / "a", n_train=100, n_test=30, seed=5)
    b = make_synthetic_mnist(tmp_path / "b", n_train=100, n_test=30, seed=5)
    c = make_synthetic_mnist(tmp_path / "c", n_train=100, n_test=30, seed=6, gz=False)
    assert sorted(p.name for p in a.iterdir()) == sorted(n + ".gz" for n in MNIST_FILES.values())
    assert sorted(p.name for p in c.iterdir()) == sorted(MNIST_FILES.values())
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    m, mc = load_mnist(a), load_mnist(c)
    assert m.train_images.shape == (100, 28, 28) and m.test_images.shape == (30, 28, 28)
    assert torch.bincount(m.train_labels, minlength=10).tolist() == [10] * 10
    assert set(m.test_labels.tolist()) == set(range(10))
    assert not torch.equal(m.train_images, mc.train_images)
    # digit-like: black background, bright strokes
    assert m.train_images[:, 0, :].float().mean() < 5 and m.train_images.max() > 150
    # classes differ: mean images of two classes are far apart
    mean = torch.stack([m.train_images[m.train_labels == k].float().mean(0) for k in range(10)])
    assert torch.cdist(mean.flatten(1), mean.flatten(1)).add(torch.eye(10) * 1e9).min() > 100


# ---------------------------------------------------------------- check_mnist


def test_check_mnist_report(synth):
    r = check_mnist(synth)
    files = r["files"]
    assert set(files) == set(MNIST_FILES.values())
    f = files["train-images-idx3-ubyte"]
    assert f["count"] == 200 and f["shape"] == [200, 28, 28]
    assert f["md5"] == hashlib.md5(gzip.decompress(Path(f["path"]).read_bytes())).hexdigest()
    assert f["md5_ok"] is False and r["official"] is False
    assert sum(r["splits"]["train"]["histogram"]) == 200 and r["splits"]["test"]["count"] == 100
    text = format_check_report(r)
    assert "t10k-labels-idx1-ubyte.gz" in text and f["md5"] in text and "histogram" in text


# ---------------------------------------------------------------- jobs.datadir: resolve_data_dir / download


def test_resolve_precedence(tmp_path, monkeypatch, synth):
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv("MNISTJOBS_DATA_DIR", str(env_dir))
    assert resolve_data_dir(synth) == synth
    assert resolve_data_dir() == env_dir
    monkeypatch.delenv("MNISTJOBS_DATA_DIR")
    home = tmp_path / "home"
    _copy_set(synth, home / "data" / "mnist")
    monkeypatch.setenv("MNISTJOBS_HOME", str(home))
    assert resolve_data_dir() == home / "data" / "mnist"  # present: no download
    with pytest.raises(DataError, match="MNISTJOBS_DATA_DIR"):
        monkeypatch.setenv("MNISTJOBS_DATA_DIR", str(tmp_path / "missing"))
        resolve_data_dir()


def test_resolve_default_home_is_cwd_state_folder(tmp_path, monkeypatch, synth):
    monkeypatch.delenv("MNISTJOBS_DATA_DIR", raising=False)
    monkeypatch.delenv("MNISTJOBS_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    _copy_set(synth, tmp_path / ".mnistjobs" / "data" / "mnist")
    assert resolve_data_dir().resolve() == (tmp_path / ".mnistjobs" / "data" / "mnist").resolve()


def test_offline_download_fails_fast_with_clear_message(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.delenv("MNISTJOBS_DATA_DIR", raising=False)
    # the real torchvision download, pointed at a closed local port: refused at once, never the internet
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError) as e:
        resolve_data_dir(home=tmp_path / "home")
    msg = str(e.value)
    # it failed at once because the port refused, not after waiting: the mirror was tried and refused
    assert "http://127.0.0.1:9/" in msg and "Connection refused" in msg
    assert socket.getdefaulttimeout() is None, "the download's socket timeout is put back"
    assert str(tmp_path / "home" / "data" / "mnist") in msg
    assert "MNISTJOBS_DATA_DIR" in msg and "--data-dir" in msg
    assert "\n" not in msg
    assert not (tmp_path / "home").exists(), "a failed download leaves nothing behind"


def test_failed_download_into_an_existing_home_removes_only_what_it_made(tmp_path, monkeypatch):
    monkeypatch.delenv("MNISTJOBS_DATA_DIR", raising=False)
    home = tmp_path / "home"
    (home / "runs").mkdir(parents=True)

    def half(folder, timeout=60.0):  # torchvision got partway, then the network went
        (folder / "MNIST" / "raw").mkdir(parents=True)
        (folder / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        raise OSError("Network is unreachable")

    monkeypatch.setattr(download_mod, "_torchvision_download", half)
    with pytest.raises(DataError, match="Network is unreachable"):
        resolve_data_dir(home=home)
    assert sorted(p.name for p in home.iterdir()) == ["runs"]


def test_download_off_and_forced_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("MNISTJOBS_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="downloading is off"):
        resolve_data_dir(home=tmp_path, download=False)

    def boom(folder, timeout=60.0):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(download_mod, "_torchvision_download", boom)
    with pytest.raises(DataError, match="Network is unreachable.*MNISTJOBS_DATA_DIR"):
        resolve_data_dir(home=tmp_path)


def test_download_once(tmp_path, monkeypatch, synth_data):
    monkeypatch.delenv("MNISTJOBS_DATA_DIR", raising=False)
    calls = []

    def fake(folder, timeout=60.0):  # what torchvision leaves: extracted files in MNIST/raw
        calls.append(folder)
        for key, base in MNIST_FILES.items():
            write_idx(folder / "MNIST" / "raw" / base, getattr(synth_data, key).to(torch.uint8))

    monkeypatch.setattr(download_mod, "_torchvision_download", fake)
    folder = resolve_data_dir(home=tmp_path / "home")
    assert folder == tmp_path / "home" / "data" / "mnist" and len(calls) == 1
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700, "the state folder is private"
    assert resolve_data_dir(home=tmp_path / "home") == folder and len(calls) == 1
    assert torch.equal(load_mnist(folder).train_labels, synth_data.train_labels)


def test_download_has_a_socket_timeout_and_puts_it_back(tmp_path, monkeypatch, synth_data):
    import torchvision.datasets

    seen = []

    class FakeMNIST:  # records the timeout the download runs under; leaves the extracted files
        def __init__(self, root, train, download):
            seen.append(socket.getdefaulttimeout())
            for key, base in MNIST_FILES.items():
                write_idx(Path(root) / "MNIST" / "raw" / base, getattr(synth_data, key).to(torch.uint8))

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    assert download_mod.ensure_downloaded(tmp_path) == tmp_path
    assert seen == [60.0], "a silent network fails in a minute, not never"
    assert socket.getdefaulttimeout() is None
    assert download_mod.ensure_downloaded(tmp_path) == tmp_path and len(seen) == 1  # once


def test_mnistnets_download_failure_says_what_failed_and_cleans_up(tmp_path, monkeypatch):
    def half(folder, timeout=60.0):
        (folder / "MNIST" / "raw").mkdir(parents=True)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(download_mod, "_torchvision_download", half)
    with pytest.raises(DataError) as e:
        download_mod.ensure_downloaded(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "Network is unreachable" in msg
    assert "MNISTJOBS_DATA_DIR" not in msg and "--data-dir" not in msg
    assert not (tmp_path / "MNIST").exists(), "torchvision's partial download is removed"


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_jobs_layer_adds_the_option_to_every_data_problem(tmp_path, synth, damage):
    d = _copy_set(synth, tmp_path / "d")
    f = d / "train-images-idx3-ubyte.gz"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:200])
    else:
        f.unlink()
    with pytest.raises(DataError) as plain:
        load_mnist(d)
    for call in (lambda: load_data(d), lambda: check_data(d)):
        with pytest.raises(DataError) as e:
            call()
        assert str(e.value) == f"{plain.value} {FIX_HINT}"
        assert "--data-dir" in str(e.value) and "MNISTJOBS_DATA_DIR" in str(e.value)
    assert check_data(synth)["splits"]["train"]["count"] == 200
    assert torch.equal(load_data(synth, train_limit=5).train_labels, load_mnist(synth).train_labels[:5])


def test_mnistnets_knows_no_cli_options_or_variables():
    """mnistnets takes paths and values: no MNISTJOBS_* variable, no --option, no os.environ, no jobs."""
    root = REPO / "mnistnets"
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert "MNISTJOBS_" not in node.value, (path, node.value)
                assert not re.search(r"(^|[\s(`'\"])--[a-z]", node.value), (path, node.value)
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("environ", "getenv"), (path, node.lineno)
            if isinstance(node, (ast.Import, ast.ImportFrom)):  # jobs imports mnistnets, never the reverse
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n == "jobs" or n.startswith("jobs.") for n in names), (path, node.lineno)


# ---------------------------------------------------------------- DeviceLoader


def _index_loader(n=103, bs=10, **kw):
    """Labels are the indices themselves, so batches reveal which images they hold."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 28, 28).contiguous()
    return DeviceLoader(images, torch.arange(n), bs, **kw)


def test_loader_len_and_batches():
    dl = _index_loader()
    assert len(dl) == 11
    sizes = [len(y) for _, y in dl]
    assert sizes == [10] * 10 + [3]
    dl = _index_loader(drop_last=True)
    assert len(dl) == 10 and [len(y) for _, y in dl] == [10] * 10
    x, y = next(iter(dl))
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_loader_shuffle_covers_every_index_once():
    dl = _index_loader(shuffle=True, seed=4)
    for epoch in range(3):
        dl.set_epoch(epoch)
        seen = torch.cat([y for _, y in dl])
        assert sorted(seen.tolist()) == list(range(103))
        assert seen.tolist() != list(range(103))


def test_loader_same_epoch_same_batches_different_epoch_differs(synth_data):
    aug = AugmentConfig(rotation=15, translate=0.1, scale=0.1, shear=10)

    def epoch_batches(seed, epoch):
        dl = DeviceLoader(synth_data.train_images, synth_data.train_labels, 32, shuffle=True, augment=aug, seed=seed)
        dl.set_epoch(epoch)
        return list(dl)

    a, b = epoch_batches(1, 2), epoch_batches(1, 2)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = epoch_batches(1, 3)
    assert not torch.equal(a[0][1], c[0][1])
    assert not torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in c]))
    d = epoch_batches(2, 2)
    assert not torch.equal(a[0][1], d[0][1])
    # without set_epoch, successive passes move on to the next epoch
    dl = DeviceLoader(synth_data.train_images, synth_data.train_labels, 32, shuffle=True, seed=1)
    first, second = torch.cat([y for _, y in dl]), torch.cat([y for _, y in dl])
    assert not torch.equal(first, second)
    dl.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in dl]), first)


def test_test_loader_in_order_and_normalized(synth_data):
    imgs, labels = synth_data.test_images, synth_data.test_labels
    dl = DeviceLoader(imgs, labels, 32)
    xs, ys = zip(*dl)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(y, labels)
    expected = ((imgs.float() / 255 - MEAN) / STD).unsqueeze(1)
    assert torch.allclose(x, expected, atol=1e-5)
    assert abs(x.min().item() - (-MEAN / STD)) < 1e-5  # background is black
    assert abs(x.max().item() - (imgs.max().item() / 255 - MEAN) / STD) < 1e-5


def test_augmentation_keeps_shape_changes_pixels(synth_data):
    imgs, labels = synth_data.train_images[:64], synth_data.train_labels[:64]
    plain = torch.cat([x for x, _ in DeviceLoader(imgs, labels, 16)])
    aug = AugmentConfig(rotation=10, translate=0.1, scale=0.1, shear=5)
    assert aug.enabled and not AugmentConfig().enabled
    dl = DeviceLoader(imgs, labels, 16, augment=aug, seed=0)
    out = torch.cat([x for x, _ in dl])
    ys = torch.cat([y for _, y in dl])
    assert out.shape == plain.shape == (64, 1, 28, 28)
    assert torch.equal(ys, labels)  # no shuffle: same order, labels untouched
    changed = (out - plain).abs().flatten(1).amax(1) > 0.5
    assert changed.all()
    lo, hi = -MEAN / STD, (1 - MEAN) / STD
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5
    # zero padding happens in pixel space: corners stay black, ink is roughly preserved
    assert torch.allclose(out[:, :, 0, 0], torch.full((64, 1), lo), atol=1e-4)
    ink = lambda x: (x * STD + MEAN).clamp(min=0).flatten(1).sum(1)  # noqa: E731
    ratio = ink(out) / ink(plain)
    assert ((ratio > 0.7) & (ratio < 1.4)).all()
    # disabled config = no augmentation
    same = torch.cat([x for x, _ in DeviceLoader(imgs, labels, 16, augment=AugmentConfig())])
    assert torch.equal(same, plain)


def test_augment_thetas_translate_only():
    th = AugmentConfig(translate=0.2).thetas(500, torch.Generator().manual_seed(0))
    assert th.shape == (500, 2, 3)
    assert torch.allclose(th[:, :, :2], torch.eye(2).expand(500, 2, 2), atol=1e-6)
    assert th[:, :, 2].abs().max() <= 0.4 + 1e-6 and th[:, :, 2].abs().max() > 0.3
    th = AugmentConfig(rotation=30).thetas(500, torch.Generator().manual_seed(0))
    det = th[:, 0, 0] * th[:, 1, 1] - th[:, 0, 1] * th[:, 1, 0]
    assert torch.allclose(det, torch.ones(500), atol=1e-5)
    with pytest.raises(ValueError):
        AugmentConfig(rotation=-1)
    with pytest.raises(ValueError):
        AugmentConfig(translate=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda_matches_cpu(synth_data):
    aug = AugmentConfig(rotation=10, translate=0.1, scale=0.1, shear=5)
    kw = dict(shuffle=True, augment=aug, seed=7)
    cpu = DeviceLoader(synth_data.train_images, synth_data.train_labels, 64, **kw)
    gpu = DeviceLoader(synth_data.train_images, synth_data.train_labels, 64, device="cuda", **kw)
    assert gpu.images.is_cuda and gpu.images.dtype == torch.uint8
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and torch.equal(yc, yg.cpu())
        assert torch.allclose(xc, xg.cpu(), atol=1e-3)


# ---------------------------------------------------------------- the real MNIST


def _real_dir() -> Path | None:
    for cand in (os.environ.get("MNISTJOBS_DATA_DIR"), REPO.parent / "shared" / "data" / "mnist"):
        if cand and Path(cand).is_dir() and any(Path(cand).glob("train-images-idx3-ubyte*")):
            return Path(cand)
    return None


@pytest.mark.realdata
def test_real_mnist():
    d = _real_dir()
    if d is None:
        pytest.skip("real MNIST not found (set MNISTJOBS_DATA_DIR or provide ../shared/data/mnist)")
    r = check_mnist(d)
    assert r["splits"]["train"]["count"] == 60000 and r["splits"]["test"]["count"] == 10000
    assert all(f["md5_ok"] for f in r["files"].values()), format_check_report(r)
    assert r["splits"]["train"]["histogram"][1] == 6742
    m = load_mnist(d, test_limit=1000)
    x = torch.cat([x for x, _ in DeviceLoader(m.train_images[:10000], m.train_labels[:10000], 1000)])
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02  # normalization stats
