"""One way to write a file atomically: a temporary file in the same folder, then a rename.

A crash mid-write never leaves a half-written file: readers see the old file or the new one.
Used for checkpoints (``mnistnets.checkpoints``), IDX files (``mnistnets.data.idx``), report
outputs and plots (``jobs.report``), and the state folder's record and token (``jobs.state``,
``jobs.services``).
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Union

Payload = Union[bytes, str, Callable[[BinaryIO], None]]


def write_atomic(path: str | os.PathLike, data: Payload, *, mode: int | None = None) -> Path:
    """Write ``data`` (bytes, text, or a function that writes to a binary file object) to ``path``.

    The folder must exist. ``mode``: the new file's permission bits (e.g. 0o600 for a secret);
    None keeps the mode of the file it replaces, or gives a new file what a plain
    ``open(path, "w")`` gives (0o666 less the umask). On any error the old file is untouched and
    no temporary file is left behind.
    """
    path = Path(path)
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            # 0o600 while it is written when the final mode is private; else the umask applies
            fd = os.open(tmp, flags, 0o600 if mode is not None and not mode & 0o077 else 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 random names all taken
        raise FileExistsError(f"no free temporary name next to {path}")
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.chmod(tmp, mode)
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
