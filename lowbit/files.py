"""Atomic file writes: a crash, a SIGKILL or a full disk leaves the old file or the new one, never
a torn one.

The data goes to a temporary file in the destination's folder (same file system, so the rename is
atomic), is flushed and fsync'ed, and ``os.replace`` puts it in place. The temporary file is created
with mode 0666 & ~umask like any ``open(path, "w")`` (``tempfile.mkstemp`` would make it 0600).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kw: Any) -> Iterator[IO[Any]]:
    """``with atomic_open(path, "w") as f: ...`` writes ``path`` atomically on a clean exit;
    on an exception the temporary file is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
