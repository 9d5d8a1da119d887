"""One daemon per state folder: an exclusive ``flock`` on ``STATE/pneumoflag.lock`` held for the process's life.

Two daemons on one journal would alert every file twice and kick each other off
the broker (same client id). The lock is taken before the database is opened,
so the second one refuses to start and names the first one's pid; the kernel
drops it when the holder exits, however it exits (no stale lock after a kill).
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Optional

LOCK_NAME = "pneumoflag.lock"


class StateLocked(RuntimeError):
    """Another process holds the state folder; the message names it."""


class StateLock:
    def __init__(self, state_dir: Path | str):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StateLocked` (or ``OSError`` when the folder cannot hold it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # never through a link (the pid note would overwrite its target), and only a plain file
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"{self.path} is not a plain file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StateLocked(f"state.dir {self.path.parent} is in use by another pneumoflag daemon "
                              f"({self.holder()}): one daemon per state folder; stop it, or give this one its "
                              "own --state-dir (and its own --device-id)") from None
        try:  # the holder's pid, for the next one's message; the lock, not this text, is what counts
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # a full disk must not stop the start for want of a pid note
        self._fd = fd

    def holder(self) -> str:
        """``pid N`` of the process that wrote the lock file, if it says."""
        try:
            pid = int(self.path.read_text().strip() or "0")
        except (OSError, ValueError):
            pid = 0
        return f"pid {pid}" if pid > 0 else "pid unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
