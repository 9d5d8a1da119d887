"""File access, one place: a file's signature, and reading it with a reason code when it cannot be read.

Read one file from the export folder, never anything outside it.

The export folder is written by another system, and a link in it can point
anywhere (``shadow.jpeg -> /etc/shadow``). A file is read only when its real
path lies inside the export folder (or the archive folder), it is a regular
file (a FIFO would block the daemon forever), and it fits the size limit. The
real path is checked again on the opened descriptor (``/proc/self/fd``), so a
link or folder swapped in between the check and the open cannot slip through.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .preprocess import ImageDecodeError
from .store import UNSTATABLE, FileSig
from .vocab import Reason


@dataclass
class FileRead:
    data: bytes
    sig: FileSig


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, r]) == r for r in roots)


def file_sig(path: Path) -> FileSig | None:
    """The file's signature (of the link itself when it leads nowhere or loops); None when it is gone.

    The watcher, the journal's rules and the reader all judge a version of a
    file by this one signature. A file that is there but cannot be looked at (a
    path longer than PATH_MAX) gets an impossible signature, so it is read (and
    refused with its reason) instead of disappearing without a word.
    """
    try:
        return FileSig.of(path.stat())
    except OSError:
        pass
    try:
        return FileSig.of(path.lstat())
    except FileNotFoundError:
        return None
    except OSError:
        return UNSTATABLE


def read_file(path: Path) -> bytes:
    """A file named on the command line (``score``, ``explain``, the self-test): its bytes, or
    :class:`ImageDecodeError` with the reason it cannot be read. The export folder's files go through
    :func:`read_export_file` instead, which also keeps links from leading outside it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(Reason.NOT_FOUND, f"{path}: no such file") from None
    except PermissionError:
        raise ImageDecodeError(Reason.PERMISSION_DENIED, f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError(Reason.NOT_A_FILE, f"{path}: is a folder") from None
    if not data:
        raise ImageDecodeError(Reason.EMPTY_FILE, f"{path}: empty file (0 bytes)")
    return data


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is, for the error message; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _descriptor_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the checks before the open stand alone
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
        kind = _not_regular(os.stat(real).st_mode)
    except OSError:
        kind = None  # the open below says what is wrong
    if kind:  # sockets cannot even be opened; say what it is instead
        raise ImageDecodeError(Reason.NOT_A_FILE, f"{label}: not a regular file ({kind})")
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
        opened = _descriptor_path(fd)
        if opened is not None and not _inside(opened, real_roots):  # swapped between the check and the open
            raise ImageDecodeError(Reason.OUTSIDE_FOLDER, f"{label}: led outside the export folder when opened; "
                                   "not read")
        st = os.fstat(fd)
        kind = _not_regular(st.st_mode)
        if kind:
            raise ImageDecodeError(Reason.NOT_A_FILE, f"{label}: not a regular file ({kind})")
        if st.st_size > max_bytes:
            raise ImageDecodeError(
                Reason.TOO_LARGE,
                f"{label}: {st.st_size / 1e6:.1f} MB exceeds watch.max_file_mb = {max_bytes / 1048576:g}",
            )
        # one buffer of the size the file says (+1 to see growth), not chunks and then their join
        data = os.read(fd, st.st_size + 1)
        chunks = [data]
        while data:
            if sum(len(c) for c in chunks) > max_bytes:  # grew while we read
                raise ImageDecodeError(Reason.TOO_LARGE, f"{label}: grew over watch.max_file_mb while being read")
            data = os.read(fd, 1 << 20)
            if data:
                chunks.append(data)
        return FileRead(chunks[0] if len(chunks) == 1 else b"".join(chunks), FileSig.of(st))
    except OSError as exc:
        raise ImageDecodeError(Reason.UNREADABLE, f"{label}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
