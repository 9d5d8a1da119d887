"""Read one file from the export folder, never anything outside it.

The export folder is written by another system, and a link in it can point
anywhere (``shadow.jpeg -> /etc/shadow``). A file is read only when its real
path lies inside the export folder (or the archive folder), it is a regular
file (a FIFO would block the daemon forever), and it fits the size limit. The
checks are made on the opened descriptor, so a link swapped in between the
check and the read cannot slip through.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .preprocess import ImageDecodeError
from .store import FileSig
from .vocab import Reason


@dataclass
class FileRead:
    data: bytes
    sig: FileSig


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, r]) == r for r in roots)


def file_sig(st: os.stat_result) -> FileSig:
    return FileSig(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def lstat_sig(path: Path) -> FileSig | None:
    """The file's signature without following a link at the end; None when it is gone."""
    try:
        return file_sig(path.lstat())
    except OSError:
        return None


def read_export_file(path: Path, roots: Sequence[Path], max_bytes: int, label: str) -> FileRead:
    """The bytes of ``path``, or :class:`ImageDecodeError` with the reason it cannot be read.

    ``roots`` are the folders the real path must lie in; ``label`` names the
    file in messages (already made printable by the caller).
    """
    real_roots = [os.path.realpath(r) for r in roots]
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        raise ImageDecodeError(Reason.NOT_FOUND, f"{label}: no such file (or a link to nothing)") from None
    except (OSError, RuntimeError) as exc:  # ELOOP, ENOTDIR (link to /etc/passwd/x), EACCES on a parent
        if isinstance(exc, PermissionError):
            raise ImageDecodeError(Reason.PERMISSION_DENIED, f"{label}: permission denied") from None
        why = os.strerror(exc.errno) if getattr(exc, "errno", None) else str(exc)
        raise ImageDecodeError(Reason.UNREADABLE, f"{label}: cannot resolve the path ({why})") from None
    if not _inside(real, real_roots):
        raise ImageDecodeError(
            Reason.OUTSIDE_FOLDER,
            f"{label}: a link to a file outside the export folder; not read",
        )
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the
        # resolved path must not have become a link since.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageDecodeError(Reason.NOT_FOUND, f"{label}: no such file") from None
    except PermissionError:
        raise ImageDecodeError(Reason.PERMISSION_DENIED,
                               f"{label}: permission denied (the daemon's user needs read access)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageDecodeError(Reason.OUTSIDE_FOLDER, f"{label}: replaced by a link while reading") from None
        raise ImageDecodeError(Reason.UNREADABLE, f"{label}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(Reason.NOT_A_FILE, f"{label}: not a regular file (a FIFO, socket or device)")
        if st.st_size > max_bytes:
            raise ImageDecodeError(
                Reason.TOO_LARGE,
                f"{label}: {st.st_size / 1e6:.1f} MB exceeds watch.max_file_mb = {max_bytes / 1048576:g}",
            )
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while we read
                raise ImageDecodeError(Reason.TOO_LARGE, f"{label}: grew over watch.max_file_mb while being read")
            chunks.append(chunk)
        return FileRead(b"".join(chunks), file_sig(st))
    except OSError as exc:
        raise ImageDecodeError(Reason.UNREADABLE, f"{label}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
