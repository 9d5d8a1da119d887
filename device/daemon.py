"""``pneumoflag watch``: the main job. Wires watcher -> pipeline -> outbox -> MQTT and keeps it running.

Guarantees: a file's result is journaled and queued in one transaction before
it is published; bad input becomes an error message and a journal record,
never a crash; SIGTERM finishes the image in hand, publishes ``offline`` and
exits 0.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import __version__
from .card import CardError
from .config import EMBEDDED_BROKER, Config, ConfigError
from .ingest import Ingest, IngestError, Ready
from .messages import ErrorMessage, encode, utc_now
from .pipeline import Pipeline, sha256_bytes
from .preprocess import ImageDecodeError
from .publisher import Publisher
from .scorer import load_scorer
from .sdnotify import Notifier
from .store import Store, StoreError

log = logging.getLogger(__name__)

#: decode failures that a file still being written produces
INCOMPLETE_REASONS = {"truncated", "corrupt", "empty-file", "unsupported-format", "dicom-invalid", "unreadable"}


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    by_priority: Counter = field(default_factory=Counter)
    errors: int = 0
    duplicates: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=1000))

    def snapshot(self, cfg: Config, queue_depth: int, outbox: int, accelerator: str, model: str) -> dict:
        lat = np.array(self.latencies) if self.latencies else None
        return {
            "schema": "pneumoflag.stats/1",
            "device": cfg.mqtt.device_id,
            "at": utc_now(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "scored": {k: self.by_priority.get(k, 0) for k in ("urgent", "flag", "routine")},
            "errors": self.errors,
            "duplicates": self.duplicates,
            "queue_depth": queue_depth,
            "outbox": outbox,
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 2) if lat is not None else None,
                "p95": round(float(np.percentile(lat, 95)), 2) if lat is not None else None,
                "n": len(self.latencies),
            },
            "accelerator": accelerator,
            "model": model,
            "version": __version__,
        }


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
        try:
            self.scorer, self.card = load_scorer(cfg.model.path, cfg.model.accelerator, cfg.model.threads)
        except (CardError, OSError) as exc:
            raise StartupError(f"model refused: {exc}") from None
        self.pipeline = Pipeline(cfg, self.scorer, self.card)
        state = Path(cfg.state.dir)
        try:
            self.store = Store(state)
        except StoreError as exc:
            raise StartupError(f"state.dir {state}: {exc} (the daemon needs a writable state folder)") from None
        if cfg.watch.archive_dir:
            Path(cfg.watch.archive_dir).mkdir(parents=True, exist_ok=True)
        if not cfg.mqtt.broker:
            self._start_embedded_broker()
        self.publisher = Publisher(cfg, self.store)
        self.publisher.start()
        log.info(
            "pneumoflag %s: model %s %s on %s (%s); thresholds flag>=%.4f urgent>=%.4f; publishing to %s under %s",
            __version__, self.card.name, self.card.version, self.scorer.report.accelerator,
            self.scorer.report.runtime, self.card.thresholds.flag, self.card.thresholds.urgent,
            cfg.mqtt.broker, cfg.topic(""),
        )

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
        self._start()
        self._install_signals()
        self.ingest.start()  # events first, so nothing arriving during the backlog scan is missed
        if self.cfg.watch.backlog:
            backlog = self.ingest.backlog()
            if backlog:
                log.info("backlog: %d files arrived while the daemon was down (oldest first)", len(backlog))
            self.ingest.enqueue_backlog(backlog)
        self.notifier.ready(f"watching {self.root}")
        if self.on_ready:
            self.on_ready(self)
        wd = self.notifier.watchdog_interval()
        next_wd = time.monotonic()
        next_stats = time.monotonic() + min(5.0, self.cfg.mqtt.stats_interval)
        try:
            while not self.stop_event.is_set():
                item = self.ingest.get(timeout=0.5)
                if item is not None:
                    self._handle(item)
                now = time.monotonic()
                if wd and now >= next_wd:
                    self.notifier.watchdog()
                    next_wd = now + wd
                if now >= next_stats:
                    self.publish_stats()
                    next_stats = now + self.cfg.mqtt.stats_interval
                if self._done():
                    break
        finally:
            self._shutdown()
        return 0

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
        if not self.publisher.drain(timeout=5.0):
            log.warning("%d results still in the outbox: they are sent on the next start",
                        self.store.outbox_depth())
        self.publish_stats()
        self.publisher.stop()
        if self.broker is not None:
            self.broker.stop()
        self.store.close()
        log.info("stopped")

    def publish_stats(self) -> None:
        try:
            outbox = self.store.outbox_depth()
        except StoreError:
            outbox = -1
        snap = self.stats.snapshot(self.cfg, self.ingest.depth(), outbox, self.scorer.report.accelerator,
                                   f"{self.card.name} {self.card.version}")
        self.publisher.publish_now(self.cfg.topic("stats"), encode(snap), qos=0, retain=True)

    # ------------------------------------------------------------------ one file
    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.name

    def _handle(self, item: Ready) -> None:
        t_start = time.perf_counter()
        path = item.path
        rel = self._rel(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            return  # gone before we got to it (moved away or deleted)
        except PermissionError:
            self._reject(rel, None, 0, 0, "permission-denied", f"{rel}: permission denied")
            return
        if not stat.S_ISREG(st.st_mode):
            return
        try:
            if self.store.seen(rel, st.st_size, st.st_mtime_ns):
                return  # already processed (restart, repeated event)
        except StoreError as exc:
            return self._store_failed(path, exc)
        limit = int(self.cfg.watch.max_file_mb * 1024 * 1024)
        if st.st_size > limit:
            self._reject(rel, None, st.st_size, st.st_mtime_ns, "too-large",
                         f"{rel}: {st.st_size / 1e6:.1f} MB exceeds watch.max_file_mb = {self.cfg.watch.max_file_mb:g}")
            return
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except PermissionError:
            self._reject(rel, None, st.st_size, st.st_mtime_ns, "permission-denied",
                         f"{rel}: permission denied (the daemon's user needs read access)")
            return
        except OSError as exc:
            self._reject(rel, None, st.st_size, st.st_mtime_ns, "unreadable", f"{rel}: {exc.strerror}")
            return
        sha = sha256_bytes(data)
        try:
            first = self.store.by_hash(sha)
        except StoreError as exc:
            return self._store_failed(path, exc)
        if first is not None:
            status = "duplicate" if first.path != rel else first.status
            try:
                self.store.record(rel, sha, st.st_size, st.st_mtime_ns, status,
                                  reason=f"same content as {first.path}", event_id=first.event_id)
            except StoreError as exc:
                return self._store_failed(path, exc)
            if first.path != rel:
                self.stats.duplicates += 1
                log.info("%s: same content as %s (already %s): not alerted again", rel, first.path, first.status)
            return
        try:
            msg = self.pipeline.score(data, rel, sha)
        except ImageDecodeError as exc:
            if exc.reason in INCOMPLETE_REASONS and self._maybe_growing(path, st):
                log.debug("%s: %s; still being written? retrying", rel, exc.reason)
                self.ingest.retry_later(path, max(self.cfg.watch.settle_seconds, 0.2))
                return
            self._reject(rel, sha, st.st_size, st.st_mtime_ns, exc.reason, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the daemon must survive an interpreter failure
            log.exception("%s: scoring failed", rel)
            self._reject(rel, sha, st.st_size, st.st_mtime_ns, "internal-error", f"{rel}: {type(exc).__name__}: {exc}")
            return
        try:
            self.store.record(rel, sha, st.st_size, st.st_mtime_ns, msg.priority, event_id=msg.event_id,
                              message=(self.cfg.topic(msg.topic_suffix()), encode(msg.to_dict()), 1))
        except StoreError as exc:
            return self._store_failed(path, exc)
        self.publisher.wake()
        self.processed += 1
        self.stats.by_priority[msg.priority] += 1
        self.stats.latencies.append((time.perf_counter() - t_start) * 1000.0)
        log.info("%s: %s (p=%.3f, %.1f ms)", rel, msg.priority.upper(), msg.probability, msg.timings_ms.total)
        self._archive(path, rel)

    def _maybe_growing(self, path: Path, st: os.stat_result) -> bool:
        """Recently written: a writer that closes and reopens per chunk may not be done."""
        return time.time() - st.st_mtime < self.cfg.watch.incomplete_timeout

    def _reject(self, rel: str, sha: Optional[str], size: int, mtime_ns: int, reason: str, message: str) -> None:
        err = ErrorMessage(device=self.cfg.mqtt.device_id, file=rel, reason=reason, message=message, sha256=sha)
        log.warning("rejected %s: %s", rel, message)
        try:
            self.store.record(rel, sha, size, mtime_ns, "error", reason=reason, event_id=err.event_id,
                              message=(self.cfg.topic(err.topic_suffix()), encode(err.to_dict()), 1))
        except StoreError as exc:
            log.error("could not journal the rejection of %s: %s (will retry)", rel, exc)
            self.ingest.retry_later(self.root / rel, 10.0)
            return
        self.publisher.wake()
        self.processed += 1
        self.stats.errors += 1

    def _store_failed(self, path: Path, exc: StoreError) -> None:
        """Disk full or read-only state: keep the file, try again later; nothing is lost."""
        log.error("%s: cannot record the result (%s); retrying in 10 s", path.name, exc)
        self.ingest.retry_later(path, 10.0)

    def _archive(self, path: Path, rel: str) -> None:
        if not self.cfg.watch.archive_dir:
            return
        dest = Path(self.cfg.watch.archive_dir) / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = dest.with_name(f"{dest.stem}-{int(time.time())}{dest.suffix}")
            shutil.move(str(path), str(dest))
        except OSError as exc:
            log.warning("could not archive %s: %s", rel, exc)


def run_daemon(cfg: Config, **kwargs) -> int:
    try:
        return Daemon(cfg, **kwargs).run()
    except (StartupError, ConfigError) as exc:
        raise StartupError(str(exc)) from None
