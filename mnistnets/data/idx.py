"""The four MNIST IDX files: the codec (gzip or raw), the checks, ``load_mnist`` and ``check_mnist``.

``read_idx`` parses one IDX file and ``load_mnist`` finds and validates the four standard files
in a folder (also torchvision's ``<dir>/MNIST/raw`` layout). Every problem is a ``DataError``
whose message names the file and says what is wrong with it and how to repair the file; which
option or variable points at another folder is the caller's to add (``jobs.datadir``).
"""
from __future__ import annotations

import gzip
import hashlib
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..files import write_atomic

if TYPE_CHECKING:
    import torch

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
_REPLACE = "Replace it with a fresh copy of the MNIST file."


class DataError(Exception):
    """A problem with the data: the message is one paragraph naming the file and the problem."""


# ----------------------------------------------------------------------------------------------
# IDX files


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip (detected by content, not by name)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path.name}: file not found ({path}).") from None
    except OSError as e:
        raise DataError(
            f"{path.name}: cannot read {path} ({e.strerror or e}). Check the file's permissions."
        ) from None
    if data[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path.name}: corrupt or truncated gzip file ({path}): {e}. The download was "
                f"probably interrupted or the file damaged: replace it with a fresh copy "
                f"(`gzip -t {path.name}` checks it)."
            ) from None
    return data  # raw IDX (also when misnamed .gz: the content decides)


def _check_magic(data: bytes, path: Path, ndim: int | None, gz: str) -> None:
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
            f"{path.name}: wrong IDX magic number in {path}: expected {want}, found 0x{magic:08X}{gz}."
            f"{hint} This is not the MNIST file its name says. {_REPLACE}"
        )


def _parse_idx(data: bytes, path: Path, ndim: int | None = None) -> torch.Tensor:
    """Parse IDX bytes into a uint8 tensor, validating the header and the payload size."""
    import torch  # here, not at the top: finding the files (locate_mnist) needs no torch

    name = path.name
    gz = " (after decompression)" if _is_gzip_file(path) else ""
    if len(data) < 4:
        raise DataError(
            f"{name}: not an IDX file ({path}): it holds only {len(data)} bytes{gz}, fewer than "
            f"the 4-byte IDX magic number. {_REPLACE}"
        )
    _check_magic(data, path, ndim, gz)
    dims_n = data[3]
    header = 4 + 4 * dims_n
    if len(data) < header:
        raise DataError(
            f"{name}: truncated IDX header in {path}: {dims_n} dimensions need a {header}-byte "
            f"header but the file holds {len(data)} bytes{gz}. {_REPLACE}"
        )
    dims = struct.unpack(f">{dims_n}I", data[4:header])
    payload = math.prod(dims)
    expected, actual = header + payload, len(data)
    if actual != expected:
        what = "truncated" if actual < expected else f"has {actual - expected} trailing bytes"
        shape = "x".join(str(d) for d in dims)
        raise DataError(
            f"{name}: file {what} ({path}): its header says {shape} = {payload} bytes of data, so "
            f"the file should hold {expected} bytes{gz} but it holds {actual}. {_REPLACE}"
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
    """Write a uint8 tensor as an IDX file (atomically); gzip-compressed (reproducibly) when the
    name ends in .gz."""
    import torch

    path = Path(path)
    t = torch.as_tensor(tensor)
    if t.dtype != torch.uint8:
        raise TypeError(f"write_idx writes uint8 tensors only, got {t.dtype}")
    if t.dim() < 1 or t.dim() > 255:
        raise ValueError(f"write_idx needs 1 to 255 dimensions, got {t.dim()}")
    header = struct.pack(f">I{t.dim()}I", (_IDX_UINT8 << 8) | t.dim(), *t.shape)
    body = t.detach().cpu().contiguous().numpy().tobytes()

    def write(f) -> None:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz:
                gz.write(header)
                gz.write(body)
        else:
            f.write(header)
            f.write(body)

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, write)


# ----------------------------------------------------------------------------------------------
# The four MNIST files


def _limit(t: torch.Tensor, limit: int | None, what: str) -> torch.Tensor:
    """The first ``limit`` items of ``t`` (a copy, so the rest can be freed); all for None."""
    if limit is None:
        return t
    if isinstance(limit, bool) or int(limit) != limit or limit < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {limit!r}")
    return t[: int(limit)].clone() if limit < len(t) else t


@dataclass
class MNIST:
    """MNIST in memory: uint8 images [N,28,28] and int64 labels [N] per split, CPU tensors."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: Path | None = field(default=None, compare=False)

    def limit(self, train_limit: int | None = None, test_limit: int | None = None) -> "MNIST":
        """The first ``train_limit`` training and ``test_limit`` test items (None: all)."""
        return MNIST(
            train_images=_limit(self.train_images, train_limit, "train_limit"),
            train_labels=_limit(self.train_labels, train_limit, "train_limit"),
            test_images=_limit(self.test_images, test_limit, "test_limit"),
            test_labels=_limit(self.test_labels, test_limit, "test_limit"),
            source=self.source,
        )

    def __repr__(self) -> str:
        return (
            f"MNIST(train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"source={str(self.source) if self.source else None!r})"
        )


def _find_file(data_dir: Path, base: str) -> Path | None:
    for folder in (data_dir, data_dir / "MNIST" / "raw", data_dir / "raw"):
        for name in (base, base + ".gz"):  # raw first: no decompression
            p = folder / name
            if p.is_file():
                return p
    return None


def _locate(data_dir) -> dict[str, Path]:
    """Paths of the four files, or DataError naming what is missing and where we looked."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise DataError(f"MNIST data folder {data_dir} does not exist.")
    if not data_dir.is_dir():
        raise DataError(f"MNIST data folder {data_dir} is not a folder.")
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
            f"(also looked in {data_dir / 'MNIST' / 'raw'})."
        )
    return found


def locate_mnist(data_dir) -> dict[str, Path]:
    """The paths of the four files in ``data_dir`` (or its torchvision layout), found without
    reading them (no torch): a DataError names what is missing and where it looked. ``load_mnist``
    and ``check_mnist`` read and check the files themselves."""
    return _locate(data_dir)


def _load_file(path: Path, ndim: int) -> tuple[torch.Tensor, bytes]:
    data = _read_bytes(path)
    t = _parse_idx(data, path, ndim)
    if ndim == 3 and tuple(t.shape[1:]) != (28, 28):
        raise DataError(
            f"{path.name}: images are {t.shape[1]}x{t.shape[2]} pixels in {path}, MNIST's are 28x28. "
            f"This is not an MNIST image file."
        )
    return t, data


def _check_split(images: torch.Tensor, labels: torch.Tensor, ip: Path, lp: Path) -> None:
    """Labels in 0..9 and as many labels as images."""
    bad = (labels > 9).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise DataError(
            f"{lp.name}: label {int(labels[i])} at index {i} in {lp} is outside 0..9 "
            f"({len(bad)} bad label{'s' if len(bad) > 1 else ''} in all). The file is damaged or "
            f"not an MNIST label file: replace it with a fresh copy."
        )
    if len(images) != len(labels):
        raise DataError(
            f"{ip.name} holds {len(images)} images but {lp.name} holds {len(labels)} labels "
            f"(in {ip.parent}): the counts must match. One of the two files is from a different "
            f"set or damaged: replace both with fresh copies."
        )


def _load_checked(data_dir) -> tuple[dict[str, Path], dict[str, tuple[torch.Tensor, bytes]]]:
    """The four files' paths and (tensor, file bytes), every check passed."""
    paths = _locate(data_dir)
    loaded = {key: _load_file(p, 3 if key.endswith("images") else 1) for key, p in paths.items()}
    for split in ("train", "test"):
        _check_split(loaded[f"{split}_images"][0], loaded[f"{split}_labels"][0],
                     paths[f"{split}_images"], paths[f"{split}_labels"])
    return paths, loaded


def load_mnist(data_dir, train_limit: int | None = None, test_limit: int | None = None) -> MNIST:
    """Load and validate MNIST from a folder of the four IDX files (.gz or raw).

    Also accepts torchvision's layout (``<data_dir>/MNIST/raw``). Checks: every file present,
    magic numbers, sizes, 28x28 images, labels in 0..9, as many images as labels per split.
    ``train_limit``/``test_limit`` keep the first N of each split. Problems raise ``DataError``.
    """
    _, loaded = _load_checked(data_dir)
    t = {key: tensor for key, (tensor, _) in loaded.items()}
    full = MNIST(t["train_images"], t["train_labels"], t["test_images"], t["test_labels"],
                 source=Path(data_dir).expanduser())
    data = full.limit(train_limit, test_limit)
    data.train_labels, data.test_labels = data.train_labels.long(), data.test_labels.long()
    return data


def check_mnist(data_dir) -> dict:
    """Validate a folder and describe it: per file path, count, shape, md5 of the decompressed
    content and whether it is the official one; per split the class histogram.

    Returns ``{"data_dir", "files": {base name: {...}}, "splits": {"train"|"test": {...}},
    "official": bool}``. Problems raise ``DataError`` as in ``load_mnist``.
    """
    paths, loaded = _load_checked(data_dir)
    files = {}
    for key, p in paths.items():
        base = MNIST_FILES[key]
        t, raw = loaded[key]
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
    import torch

    splits = {}
    for split in ("train", "test"):
        labels = loaded[f"{split}_labels"][0]
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
