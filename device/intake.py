"""Intake: the journal's rules for one file, between the watcher and the pipeline, and its end.

A file the watcher hands over goes through :meth:`Intake.admit` (read safely; already seen, unchanged,
a duplicate of other content?), :meth:`Intake.start` (the in-progress mark that catches a file the
daemon keeps dying on), the pipeline, and ends in exactly one of :meth:`Intake.scored` (the flag,
finished and journaled with its outbox message in one transaction; for an image of a DICOM study, what it does
to the study's one result: ``device/studies.py``), :meth:`Intake.failed` (an error
message, or "still being written: look again later") or :meth:`Intake.abandon` (not the file's fault:
it is scored after a restart). Every outcome is journaled here and nowhere else.

A state database that cannot be written keeps the file for later (``disk full``: retried with
backoff, said once per episode) or sets :attr:`Intake.fatal` (read-only or corrupt: the daemon exits 1).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import Config
from .contract import ErrorMessage, FlagMessage, encode
from .decoder import Decoded
from .ingest import Ingest, Ready
from . import received
from .pacs_outbox import pacs_item
from .pipeline import Pipeline, sha256_bytes
from .preprocess import ImageDecodeError
from .publisher import Publisher
from .reader import FileRead, file_sig, read_export_file
from .safe_text import path_text, printable
from .stats import Stats
from .store import FileSig, FlagRecord, JournalRow, Store, StoreError
from .studies import Plan, Studies
from .vocab import Priority, Reason

log = logging.getLogger(__name__)

#: decode failures that a file still being written produces
INCOMPLETE_REASONS = {Reason.TRUNCATED, Reason.CORRUPT, Reason.EMPTY_FILE, Reason.UNSUPPORTED_FORMAT,
                      Reason.DICOM_INVALID, Reason.UNREADABLE, Reason.DICOM_NO_PIXELS}
#: a file whose decoding or scoring was under way this many times when the daemon died is refused
MAX_INTERRUPTED = 2


@dataclass
class Job:
    """A file admitted for scoring: read once, hashed once."""

    item: Ready
    rel: str  # relative to the export folder, safe UTF-8 text: the journal key and the message's file
    label: str  # printable, for logs
    read: FileRead
    sha: str
    prev: Optional[JournalRow]  # the last result for this path, which a new one supersedes
    t_start: float  # perf_counter when intake took it
    alone: bool = False  # nothing else was in hand when it came (stats' steps)
    #: a daemon stopped while it was in hand: it is decoded and scored with no other file in hand, so that
    #: another stop blames it alone (not the files that happened to be in the worker beside it)
    suspect: bool = False
    t_submit: float = 0.0  # perf_counter when it went to the decoder
    t_decoded: float = 0.0  # perf_counter when its decode came back

    @property
    def path(self) -> Path:
        return self.item.path

    @property
    def supersedes(self) -> Optional[str]:
        return self.prev.event_id if self.prev is not None else None

    def depends_on(self, other: "Job") -> bool:
        """Its rules read the other's result: the same path (supersede, seen) or the same bytes (duplicate)."""
        return self.rel == other.rel or self.sha == other.sha


class Intake:
    def __init__(self, cfg: Config, root: Path, store: Store, publisher: Publisher, ingest: Ingest,
                 pipeline: Pipeline, stats: Stats, heatmaps=None, drift=None, studies: Optional[Studies] = None):
        self.cfg = cfg
        self.root = root
        self.store = store
        self.publisher = publisher
        self.ingest = ingest
        self.pipeline = pipeline
        self.stats = stats
        self.heatmaps = heatmaps
        self.drift = drift  # device/drift.py's monitor, or None
        #: one result per DICOM study (device/studies.py)
        self.studies = studies if studies is not None else Studies(cfg, store)
        self.processed = 0  # files that ended in a flag or an error
        #: set when the state database can no longer be written or is corrupt: the daemon exits 1
        self.fatal: Optional[str] = None
        self.disk_full_since: Optional[float] = None
        self._backoff = 5.0
        self._arriving: dict[str, tuple[FileSig, float]] = {}  # rel -> (sig, monotonic time it last changed)
        #: the DICOM receiver's spool (``received``): its files are journaled as ``dicom-net/<SOPInstanceUID>.dcm``
        self.spool = (Path(cfg.state.dir) / received.SPOOL).resolve() if cfg.dicom_net.enabled else None
        #: paths a stopped daemon had in hand (read once: every later mark is this daemon's own)
        self._interrupted = store.interrupted()
        self._roots = [root] + ([Path(cfg.watch.archive_dir)] if cfg.watch.archive_dir else []) + \
            ([self.spool] if self.spool is not None else [])

    def is_received(self, path: Path) -> bool:
        """A DICOM instance from the receiver's spool, not a file of the export folder."""
        return self.spool is not None and path.parent == self.spool

    def rel(self, path: Path) -> str:
        if self.is_received(path):
            return received.key(path.stem)
        try:
            return path_text(path.relative_to(self.root))
        except ValueError:
            return path_text(path.name)

    def already_seen(self, path: Path) -> bool:
        """This version of the file is in the journal (the backlog scan skips it)."""
        sig = file_sig(path)
        try:
            return sig is not None and self.store.seen(self.rel(path), sig)
        except StoreError:
            return False

    # ------------------------------------------------------------------ before the pipeline
    def admit(self, item: Ready) -> Optional[Job]:
        """The file to score, or None when the journal's rules settled it (or it is kept for later)."""
        t_start = time.perf_counter()
        path, rel = item.path, self.rel(item.path)
        sig = file_sig(path)
        if sig is None:
            return None  # gone before we got to it (moved away or deleted)
        try:
            if self.store.seen(rel, sig):
                return None  # this version was already processed (restart, repeated event)
            prev = self.store.last_for_path(rel)
        except StoreError as exc:
            return self._store_failed(path, exc)
        if prev is not None and prev.status != "error" and (prev.size, prev.mtime_ns) == (sig.size, sig.mtime_ns):
            # a scored file whose size and modification time are as they were: only its attributes changed
            # (chmod, chown); it is not read again, so a chmod 000 cannot turn it into an error
            self._record(path, rel, prev.sha256, sig, "unchanged", event_id=prev.event_id)
            return None
        label = printable(rel)
        try:
            fr = read_export_file(path, self._roots, int(self.cfg.watch.max_file_mb * 1024 * 1024), label)
        except ImageDecodeError as exc:
            if exc.reason != Reason.NOT_FOUND:
                self._error(path, rel, None, sig, exc.reason, str(exc), prev)
            return None
        job = Job(item, rel, label, fr, sha256_bytes(fr.data), prev, t_start, suspect=rel in self._interrupted)
        return job if self._new_content(job) else None

    def recheck(self, job: Job) -> Optional[Job]:
        """The journal's rules again, on the bytes already read: after the file it depends on is journaled."""
        try:
            if self.store.seen(job.rel, job.read.sig):
                return None
            job.prev = self.store.last_for_path(job.rel)
        except StoreError as exc:
            return self._store_failed(job.path, exc)
        return job if self._new_content(job) else None

    def _new_content(self, job: Job) -> bool:
        """False when these bytes were said already: under this path (unchanged) or another (duplicate)."""
        try:
            first = self.store.by_hash(job.sha)
        except StoreError as exc:
            self._store_failed(job.path, exc)
            return False
        if job.prev is not None and job.prev.sha256 == job.sha:
            # same bytes as the last result for this path: a chmod, touch or re-export; nothing new to say
            self._record(job.path, job.rel, job.sha, job.read.sig, "unchanged", event_id=job.prev.event_id)
            return False
        if first is not None and first.path != job.rel:
            self._duplicate(job, first)
            return False
        return True

    def start(self, job: Job) -> bool:
        """Mark it in progress (journaled before decoding: a crash leaves the mark behind); False when the
        daemon already died on it too often, or the mark cannot be written."""
        try:
            interrupted = self.store.begin(job.rel, job.sha)
        except StoreError as exc:
            self._store_failed(job.path, exc)
            return False
        self._interrupted.discard(job.rel)  # from here on, a mark on it is this daemon's own
        if interrupted >= MAX_INTERRUPTED:
            self._error(job.path, job.rel, job.sha, job.read.sig, Reason.CRASHED_DECODER,
                        f"{job.rel}: the daemon stopped {interrupted} times while this file was being decoded or "
                        "scored (killed, out of memory, or a crash); refused so that it cannot stop the appliance "
                        "again", job.prev)
            return False
        return True

    # ------------------------------------------------------------------ the ends
    def scored(self, job: Job, d: Decoded, p: float, infer_ms: float, total_ms: float) -> None:
        """A scored file: its message, whole (a flag, or a study's news: ``device/studies.py``); journaled and
        queued in one transaction; then the heat map."""
        file_mtime = job.read.sig.mtime_ns / 1e9
        msg = self.pipeline.message(d, p, infer_ms, total_ms, job.rel, job.sha, file_mtime=file_mtime,
                                    seen_at=job.item.seen_at, supersedes=job.supersedes)
        if self.is_received(job.path):
            msg.received_from = self._caller(job.rel)
        pacs = pacs_item(self.cfg, job.read.data, msg) if self.cfg.pacs.destinations else None
        try:
            plan = self.studies.scored(msg, pacs)
        except StoreError as exc:
            self._store_failed(job.path, exc)
            return
        if not (self._flag(job, msg) if plan is None else self._study_result(job, msg.priority, plan)):
            return
        self._arriving.pop(job.rel, None)
        if self.heatmaps is not None and msg.priority != Priority.ROUTINE and (plan is None or plan.flag is msg):
            self.heatmaps.submit(msg.event_id, job.rel, job.read.data, d.pixels)  # the flag is queued already
        self.processed += 1
        self.stats.by_priority[msg.priority] += 1
        now = time.perf_counter()
        self.stats.latencies.append((now - job.t_start) * 1000.0)
        self._steps(job, infer_ms, now)
        if self.drift is not None:  # after the flag is queued: no latency added to it
            self.drift.scored(p, msg.priority, d.inputs)
        log.info("%s: %s (p=%.4f, %.1f ms)%s%s", job.label, msg.priority.upper(), msg.probability, total_ms,
                 f", supersedes {msg.supersedes}" if msg.supersedes and plan is None else "",
                 "" if plan is None else f"; study {plan.row.uid} ({plan.row.images} scored): "
                 + (f"{str(plan.row.priority).upper()} stays" if plan.flag is None else
                    f"now {str(plan.row.priority).upper()}, flag {plan.flag.event_id}"
                    + (f" replaces {plan.flag.supersedes}" if plan.flag.supersedes else "")))
        self._archive(job.path, job.rel)

    def _flag(self, job: Job, msg: FlagMessage) -> bool:
        """Journal the flag of an image without a study and queue it (no SR: an SR needs the study's identity)."""
        payload = encode(msg.to_dict())
        record = FlagRecord(msg.event_id, msg.priority, msg.probability, payload, msg.written_ts,
                            job.item.seen_at, time.time())
        # fsync'd by the publisher before it sends (group commit), unless the file is archived right away: a
        # power cut must not leave it moved out of the export folder with its result unwritten
        return self._record(job.path, job.rel, job.sha, job.read.sig, msg.priority, event_id=msg.event_id,
                            supersedes=msg.supersedes, message=(self.cfg.topics.flag(msg.priority), payload, 1),
                            flag=record, durable=bool(self.cfg.watch.archive_dir))

    def _study_result(self, job: Job, priority: str, plan: Plan) -> bool:
        """An image of a study: journaled with what it does to the study, the study's new flag or its news (its
        SR is queued when the study closes)."""
        q = self.studies.queued(plan)
        return self._record(job.path, job.rel, job.sha, job.read.sig, priority, event_id=q.event_id,
                            supersedes=plan.flag.supersedes if plan.flag else None, message=(q.topic, q.payload, 1),
                            flag=q.flag, durable=bool(self.cfg.watch.archive_dir), study=plan.change)

    def _steps(self, job: Job, infer_ms: float, journaled: float) -> None:
        add = self.stats.steps.add
        for step, ms in (("queue", job.t_start - job.item.t_ready), ("admit", job.t_submit - job.t_start),
                         ("decode", job.t_decoded - job.t_submit),
                         ("journal", journaled - job.t_decoded - infer_ms / 1000.0)):
            add(step, ms * 1000.0, job.alone)
        add("infer", infer_ms, job.alone)

    def failed(self, job: Job, exc: ImageDecodeError) -> None:
        """The pipeline refused it: an error, unless it looks like a file still being written."""
        if exc.reason in INCOMPLETE_REASONS and not self.is_received(job.path) and \
                self._still_arriving(job.rel, job.read.sig):  # a received instance is whole: no wait
            log.debug("%s: %s; still being written? retrying", job.label, exc.reason)
            self.abandon(job)
            self.ingest.retry_later(job.path, max(self.cfg.watch.settle_seconds, 0.2))
            return
        self._error(job.path, job.rel, job.sha, job.read.sig, exc.reason, str(exc), job.prev, ids=exc.ids)

    def internal_error(self, job: Job, exc: Exception) -> None:
        log.error("%s: scoring failed", job.label, exc_info=exc)
        self._error(job.path, job.rel, job.sha, job.read.sig, Reason.INTERNAL_ERROR,
                    f"{job.rel}: {type(exc).__name__}: {exc}", job.prev)

    def abandon(self, job: Job) -> None:
        """Its processing ended without a result (retried later): no longer an interrupted one."""
        try:
            self.store.end(job.rel)
        except StoreError as exc:
            log.debug("%s: in-progress marker not cleared: %s", job.label, exc)

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

    def _duplicate(self, job: Job, first: JournalRow) -> None:
        """A copy of content already processed under another name: say so, never alert twice."""
        what = first.status if first.status != "error" else f"rejected: {first.reason}"
        err = ErrorMessage(device=self.cfg.mqtt.device_id, file=job.rel, reason=Reason.DUPLICATE_OF,
                           message=f"{job.rel}: same content as {first.path} (event {first.event_id}, {what}); "
                                   "not scored again",
                           sha256=job.sha, duplicate_of=first.event_id)
        if self._record(job.path, job.rel, job.sha, job.read.sig, "duplicate", reason=Reason.DUPLICATE_OF,
                        event_id=err.event_id, message=(self.cfg.topics.error(), encode(err.to_dict()), 1)):
            self.stats.duplicates += 1
            log.info("%s: same content as %s (already %s): not alerted again", job.label, printable(first.path),
                     what)

    def _error(self, path: Path, rel: str, sha: Optional[str], sig: FileSig, reason: str, message: str,
               prev: Optional[JournalRow], ids: Optional[dict[str, str]] = None) -> None:
        """An error message for the file; ``ids``: a DICOM image's, whose study then names it as refused."""
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
        try:
            plan = self.studies.refused(rel, reason, ids)
        except StoreError as exc:
            self._store_failed(path, exc)
            return
        if self._record(path, rel, sha, sig, "error", reason=str(reason), event_id=err.event_id,
                        supersedes=supersedes, message=(self.cfg.topics.error(), encode(err.to_dict()), 1),
                        study=plan.change if plan else None, also=self.studies.queued(plan) if plan else None):
            self._arriving.pop(rel, None)
            self.processed += 1
            self.stats.errors += 1
            if self.drift is not None and reason == Reason.NOT_A_RADIOGRAPH:
                self.drift.refused()

    # ------------------------------------------------------------------ the journal
    def _record(self, path: Path, rel: str, sha: Optional[str], sig: FileSig, status: str, durable: bool = False,
                **kw) -> bool:
        """Journal one outcome. Not fsync'd here: its message is sent only after the publisher's fsync, and
        an outcome a power cut takes back is decided again on the next start (the file is still there). A
        received instance's is fsync'd at once: its spool file goes next, and the sender was told "stored"."""
        durable = durable or self.is_received(path)
        try:
            self.store.record(rel, sha, sig, status, durable=durable, **kw)
        except StoreError as exc:
            self._store_failed(path, exc)
            return False
        self._store_ok()
        if kw.get("message"):
            self.publisher.wake()
        if self.is_received(path):  # its result is journaled: the spool lets it go
            received.finish(self.cfg, path)
        return True

    def _caller(self, rel: str) -> Optional[str]:
        try:
            return self.store.received_from(rel)
        except StoreError as exc:  # the flag goes out without it rather than not at all
            log.warning("%s: calling AE title not read from the journal: %s", printable(rel), exc)
            return None

    def _store_failed(self, path: Path, exc: StoreError) -> None:
        """Disk full or read-only state: keep the file, say so once per episode, retry with backoff."""
        if exc.corrupt:
            self.fatal = (f"state database corrupt ({exc}); move it aside and restart: pneumoflag starts a new one, "
                          "and the files still in the export folder are scored again")
            return
        if exc.read_only:  # does not pass with time, unlike a full disk: the daemon exits 1
            self.fatal = self.read_only_text(str(exc))
            return
        if self.disk_full_since is None:
            self.disk_full_since = time.monotonic()
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
        self.ingest.retry_later(path, self._backoff)
        self._backoff = min(self._backoff * 2, 60.0)

    def read_only_text(self, why: str) -> str:
        return (f"state database {self.store.path} can no longer be written ({why}): nothing can be journaled, so "
                "nothing is scored; the files waiting are scored after a restart with a writable state disk")

    def _store_ok(self) -> None:
        if self.disk_full_since is not None:
            log.info("state database writable again after %.0f s", time.monotonic() - self.disk_full_since)
            self.disk_full_since = None
            self._backoff = 5.0

    def _archive(self, path: Path, rel: str) -> None:
        if not self.cfg.watch.archive_dir or self.is_received(path):  # the spool's files: received.finish
            return
        dest = Path(self.cfg.watch.archive_dir) / path.relative_to(self.root)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = dest.with_name(f"{dest.stem}-{int(time.time())}{dest.suffix}")
            shutil.move(str(path), str(dest))
        except OSError as exc:
            log.warning("could not archive %s: %s", printable(rel), exc)
