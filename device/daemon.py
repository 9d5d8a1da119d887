"""``pneumoflag watch``: the main job. Wires watcher -> pipeline -> outbox -> MQTT and keeps it running.

Guarantees:
- a file's result is journaled and queued in one transaction before it is
  published; bad input becomes an error message and a journal record, never a
  crash;
- every file ends in a flag or an error within ``watch.incomplete_timeout`` of
  its first failed decode, whatever its clock says;
- one path, one current result: a later version of the same path (completed,
  made readable, new content) is scored again and its message names the event
  it ``supersedes``; a copy of content already seen elsewhere gets a
  ``duplicate-of`` message naming the first event, never a second alert;
- nothing outside the export folder is read (see ``reader``);
- no file holds the loop longer than ``watch.max_decode_seconds`` (decoding runs in a
  reused worker process, see ``decoder``; the watchdog pings go on while it waits), and
  a file the daemon died on twice while processing it is refused (``crashed-decoder``),
  never retried in a restart loop;
- a worker thread that dies, or a watcher that stops, ends the process with
  status 1 (systemd restarts it): it never sits ``online`` and deaf; a replaced
  export folder is watched again;
- a full state disk is reported once per episode and retried with backoff; a
  state database that can no longer be written (read-only file system) ends
  the process with status 1 after publishing ``offline``: the file in hand is
  not journaled, so it is scored on the next start;
- one daemon per state folder (``statelock``): a second one refuses to start;
- SIGTERM finishes the image in hand, publishes ``offline`` and exits 0.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np


from . import __version__
from .card import CardError
from .config import EMBEDDED_BROKER, Config
from .contract import ErrorMessage, FlagMessage, encode, utc_iso
from .decoder import DecoderUnavailable, DecodeWorker
from .escalation import AckDesk
from .ingest import Ingest, IngestError, Ready
from .pipeline import Pipeline, sha256_bytes
from .preprocess import ImageDecodeError
from .publisher import Publisher
from .reader import FileRead, file_sig, read_export_file
from .resend import ResendDesk
from .safe_text import path_text, printable
from .scorer import load_scorer
from .sdnotify import Notifier
from .store import FileSig, FlagRecord, JournalRow, Store, StoreError
from .statelock import StateLock, StateLocked
from .stats import Stats, time_to_notification
from .vocab import Priority, Reason

log = logging.getLogger(__name__)

#: decode failures that a file still being written produces
INCOMPLETE_REASONS = {Reason.TRUNCATED, Reason.CORRUPT, Reason.EMPTY_FILE, Reason.UNSUPPORTED_FORMAT,
                      Reason.DICOM_INVALID, Reason.UNREADABLE, Reason.DICOM_NO_PIXELS}
#: a file whose decoding or scoring was under way this many times when the daemon died is refused
MAX_INTERRUPTED = 2
#: how often the main loop checks that the watcher runs and the export folder is the same one
HEALTH_INTERVAL = 2.0


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


class Daemon:
    def __init__(
        self,
        cfg: Config,
        exit_after: Optional[int] = None,
        once: bool = False,
        on_ready: Optional[Callable[["Daemon"], None]] = None,
    ):
        self.cfg = cfg
        self.exit_after = exit_after
        self.once = once
        self.on_ready = on_ready
        self.stop_event = threading.Event()
        self.stats = Stats()
        self.notifier = Notifier()
        self.processed = 0
        self.broker = None
        self.root = Path(cfg.watch.dir).resolve() if cfg.watch.dir else None
        self._arriving: dict[str, tuple[FileSig, float]] = {}  # rel -> (sig, monotonic time it last changed)
        self._fatal: Optional[str] = None  # set by a dying worker thread: the main loop exits 1
        self._disk_full_since: Optional[float] = None
        self._store_backoff = 5.0
        self._folder_state = "ok"
        self._watch_restarts: list[float] = []
        self._next_rescan = time.monotonic() + cfg.watch.rescan_interval
        self._wd: Optional[float] = None  # watchdog ping interval (None: no watchdog)
        self._next_wd = 0.0

    # ------------------------------------------------------------------ startup
    def _start(self) -> None:
        cfg = self.cfg
        if self.root is None:
            raise StartupError("no export folder: give `pneumoflag watch DIR` or set watch.dir")
        self.ingest = Ingest(self.root, cfg.watch.recursive, cfg.watch.polling, cfg.watch.poll_interval,
                             cfg.watch.settle_seconds, cfg.watch.ignore,
                             exclude=[cfg.watch.archive_dir] if cfg.watch.archive_dir else [])
        try:
            self.ingest.check_root()
        except IngestError as exc:
            raise StartupError(str(exc)) from None
        self.state_lock = StateLock(cfg.state.dir)
        try:  # before the model (a quick refusal) and before the database is opened
            self.state_lock.acquire()
        except StateLocked as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"state.dir {cfg.state.dir}: {exc} (the daemon needs a writable state folder)") from None
        try:
            self.scorer, self.card = load_scorer(cfg.model.path, cfg.model.accelerator, cfg.model.threads)
        except (CardError, OSError) as exc:
            raise StartupError(f"model refused: {exc}") from None
        self.pipeline = Pipeline(cfg, self.scorer, self.card)
        # decodes run in a reused worker process with a deadline; the wait pings the watchdog
        self.pipeline.decoder = DecodeWorker(self.pipeline.settings, cfg.watch.max_decode_seconds,
                                             tick=self._watchdog_tick)  # started last, below
        state = Path(cfg.state.dir)
        try:
            self.store = Store(state)
        except StoreError as exc:
            if exc.corrupt:
                raise StartupError(f"state.dir {state}: the state database is corrupt ({exc}): move "
                                   f"{state / 'pneumoflag.db'} aside; a new one starts empty and the files still in "
                                   "the export folder are then scored again") from None
            raise StartupError(f"state.dir {state}: {exc} (the daemon needs a writable state folder)") from None
        if cfg.watch.archive_dir:
            Path(cfg.watch.archive_dir).mkdir(parents=True, exist_ok=True)
        try:
            self.pipeline.decoder.start()
        except DecoderUnavailable as exc:
            raise StartupError(str(exc)) from None
        if not cfg.mqtt.broker:
            self._start_embedded_broker()
        self.publisher = Publisher(cfg, self.store)
        self.acks = AckDesk(cfg, self.store, self.publisher)
        self.resends = ResendDesk(cfg, self.store, self.publisher)
        self.heatmaps = None
        if cfg.explain.enabled:
            from .heatmaps import HeatmapWorker

            self.heatmaps = HeatmapWorker(cfg, self.card, self.pipeline, self.store, self.publisher)
            self.heatmaps.start()
        self.publisher.start()
        points = self.card.raw.get("operating_points", {}).get("source", {})
        log.info(
            "pneumoflag %s: model %s %s (card revision %d, operating points from %s) on %s (%s); %s; "
            "publishing to %s under %s",
            __version__, self.card.name, self.card.version, self.card.revision,
            points.get("folder", "its validation data"), self.scorer.report.accelerator,
            self.scorer.report.runtime, self.card.thresholds.describe(), cfg.mqtt.broker, cfg.topics.tree(),
        )
        adapted = self.card.adaptation_summary()
        if adapted:
            log.info("%s", adapted)

    def _start_embedded_broker(self) -> None:
        from .broker import BrokerStartError, EmbeddedBroker, port_in_use

        self.cfg.mqtt.broker = EMBEDDED_BROKER
        host, port = self.cfg.broker_host_port
        if self.cfg.mqtt.protocol == "5":
            log.warning("the embedded broker speaks MQTT 3.1.1 only: using 3.1.1")
            self.cfg.mqtt.protocol = "3.1.1"
        if port_in_use(host, port):
            log.warning("no broker configured and %s:%d is already taken: using the broker that runs there", host, port)
            return
        try:
            self.broker = EmbeddedBroker(host, port)
            self.broker.start()
        except BrokerStartError as exc:
            raise StartupError(str(exc)) from None
        log.info("no broker configured: started the embedded MQTT broker on %s:%d", host, port)
        log.info("subscribe with:  pneumoflag alerts --broker %s:%d   (or: mosquitto_sub -h %s -p %d -t '%s/#' -v)",
                 host, port, host, port, self.cfg.mqtt.topic_prefix)

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Watch until stopped; 0 on a clean stop, 1 when a worker died (systemd restarts us)."""
        threading.excepthook = self._thread_died  # before any worker thread starts
        # a recursive watch walks folder chains as deep as PATH_MAX allows (about 2,000 levels) with
        # recursive code (watchdog, os.walk): give it the frames rather than dying at 1,000
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
        try:
            self._start()
        except BaseException:
            if getattr(self, "pipeline", None) is not None and self.pipeline.decoder is not None:
                self.pipeline.decoder.stop()  # the worker must not outlive a failed start
            if getattr(self, "state_lock", None) is not None:  # a refused start holds the state folder no longer
                self.state_lock.release()
            raise
        self._install_signals()
        self.ingest.start()  # events first, so nothing arriving during the backlog scan is missed
        if self.cfg.watch.backlog:
            self._enqueue_backlog("arrived while the daemon was down")
        self.notifier.ready(f"watching {self.root}")
        if self.on_ready:
            self.on_ready(self)
        self._wd = self.notifier.watchdog_interval()
        self._next_wd = next_health = next_escalation = time.monotonic()
        next_stats = time.monotonic() + min(5.0, self.cfg.mqtt.stats_interval)
        status = 0
        try:
            while not self.stop_event.is_set():
                item = self.ingest.get(timeout=0.5)
                if item is not None:
                    self._handle(item)
                self.acks.journal_received()
                self.resends.serve_requests()
                now = time.monotonic()
                if now >= next_escalation:
                    next_escalation = now + 1.0
                    self.acks.escalate_due()
                if now >= next_health:
                    next_health = now + HEALTH_INTERVAL
                    if not self._healthy():
                        status = 1
                        break
                self._watchdog_tick()
                if now >= next_stats:
                    self.publish_stats()
                    next_stats = now + self.cfg.mqtt.stats_interval
                if self._done():
                    break
        finally:
            self._shutdown()
        return status

    def _watchdog_tick(self) -> None:
        """Ping the watchdog when due, from the main loop or while it waits on a (bounded) decode;
        never once a worker thread has died."""
        now = time.monotonic()
        if self._wd and now >= self._next_wd and not self._fatal:
            self.notifier.watchdog()
            self._next_wd = now + self._wd

    def _enqueue_backlog(self, why: str) -> None:
        backlog = [p for p in self.ingest.backlog() if not self._already_seen(p)]
        if backlog:
            log.info("backlog: %d files %s (oldest first)", len(backlog), why)
        self.ingest.enqueue_backlog(backlog)

    def _already_seen(self, path: Path) -> bool:
        sig = file_sig(path)
        try:
            return sig is not None and self.store.seen(self._rel(path), sig)
        except StoreError:
            return False

    def _healthy(self) -> bool:
        """False when the process must exit non-zero: a worker thread died or the watcher stopped."""
        if not self._fatal and self.store.on_read_only_fs():  # found even when no file arrives to be written
            self._fatal = self._read_only_text("its file system is mounted read-only")
        if self._fatal:
            log.critical("%s; exiting with status 1 so the service manager restarts pneumoflag", self._fatal)
            return False
        self._restore_store()
        state = self.ingest.folder_state()
        if state != self._folder_state:
            if state == "missing":
                log.error("export folder %s is gone: waiting for it to come back (no file is seen meanwhile)",
                          self.root)
            elif state == "link":
                log.error("export folder %s was replaced by a link to %s: not followed; waiting for the folder "
                          "to come back (no file is seen meanwhile)", self.root, os.path.realpath(self.root))
            self._folder_state = state
        if state in ("missing", "link"):
            return True
        if state == "ok" and not self.ingest.alive():
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
            log.warning("export folder %s was replaced (removed and made again, or another folder moved in): "
                        "watching the new one", self.root)
            try:
                self.ingest.restart()
            except IngestError as exc:
                log.error("cannot watch the new export folder: %s", exc)
                return True
            self._folder_state = "ok"
            self._enqueue_backlog("in the new export folder")
            return True
        now = time.monotonic()
        if self.ingest.rescan_wanted.is_set():
            self.ingest.rescan_wanted.clear()
            log.warning("file events were lost (inotify queue overflow, or a folder made readable again): scanning "
                        "the export folder for what was missed")
            self._enqueue_backlog("missed while events were lost")
            self._next_rescan = now + self.cfg.watch.rescan_interval
        elif self.cfg.watch.rescan_interval and now >= self._next_rescan:
            self._next_rescan = now + self.cfg.watch.rescan_interval
            self._enqueue_backlog("not seen by the watcher (periodic rescan)")
        return True

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook: a worker thread ended with an exception."""
        name = args.thread.name if args.thread else "?"
        log.critical("thread %s died: %s: %s", name, args.exc_type.__name__, args.exc_value,
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        self._fatal = f"thread {name} died ({args.exc_type.__name__}: {args.exc_value})"

    def _done(self) -> bool:
        if self.exit_after is not None and self.processed >= self.exit_after:
            log.info("processed %d files (--exit-after): stopping", self.processed)
            return True
        if self.once and self.ingest.depth() == 0:
            log.info("backlog done (--once): stopping")
            return True
        return False

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum, frame):
            log.info("%s: finishing the image in hand, then stopping", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def _shutdown(self) -> None:
        self.notifier.stopping()
        self.ingest.stop()
        if self.heatmaps is not None:
            self.heatmaps.stop()
        if self.pipeline.decoder is not None:
            self.pipeline.decoder.stop()
        try:
            self._restore_store()
            if not self.publisher.drain(timeout=5.0):
                log.warning("%d results still in the outbox: they are sent on the next start",
                            self.store.outbox_depth())
        except StoreError as exc:
            log.error("state database unusable at shutdown: %s", exc)
        self.publish_stats()
        self.publisher.stop()
        if self.broker is not None:
            self.broker.stop()
        self.store.close()
        self.state_lock.release()
        log.info("stopped")

    def _restore_store(self) -> None:
        try:
            if self.store.restore_if_deleted():
                log.error("the state database %s was deleted while the daemon ran: written back from its open copy "
                          "(deleting it would make a restart alert every file again)", self.store.path)
        except (OSError, sqlite3.Error) as exc:
            log.error("the state database %s was deleted and cannot be written back: %s", self.store.path, exc)

    def publish_stats(self) -> None:
        try:
            outbox = self.store.outbox_depth()
        except StoreError:
            outbox = -1
        health = {"export_folder": self._folder_state, "state_disk_full": self._disk_full_since is not None}
        try:
            health["delivered_seq"] = self.store.delivered_seq()
        except StoreError:
            pass
        try:
            ttn = time_to_notification(self.store.flag_times(time.time() - 86400))
        except StoreError:
            ttn = {}
        snap = self.stats.snapshot(self.cfg, self.ingest.depth(), outbox, self.scorer.report.accelerator,
                                   f"{self.card.name} {self.card.version}", health, ttn)
        self.publisher.publish_now(self.cfg.topics.stats(), encode(snap), qos=0, retain=True)

    # ------------------------------------------------------------------ one file
    def _rel(self, path: Path) -> str:
        """The path relative to the export folder as safe UTF-8 text (the journal key and the message's file)."""
        try:
            return path_text(path.relative_to(self.root))
        except ValueError:
            return path_text(path.name)

    def _handle(self, item: Ready) -> None:
        """One file: read it safely, apply the journal's rules, score it, journal and queue the result."""
        t_start = time.perf_counter()
        path = item.path
        rel = self._rel(path)
        label = printable(rel)
        sig = file_sig(path)
        if sig is None:
            return  # gone before we got to it (moved away or deleted)
        try:
            if self.store.seen(rel, sig):
                return  # this version was already processed (restart, repeated event)
        except StoreError as exc:
            return self._store_failed(path, exc)
        try:
            prev = self.store.last_for_path(rel)
        except StoreError as exc:
            return self._store_failed(path, exc)
        if prev is not None and prev.status != "error" and (prev.size, prev.mtime_ns) == (sig.size, sig.mtime_ns):
            # a scored file whose size and modification time are as they were: only its attributes changed
            # (chmod, chown); it is not read again, so a chmod 000 cannot turn it into an error
            self._record(path, rel, prev.sha256, sig, "unchanged", event_id=prev.event_id)
            return
        roots = [self.root] + ([Path(self.cfg.watch.archive_dir)] if self.cfg.watch.archive_dir else [])
        try:
            fr = read_export_file(path, roots, int(self.cfg.watch.max_file_mb * 1024 * 1024), label)
        except ImageDecodeError as exc:
            if exc.reason != Reason.NOT_FOUND:
                self._finish_error(path, rel, None, sig, exc.reason, str(exc), prev=prev)
            return
        sha = sha256_bytes(fr.data)
        try:
            first = self.store.by_hash(sha)
        except StoreError as exc:
            return self._store_failed(path, exc)
        if prev is not None and prev.sha256 == sha:
            # same bytes as the last result for this path: a chmod, touch or re-export; nothing new to say
            self._record(path, rel, sha, fr.sig, "unchanged", event_id=prev.event_id)
            return
        if first is not None and first.path != rel:
            self._duplicate(path, rel, sha, fr.sig, first)
            return
        supersedes = prev.event_id if prev is not None else None
        try:
            interrupted = self.store.begin(rel, sha)  # journaled before decoding: a crash leaves it behind
        except StoreError as exc:
            return self._store_failed(path, exc)
        if interrupted >= MAX_INTERRUPTED:
            self._finish_error(path, rel, sha, fr.sig, Reason.CRASHED_DECODER,
                               f"{rel}: the daemon stopped {interrupted} times while this file was being decoded or "
                               "scored (killed, out of memory, or a crash); refused so that it cannot stop the "
                               "appliance again", prev=prev)
            return
        try:
            msg, decoded = self._score(fr.data, rel, sha, label)
        except DecoderUnavailable as exc:  # not the file's fault: it is scored after the restart
            self._not_in_progress(rel)
            self._fatal = f"the decoder worker cannot be started ({exc})"
            return
        except ImageDecodeError as exc:
            if exc.reason in INCOMPLETE_REASONS and self._still_arriving(rel, fr.sig):
                log.debug("%s: %s; still being written? retrying", label, exc.reason)
                self._not_in_progress(rel)
                self.ingest.retry_later(path, max(self.cfg.watch.settle_seconds, 0.2))
                return
            self._finish_error(path, rel, sha, fr.sig, exc.reason, str(exc), prev=prev)
            return
        except Exception as exc:
            log.exception("%s: scoring failed", label)
            self._finish_error(path, rel, sha, fr.sig, Reason.INTERNAL_ERROR, f"{rel}: {type(exc).__name__}: {exc}",
                               prev=prev)
            return
        self._flagged(item, rel, sha, fr, msg, decoded.pixels, supersedes, t_start)

    def _flagged(self, item: Ready, rel: str, sha: str, fr: FileRead, msg: FlagMessage, pixels: np.ndarray,
                 supersedes: Optional[str], t_start: float) -> None:
        """A scored file: finish its message, journal and queue it (one transaction), then the heat map."""
        path = item.path
        written = msg.written_ts if msg.written_ts is not None else fr.sig.mtime_ns / 1e9
        msg.written_at = utc_iso(written)
        msg.seen_at = utc_iso(item.seen_at)
        msg.supersedes = supersedes
        payload = encode(msg.to_dict())
        record = FlagRecord(msg.event_id, msg.priority, msg.probability, payload, written, item.seen_at, time.time())
        if not self._record(path, rel, sha, fr.sig, msg.priority, event_id=msg.event_id, supersedes=supersedes,
                            message=(self.cfg.topics.flag(msg.priority), payload, 1), flag=record):
            return
        self._arriving.pop(rel, None)
        if self.heatmaps is not None and msg.priority != Priority.ROUTINE:
            self.heatmaps.submit(msg.event_id, rel, fr.data, pixels)  # the flag is queued already
        self.processed += 1
        self.stats.by_priority[msg.priority] += 1
        self.stats.latencies.append((time.perf_counter() - t_start) * 1000.0)
        log.info("%s: %s (p=%.4f, %.1f ms)%s", printable(rel), msg.priority.upper(), msg.probability,
                 msg.timings_ms.total, f", supersedes {supersedes}" if supersedes else "")
        self._archive(path, rel)

    def _not_in_progress(self, rel: str) -> None:
        """A decode that ended (the file is retried later): not an interrupted one."""
        try:
            self.store.end(rel)
        except StoreError as exc:
            log.debug("%s: in-progress marker not cleared: %s", printable(rel), exc)

    def _score(self, data: bytes, rel: str, sha: str, label: str):
        """Score, and once more in a fresh worker when the worker died on the file: one death may be the
        machine's (the OOM killer, a kill by hand), two in a row are the file's (``crashed-decoder``)."""
        try:
            return self.pipeline.score_decoded(data, rel, sha)
        except ImageDecodeError as exc:
            if exc.reason != Reason.CRASHED_DECODER:
                raise
            log.warning("%s: the decoder worker died on it (%s); once more in a new worker", label, exc)
        return self.pipeline.score_decoded(data, rel, sha)

    def _still_arriving(self, rel: str, sig: FileSig) -> bool:
        """The file changed less than incomplete_timeout ago, as this daemon saw it.

        Measured on our monotonic clock from the last change we observed, never
        from the file's mtime: a bad file stamped in the future must still end
        in an error in time.
        """
        now = time.monotonic()
        seen = self._arriving.get(rel)
        if seen is None or seen[0] != sig:
            self._arriving[rel] = (sig, now)
            if len(self._arriving) > 10_000:  # bounded: drop the oldest
                self._arriving.pop(next(iter(self._arriving)))
            return True
        return now - seen[1] < self.cfg.watch.incomplete_timeout

    def _record(self, path: Path, rel: str, sha: Optional[str], sig: FileSig, status: str, **kw) -> bool:
        try:
            self.store.record(rel, sha, sig, status, **kw)
        except StoreError as exc:
            self._store_failed(path, exc)
            return False
        self._store_ok()
        if kw.get("message"):
            self.publisher.wake()
        return True

    def _duplicate(self, path: Path, rel: str, sha: str, sig: FileSig, first: JournalRow) -> None:
        """A copy of content already processed under another name: say so, never alert twice."""
        what = first.status if first.status != "error" else f"rejected: {first.reason}"
        err = ErrorMessage(device=self.cfg.mqtt.device_id, file=rel, reason=Reason.DUPLICATE_OF,
                           message=f"{rel}: same content as {first.path} (event {first.event_id}, {what}); "
                                   "not scored again",
                           sha256=sha, duplicate_of=first.event_id)
        if self._record(path, rel, sha, sig, "duplicate", reason=Reason.DUPLICATE_OF, event_id=err.event_id,
                        message=(self.cfg.topics.error(), encode(err.to_dict()), 1)):
            self.stats.duplicates += 1
            log.info("%s: same content as %s (already %s): not alerted again", printable(rel),
                     printable(first.path), what)

    def _finish_error(self, path: Path, rel: str, sha: Optional[str], sig: FileSig, reason: str, message: str,
                      prev: Optional[JournalRow] = None) -> None:
        if prev is not None and prev.status == "error" and prev.reason == str(reason) and prev.sha256 == sha:
            # the same error for the same content (or, unread, the same reason again after a touch or
            # chmod): said once already
            self._record(path, rel, sha, sig, "unchanged", reason=str(reason), event_id=prev.event_id)
            self._arriving.pop(rel, None)
            return
        supersedes = prev.event_id if prev is not None else None
        err = ErrorMessage(device=self.cfg.mqtt.device_id, file=rel, reason=str(reason), message=message,
                           sha256=sha, supersedes=supersedes)
        log.warning("rejected %s: %s", printable(rel), printable(message))
        if self._record(path, rel, sha, sig, "error", reason=str(reason), event_id=err.event_id,
                        supersedes=supersedes, message=(self.cfg.topics.error(), encode(err.to_dict()), 1)):
            self._arriving.pop(rel, None)
            self.processed += 1
            self.stats.errors += 1

    def _store_failed(self, path: Path, exc: StoreError) -> None:
        """Disk full or read-only state: keep the file, say so once per episode, retry with backoff."""
        if exc.corrupt:
            self._fatal = (f"state database corrupt ({exc}); move it aside and restart: pneumoflag starts a new one, "
                           "and the files still in the export folder are scored again")
            return
        if exc.read_only:  # does not pass with time, unlike a full disk: say so and exit 1 (see run)
            self._fatal = self._read_only_text(str(exc))
            return
        if self._disk_full_since is None:
            self._disk_full_since = time.monotonic()
            free = shutil.disk_usage(self.cfg.state.dir).free if os.path.isdir(self.cfg.state.dir) else -1
            try:
                depth = self.store.outbox_depth()
            except StoreError:
                depth = -1
            log.error("%s: %s free on %s, %d results wait in the outbox; nothing is lost, files are retried "
                      "with backoff (%s)", "state disk full" if exc.disk_full else "state database not writable",
                      f"{free / 1e6:.1f} MB" if free >= 0 else "?", self.cfg.state.dir, depth, exc)
        else:
            log.debug("state still not writable: %s", exc)
        self.ingest.retry_later(path, self._store_backoff)
        self._store_backoff = min(self._store_backoff * 2, 60.0)

    def _read_only_text(self, why: str) -> str:
        return (f"state database {self.store.path} can no longer be written ({why}): nothing can be journaled, so "
                "nothing is scored; the files waiting are scored after a restart with a writable state disk")

    def _store_ok(self) -> None:
        if self._disk_full_since is not None:
            log.info("state database writable again after %.0f s", time.monotonic() - self._disk_full_since)
            self._disk_full_since = None
            self._store_backoff = 5.0

    def _archive(self, path: Path, rel: str) -> None:
        if not self.cfg.watch.archive_dir:
            return
        dest = Path(self.cfg.watch.archive_dir) / path.relative_to(self.root)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = dest.with_name(f"{dest.stem}-{int(time.time())}{dest.suffix}")
            shutil.move(str(path), str(dest))
        except OSError as exc:
            log.warning("could not archive %s: %s", printable(rel), exc)
