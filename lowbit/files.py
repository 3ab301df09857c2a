"""Atomic file writes: a crash, a SIGKILL or a full disk leaves the old file or the new one, never
a torn one.

The data goes to a temporary file in the destination's folder (same file system, so the rename is
atomic), is flushed and fsync'ed, and ``os.replace`` puts it in place. The temporary file is created
with mode 0666 & ~umask like any ``open(path, "w")`` (``tempfile.mkstemp`` would make it 0600).

A process killed between creating the temporary file and the rename leaves it behind; the next
write to the same destination removes such leftovers whose writer is no longer alive (the pid is
part of the name). Errors name the destination, never the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clean_stale(path: Path) -> None:
    """Remove ``.<name>.<pid>.<hex>.tmp`` files next to ``path`` left by a writer that died."""
    prefix = f".{path.name}."
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)


def _user_error(exc: OSError, path: Path) -> OSError:
    """The same error, naming the destination the user gave instead of the temporary file."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kw: Any) -> Iterator[IO[Any]]:
    """``with atomic_open(path, "w") as f: ...`` writes ``path`` atomically on a clean exit;
    on an exception the temporary file is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    _clean_stale(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _user_error(exc, path) from None
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:  # a full disk shows here
                raise _user_error(exc, path) from None
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _user_error(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
