"""Durable state in SQLite: the outbox (results not yet acknowledged by the broker) and the
journal (every file processed, by path and content hash).

A result and its journal record are written in one transaction, before anything
is published: after a crash a file is either fully recorded (its message waits
in the outbox) or not recorded at all (it is scored again). So a restart
neither re-alerts nor skips, and a broker outage loses nothing.

Paths are stored as :func:`~pneumoflag.device.safe_text.path_text` (valid UTF-8
whatever bytes the name had). A file counts as already seen only when path,
size, mtime *and* ctime match: a chmod or any attribute change brings it back.
When the state disk is full every write raises :class:`StoreError` with
``disk_full`` set, and nothing half-written is left behind; a database that
can no longer be written at all (a read-only file system, SQLITE_READONLY) has
``read_only`` set instead: that does not pass with time, unlike a full disk.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Optional

from .contract import MAX_RESEND, encode, utc_iso

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL UNIQUE,
    topic      TEXT NOT NULL,
    payload    BLOB NOT NULL,
    qos        INTEGER NOT NULL DEFAULT 1,
    created    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    path         TEXT NOT NULL,
    sha256       TEXT,
    size         INTEGER,
    mtime_ns     INTEGER,
    status       TEXT NOT NULL,   -- urgent | flag | routine | error | duplicate
    reason       TEXT,
    event_id     TEXT,
    processed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_path ON journal(path);
CREATE INDEX IF NOT EXISTS journal_sha ON journal(sha256);
-- one row per flag: the times that make time-to-notification, and its acknowledgement and escalations
CREATE TABLE IF NOT EXISTS flags (
    event_id       TEXT PRIMARY KEY,
    path           TEXT NOT NULL,
    priority       TEXT NOT NULL,
    probability    REAL NOT NULL,
    payload        BLOB NOT NULL,   -- the flag message as published
    written_at     REAL,            -- DICOM acquisition/content time, else the file's mtime
    seen_at        REAL,            -- the watcher handed the file over
    scored_at      REAL NOT NULL,
    delivered_at   REAL,            -- the broker acknowledged it (PUBACK)
    acked_at       REAL,            -- the first acknowledgement from a nursing station
    acked_by       TEXT,
    ack_station    TEXT,
    escalations    INTEGER NOT NULL DEFAULT 0,
    last_escalated REAL,
    heatmap        TEXT             -- the overlay's file name under STATE/heatmaps (explain.enabled)
);
CREATE INDEX IF NOT EXISTS flags_open ON flags(priority, acked_at);
-- a file being decoded and scored now: left behind when the daemon dies on it (see Store.begin)
CREATE TABLE IF NOT EXISTS in_progress (
    path     TEXT PRIMARY KEY,
    sha256   TEXT,
    attempts INTEGER NOT NULL,      -- times its processing began without a result being journaled
    started  REAL NOT NULL
);
-- every acknowledgement received, in order (a flag may be acknowledged by several stations)
CREATE TABLE IF NOT EXISTS acks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL,
    station     TEXT NOT NULL,
    by_name     TEXT NOT NULL,
    at          TEXT NOT NULL,      -- as the station said
    received_at REAL NOT NULL,
    known_flag  INTEGER NOT NULL     -- 0: no flag of this daemon has that event id
);
-- every instance the DICOM receiver answered "stored" (device/received.py), written before the answer: its
-- result is the journal row of ``path``; kept after that, so a resend is answered success and not scored again
CREATE TABLE IF NOT EXISTS received (
    sop_instance_uid TEXT PRIMARY KEY,
    path             TEXT NOT NULL,  -- its journal key, dicom-net/<SOPInstanceUID>.dcm
    calling_ae       TEXT NOT NULL,
    peer             TEXT,           -- the sender's address
    received_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS received_path ON received(path);
-- results waiting to go back to PACS as a structured report (device/pacs_outbox.py), one row per study result
-- and destination, queued when the study closes; ``id`` is the order per destination. Keyed by the study's flag
-- the SR reports, whose event id also gives the SR its SOP Instance UID.
CREATE TABLE IF NOT EXISTS pacs_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL,
    destination TEXT NOT NULL,      -- AE@HOST:PORT, as in pacs.destinations
    kind        TEXT NOT NULL DEFAULT 'sr',  -- sr | heatmap (a Secondary Capture, pacs.send_heatmap)
    payload     BLOB,               -- heatmap: the overlay PNG
    header      BLOB NOT NULL,      -- the source image's DICOM header (Part 10, no pixel data): what the SR copies
    finding     TEXT NOT NULL,      -- JSON: probability, priority, threshold, model (name, version, sha256)
    created     REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    UNIQUE (event_id, destination, kind)
);
-- one row per DICOM study (device/studies.py): its current result and its refused views
CREATE TABLE IF NOT EXISTS studies (
    uid         TEXT PRIMARY KEY,   -- StudyInstanceUID
    flag_event  TEXT,               -- the study's current flag (NULL: none of its images scored yet)
    flag_file   TEXT,               -- the image whose result that is: the highest of its images'
    priority    TEXT,               -- that result's priority
    images      INTEGER NOT NULL,   -- its images scored (each file once)
    rejected    TEXT NOT NULL,      -- JSON [{file, reason}]: its images refused (a lateral, a non-chest view)
    accession   TEXT,
    last_image  REAL NOT NULL,      -- when its newest image was journaled (wall clock: it survives a restart)
    closed_at   REAL                -- NULL while open
);
CREATE INDEX IF NOT EXISTS studies_open ON studies(closed_at, last_image);
-- each scored image of a study, by file: its own result (the study's is the highest) and what its SR needs
CREATE TABLE IF NOT EXISTS study_images (
    uid       TEXT NOT NULL,
    file      TEXT NOT NULL,        -- its journal key
    priority  TEXT NOT NULL,
    message   BLOB NOT NULL,        -- its result as a flag (JSON), published when it becomes the study's
    header    BLOB,                 -- its DICOM header and finding, for the study's SR (pacs.destinations)
    finding   TEXT,
    scored_at REAL NOT NULL,
    PRIMARY KEY (uid, file)
);
"""
#: columns added after the first release: (table, column, type). ``flags.study``: the StudyInstanceUID of a study's
#: flag; ``pacs_outbox.held_for``: a heat map of an open study's result, held (that study's uid) until its close
#: queues it after the study's SR
MIGRATIONS = (("journal", "ctime_ns", "INTEGER"), ("journal", "supersedes", "TEXT"), ("journal", "heatmap", "TEXT"),
              ("flags", "heatmap", "TEXT"), ("flags", "seq", "INTEGER"), ("flags", "study", "TEXT"),
              ("pacs_outbox", "held_for", "TEXT"))
#: indexes on migrated columns, made after the migrations
LATE_INDEXES = "CREATE UNIQUE INDEX IF NOT EXISTS flags_seq ON flags(seq)"



class StoreError(RuntimeError):
    """The state database cannot be written (disk full, read-only, I/O error)."""

    def __init__(self, message: str, disk_full: bool = False, corrupt: bool = False, read_only: bool = False):
        super().__init__(message)
        self.disk_full = disk_full
        self.corrupt = corrupt
        self.read_only = read_only


@dataclass
class OutboxRow:
    seq: int
    event_id: str
    topic: str
    payload: bytes
    qos: int


@dataclass
class JournalRow:
    path: str
    sha256: Optional[str]
    status: str
    reason: Optional[str]
    event_id: Optional[str]
    size: Optional[int] = None
    mtime_ns: Optional[int] = None


@dataclass
class FlagRecord:
    """What the flags table keeps of a flag when it is journaled."""

    event_id: str
    priority: str
    probability: float
    payload: bytes
    written_at: Optional[float]
    seen_at: Optional[float]
    scored_at: float


@dataclass(frozen=True)
class PacsItem:
    """What an SR is built from later, queued with its flag for every destination."""

    header: bytes
    finding: str  # JSON
    destinations: tuple[str, ...]


@dataclass
class PacsRow:
    id: int
    event_id: str
    destination: str
    header: bytes
    finding: str
    attempts: int
    kind: str = "sr"
    payload: Optional[bytes] = None


@dataclass
class StudyRow:
    """A study as the studies table keeps it (``device/studies.py`` decides what goes in)."""

    uid: str
    flag_event: Optional[str]
    flag_file: Optional[str]
    priority: Optional[str]
    images: int
    rejected: str  # JSON
    accession: Optional[str]
    last_image: float
    closed_at: Optional[float] = None


#: the studies columns a :class:`StudyRow` is made of, in its field order
STUDY_COLUMNS = "uid, flag_event, flag_file, priority, images, rejected, accession, last_image, closed_at"


@dataclass
class StudyImage:
    """One scored image of a study (the study_images table)."""

    file: str
    priority: str
    message: bytes  # its FlagMessage as JSON
    header: Optional[bytes]
    finding: Optional[str]
    scored_at: float


@dataclass
class StudyChange:
    """What one image does to its study, written in that image's transaction: the study as it now stands, the
    image's own result (``image``: scored) or its removal (``drop``: refused now)."""

    row: StudyRow
    image: Optional[StudyImage] = None
    drop: Optional[str] = None


@dataclass(frozen=True)
class Queued:
    """A message queued in a result's own transaction beside its main one: a study's news, or its new flag
    (``flag``: numbered and kept in the flags table like any flag)."""

    event_id: str
    topic: str
    payload: bytes
    qos: int = 1
    flag: Optional[FlagRecord] = None


@dataclass
class DueEscalation:
    event_id: str
    payload: bytes
    escalations: int
    delivered_at: float  # wall clock, as stamped at the PUBACK
    last_escalated: Optional[float] = None  # wall clock


#: the journal columns a :class:`JournalRow` is made of, in its field order
JOURNAL_COLUMNS = "path, sha256, status, reason, event_id, size, mtime_ns"


@dataclass(frozen=True)
class FileSig:
    """What identifies one version of a file on disk."""

    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileSig":
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


#: the signature of a file that is there but cannot be looked at (a path longer than PATH_MAX): impossible
#: for a real file, so the file is handed on and read, and refused with its reason instead of vanishing
UNSTATABLE = FileSig(-1, -1, -1)
#: the state database's name in ``state.dir``
STATE_DB = "pneumoflag.db"


class Store:
    def __init__(self, state_dir: Path | str, filename: str = STATE_DB):
        self.path = Path(state_dir) / filename
        self._lock = threading.Lock()
        self._wal: Optional[str] = None  # the write-ahead log :meth:`sync` flushes (None: not in WAL mode)
        self._synced_seq = 0  # every outbox row up to this seq is on disk (fsync'd): only those are sent
        self._synced_pacs = 0  # the same for the PACS outbox
        self._unsynced = True  # a commit since the last sync has not been fsync'd (at open: who knows)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = self._connect()
            self._write(self._migrate)
            self._db.execute("PRAGMA quick_check").fetchone()
            # a write now, not at the first radiograph: a read-only state folder fails the start
            self._db.execute("PRAGMA user_version = 1")
            if not os.access(self.path.parent, os.W_OK):
                raise OSError(f"the folder {self.path.parent} is not writable")
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from None
        self._inode = self.path.stat().st_ino
        self.sync()  # what an earlier process committed without an fsync is on disk before it is sent

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Make the tables and add the columns an older database lacks, in one write transaction: processes
        opening the database at once wait their turn (no ``duplicate column name``, no busy deadlock)."""
        for statement in SCHEMA.split(";\n"):
            if statement.strip():
                db.execute(statement)
        for table, column, kind in MIGRATIONS:
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        db.execute(LATE_INDEXES)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        for attempt in range(100):  # switching to WAL does not wait for a lock held by another process opening it
            try:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                self._wal = f"{self.path}-wal" if str(mode).lower() == "wal" else None
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.1)
        db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss
        return db

    def _error(self, exc: BaseException) -> StoreError:
        full = _is_disk_full(exc)
        read_only = not full and (_is_read_only(exc) or self.on_read_only_fs() or
                                  (_is_io_error(exc) and self._refuses_new_files()))
        return StoreError(f"state database {self.path}: {exc}", full, _is_corrupt(exc), read_only)

    def _refuses_new_files(self) -> bool:
        """After an I/O error: can the state folder still take a file? EROFS says the disk went read-only
        (ext4 ``errors=remount-ro`` after a media error leaves it mounted ``rw,emergency_ro``)."""
        probe = self.path.with_name(f".{self.path.name}.probe")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            probe.unlink()
        except OSError as exc:
            return exc.errno in (errno.EROFS, errno.EIO)
        return False

    def on_read_only_fs(self) -> bool:
        """The state folder's file system is mounted read-only (remounted after an I/O error, say)."""
        try:
            return bool(os.statvfs(self.path.parent).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    def restore_if_deleted(self) -> bool:
        """The database file was deleted while open: write it back from the open copy (True when it did).

        Without this a restart would start an empty journal and alert every file in the folder again.
        """
        try:
            if self.path.stat().st_ino == self._inode:
                return False
        except FileNotFoundError:
            pass
        with self._lock:
            tmp = self.path.with_name(f".{self.path.name}.restore")
            tmp.unlink(missing_ok=True)
            target = sqlite3.connect(str(tmp))
            try:
                self._db.backup(target)
            finally:
                target.close()
            os.replace(tmp, self.path)
            self._db.close()
            self._db = self._connect()
            self._inode = self.path.stat().st_ino
        return True

    def _read(self, sql: str, args: tuple = (), one: bool = False):
        """A query; any SQLite failure (a corrupt or vanished database) becomes :class:`StoreError`."""
        with self._lock:
            try:
                cur = self._db.execute(sql, args)
                return cur.fetchone() if one else cur.fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, fn, durable: bool = True):
        """One write transaction; ``durable=False`` commits it without an fsync. The level is set and
        restored under the same lock as the write, so another thread's durable write never runs at it."""
        with self._lock:
            try:
                if not durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    out = self._transaction(fn)
                finally:
                    if not durable:
                        self._db.execute("PRAGMA synchronous=FULL")
                if durable:  # the commit's fsync of the log covered every commit before it
                    self._synced(self._tops())
                return out
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def _tops(self) -> dict[str, int]:
        """The last row id each outbox (MQTT, PACS) has handed out."""
        return dict(self._db.execute("SELECT name, seq FROM sqlite_sequence WHERE name IN ('outbox', 'pacs_outbox')"))

    def _synced(self, tops: dict[str, int]) -> None:
        self._synced_seq = max(self._synced_seq, int(tops.get("outbox", 0)))
        self._synced_pacs = max(self._synced_pacs, int(tops.get("pacs_outbox", 0)))

    @property
    def synced_seq(self) -> int:
        """The outbox seq up to which rows are on disk (:meth:`sync`)."""
        return self._synced_seq

    def sync(self) -> int:
        """Group commit: one fsync of the write-ahead log makes every result committed before it durable;
        returns the outbox seq up to which rows may now be sent (:meth:`pending` gives no other).

        The fsync runs outside the lock, so the daemon commits the next results while the disk works,
        and the next sync covers all of them. A failed fsync raises :class:`StoreError`; what it should have
        covered is not sent.
        """
        with self._lock:
            if not self._unsynced:
                return self._synced_seq
            self._unsynced = False
            try:
                tops = self._tops()
            except sqlite3.Error as exc:
                self._unsynced = True
                raise self._error(exc) from None
        try:
            if self._wal is not None and os.path.exists(self._wal):
                fd = os.open(self._wal, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            with self._lock:
                self._unsynced = True
            raise self._error(exc) from None
        with self._lock:
            self._synced(tops)
            return self._synced_seq

    def _transaction(self, fn):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(self._db)
            self._db.execute("COMMIT")
            return out
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back already (disk full)
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    log.debug("rollback after a failed write also failed", exc_info=True)
            raise

    # ------------------------------------------------------------------ journal
    def seen(self, path: str, sig: FileSig) -> bool:
        """This exact version of the file (path, size, mtime, ctime) was already processed."""
        row = self._read(
            "SELECT 1 FROM journal WHERE path=? AND size=? AND mtime_ns=? AND (ctime_ns=? OR ctime_ns IS NULL) "
            "LIMIT 1", (path, sig.size, sig.mtime_ns, sig.ctime_ns), one=True)
        return row is not None

    def last_for_path(self, path: str) -> Optional[JournalRow]:
        """The latest result journaled for this path (not counting unchanged versions)."""
        row = self._read(
            "SELECT " + JOURNAL_COLUMNS + " FROM journal "
            "WHERE path=? AND status != 'unchanged' ORDER BY id DESC LIMIT 1", (path,), one=True)
        return JournalRow(*row) if row else None

    def by_hash(self, sha256: str) -> Optional[JournalRow]:
        """The first scored (or rejected) file with this content, if any."""
        row = self._read(
            "SELECT " + JOURNAL_COLUMNS + " FROM journal "
            "WHERE sha256=? AND status NOT IN ('duplicate', 'unchanged') ORDER BY id LIMIT 1", (sha256,), one=True)
        return JournalRow(*row) if row else None

    def record(
        self,
        path: str,
        sha256: Optional[str],
        sig: FileSig,
        status: str,
        reason: Optional[str] = None,
        event_id: Optional[str] = None,
        message: Optional[tuple[str, bytes, int]] = None,
        supersedes: Optional[str] = None,
        flag: Optional[FlagRecord] = None,
        durable: bool = True,
        study: Optional[StudyChange] = None,
        also: Optional[Queued] = None,
    ) -> Optional[int]:
        """Journal a processed file and (atomically) queue its message; returns the outbox seq.

        ``durable=False`` commits without an fsync (it survives a killed process, not a power cut): its
        message is sent only once a :meth:`sync` has made it durable, and the daemon's publisher syncs
        before it sends (group commit).

        A flag gets the next number of this device's flag sequence (``seq`` in its message) in the same
        transaction, so the numbers have no gaps and no repeats, whatever fails: a station that misses one
        can tell, and ask for it again (:meth:`flags_between`). ``study`` writes what the image does to its study
        (whose SR is queued when it closes: :meth:`close_study`), and ``also``
        queues a second message (a study's news or new flag, after the main one).
        """
        uid = study.row.uid if study is not None else None

        def tx(db: sqlite3.Connection) -> Optional[int]:
            nonlocal message
            db.execute(
                "INSERT INTO journal (path, sha256, size, mtime_ns, ctime_ns, status, reason, event_id, supersedes, "
                "processed_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (path, sha256, sig.size, sig.mtime_ns, sig.ctime_ns, status, reason, event_id, supersedes,
                 time.time()),
            )
            db.execute("DELETE FROM in_progress WHERE path=?", (path,))
            if flag is not None:
                payload = _insert_flag(db, path, flag, uid)
                if message is not None:  # a flag's message is the flag
                    message = (message[0], payload, message[2])
            if study is not None:
                _write_study(db, study)
            seq = None
            if message is not None:
                topic, payload, qos = message
                seq = db.execute("INSERT INTO outbox (event_id, topic, payload, qos, created) VALUES (?,?,?,?,?)",
                                 (event_id, topic, payload, qos, time.time())).lastrowid
            if also is not None:
                payload = _insert_flag(db, path, also.flag, uid) if also.flag is not None else also.payload
                seq = db.execute("INSERT INTO outbox (event_id, topic, payload, qos, created) VALUES (?,?,?,?,?)",
                                 (also.event_id, also.topic, payload, also.qos, time.time())).lastrowid
            return seq

        if durable or self._wal is None:  # without a write-ahead log each commit pays its own fsync
            return self._write(tx)
        seq = self._write(tx, durable=False)
        self._unsynced = True
        return seq

    def begin(self, path: str, sha256: str) -> int:
        """Mark the file as being processed now; how many earlier starts on this content never ended.

        The mark goes when its result is journaled (:meth:`record`) or :meth:`end`; one left from a
        daemon that died on the file counts. Written without an fsync: it must survive the process
        (a kill, the OOM killer), not a power cut, and the flag's latency must not pay for it.
        """

        def tx(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT sha256, attempts FROM in_progress WHERE path=?", (path,)).fetchone()
            before = row[1] if row is not None and row[0] == sha256 else 0
            db.execute("INSERT OR REPLACE INTO in_progress (path, sha256, attempts, started) VALUES (?,?,?,?)",
                       (path, sha256, before + 1, time.time()))
            return before

        return self._write(tx, durable=False)

    def interrupted(self) -> set[str]:
        """The paths whose processing began and never ended: left by a daemon that stopped on them."""
        return {row[0] for row in self._read("SELECT path FROM in_progress")}

    def end(self, path: str) -> None:
        """The file's processing ended without a result (it is retried later): no longer in progress."""
        self._write(lambda db: db.execute("DELETE FROM in_progress WHERE path=?", (path,)))

    def journal(self, limit: int = 1000) -> list[JournalRow]:
        rows = self._read("SELECT " + JOURNAL_COLUMNS + " FROM journal "
                          "ORDER BY id LIMIT ?", (limit,))
        return [JournalRow(*r) for r in rows]

    # ------------------------------------------------------------------ outbox
    def pending(self, limit: int = 100, after_seq: int = 0) -> list[OutboxRow]:
        """The next rows to send, in order: only those on disk (see :meth:`sync`)."""
        rows = self._read("SELECT seq, event_id, topic, payload, qos FROM outbox WHERE seq > ? AND seq <= ? "
                          "ORDER BY seq LIMIT ?", (after_seq, self._synced_seq, limit))
        return [OutboxRow(*r) for r in rows]

    def ack(self, seqs: list[int]) -> None:
        """The broker acknowledged them: only now do they leave the outbox (one transaction).

        A flag's delivery time is noted at the same moment (the first PUBACK counts). Written without
        an fsync, like :meth:`begin`: a deletion that a power cut undoes only sends the message once
        more, which at-least-once delivery allows and the stations drop by ``event_id``; the fsync
        each result's journaling pays stays.
        """
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE flags SET delivered_at=? WHERE delivered_at IS NULL AND event_id="
                "(SELECT event_id FROM outbox WHERE seq=?)", [(now, s) for s in seqs])
            db.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in seqs])

        self._write(tx, durable=False)

    # ------------------------------------------------------------------ acknowledgements and escalation
    def record_acks(self, acks: list[dict[str, str]]) -> list[tuple[bool, bool]]:
        """Journal acknowledgements in one transaction; per ack (a flag of ours?, not seen before?).

        Acks for event ids that are not our flags are not stored (counted by the caller), and a repeat of
        the same (event, station, nurse) adds nothing: a flood cannot grow the database.
        """
        now = time.time()

        def tx(db: sqlite3.Connection) -> list[tuple[bool, bool]]:
            out = []
            for a in acks:
                known = db.execute("SELECT 1 FROM flags WHERE event_id=?", (a["event_id"],)).fetchone() is not None
                new = known and db.execute("SELECT 1 FROM acks WHERE event_id=? AND station=? AND by_name=?",
                                           (a["event_id"], a["station"], a["by"])).fetchone() is None
                if new:
                    db.execute("INSERT INTO acks (event_id, station, by_name, at, received_at, known_flag) "
                               "VALUES (?,?,?,?,?,1)", (a["event_id"], a["station"], a["by"], a["at"], now))
                    db.execute("UPDATE flags SET acked_at=?, acked_by=?, ack_station=? WHERE event_id=? "
                               "AND acked_at IS NULL", (now, a["by"], a["station"], a["event_id"]))
                out.append((known, new))
            return out

        return self._write(tx)

    def open_urgent(self, max_escalations: int) -> list[DueEscalation]:
        """Urgent flags delivered, unacknowledged and not yet escalated ``max_escalations`` times.

        Which of them are due is decided by the caller on its monotonic clock (see ``escalation``): the
        wall-clock stamps kept here are for the report, and a clock step must not move an escalation.
        """
        rows = self._read(
            "SELECT event_id, payload, escalations, delivered_at, last_escalated FROM flags WHERE priority='urgent' "
            "AND acked_at IS NULL AND delivered_at IS NOT NULL AND escalations < ? ORDER BY delivered_at",
            (max_escalations,))
        return [DueEscalation(*r) for r in rows]

    def record_escalation(self, event_id: str, n: int, topic: str, payload: bytes) -> None:
        """Queue escalation ``n`` of a flag and count it, in one transaction."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO outbox (event_id, topic, payload, qos, created) VALUES (?,?,?,?,?)",
                       (f"{event_id}#escalation-{n}", topic, payload, 1, now))
            db.execute("UPDATE flags SET escalations=?, last_escalated=? WHERE event_id=?", (n, now, event_id))

        self._write(tx)

    def record_heatmap(self, event_id: str, name: str, topic: str, png: bytes,
                       pacs: Optional[PacsItem] = None) -> None:
        """Name a flag's heat map in the journal and queue it (after the flag, by outbox order); ``pacs``: also
        for each PACS destination as a Secondary Capture (after the flag's SR, by id)."""

        def tx(db: sqlite3.Connection) -> None:
            db.execute("UPDATE journal SET heatmap=? WHERE event_id=?", (name, event_id))
            db.execute("UPDATE flags SET heatmap=? WHERE event_id=?", (name, event_id))
            db.execute("INSERT INTO outbox (event_id, topic, payload, qos, created) VALUES (?,?,?,?,?)",
                       (f"{event_id}#heatmap", topic, png, 1, time.time()))
            if pacs is None:
                return
            held = None  # a study's flag: its Secondary Capture follows its SR, at the study's close
            row = db.execute("SELECT s.uid, s.flag_event, s.closed_at FROM flags f JOIN studies s ON s.uid = f.study "
                             "WHERE f.event_id=?", (event_id,)).fetchone()
            if row is not None:
                if row[1] != event_id:
                    return  # superseded already: its study's SR reports another image
                held = row[0] if row[2] is None else None
            db.executemany("INSERT OR IGNORE INTO pacs_outbox (event_id, destination, kind, payload, header, "
                           "finding, created, held_for) VALUES (?,?,'heatmap',?,?,?,?,?)",
                           [(event_id, d, png, pacs.header, pacs.finding, time.time(), held)
                            for d in pacs.destinations])

        self._write(tx)

    def delivered_seq(self) -> int:
        """The highest flag number the broker has taken (0: none yet); stats carry it so a station that
        missed the newest flags (its broker queue overflowed) can tell even when no flag follows."""
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM flags WHERE delivered_at IS NOT NULL",
                              one=True)[0])

    def flags_between(self, first: int, last: int) -> list[tuple[str, bytes]]:
        """(event_id, payload) of flags ``first``..``last``, at most :data:`MAX_RESEND`: each as first published,
        with ``acked`` (by, station, at) when a station acknowledged it, since the station that missed the flag
        missed that ack too (acks are not kept by the broker for it any more than flags)."""
        last = min(last, first + MAX_RESEND - 1)
        rows = self._read("SELECT event_id, payload, acked_by, ack_station, acked_at FROM flags "
                          "WHERE seq BETWEEN ? AND ? ORDER BY seq", (first, last))
        return [(e, p if by is None else encode({**json.loads(p), "acked": {"by": by, "station": st,
                                                                            "at": utc_iso(at)}}))
                for e, p, by, st, at in rows]

    def resend_backlog(self) -> int:
        """Copies sent again that wait in the outbox (a new flag queues behind them)."""
        return int(self._read("SELECT COUNT(*) FROM outbox WHERE event_id LIKE '%#resend-%'", one=True)[0])

    def queue_resend(self, topic: str, flags: list[tuple[str, bytes]], tag: str) -> None:
        """Queue copies of flags on a station's own replay topic (one transaction); ``tag`` tells requests apart."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR IGNORE INTO outbox (event_id, topic, payload, qos, created) VALUES (?,?,?,?,?)",
                           [(f"{e}#resend-{tag}", topic, p, 1, now) for e, p in flags])

        self._write(tx)

    def flag_times(self, since: float) -> list[tuple]:
        """(priority, written_at, seen_at, scored_at, delivered_at, acked_at, escalations) of flags scored since."""
        return self._read(
            "SELECT priority, written_at, seen_at, scored_at, delivered_at, acked_at, escalations FROM flags "
            "WHERE scored_at >= ? ORDER BY scored_at", (since,))

    def outbox_depth(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM outbox", one=True)[0])

    # ------------------------------------------------------------------ results back to PACS
    def pacs_head(self, destination: str) -> Optional[PacsRow]:
        """The oldest result waiting for ``destination`` (they go in order: nothing passes it), once on disk."""
        row = self._read("SELECT id, event_id, destination, header, finding, attempts, kind, payload FROM pacs_outbox "
                         "WHERE destination=? AND id <= ? AND held_for IS NULL ORDER BY id LIMIT 1",
                         (destination, self._synced_pacs), one=True)
        return PacsRow(*row) if row else None

    def pacs_sent(self, row_id: int) -> None:
        """The peer answered success: only now does the row go."""
        self._write(lambda db: db.execute("DELETE FROM pacs_outbox WHERE id=?", (row_id,)))

    def pacs_failed(self, row_id: int, error: str) -> None:
        """A try that did not end in success: counted, its reason kept for stats and the report (no fsync: a
        lost count only changes a number)."""
        self._write(lambda db: db.execute("UPDATE pacs_outbox SET attempts=attempts+1, last_error=? WHERE id=?",
                                          (error[:500], row_id)), durable=False)

    def pacs_status(self, destinations: list[str]) -> dict[str, dict]:
        """Per destination: results waiting, and the last error of the one at the head (None: none or no error)."""
        out = {}
        for d in destinations:
            depth = self._read("SELECT COUNT(*) FROM pacs_outbox WHERE destination=?", (d,), one=True)[0]
            head = self._read("SELECT last_error FROM pacs_outbox WHERE destination=? ORDER BY id LIMIT 1", (d,),
                              one=True)
            out[d] = {"depth": int(depth), "last_error": head[0] if head else None}
        return out

    # ------------------------------------------------------------------ studies
    def study(self, uid: str) -> Optional[StudyRow]:
        row = self._read(f"SELECT {STUDY_COLUMNS} FROM studies WHERE uid=?", (uid,), one=True)
        return StudyRow(*row) if row else None

    def study_ranks(self, uid: str) -> list[tuple[str, str]]:
        """(file, priority) of the study's scored images, in the order they were scored: what its result is
        decided from, without their messages and headers."""
        return [(f, p) for f, p in self._read("SELECT file, priority FROM study_images WHERE uid=? "
                                              "ORDER BY scored_at, rowid", (uid,))]

    def study_image(self, uid: str, file: str) -> Optional[StudyImage]:
        row = self._read("SELECT file, priority, message, header, finding, scored_at FROM study_images "
                         "WHERE uid=? AND file=?", (uid, file), one=True)
        return StudyImage(*row) if row else None

    def study_images(self, uid: str) -> list[StudyImage]:
        """The study's scored images, in the order they were scored."""
        rows = self._read("SELECT file, priority, message, header, finding, scored_at FROM study_images WHERE uid=? "
                          "ORDER BY scored_at, rowid", (uid,))
        return [StudyImage(*r) for r in rows]

    def quiet_studies(self, before: float) -> list[StudyRow]:
        """Open studies whose newest image was journaled before ``before``, oldest first."""
        rows = self._read(f"SELECT {STUDY_COLUMNS} FROM studies WHERE closed_at IS NULL AND last_image < ? "
                          "ORDER BY last_image", (before,))
        return [StudyRow(*r) for r in rows]

    def close_study(self, study: StudyRow, news: Queued, pacs: Optional[PacsItem]) -> bool:
        """Close a study, queue its news and (``pacs``) its SR for every destination, in one transaction;
        False when an image came meanwhile (it stays open). The SR's rows are keyed by the study's flag: a study
        closed again with the same result queues none again."""

        def tx(db: sqlite3.Connection) -> bool:
            now = time.time()
            cur = db.execute("UPDATE studies SET closed_at=? WHERE uid=? AND closed_at IS NULL AND last_image=?",
                             (now, study.uid, study.last_image))
            if not cur.rowcount:
                return False
            db.execute("INSERT INTO outbox (event_id, topic, payload, qos, created) VALUES (?,?,?,?,?)",
                       (news.event_id, news.topic, news.payload, news.qos, now))
            if pacs is not None and study.flag_event is not None:
                db.executemany("INSERT OR IGNORE INTO pacs_outbox (event_id, destination, header, finding, created) "
                               "VALUES (?,?,?,?,?)", [(study.flag_event, d, pacs.header, pacs.finding, now)
                                                      for d in pacs.destinations])
            # the heat map of its result follows the SR (a new id: after it); those of results it replaced go
            held = db.execute("SELECT event_id, destination, payload, header, finding, created FROM pacs_outbox "
                              "WHERE held_for=? ORDER BY id", (study.uid,)).fetchall()
            db.execute("DELETE FROM pacs_outbox WHERE held_for=?", (study.uid,))
            db.executemany("INSERT OR IGNORE INTO pacs_outbox (event_id, destination, kind, payload, header, finding, "
                           "created) VALUES (?,?,'heatmap',?,?,?,?)", [r for r in held if r[0] == study.flag_event])
            return True

        return self._write(tx)

    # ------------------------------------------------------------------ instances received over DICOM
    def receive(self, sop_instance_uid: str, path: str, calling_ae: str, peer: Optional[str]) -> None:
        """Journal a received instance (fsync'd) before the receiver answers "stored"; a repeat adds nothing."""
        self._write(lambda db: db.execute(
            "INSERT OR IGNORE INTO received (sop_instance_uid, path, calling_ae, peer, received_at) VALUES (?,?,?,?,?)",
            (sop_instance_uid, path, calling_ae, peer, time.time())))

    def was_received(self, sop_instance_uid: str) -> bool:
        """This instance was answered "stored" once already (its result may be journaled or still to come)."""
        return self._read("SELECT 1 FROM received WHERE sop_instance_uid=?", (sop_instance_uid,), one=True) is not None

    def received_from(self, path: str) -> Optional[str]:
        """The calling AE title of the instance journaled under ``path``; None for a file from the folder."""
        row = self._read("SELECT calling_ae FROM received WHERE path=?", (path,), one=True)
        return row[0] if row else None

    def received_unscored(self) -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of received instances without a journaled result, oldest first."""
        return self._read("SELECT sop_instance_uid, path FROM received r WHERE NOT EXISTS "
                          "(SELECT 1 FROM journal j WHERE j.path = r.path) ORDER BY received_at")


def _insert_flag(db: sqlite3.Connection, path: str, flag: FlagRecord, study: Optional[str]) -> bytes:
    """Keep a flag in the flags table under the next number of the device's sequence; its payload, numbered."""
    seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM flags").fetchone()[0]
    payload = numbered(flag.payload, seq)
    db.execute("INSERT INTO flags (event_id, path, priority, probability, payload, written_at, seen_at, scored_at, "
               "seq, study) VALUES (?,?,?,?,?,?,?,?,?,?)",
               (flag.event_id, path, flag.priority, flag.probability, payload, flag.written_at, flag.seen_at,
                flag.scored_at, seq, study))
    return payload


def _write_study(db: sqlite3.Connection, change: StudyChange) -> None:
    db.execute(f"INSERT OR REPLACE INTO studies ({STUDY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", astuple(change.row))
    if change.image is not None:
        i = change.image
        db.execute("INSERT OR REPLACE INTO study_images (uid, file, priority, message, header, finding, scored_at) "
                   "VALUES (?,?,?,?,?,?,?)", (change.row.uid, i.file, i.priority, i.message, i.header, i.finding,
                                              i.scored_at))
    if change.drop is not None:
        db.execute("DELETE FROM study_images WHERE uid=? AND file=?", (change.row.uid, change.drop))


def numbered(payload: bytes, seq: int) -> bytes:
    """A flag message (JSON object) with its sequence number."""
    return encode({**json.loads(payload), "seq": seq})


def _is_corrupt(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or \
        "malformed" in str(exc) or "not a database" in str(exc)


def _is_read_only(exc: BaseException) -> bool:
    if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_READONLY or \
            getattr(exc, "errno", None) == errno.EROFS:
        return True
    text = str(exc).lower()
    return "readonly database" in text or "read-only file system" in text


def _is_io_error(exc: BaseException) -> bool:
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_IOERR or \
        getattr(exc, "errno", None) == errno.EIO


def _is_disk_full(exc: BaseException) -> bool:
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or getattr(exc, "errno", None) == 28:
        return True
    text = str(exc).lower()
    return "disk is full" in text or "no space" in text
