"""MNIST data: IDX files (gzip or raw), validation, download, checks, synthetic digits, a device loader.

Reading: ``read_idx`` parses one IDX file and ``load_mnist`` finds and validates the four
standard files in a folder (also torchvision's ``<dir>/MNIST/raw`` layout). Every problem is a
``DataError`` whose message says which file, what is wrong, and how to fix it.

Where the data comes from: ``resolve_data_dir`` picks ``--data-dir`` > ``$MNISTJOBS_DATA_DIR`` >
``<home>/data/mnist`` (home = ``--home`` > ``$MNISTJOBS_HOME`` > ``./.mnistjobs``), downloading there
once with torchvision when needed.

Training: ``DeviceLoader`` keeps a whole split as one uint8 tensor on the device, serves batches
by index slices, normalizes with the MNIST mean/std and augments each batch with one batched
random affine warp (``affine_grid`` + ``grid_sample``). Shuffling and augmentation are a
deterministic function of ``(seed, epoch)``, so a run resumed from a checkpoint sees exactly the
batches an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import shutil
import socket
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "DataError",
    "read_idx",
    "write_idx",
    "MNIST",
    "load_mnist",
    "resolve_data_dir",
    "check_mnist",
    "format_check_report",
    "make_synthetic_mnist",
    "AugmentConfig",
    "DeviceLoader",
    "MNIST_MEAN",
    "MNIST_STD",
    "MNIST_FILES",
    "KNOWN_MD5",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# key -> standard file name (without .gz)
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# md5 of the decompressed files of the official MNIST (see shared/data/mnist/README.md)
KNOWN_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

_IDX_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_FIX_HINT = (
    "Point --data-dir or MNISTJOBS_DATA_DIR at a folder holding the four MNIST files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte; each raw or .gz), or leave both unset to download MNIST "
    "into the state folder."
)


class DataError(Exception):
    """A problem with the data: the message is one paragraph naming the file, the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# IDX files


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip (detected by content, not by name)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"{path.name}: file not found ({path}). {_FIX_HINT}"
        ) from None
    except OSError as e:
        raise DataError(
            f"{path.name}: cannot read {path} ({e.strerror or e}). Check the file's permissions, "
            f"or {_FIX_HINT[0].lower()}{_FIX_HINT[1:]}"
        ) from None
    if data[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path.name}: corrupt or truncated gzip file ({path}): {e}. The download was "
                f"probably interrupted or the file damaged: replace it with a fresh copy "
                f"(`gzip -t {path.name}` checks it), or {_FIX_HINT[0].lower()}{_FIX_HINT[1:]}"
            ) from None
    return data  # raw IDX (also when misnamed .gz: the content decides)


def _parse_idx(data: bytes, path: Path, ndim: int | None = None) -> torch.Tensor:
    """Parse IDX bytes into a uint8 tensor, validating the header and the payload size."""
    name = path.name
    gz = " (after decompression)" if _is_gzip_file(path) else ""
    replace = (
        f"Replace it with a fresh copy of the MNIST file, or {_FIX_HINT[0].lower()}{_FIX_HINT[1:]}"
    )
    if len(data) < 4:
        raise DataError(
            f"{name}: not an IDX file ({path}): it holds only {len(data)} bytes{gz}, fewer than "
            f"the 4-byte IDX magic number. {replace}"
        )
    magic = struct.unpack(">I", data[:4])[0]
    dims_n = data[3]
    expected_magic = (_IDX_UINT8 << 8) | ndim if ndim is not None else None
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UINT8 or dims_n == 0 or (
        expected_magic is not None and magic != expected_magic
    ):
        if expected_magic is not None:
            want = f"0x{expected_magic:08X} (uint8, {ndim} dimension{'s' if ndim != 1 else ''})"
        else:
            want = "0x000008NN (uint8 data, NN dimensions)"
        hint = ""
        if data[:5] in (b"<!DOC", b"<html", b"<HTML"):
            hint = " It looks like an HTML page (a failed download), not MNIST data."
        raise DataError(
            f"{name}: wrong IDX magic number in {path}: expected {want}, found 0x{magic:08X}{gz}."
            f"{hint} This is not the MNIST file its name says. {replace}"
        )
    header = 4 + 4 * dims_n
    if len(data) < header:
        raise DataError(
            f"{name}: truncated IDX header in {path}: {dims_n} dimensions need a {header}-byte "
            f"header but the file holds {len(data)} bytes{gz}. {replace}"
        )
    dims = struct.unpack(f">{dims_n}I", data[4:header])
    payload = math.prod(dims)
    expected, actual = header + payload, len(data)
    if actual != expected:
        what = "truncated" if actual < expected else f"has {actual - expected} trailing bytes"
        shape = "x".join(str(d) for d in dims)
        raise DataError(
            f"{name}: file {what} ({path}): its header says {shape} = {payload} bytes of data, so "
            f"the file should hold {expected} bytes{gz} but it holds {actual}. {replace}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": we clone right away
        flat = torch.frombuffer(data, dtype=torch.uint8, offset=header, count=payload) if payload else (
            torch.empty(0, dtype=torch.uint8)
        )
    return flat.clone().reshape(dims)


def _is_gzip_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == _GZIP_MAGIC
    except OSError:
        return False


def read_idx(path, ndim: int | None = None) -> torch.Tensor:
    """Read one IDX file of unsigned bytes (gzip or raw) into a uint8 tensor of its header's shape.

    Validates the magic number (0x00000801 for labels, 0x00000803 for images: data type 0x08,
    then the number of dimensions), the header, and that the data holds exactly the product of
    the dimensions (truncated or trailing bytes are errors). ``ndim`` (optional) requires that
    many dimensions. Every problem raises ``DataError`` naming the file.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path, ndim)


def write_idx(path, tensor) -> Path:
    """Write a uint8 tensor as an IDX file; gzip-compressed (reproducibly) when the name ends in .gz."""
    path = Path(path)
    t = torch.as_tensor(tensor)
    if t.dtype != torch.uint8:
        raise TypeError(f"write_idx writes uint8 tensors only, got {t.dtype}")
    if t.dim() < 1 or t.dim() > 255:
        raise ValueError(f"write_idx needs 1 to 255 dimensions, got {t.dim()}")
    header = struct.pack(f">I{t.dim()}I", (_IDX_UINT8 << 8) | t.dim(), *t.shape)
    body = t.detach().cpu().contiguous().numpy().tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz:
                gz.write(header)
                gz.write(body)
        else:
            f.write(header)
            f.write(body)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# The four MNIST files


@dataclass
class MNIST:
    """MNIST in memory: uint8 images [N,28,28] and int64 labels [N] per split, CPU tensors."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: Path | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        return (
            f"MNIST(train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"source={str(self.source) if self.source else None!r})"
        )


def _candidate_dirs(data_dir: Path) -> list[Path]:
    return [data_dir, data_dir / "MNIST" / "raw", data_dir / "raw"]


def _find_file(data_dir: Path, base: str) -> Path | None:
    for folder in _candidate_dirs(data_dir):
        for name in (base, base + ".gz"):  # raw first: no decompression
            p = folder / name
            if p.is_file():
                return p
    return None


def _locate(data_dir) -> dict[str, Path]:
    """Paths of the four files, or DataError naming what is missing and where we looked."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise DataError(
            f"MNIST data folder {data_dir} does not exist. {_FIX_HINT}"
        )
    if not data_dir.is_dir():
        raise DataError(
            f"MNIST data folder {data_dir} is not a folder. {_FIX_HINT}"
        )
    found, missing = {}, []
    for key, base in MNIST_FILES.items():
        p = _find_file(data_dir, base)
        if p is None:
            missing.append(base)
        else:
            found[key] = p
    if missing:
        names = ", ".join(f"{m} (or {m}.gz)" for m in missing)
        raise DataError(
            f"MNIST file{'s' if len(missing) > 1 else ''} missing: {names} not found in {data_dir} "
            f"(also looked in {data_dir / 'MNIST' / 'raw'}). {_FIX_HINT}"
        )
    return found


def _load_file(path: Path, ndim: int) -> tuple[torch.Tensor, bytes]:
    data = _read_bytes(path)
    t = _parse_idx(data, path, ndim)
    if ndim == 3 and tuple(t.shape[1:]) != (28, 28):
        raise DataError(
            f"{path.name}: images are {t.shape[1]}x{t.shape[2]} pixels in {path}, MNIST's are 28x28. "
            f"This is not an MNIST image file. {_FIX_HINT}"
        )
    return t, data


def _check_labels(labels: torch.Tensor, path: Path) -> None:
    bad = (labels > 9).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise DataError(
            f"{path.name}: label {int(labels[i])} at index {i} in {path} is outside 0..9 "
            f"({len(bad)} bad label{'s' if len(bad) > 1 else ''} in all). The file is damaged or "
            f"not an MNIST label file: replace it with a fresh copy, or "
            f"{_FIX_HINT[0].lower()}{_FIX_HINT[1:]}"
        )


def _check_counts(images: torch.Tensor, labels: torch.Tensor, ip: Path, lp: Path) -> None:
    if len(images) != len(labels):
        raise DataError(
            f"{ip.name} holds {len(images)} images but {lp.name} holds {len(labels)} labels "
            f"(in {ip.parent}): the counts must match. One of the two files is from a different "
            f"set or damaged: replace both with fresh copies, or {_FIX_HINT[0].lower()}{_FIX_HINT[1:]}"
        )


def _limit(t: torch.Tensor, limit: int | None, what: str) -> torch.Tensor:
    if limit is None:
        return t
    if isinstance(limit, bool) or int(limit) != limit or limit < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {limit!r}")
    return t[: int(limit)].clone() if limit < len(t) else t


def load_mnist(data_dir, train_limit: int | None = None, test_limit: int | None = None) -> MNIST:
    """Load and validate MNIST from a folder of the four IDX files (.gz or raw).

    Also accepts torchvision's layout (``<data_dir>/MNIST/raw``). Checks: every file present,
    magic numbers, sizes, 28x28 images, labels in 0..9, as many images as labels per split.
    ``train_limit``/``test_limit`` keep the first N of each split. Problems raise ``DataError``.
    """
    paths = _locate(data_dir)
    t = {}
    for key, p in paths.items():
        t[key], _ = _load_file(p, 3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        ip, lp = paths[f"{split}_images"], paths[f"{split}_labels"]
        _check_labels(t[f"{split}_labels"], lp)
        _check_counts(t[f"{split}_images"], t[f"{split}_labels"], ip, lp)
    return MNIST(
        train_images=_limit(t["train_images"], train_limit, "train_limit"),
        train_labels=_limit(t["train_labels"], train_limit, "train_limit").long(),
        test_images=_limit(t["test_images"], test_limit, "test_limit"),
        test_labels=_limit(t["test_labels"], test_limit, "test_limit").long(),
        source=Path(data_dir).expanduser(),
    )


# ----------------------------------------------------------------------------------------------
# Where the data lives; download


def _has_files(folder: Path) -> bool:
    """True when the four files are directly in ``folder`` or torchvision's extracted raw files are
    in ``folder/MNIST/raw`` (torchvision extracts only after the md5 check, so those are complete)."""
    if all((folder / b).is_file() or (folder / (b + ".gz")).is_file() for b in MNIST_FILES.values()):
        return True
    raw = folder / "MNIST" / "raw"
    return all((raw / b).is_file() for b in MNIST_FILES.values())


@contextlib.contextmanager
def _download_lock(folder: Path):
    """An exclusive lock, so that parallel workers sharing a state folder download only once."""
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


def resolve_data_dir(data_dir=None, home=None, download: bool = True) -> Path:
    """The folder to read MNIST from: ``data_dir`` > ``$MNISTJOBS_DATA_DIR`` > ``<home>/data/mnist``.

    ``home`` defaults to ``$MNISTJOBS_HOME`` or ``./.mnistjobs``. A given folder (argument or
    variable) is returned as is once it exists (``load_mnist`` checks its files). The state folder
    is filled once with torchvision's download when it lacks the files and ``download`` is true;
    when that fails (offline), ``DataError`` says how to point at a local copy.
    """
    for value, origin in ((data_dir, "--data-dir"), (os.environ.get("MNISTJOBS_DATA_DIR"), "MNISTJOBS_DATA_DIR")):
        if value is None or str(value) == "":
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"MNIST data folder {folder} (from {origin}) does "
                f"{'not exist' if not folder.exists() else 'not name a folder'}. Point {origin} at "
                f"a folder holding the four MNIST IDX files (train-images-idx3-ubyte, "
                f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; raw or "
                f".gz), or unset it to download MNIST into the state folder."
            )
        return folder

    home = Path(home or os.environ.get("MNISTJOBS_HOME") or "./.mnistjobs").expanduser()
    folder = home / "data" / "mnist"
    if _has_files(folder):
        return folder
    if not download:
        raise DataError(
            f"No MNIST in {folder} and downloading is off. Set MNISTJOBS_DATA_DIR or --data-dir "
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
            f"MNISTJOBS_HOME (or --home) to a writable folder, or set MNISTJOBS_DATA_DIR or "
            f"--data-dir to a local copy of MNIST."
        ) from None
    with _download_lock(folder):
        if _has_files(folder):  # another worker finished it while we waited
            return folder
        try:
            _torchvision_download(folder)
        except Exception as e:  # URLError, socket errors, torchvision's RuntimeError, md5 mismatch
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            else:
                shutil.rmtree(folder / "MNIST", ignore_errors=True)  # torchvision's partial download
            reason = " ".join(str(e).split())
            if len(reason) > 300:
                reason = reason[:297] + "..."
            raise DataError(
                f"Could not download MNIST into {folder} (offline?): {type(e).__name__}: {reason}. "
                f"Set MNISTJOBS_DATA_DIR or --data-dir to a local copy of MNIST (a folder holding "
                f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                f"t10k-labels-idx1-ubyte, raw or .gz), or put those files into {folder}."
            ) from None
    if not _has_files(folder):  # pragma: no cover - torchvision reported success without files
        raise DataError(
            f"The MNIST download into {folder} finished but the files are not there. Set "
            f"MNISTJOBS_DATA_DIR or --data-dir to a local copy of MNIST."
        )
    return folder


# ----------------------------------------------------------------------------------------------
# Checks for `mnistjobs data`


def check_mnist(data_dir) -> dict:
    """Validate a folder and describe it: per file path, count, shape, md5 of the decompressed
    content and whether it is the official one; per split the class histogram.

    Returns ``{"data_dir", "files": {base name: {...}}, "splits": {"train"|"test": {...}},
    "official": bool}``. Problems raise ``DataError`` as in ``load_mnist``.
    """
    paths = _locate(data_dir)
    files, tensors = {}, {}
    for key, p in paths.items():
        base = MNIST_FILES[key]
        t, raw = _load_file(p, 3 if key.endswith("images") else 1)
        tensors[key] = t
        md5 = hashlib.md5(raw).hexdigest()
        files[base] = {
            "key": key,
            "path": str(p),
            "compressed": _is_gzip_file(p),
            "count": int(t.shape[0]),
            "shape": list(t.shape),
            "md5": md5,
            "known_md5": KNOWN_MD5[base],
            "md5_ok": md5 == KNOWN_MD5[base],
        }
    splits = {}
    for split in ("train", "test"):
        ip, lp = paths[f"{split}_images"], paths[f"{split}_labels"]
        labels = tensors[f"{split}_labels"]
        _check_labels(labels, lp)
        _check_counts(tensors[f"{split}_images"], labels, ip, lp)
        splits[split] = {
            "count": int(len(labels)),
            "histogram": [int(c) for c in torch.bincount(labels.long(), minlength=10)[:10]],
        }
    return {
        "data_dir": str(Path(data_dir).expanduser()),
        "files": files,
        "splits": splits,
        "official": all(f["md5_ok"] for f in files.values()),
    }


def format_check_report(report: dict) -> str:
    """A small readable table of ``check_mnist``'s result, for the CLI."""
    lines = [f"MNIST in {report['data_dir']}", ""]
    rows = [("file", "items", "shape", "md5 (decompressed)", "official")]
    for base, f in report["files"].items():
        name = Path(f["path"]).name
        rows.append((name, f"{f['count']:,}", "x".join(map(str, f["shape"])), f["md5"],
                     "yes" if f["md5_ok"] else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    align = ["<", ">", "<", "<", "<"]
    for j, r in enumerate(rows):
        lines.append("  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    hist_rows = [("split",) + tuple(str(d) for d in range(10)) + ("total",)]
    for split, s in report["splits"].items():
        hist_rows.append((split,) + tuple(f"{c:,}" for c in s["histogram"]) + (f"{s['count']:,}",))
    hw = [max(len(r[i]) for r in hist_rows) for i in range(len(hist_rows[0]))]
    lines.append("class histogram")
    for r in hist_rows:
        lines.append("  ".join(f"{c:{'<' if i == 0 else '>'}{w}}" for i, (c, w) in enumerate(zip(r, hw))))
    lines.append("")
    if report["official"]:
        lines.append("All four files match the official MNIST digests.")
    else:
        bad = [b for b, f in report["files"].items() if not f["md5_ok"]]
        lines.append(
            "Not the official MNIST: " + ", ".join(bad) + " differ from the known digests "
            "(fine for synthetic or modified data)."
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Synthetic digits for tests

# Seven-segment glyphs in a 10x16 box centred on 0: segment -> (x0, y0, x1, y1); y grows downward.
_SEGMENTS = {
    "a": (-5, -8, 5, -8), "b": (5, -8, 5, 0), "c": (5, 0, 5, 8), "d": (-5, 8, 5, 8),
    "e": (-5, 0, -5, 8), "f": (-5, -8, -5, 0), "g": (-5, 0, 5, 0),
}
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def _render_synthetic(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Seven-segment digits with a class-specific blob, random shift/scale/slant/width, and noise."""
    n = len(labels)
    seg = torch.tensor(list(_SEGMENTS.values()), dtype=torch.float32)  # [7,4]
    names = list(_SEGMENTS)
    on = torch.zeros(10, 7, dtype=torch.bool)
    for d, segs in enumerate(_DIGIT_SEGMENTS):
        for s in segs:
            on[d, names.index(s)] = True
    # a small dot whose place on a ring around the glyph's centre tells the class, as a second cue
    ang = torch.arange(10, dtype=torch.float32) * (2 * math.pi / 10)
    dots = torch.stack([3.0 * torch.cos(ang), 3.0 * torch.sin(ang) * 1.3], 1)  # [10,2], inside the box

    r = torch.rand(n, 6, generator=gen)
    shift = (r[:, 0:2] - 0.5) * 4.0  # +-2 px
    scale = 0.95 + 0.1 * r[:, 2:3]
    slant = (r[:, 3:4] - 0.5) * 0.2  # italic shear
    width = 1.5 + 0.3 * r[:, 4:5]  # stroke half-width in px
    bright = 180.0 + 75.0 * r[:, 5:6]

    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    px, py = xs.reshape(1, -1) - 13.5, ys.reshape(1, -1) - 13.5  # [1,784], centred
    out = torch.empty(n, 784)
    for start in range(0, n, 1024):  # chunks bound the memory for big n
        sl = slice(start, start + 1024)
        # pixel -> glyph coordinates (inverse of scale, slant, shift)
        gy = (py - shift[sl, 1:2]) / scale[sl]
        gx = (px - shift[sl, 0:1]) / scale[sl] + slant[sl] * gy
        gx, gy = gx.unsqueeze(1), gy.unsqueeze(1)  # [b,1,784]
        x0, y0, x1, y1 = (seg[:, i].view(1, 7, 1) for i in range(4))
        dx, dy = x1 - x0, y1 - y0
        t = (((gx - x0) * dx + (gy - y0) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
        dist = torch.hypot(gx - (x0 + t * dx), gy - (y0 + t * dy))  # [b,7,784]
        dist = dist.masked_fill(~on[labels[sl]].unsqueeze(2), 1e3).amin(1)  # [b,784]
        dot = dots[labels[sl]]  # [b,2]
        ddist = torch.hypot(gx[:, 0] - dot[:, 0:1], gy[:, 0] - dot[:, 1:2]) - 0.6
        dist = torch.minimum(dist, ddist)
        ink = ((width[sl] - dist) / 1.0 + 0.5).clamp(0, 1)  # anti-aliased edge
        out[sl] = ink * bright[sl]
    noise = torch.randn(n, 784, generator=gen) * 12.0
    img = (out + noise * (out > 0)).clamp(0, 255).round().to(torch.uint8)
    return img.reshape(n, 28, 28)


def make_synthetic_mnist(folder, n_train: int = 512, n_test: int = 256, seed: int = 0, gz: bool = True) -> Path:
    """Write the four MNIST IDX files of a small learnable fake MNIST into ``folder``; return it.

    Each class is a seven-segment rendering of its digit (randomly shifted, scaled, slanted and
    thickened, with noise on the strokes) plus a dot at a class-specific place: a tiny CNN gets
    far above chance in an epoch or two. Classes are balanced; the files are byte-identical for a
    given seed (gzip with a fixed mtime).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(int(seed))
    for split, n in (("train", n_train), ("test", n_test)):
        if n < 1:
            raise ValueError(f"n_{split} must be >= 1, got {n}")
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=gen)]
        images = _render_synthetic(labels, gen)
        for kind, t in (("images", images), ("labels", labels.to(torch.uint8))):
            base = MNIST_FILES[f"{split}_{kind}"]
            name, other = (base + ".gz", base) if gz else (base, base + ".gz")
            (folder / other).unlink(missing_ok=True)  # no stale twin in the other format
            write_idx(folder / name, t)
    return folder


# ----------------------------------------------------------------------------------------------
# Augmentation and the device loader


@dataclass
class AugmentConfig:
    """Random affine augmentation, drawn per image. 0 disables a kind.

    rotation: max degrees (uniform in [-r, r]); translate: max shift as a fraction of the image
    side (per axis); scale: max relative zoom (factor in [1-s, 1+s]); shear: max x-shear degrees.
    """

    rotation: float = 0.0
    translate: float = 0.0
    scale: float = 0.0
    shear: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rotation", "translate", "scale", "shear"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"AugmentConfig.{name} must be a number >= 0, got {v!r}")
        if self.translate >= 1:
            raise ValueError(f"AugmentConfig.translate is a fraction of the image side (< 1), got {self.translate}")
        if self.scale >= 1:
            raise ValueError(f"AugmentConfig.scale is a fraction (< 1), got {self.scale}")
        if self.shear >= 90:
            raise ValueError(f"AugmentConfig.shear must be < 90 degrees, got {self.shear}")

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in (self.rotation, self.translate, self.scale, self.shear))

    def thetas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random inverse affine matrices [n,2,3] for ``F.affine_grid`` (CPU, float32).

        The forward warp is translate . rotate . shear . scale about the image centre; affine_grid
        wants the map from output to input coordinates, i.e. its inverse. Normalized coordinates
        of a square image are isotropic, so degrees mean degrees.
        """
        u = torch.rand(n, 5, generator=generator, dtype=torch.float64) * 2 - 1  # U(-1, 1)
        rot = torch.deg2rad(u[:, 0] * self.rotation)
        shear = torch.tan(torch.deg2rad(u[:, 1] * self.shear))
        s = 1 + u[:, 2] * self.scale
        tx, ty = u[:, 3] * self.translate * 2, u[:, 4] * self.translate * 2  # normalized range is 2
        cos, sin = torch.cos(rot), torch.sin(rot)
        # forward A = R @ Sh @ S, Sh = [[1, shear], [0, 1]], S = s*I
        a11, a12 = cos * s, (cos * shear - sin) * s
        a21, a22 = sin * s, (sin * shear + cos) * s
        det = a11 * a22 - a12 * a21
        i11, i12, i21, i22 = a22 / det, -a12 / det, -a21 / det, a11 / det
        theta = torch.stack([
            torch.stack([i11, i12, -(i11 * tx + i12 * ty)], 1),
            torch.stack([i21, i22, -(i21 * tx + i22 * ty)], 1),
        ], 1)
        return theta.float()


def _mix_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed from (seed, epoch) (splitmix64 finalizer), so nearby pairs are unrelated."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 1


class DeviceLoader:
    """Batches of one split held as a single uint8 tensor on ``device``.

    Yields ``(x, y)``: x float32 [B,1,28,28] normalized ((x/255 - 0.1307)/0.3081), y int64 [B].
    ``shuffle`` draws a permutation per epoch; ``augment`` (an ``AugmentConfig``) warps each batch
    with one random affine per image (bilinear, zero padding in raw-pixel space, before the
    normalization). Both come from a private CPU generator seeded from ``(seed, epoch)``:
    ``set_epoch(e)`` selects the epoch; without it each pass takes the next epoch number.
    """

    def __init__(self, images_uint8, labels, batch_size: int, *, device="cpu", shuffle: bool = False,
                 augment: AugmentConfig | None = None, drop_last: bool = False, seed: int = 0):
        images = torch.as_tensor(images_uint8)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceLoader wants uint8 images, got {images.dtype}")
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"DeviceLoader wants images [N,28,28] or [N,1,28,28], got {list(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"{len(images)} images but labels of shape {list(labels.shape)}")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment must be an AugmentConfig or None, got {type(augment).__name__}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, dtype=torch.long)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = augment if augment is not None and augment.enabled else None
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = 0
        self._scale = 1.0 / (255.0 * MNIST_STD)
        self._shift = MNIST_MEAN / MNIST_STD

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s order and augmentation (reproducibly)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1  # a later pass without set_epoch gets the next epoch
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        n, b = self.num_samples, self.batch_size
        stop = (n // b) * b if self.drop_last else n
        order = torch.randperm(n, generator=gen).to(self.device) if self.shuffle else None
        thetas = self.augment.thetas(n, gen).to(self.device) if self.augment is not None else None
        return self._batches(order, thetas, stop)

    def _batches(self, order, thetas, stop):
        b = self.batch_size
        for i in range(0, stop, b):
            if order is None:
                x, y = self.images[i:i + b], self.labels[i:i + b]
            else:
                idx = order[i:i + b]
                x, y = self.images[idx], self.labels[idx]
            x = x.float()
            if thetas is not None:
                theta = thetas[i:i + b]
                grid = F.affine_grid(theta, list(x.shape), align_corners=False)
                x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            yield x.mul_(self._scale).sub_(self._shift), y

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(n={self.num_samples}, batch_size={self.batch_size}, device={self.device}, "
            f"shuffle={self.shuffle}, augment={self.augment}, drop_last={self.drop_last}, seed={self.seed})"
        )
