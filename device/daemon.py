"""``pneumoflag watch``: the main job. Builds the stages and runs them: watcher (``ingest``) -> the journal's
rules (``intake``) -> decode in the worker, infer (``pipeline``) -> journal and outbox (``store``) -> MQTT
(``publisher``). Overlapped: the worker decodes the next file while this one is inferred and journaled.

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
- with ``pacs.destinations`` a scored DICOM image's SR is queued in its flag's transaction and sent to each
  destination in order, deleted only on the peer's success (``pacs_outbox``);
- with ``dicom_net.enabled`` a DICOM receiver runs beside the watcher (``received``): an instance answered
  "stored" is in the state folder and journaled, goes through the same intake, decoder, model and outbox as a
  dropped file, is scored once (a resend too), and survives a kill -9 (handed over again at the next start);
- SIGTERM finishes the images in hand, publishes ``offline`` and exits 0.
"""
from __future__ import annotations

import logging
import signal
import sqlite3
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional



from . import __version__
from .card import CardError
from .config import EMBEDDED_BROKER, Config
from .contract import encode
from .decoder import DecoderUnavailable, DecodeWorker
from .drift import DriftMonitor
from .escalation import AckDesk
from .ingest import Ingest, IngestError, Ready
from .intake import Intake, Job
from .pipeline import Pipeline
from .preprocess import ImageDecodeError
from .publisher import Publisher
from .resend import ResendDesk
from .scorer import load_scorer
from .sdnotify import Notifier
from .store import Store, StoreError
from .statelock import StateLock, StateLocked
from .stats import Stats, time_to_notification

log = logging.getLogger(__name__)

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
        self.broker = None
        self.root = Path(cfg.watch.dir).resolve() if cfg.watch.dir else None
        self._fatal: Optional[str] = None  # set by a dying worker thread: the main loop exits 1
        #: the files in the decoder, oldest first: (job, perf_counter at submit)
        self._decoding: deque[tuple[Job, float]] = deque()
        self.intake: Optional[Intake] = None  # made by _start, once the store and publisher exist
        self._wd: Optional[float] = None  # watchdog ping interval (None: no watchdog)
        self._next_wd = 0.0
        self.received = None  # the DICOM receiver (dicom_net.enabled), started by _start
        self.pacs_sender = None  # the SR sender (pacs.destinations), started by _start

    # ------------------------------------------------------------------ startup
    def _start(self) -> None:
        cfg = self.cfg
        if self.root is None:
            raise StartupError("no export folder: give `pneumoflag watch DIR` or set watch.dir")
        self.ingest = Ingest(self.root, cfg.watch.recursive, cfg.watch.polling, cfg.watch.poll_interval,
                             cfg.watch.settle_seconds, cfg.watch.ignore,
                             exclude=[cfg.watch.archive_dir] if cfg.watch.archive_dir else [],
                             rescan_interval=cfg.watch.rescan_interval)
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
            self.scorer, self.card = load_scorer(cfg.model.path, cfg.model.accelerator, cfg.model.threads,
                                                 burst_threads=cfg.model.burst_threads)
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
        if cfg.dicom_net.enabled:
            self._start_receiver()
        try:
            self.pipeline.decoder.start()
        except DecoderUnavailable as exc:
            raise StartupError(str(exc)) from None
        if not cfg.mqtt.broker:
            self._start_embedded_broker()
        self.publisher = Publisher(cfg, self.store, self.stats.steps)
        self.acks = AckDesk(cfg, self.store, self.publisher)
        self.resends = ResendDesk(cfg, self.store, self.publisher)
        self.heatmaps = None
        if cfg.explain.enabled:
            from .heatmaps import HeatmapWorker

            self.heatmaps = HeatmapWorker(cfg, self.card, self.pipeline, self.store, self.publisher)
            self.heatmaps.start()
        self.drift = DriftMonitor.for_daemon(cfg, self.card)
        if self.drift is not None:
            self.drift.on_change = lambda _: self.publish_drift()
        self.intake = Intake(cfg, self.root, self.store, self.publisher, self.ingest, self.pipeline, self.stats,
                             self.heatmaps, self.drift)
        self.ingest.seen = self.intake.already_seen
        self.publisher.start()
        if cfg.pacs.destinations:
            from .pacs_outbox import PacsSender

            self.pacs_sender = PacsSender(cfg, self.store)
            self.pacs_sender.start()
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

    def _start_receiver(self) -> None:
        """The DICOM receiver, its spool recovered first; what it receives waits in the watcher's queue."""
        from .dicom_net import DicomNetError
        from .received import ReceivedInstances

        try:
            self.received = ReceivedInstances(self.cfg, self.ingest.hand_over)
            self.received.start()
        except (DicomNetError, StoreError) as exc:
            raise StartupError(str(exc)) from None

    def _stop_receiver(self) -> None:
        """Stop taking instances (the unanswered ones are resent by their senders); before the store closes."""
        if self.received is not None:
            self.received.stop()
            self.received = None

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
            self._stop_receiver()
            if getattr(self, "pipeline", None) is not None and self.pipeline.decoder is not None:
                self.pipeline.decoder.stop()  # the worker must not outlive a failed start
            if getattr(self, "state_lock", None) is not None:  # a refused start holds the state folder no longer
                self.state_lock.release()
            raise
        self._install_signals()
        self.ingest.start()  # events first, so nothing arriving during the backlog scan is missed
        if self.cfg.watch.backlog:
            self.ingest.enqueue_unseen("arrived while the daemon was down")
        self.notifier.ready(f"watching {self.root}")
        if self.on_ready:
            self.on_ready(self)
        self._wd = self.notifier.watchdog_interval()
        self._next_wd = next_health = next_escalation = time.monotonic()
        next_stats = time.monotonic() + min(5.0, self.cfg.mqtt.stats_interval)
        status = 0
        try:
            while not self.stop_event.is_set():
                self._advance(self._next_file())
                if self.drift is not None and not self._decoding:
                    self.drift.judge()  # no file in hand: the window as it is now
                self.acks.journal_received()
                self.resends.serve_requests()
                now = time.monotonic()
                if now >= next_escalation:
                    next_escalation = now + 1.0
                    self.acks.escalate_due()
                    self._close_studies()
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
            try:
                self._drain()  # the images in hand are finished
            finally:
                self._shutdown()
        return status

    def _close_studies(self) -> None:
        """Close the studies that went quiet (``dicom.study_quiet_seconds``): their news and SRs queued."""
        try:
            if self.intake.studies.close_quiet():
                self.publisher.wake()
        except StoreError as exc:  # tried again in a second; the files' own journaling says the disk's state
            log.debug("quiet studies not closed yet: %s", exc)

    def _watchdog_tick(self) -> None:
        """Ping the watchdog when due, from the main loop or while it waits on a (bounded) decode;
        never once a worker thread has died."""
        now = time.monotonic()
        failed = self._fatal or (self.intake is not None and (self.intake.fatal or self.publisher.sync_error))
        if self._wd and now >= self._next_wd and not failed:
            self.notifier.watchdog()
            self._next_wd = now + self._wd

    def _healthy(self) -> bool:
        """False when the process must exit non-zero: a worker thread died, the state database cannot be
        written, or the watcher keeps stopping."""
        if not self._fatal and self.intake.fatal:
            self._fatal = self.intake.fatal
        if not self._fatal and self.publisher.sync_error:
            self._fatal = self.publisher.sync_error
        if not self._fatal and self.store.on_read_only_fs():  # found even when no file arrives to be written
            self._fatal = self.intake.read_only_text("its file system is mounted read-only")
        if self._fatal:
            log.critical("%s; exiting with status 1 so the service manager restarts pneumoflag", self._fatal)
            return False
        self._restore_store()
        return self.ingest.check_health()

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook: a worker thread ended with an exception."""
        name = args.thread.name if args.thread else "?"
        log.critical("thread %s died: %s: %s", name, args.exc_type.__name__, args.exc_value,
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        self._fatal = f"thread {name} died ({args.exc_type.__name__}: {args.exc_value})"

    @property
    def processed(self) -> int:
        return self.intake.processed if self.intake is not None else 0

    def _done(self) -> bool:
        if self.exit_after is not None and self.processed >= self.exit_after:
            log.info("processed %d files (--exit-after): stopping", self.processed)
            return True
        if self.once and self.ingest.depth() == 0 and not self._decoding:
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
        self._stop_receiver()
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
        if self.drift is not None:
            self.drift.judge()
        self.publish_stats()
        if self.pacs_sender is not None:
            self.pacs_sender.stop()
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
        health = {"export_folder": self.ingest.health, "state_disk_full": self.intake.disk_full_since is not None}
        try:
            health["delivered_seq"] = self.store.delivered_seq()
        except StoreError:
            pass
        if self.cfg.pacs.destinations:
            try:
                health["pacs"] = self.store.pacs_status(self.cfg.pacs.destinations)
            except StoreError:
                pass
        try:
            ttn = time_to_notification(self.store.flag_times(time.time() - 86400))
        except StoreError:
            ttn = {}
        snap = self.stats.snapshot(self.cfg, self.ingest.depth(), outbox, self.scorer.report.accelerator,
                                   f"{self.card.name} {self.card.version}", health, ttn,
                                   self.drift.summary() if self.drift is not None else None)
        self.publisher.publish_now(self.cfg.topics.stats(), encode(snap), qos=0, retain=True)
        self.publish_drift()

    def publish_drift(self) -> None:
        """The drift state, retained (at each change and with each stats message), and saved for a restart."""
        if self.drift is not None:
            self.drift.save()
            self.publisher.publish_now(self.cfg.topics.drift(), encode(self.drift.message().to_dict()), qos=1,
                                       retain=True)


    # ------------------------------------------------------------------ files: ingest -> intake -> pipeline
    def _next_file(self) -> Optional[Ready]:
        """The next ready file; no wait while files are in the decoder, and none past ``--exit-after``."""
        if self.exit_after is not None and self.processed + len(self._decoding) >= self.exit_after:
            return None
        return self.ingest.get(timeout=0.0 if self._decoding else 0.5)

    def _advance(self, item: Optional[Ready]) -> None:
        """One step, overlapped: admit ``item`` while the worker decodes the files before it; once the
        worker holds :data:`Pipeline.DEPTH` files (or no file is ready: ``None``), collect the oldest, hand the
        worker ``item``, and infer and journal the oldest while the worker decodes the next."""
        job = self.intake.admit(item) if item is not None else None
        if job is not None:
            job.alone = not self._decoding and self.ingest.depth() == 0
        if job is not None and any(job.depends_on(earlier) for earlier, _ in self._decoding):
            self._drain()  # this file's rules need an earlier one's result: journal those first
            job = self.intake.recheck(job)
        if job is not None and job.suspect:  # a stopped daemon had it: alone in hand, so a stop on it is its own
            self._drain()
            if self.intake.start(job):
                self._submit(job)
            self._drain()
            return
        done = None
        if self._decoding and (job is None or len(self._decoding) >= self.pipeline.DEPTH):
            done = self._decoding.popleft()
        decoded = self._collect(*done) if done is not None else None
        if decoded is not None:
            done[0].t_decoded = time.perf_counter()
        if job is not None and self.intake.start(job):
            self._submit(job)
        if decoded is not None:
            self._finish(done[0], decoded, done[1])

    def _drain(self) -> None:
        """Finish every file in the decoder."""
        while self._decoding:
            self._advance(None)

    def _handle(self, item: Ready) -> None:
        """One file, start to end (nothing else in the decoder)."""
        self._advance(item)
        self._drain()

    def _submit(self, job: Job) -> None:
        try:
            self.pipeline.submit(job.read.data, job.rel)
        except ImageDecodeError as exc:  # refused before the worker (a header flood)
            self.intake.failed(job, exc)
            return
        except DecoderUnavailable as exc:  # not the file's fault: it is scored after the restart
            self.intake.abandon(job)
            self._fatal = f"the decoder worker cannot be started ({exc})"
            return
        job.t_submit = time.perf_counter()
        self._decoding.append((job, job.t_submit))

    def _collect(self, job: Job, t_submit: float):
        """The decode (the worker gives a file a second try when it died on it), or None when the file
        ended here (refused, or kept for after a restart)."""
        try:
            return self.pipeline.collect()
        except DecoderUnavailable as exc:
            self.intake.abandon(job)
            self._fatal = f"the decoder worker cannot be started ({exc})"
        except ImageDecodeError as exc:
            self.intake.failed(job, exc)
        except Exception as exc:  # noqa: BLE001 - one file's internal error, journaled as such
            self.intake.internal_error(job, exc)
        return None

    def _finish(self, job: Job, decoded, t_submit: float) -> None:
        try:
            p, infer_ms = self.pipeline.infer(decoded, job.rel, busy=bool(self._decoding))
        except ImageDecodeError as exc:
            self.intake.failed(job, exc)
            return
        except Exception as exc:  # noqa: BLE001
            self.intake.internal_error(job, exc)
            return
        self.intake.scored(job, decoded, p, infer_ms, (time.perf_counter() - t_submit) * 1000.0)
