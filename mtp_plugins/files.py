"""Result and record files that a crash at any moment leaves whole: a replaced file is the old one or
the new one, never half of either; an appended line is written by one system call."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# The process umask, read once (reading it means setting it): a replaced file gets the permissions
# that open() would give it, not mkstemp's owner-only 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """A file object (``mode`` "w" for text, "wb" for bytes) whose content replaces ``path`` when the
    block ends without an error: written to a hidden temporary file beside it, flushed to disk, then
    renamed over it. On an error, or a kill at any moment, ``path`` keeps its previous content (or
    stays absent); the temporary file is removed on an error and is a hidden ``.NAME.*.partial`` file
    after a kill."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (UTF-8 for text) through ``atomic_writer``."""
    with atomic_writer(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append ``line`` and a newline to ``path`` with one ``write(2)`` on an ``O_APPEND`` descriptor
    (no user-space buffer that a kill could flush in pieces), creating the file if needed."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # less the umask, as open() does
    try:
        while data:  # a regular file takes it in one call unless the disk fills up
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
