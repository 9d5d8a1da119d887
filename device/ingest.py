"""Watch the export folder and hand over files that are completely written.

A file is ready when the OS says the writer closed it (inotify close-after-
write), when it is renamed/moved in (write-to-temp-then-rename, the temporary
file in the folder or outside it), or - where
no close event exists (polling on SMB/NFS) - when its size and mtime have not
changed for ``settle_seconds``. Temporary names are ignored. Files that were
there before the daemon started come first, oldest first.
"""
from __future__ import annotations

import fnmatch
import heapq
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Callable, Optional, Sequence

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEventHandler,
)

from .config import WatchConfig
from .reader import file_sig
from .store import FileSig

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """The export folder cannot be watched."""


@dataclass(frozen=True)
class Ready:
    path: Path
    #: how it became ready: "closed" (after write), "moved", "settled", "backlog", "received" (over DICOM)
    how: str
    #: wall-clock time the watcher handed it over (for time-to-notification)
    seen_at: float = field(default_factory=time.time, compare=False)
    #: perf_counter at the hand-over (the ``queue`` step of stats)
    t_ready: float = field(default_factory=time.perf_counter, compare=False)


def _never_raise(fn: Callable) -> Callable:
    """A watchdog callback that raises kills the observer thread and the daemon goes deaf: log instead."""

    @wraps(fn)
    def guarded(self, event):
        try:
            return fn(self, event)
        except Exception:
            log.exception("watcher: %s on %r failed; the event is skipped (the backlog scan will find the file)",
                          fn.__name__, getattr(event, "src_path", event))
            self.failed_events += 1
            return None

    return guarded


def _folder_id(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class _OverflowWatch(logging.Handler):
    """watchdog reports a full inotify queue (events lost) only in its log: turn that into a rescan."""

    def __init__(self, ingest: "Ingest"):
        super().__init__(logging.WARNING)
        self.ingest = ingest

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.ingest.rescan_wanted.set()


def _native_observer():
    """inotify where there is one, reporting a rename from outside the folder as a move (its source empty),
    not as a new file that must settle first: an exporter that writes elsewhere and renames in is served at
    once, as one that renames within the folder is."""
    try:
        from watchdog.observers.inotify import InotifyObserver

        return InotifyObserver(generate_full_events=True)
    except ImportError:  # not Linux: the platform's own events
        from watchdog.observers import Observer

        return Observer()


class Ingest(FileSystemEventHandler):
    def __init__(
        self,
        root: Path,
        recursive: bool = WatchConfig().recursive,
        polling: bool = WatchConfig().polling,
        poll_interval: float = WatchConfig().poll_interval,
        settle_seconds: float = WatchConfig().settle_seconds,
        ignore: Sequence[str] = tuple(WatchConfig().ignore),
        exclude: Sequence[Path] = (),
        rescan_interval: float = WatchConfig().rescan_interval,
    ):
        self.root = Path(root)
        self.rescan_interval = rescan_interval
        #: the journal already holds this version (set by the daemon once its store is open)
        self.seen: Callable[[Path], bool] = lambda path: False
        #: the export folder as last reported: ok, missing, link (published in stats)
        self.health = "ok"
        self._watch_restarts: list[float] = []
        self._next_rescan = time.monotonic() + rescan_interval
        self.recursive = recursive
        self.polling = polling
        self.poll_interval = poll_interval
        self.settle = settle_seconds
        self.ignore = tuple(p.lower() for p in ignore)  # Windows exporters write CR0001.TMP as well as .tmp
        self.exclude = tuple(Path(p).resolve() for p in exclude)
        self._cond = threading.Condition()
        self._ready: deque[Ready] = deque()
        self._queued: set[Path] = set()
        self._waiting: list[tuple[float, int, Path]] = []  # (due, tiebreak, path) heap
        self._sigs: dict[Path, Optional[FileSig]] = {}
        self._n = 0
        self._observer = None
        self._root_id: Optional[tuple[int, int]] = None
        self._root_real = os.path.realpath(self.root)
        self.failed_events = 0
        self._unlistable: set[str] = set()  # folders the backlog scan could not list (said once each)
        self.rescan_wanted = threading.Event()  # events were lost: the daemon scans the folder again

    # ------------------------------------------------------------------ setup
    def check_root(self) -> None:
        if not self.root.exists():
            raise IngestError(f"export folder {self.root} does not exist")
        if not self.root.is_dir():
            raise IngestError(f"export folder {self.root} is not a folder")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise IngestError(f"export folder {self.root}: permission denied (the daemon needs read access)")

    def start(self) -> None:
        self.check_root()
        if not hasattr(self, "_overflow"):
            self._overflow = _OverflowWatch(self)
            logging.getLogger("watchdog").addHandler(self._overflow)
        if self.polling:
            from watchdog.observers.polling import PollingObserver

            self._observer = PollingObserver(timeout=self.poll_interval)
        else:
            self._observer = _native_observer()
        self._observer.schedule(self, str(self.root), recursive=self.recursive)
        self._observer.start()
        self._root_id = _folder_id(self.root)
        log.info("watching %s (%s%s)", self.root, "polling" if self.polling else "native events",
                 ", recursive" if self.recursive else "")

    def stop(self) -> None:
        if hasattr(self, "_overflow"):
            logging.getLogger("watchdog").removeHandler(self._overflow)
            del self._overflow
        self._stop_observer()
        with self._cond:
            self._cond.notify_all()

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            try:
                self._observer.join(timeout=5)
            except RuntimeError:  # never started
                pass
            self._observer = None

    def alive(self) -> bool:
        """The observer and its emitter threads are running (a dead one means files go unseen)."""
        obs = self._observer
        if obs is None or not obs.is_alive():
            return False
        return all(e.is_alive() for e in getattr(obs, "emitters", ()))

    def folder_state(self) -> str:
        """``ok``, ``missing``, ``replaced`` (removed and made again, or another folder moved in), or
        ``link`` (replaced by a link that leads elsewhere: not followed)."""
        now = _folder_id(self.root)
        if now is None:
            return "missing"
        if os.path.realpath(self.root) != self._root_real:
            return "link"
        return "ok" if now == self._root_id else "replaced"

    def restart(self) -> None:
        """Watch the folder now at ``root`` (after it was replaced)."""
        self._stop_observer()
        self.start()

    # ------------------------------------------------------------------ the folder's health
    def enqueue_unseen(self, why: str) -> None:
        """Queue what the folder holds and the journal does not (oldest first)."""
        backlog = [p for p in self.backlog() if not self.seen(p)]
        if backlog:
            log.info("backlog: %d files %s (oldest first)", len(backlog), why)
        self.enqueue_backlog(backlog)

    def check_health(self) -> bool:
        """Called every few seconds: follow a folder that went, came back or was replaced, scan again when
        events were lost. False when the watcher keeps stopping (the daemon exits 1)."""
        state = self.folder_state()
        if state != self.health:
            if state == "missing":
                log.error("export folder %s is gone: waiting for it to come back (no file is seen meanwhile)",
                          self.root)
            elif state == "link":
                log.error("export folder %s was replaced by a link to %s: not followed; waiting for the folder "
                          "to come back (no file is seen meanwhile)", self.root, os.path.realpath(self.root))
            self.health = state
        if state in ("missing", "link"):
            return True
        if state == "ok" and not self.alive():
            # inotify ends its watch when the folder is deleted; a folder made again may even get
            # the same inode number. Watch it again, unless that keeps failing.
            now = time.monotonic()
            self._watch_restarts = [t for t in self._watch_restarts if now - t < 60] + [now]
            if len(self._watch_restarts) > 5:
                log.critical("the folder watcher keeps stopping; exiting with status 1 so the service manager "
                             "restarts pneumoflag")
                return False
            log.warning("the folder watcher stopped (export folder %s removed and made again?): watching it again",
                        self.root)
            state = "replaced"
        if state == "replaced":
            self._follow_replaced()
            return True
        self._rescan_when_due()
        return True

    def _follow_replaced(self) -> None:
        log.warning("export folder %s was replaced (removed and made again, or another folder moved in): "
                    "watching the new one", self.root)
        try:
            self.restart()
        except IngestError as exc:
            log.error("cannot watch the new export folder: %s", exc)
            return
        self.health = "ok"
        self.enqueue_unseen("in the new export folder")

    def _rescan_when_due(self) -> None:
        now = time.monotonic()
        if self.rescan_wanted.is_set():
            self.rescan_wanted.clear()
            log.warning("file events were lost (inotify queue overflow, or a folder made readable again): scanning "
                        "the export folder for what was missed")
            self.enqueue_unseen("missed while events were lost")
            self._next_rescan = now + self.rescan_interval
        elif self.rescan_interval and now >= self._next_rescan:
            self._next_rescan = now + self.rescan_interval
            self.enqueue_unseen("not seen by the watcher (periodic rescan)")

    def ignored(self, path: Path) -> bool:
        """Temporary names, files outside the folder or in skipped subfolders, and the archive.

        Never raises: a link loop or an unreadable parent must not reach the
        watcher thread. Links are not followed here; the reader checks where
        they point.
        """
        name = path.name.lower()
        if any(fnmatch.fnmatchcase(name, pat) for pat in self.ignore):
            return True
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return True
        if len(rel.parts) > 1 and (not self.recursive or any(p.startswith(".") for p in rel.parts[:-1])):
            return True
        if not self.exclude:
            return False
        try:
            parent = path.parent.resolve()
        except (OSError, RuntimeError):
            return False
        return any(parent == ex or ex in parent.parents for ex in self.exclude)

    def backlog(self) -> list[Path]:
        """Everything but folders already in the folder, oldest first: links, FIFOs and sockets too,
        which the reader then refuses with their reason."""
        files = []
        for p in self._walk(self.root):
            if self.ignored(p):
                continue
            try:
                files.append((p.lstat().st_mtime_ns, str(p), p))
            except OSError:
                files.append((0, str(p), p))
        return [p for _, _, p in sorted(files)]

    def _walk(self, top: Path) -> list[Path]:
        """Non-folders under ``top`` (one level unless recursive); iterative, so no depth is too deep."""
        out, todo = [], [top]
        while todo:
            folder = todo.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            except OSError as exc:  # say so: files below it are not seen (ENAMETOOLONG past PATH_MAX, EACCES)
                if str(folder) not in self._unlistable:
                    self._unlistable.add(str(folder))
                    log.warning("cannot list %s (%s): files in it are not seen", folder, exc.strerror or exc)
                continue
            for e in entries:
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    if self.recursive and not e.name.startswith("."):
                        todo.append(Path(e.path))
                else:
                    out.append(Path(e.path))
        return out

    def enqueue_backlog(self, paths: Sequence[Path]) -> None:
        now = time.time()
        for p in paths:
            sig = file_sig(p)
            # recently modified files may still be being written: let them settle
            if sig and now - sig.mtime_ns / 1e9 < self.settle:
                self._wait(p, sig)
            else:
                self._push(Ready(p, "backlog"))

    # ------------------------------------------------------------------ queue
    def _push(self, item: Ready) -> None:
        with self._cond:
            if item.path in self._queued:
                return
            self._queued.add(item.path)
            self._sigs.pop(item.path, None)
            self._ready.append(item)
            self._cond.notify()

    def _wait(self, path: Path, sig: Optional[FileSig], delay: Optional[float] = None) -> None:
        with self._cond:
            self._sigs[path] = sig
            self._n += 1
            heapq.heappush(self._waiting, (time.monotonic() + (self.settle if delay is None else delay), self._n, path))
            self._cond.notify()

    def hand_over(self, path: Path) -> None:
        """A file from outside the folder that is complete already (a DICOM instance the receiver journaled):
        queued like a ready file; thread-safe, for the receiver's threads."""
        self._push(Ready(path, "received"))

    def retry_later(self, path: Path, delay: float) -> None:
        """The file failed to decode but may still be growing: look again later."""
        self._wait(path, file_sig(path), delay)

    def depth(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._sigs)

    def get(self, timeout: float) -> Optional[Ready]:
        """The next ready file, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._promote_settled()
                if self._ready:
                    item = self._ready.popleft()
                    self._queued.discard(item.path)
                    return item
                now = time.monotonic()
                if now >= deadline:
                    return None
                wake = deadline
                if self._waiting:
                    wake = min(wake, self._waiting[0][0])
                self._cond.wait(max(0.0, wake - now))

    def _promote_settled(self) -> None:
        now = time.monotonic()
        while self._waiting and self._waiting[0][0] <= now:
            _, _, path = heapq.heappop(self._waiting)
            if path not in self._sigs:
                continue  # already promoted by a close/move event
            before = self._sigs[path]
            after = file_sig(path)
            if after is None:  # deleted meanwhile
                self._sigs.pop(path, None)
            elif after == before:
                self._sigs.pop(path, None)
                if path not in self._queued:
                    self._queued.add(path)
                    self._ready.append(Ready(path, "settled"))
            else:  # still changing
                self._sigs[path] = after
                self._n += 1
                heapq.heappush(self._waiting, (now + self.settle, self._n, path))

    # ------------------------------------------------------------------ watchdog callbacks
    @_never_raise
    def on_closed(self, event: FileClosedEvent) -> None:
        p = Path(os.fsdecode(event.src_path))
        if not self.ignored(p):
            self._push(Ready(p, "closed"))

    @_never_raise
    def on_moved(self, event: FileMovedEvent) -> None:
        """A rename within the folder, or (an empty source) a file renamed in from outside it: complete
        either way, as a writer renames only what it has written. An empty destination: moved out."""
        if event.is_directory:
            return
        if event.src_path:
            with self._cond:
                self._sigs.pop(Path(os.fsdecode(event.src_path)), None)
        if not event.dest_path:
            return
        p = Path(os.fsdecode(event.dest_path))
        if not self.ignored(p):
            self._push(Ready(p, "moved"))

    @_never_raise
    def on_created(self, event: FileCreatedEvent) -> None:
        self._changed(event)

    @_never_raise
    def on_modified(self, event: FileModifiedEvent) -> None:
        self._changed(event)

    @_never_raise
    def on_attrib(self, event) -> None:
        if event.is_directory:  # a folder made readable again: what arrived meanwhile was never seen
            self.rescan_wanted.set()
            return
        # a chmod (IN_ATTRIB) that makes a rejected file readable brings it back
        self._changed(event)

    def _changed(self, event) -> None:
        if event.is_directory:
            return
        p = Path(os.fsdecode(event.src_path))
        if self.ignored(p):
            return
        with self._cond:
            if p in self._sigs:  # already waiting: the settle check will see the change
                return
        self._wait(p, file_sig(p))

    @_never_raise
    def on_deleted(self, event: FileDeletedEvent) -> None:
        with self._cond:
            self._sigs.pop(Path(os.fsdecode(event.src_path)), None)
