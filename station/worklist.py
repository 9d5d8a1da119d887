"""The station's worklist in SQLite: what a reload or a restart shows again.

Guarantees, in the order a message meets them:

- every message is checked by the contract first (``FlagMessage.parse`` and the others of ``device.contract``,
  as the daemon checks the acks it journals); the stored copy is bounded (each text
  cut to ``MAX_TEXT``), and a row an older version stored that no longer validates is skipped, not fatal;
- every write is idempotent: flags and errors by ``event_id``, acks by (event_id, station, at, device), so a repeat
  delivery (MQTT is at-least-once) changes nothing and returns ``None``: the page never gets a second row;
- a write is committed (``synchronous = FULL``) before the method returns, and ``mqtt_link`` acknowledges
  the message to the broker only after that, so a crash loses nothing the broker still holds for us;
- an ack or an escalation may arrive before its flag (different topics, different publishers): acks are
  kept on their own and joined, an escalation carries the flag and adds the row;
- a heat map (a PNG, ``explain.enabled`` on the appliance) is kept as a BLOB beside its flag, in the same
  transaction discipline, and only while its row is on the page (``prune_heatmaps``): the images are the
  bulk of the database. One whose flag has not come (yet) is kept for ``ORPHAN_KEEP_S``, then dropped.

All methods run on the event loop's thread; the connection is not shared.
"""
from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pneumoflag.device import contract
from pneumoflag.device.contract import (MAX_TEXT, PRIORITIES, AckMessage, ContractError, ErrorMessage,
                                        EscalationMessage, FlagMessage, StatsSummary, StudyInfo, StudyUpdate,
                                        utc_iso)

log = logging.getLogger(__name__)

#: acknowledged rows stay on the page this long after their ack arrived (they stay in the database)
ACK_KEEP_S = 12 * 3600
MAX_ROWS = 1000
#: acks for a flag this station has not seen (it may still come) are kept this long, and at most this many
ORPHAN_ACK_KEEP_S = 24 * 3600
MAX_ORPHAN_ACKS = 1000
#: heat maps: the most a payload may weigh (the daemon's are ~100-200 KB), and the PNG signature
MAX_HEATMAP_BYTES = 2 * 1024 * 1024
MAX_HEATMAP_SIDE = 4096  # pixels: a small file may still decompress to a huge image in the browser
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: a heat map whose flag this station has not seen is kept this long (the flag may still come), then dropped
ORPHAN_KEEP_S = 3600
MAX_ORPHANS = 100

SCHEMA = """
CREATE TABLE IF NOT EXISTS flags (
    event_id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    priority TEXT NOT NULL,
    rank INTEGER NOT NULL,
    probability REAL NOT NULL,
    file TEXT NOT NULL,
    accession_number TEXT,
    written_at TEXT,
    scored_at TEXT,
    received_at TEXT NOT NULL,
    ttn_s REAL,
    sort_epoch REAL NOT NULL,
    escalation INTEGER NOT NULL DEFAULT 0,
    max_escalations INTEGER,
    escalated_at TEXT,
    supersedes TEXT,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS flags_order ON flags (rank, sort_epoch);
CREATE TABLE IF NOT EXISTS acks (
    event_id TEXT NOT NULL,
    station TEXT NOT NULL,
    by_name TEXT NOT NULL,
    at TEXT NOT NULL,
    received_epoch REAL NOT NULL,
    device TEXT,  -- the device whose topic it came on (NULL: stored before this column)
    PRIMARY KEY (event_id, station, at, device)
);
CREATE TABLE IF NOT EXISTS errors (
    event_id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    file TEXT,
    reason TEXT,
    message TEXT,
    at TEXT,
    received_epoch REAL NOT NULL,
    supersedes TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    status TEXT,
    status_epoch REAL,
    stats TEXT,
    stats_epoch REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- each device's flag numbers (seq): the highest seen and the ranges not received (JSON [[first, last, since]])
CREATE TABLE IF NOT EXISTS sequence (
    device TEXT PRIMARY KEY,
    high INTEGER NOT NULL,
    gaps TEXT NOT NULL
);
-- the newest news of each study flag (device/studies.py): the count, refused views, closed; it may come before its
-- flag (a flag sent again after a gap), so it is kept on its own and joined, as acks are
CREATE TABLE IF NOT EXISTS study_news (
    event_id TEXT NOT NULL,  -- the study's flag
    device TEXT NOT NULL,
    uid TEXT NOT NULL,
    study TEXT NOT NULL,     -- JSON: uid, images, rejected, closed
    at REAL NOT NULL,        -- when the device said it: a copy delivered again later is older
    received_epoch REAL NOT NULL,
    PRIMARY KEY (event_id, device)
);
CREATE TABLE IF NOT EXISTS heatmaps (
    event_id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    png BLOB NOT NULL,
    received_epoch REAL NOT NULL
);
"""
#: columns added after the first release of this file, for databases made before them
LATER_COLUMNS = {"flags": ("supersedes", "study"), "errors": ("supersedes",), "devices": ("drift",)}
#: the acks table before acks were kept per device: rebuilt with the device in its key
_ACKS_BY_DEVICE = """
BEGIN;
CREATE TABLE acks_by_device (event_id TEXT NOT NULL, station TEXT NOT NULL, by_name TEXT NOT NULL, at TEXT NOT NULL,
    received_epoch REAL NOT NULL, device TEXT, PRIMARY KEY (event_id, station, at, device));
INSERT INTO acks_by_device SELECT event_id, station, by_name, at, received_epoch, NULL FROM acks;
DROP TABLE acks;
ALTER TABLE acks_by_device RENAME TO acks;
COMMIT;
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS flags_supersedes ON flags (supersedes);
CREATE INDEX IF NOT EXISTS errors_supersedes ON errors (supersedes);
"""


#: missing ranges kept per device (beyond it the two closest are merged: nothing missed is forgotten), and the
#: largest jump in the numbers taken as missed flags (a bigger one, from a flag or from stats, is no backlog
#: any broker keeps: it is ignored and logged, so one forged number cannot hide the real ones)
MAX_GAPS = 100
MAX_JUMP = 100_000


#: a message that does not follow the contract; logged and dropped (and still acknowledged). The contract's own
#: error, so the field validators of ``device.contract`` raise what the station's callers catch
BadMessage = ContractError


def _bounded(value: Any) -> Any:
    """A parsed message with every text cut to ``MAX_TEXT``: what is stored of it (nothing shows more)."""
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, dict):
        return {k[:MAX_TEXT]: _bounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bounded(v) for v in value]
    return value


@dataclass
class Ack:
    by: str
    station: str
    at: str


@dataclass
class Row:
    """One flag as the page shows it."""

    event_id: str
    device: str
    priority: str
    probability: float
    file: str
    accession_number: str | None
    written_at: str | None
    scored_at: str | None
    received_at: str
    ttn_s: float | None  # time to notification: received here minus written (None when unknown)
    sort_at: str  # what "oldest first" and the age go by: written, else scored, else received
    escalation: int
    max_escalations: int | None
    escalated_at: str | None
    ack: Ack | None
    superseded_by: str | None  # a newer result (flag or error) for the same file replaced this one
    heatmap: bool  # the appliance's heat-map overlay is here (GET /heatmap/EVENT_ID.png)
    #: the flag is its study's result: {uid, images, rejected: [{file, reason}], closed} (``device/studies.py``)
    study: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ErrorRow:
    event_id: str
    device: str
    file: str | None
    reason: str | None
    message: str | None
    at: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DeviceState:
    device: str
    state: str  # online, offline, silent (online but no stats for a while) or unknown
    status_at: str | None
    stats_at: str | None
    stats: dict[str, float]
    missed: int = 0  # flags this station knows it has not received (by their numbers)
    missed_ranges: list[list[int]] | None = None  # [first, last], the oldest few
    drift: dict[str, str] | None = None  # the drift monitor's state, reason and since (device/drift.py)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_ROW_SQL = """
SELECT f.event_id, f.device, f.priority, f.probability, f.file, f.accession_number, f.written_at, f.scored_at,
       f.received_at, f.ttn_s, f.sort_epoch, f.escalation, f.max_escalations, f.escalated_at,
       a.by_name, a.station, a.at, a.received_epoch,
       COALESCE((SELECT s.event_id FROM flags s WHERE s.supersedes = f.event_id LIMIT 1),
                (SELECT e.event_id FROM errors e WHERE e.supersedes = f.event_id LIMIT 1)) AS superseded_by,
       f.rank,
       EXISTS (SELECT 1 FROM heatmaps h WHERE h.event_id = f.event_id) AS heatmap,
       f.study,
       (SELECT n.study FROM study_news n WHERE n.event_id = f.event_id AND n.device = f.device) AS news
FROM flags f
LEFT JOIN (SELECT k.event_id, k.by_name, k.station, MIN(k.at) AS at, k.received_epoch FROM acks k
           JOIN flags g ON g.event_id = k.event_id AND (k.device IS NULL OR k.device = g.device)
           GROUP BY k.event_id) a
       ON a.event_id = f.event_id
"""


def _row(r: tuple) -> Row:
    ack = Ack(by=r[14], station=r[15], at=r[16]) if r[14] is not None else None
    return Row(event_id=r[0], device=r[1], priority=r[2], probability=r[3], file=r[4], accession_number=r[5],
               written_at=r[6], scored_at=r[7], received_at=r[8], ttn_s=r[9], sort_at=utc_iso(r[10]),
               escalation=r[11], max_escalations=r[12], escalated_at=r[13], ack=ack, superseded_by=r[18],
               heatmap=bool(r[20]), study=_study_of(r[21], r[22]))


def _study_of(flag_study: str | None, news: str | None) -> dict[str, Any] | None:
    """The flag's study as its newest news has it (news for another study, or for a flag without one, is not
    taken)."""
    if not flag_study:
        return None
    study = contract.loads(flag_study)
    newer = contract.loads(news) if news else None
    return newer if newer and newer.get("uid") == study.get("uid") else study


def _valid_row(r: tuple) -> Row | None:
    """A stored row as the page gets it, or None (logged) for one an older version stored that no longer
    validates (a date Python cannot convert, a value JSON cannot carry): one bad row must not empty the page."""
    try:
        row = _row(r)
        contract.dumps(row.to_json())
    except (ValueError, OverflowError, TypeError, OSError) as exc:
        log.warning("skipped stored flag %s that no longer validates: %s", str(r[0])[:80], exc)
        return None
    return row


def check_png(data: bytes) -> None:
    """Refuse what a browser should not be handed as a heat map: not a PNG, too heavy, or too many pixels.

    The IHDR chunk must come first (PNG requires it), so its width and height are at fixed offsets.
    """
    if len(data) > MAX_HEATMAP_BYTES:
        raise BadMessage(f"{len(data)} bytes, over the {MAX_HEATMAP_BYTES} byte limit")
    if not data.startswith(PNG_SIGNATURE):
        raise BadMessage("not a PNG (no PNG signature)")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadMessage("not a PNG (no IHDR header)")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not (0 < width <= MAX_HEATMAP_SIDE and 0 < height <= MAX_HEATMAP_SIDE):
        raise BadMessage(f"{width}x{height} pixels, over the {MAX_HEATMAP_SIDE} pixel limit")


def _stored_stats(device: str, stats: str | None) -> dict[str, float]:
    """The stored figures, or none (logged) when an older version stored what is not standard JSON (NaN)."""
    if not stats:
        return {}
    try:
        value = contract.loads(stats)
        contract.dumps(value)
    except (ContractError, ValueError) as exc:
        log.warning("skipped the stored stats of %s that no longer validate: %s", device[:80], exc)
        return {}
    return value if isinstance(value, dict) else {}


def _stored_drift(device: str, drift: str | None) -> dict[str, str] | None:
    """The stored drift state, or None (logged) when it no longer validates."""
    if not drift:
        return None
    try:
        value = contract.loads(drift)
    except (ContractError, ValueError) as exc:
        log.warning("skipped the stored drift state of %s that no longer validates: %s", device[:80], exc)
        return None
    return value if isinstance(value, dict) else None


def _progress(study: dict[str, Any]) -> tuple[int, bool]:
    """How far a study's news is, for two with the same time: its images and refused views count up, then it
    closes."""
    return int(study.get("images", 0)) + len(study.get("rejected", [])), bool(study.get("closed"))


def _study_json(study: StudyInfo | None) -> str | None:
    return contract.dumps(_bounded(asdict(study))) if study is not None else None


class Worklist:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self.db = sqlite3.connect(self.path, isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)  # it holds the session-signing secret
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.executescript(SCHEMA)
        for table, columns in LATER_COLUMNS.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        if "device" not in {r[1] for r in self.db.execute("PRAGMA table_info(acks)")}:
            self.db.executescript(_ACKS_BY_DEVICE)
        self.db.executescript(INDEXES)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writes (one per MQTT message)
    def add_flag(self, payload: dict, topic_device: str, received: float | None = None) -> Row | None:
        """Store a flag (the topic names its device); None when this event_id is already here (a repeat)."""
        msg = FlagMessage.parse(payload, topic_device)
        event_id, device, written = msg.event_id, msg.device, msg.written_ts
        other = self.device_of(event_id)
        if other is not None and other != device:
            # refused, not merged: acks, escalations and heat maps name a flag by event_id alone, so a second
            # device's flag under the same id would take the first one's acks (the daemon's ids are UUIDs:
            # a clash is a misconfigured or hostile publisher, to be seen in the log and the refused counts)
            raise BadMessage(f"event id {event_id} is already a flag of device {other[:80]!r}")
        received = time.time() if received is None else received
        ttn = round(received - written, 3) if written is not None else None
        sort_epoch = next(t for t in (written, msg.scored_ts, received) if t is not None)
        cur = self.db.execute(
            "INSERT OR IGNORE INTO flags (event_id, device, priority, rank, probability, file, accession_number, "
            "written_at, scored_at, received_at, ttn_s, sort_epoch, supersedes, payload, study) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (event_id, device, msg.priority, PRIORITIES.index(msg.priority), msg.probability, msg.file,
             (msg.dicom or {}).get("accession_number"), msg.written_at, msg.scored_at, utc_iso(received), ttn,
             sort_epoch, msg.supersedes, contract.dumps(_bounded(payload)), _study_json(msg.study)))
        if msg.seq is not None:
            self.note_seq(device, msg.seq, received)
        return self.row(event_id) if cur.rowcount else None

    # ------------------------------------------------------------------ flag numbers: what this station missed
    def _sequence(self, device: str) -> tuple[int, list[list]] | None:
        r = self.db.execute("SELECT high, gaps FROM sequence WHERE device = ?", (device,)).fetchone()
        return (int(r[0]), contract.loads(r[1])) if r else None

    def _set_sequence(self, device: str, high: int, gaps: list[list]) -> None:
        while len(gaps) > MAX_GAPS:  # merge the two closest ranges: the numbers between them are asked again
            i = min(range(len(gaps) - 1), key=lambda k: gaps[k + 1][0] - gaps[k][1])
            gaps[i:i + 2] = [[gaps[i][0], gaps[i + 1][1], min(gaps[i][2], gaps[i + 1][2])]]
        self.db.execute("INSERT INTO sequence VALUES (?,?,?) ON CONFLICT(device) DO UPDATE SET high = excluded.high, "
                        "gaps = excluded.gaps", (device, high, contract.dumps(gaps)))

    def note_seq(self, device: str, seq: int, now: float | None = None) -> None:
        """A flag numbered ``seq`` arrived: a jump past the highest is a gap, a number inside a gap fills it.

        The first number seen from a device is where this station starts counting (it does not ask for the
        device's past). A 1 that fills no gap means the device started numbering again (a new state folder),
        but only while nothing is missing: with gaps open it is not believed, so one forged flag cannot wipe
        the record of real ones (the broker's ACL decides who may publish as a device).
        """
        now = time.time() if now is None else now
        known = self._sequence(device)
        if known is None:
            return self._set_sequence(device, seq, [])
        high, gaps = known
        if seq > high + MAX_JUMP:
            log.warning("%s: a flag numbered %d, %d beyond the last one here: not taken as missed flags", device,
                        seq, seq - high)
            return None
        if seq > high:
            if seq > high + 1:
                gaps.append([high + 1, seq - 1, now])
            return self._set_sequence(device, seq, gaps)
        inside = [g for g in gaps if g[0] <= seq <= g[1]]
        if not inside:
            if seq == 1 and not gaps:
                log.info("%s numbers its flags from 1 again (a new state folder?)", device)
                self._set_sequence(device, 1, [])
            return None
        g = inside[0]
        rest = [x for x in ([g[0], seq - 1, g[2]], [seq + 1, g[1], g[2]]) if x[0] <= x[1]]
        i = gaps.index(g)
        self._set_sequence(device, high, gaps[:i] + rest + gaps[i + 1:])
        return None

    def note_delivered(self, device: str, delivered: int, now: float | None = None) -> None:
        """Stats say the device's broker has taken flags up to ``delivered``: those beyond our highest are
        missed (the newest, which a broker queue drops first), even when no later flag comes to show it."""
        known = self._sequence(device)
        if known is None or delivered <= known[0]:
            return
        high, gaps = known
        if delivered - high > MAX_JUMP:
            log.warning("%s: stats announce flag %d, %d beyond the last one here: not taken as missed flags",
                        device, delivered, delivered - high)
            return
        gaps.append([high + 1, delivered, time.time() if now is None else now])
        self._set_sequence(device, delivered, gaps)

    def missing(self, older_than: float, now: float | None = None) -> dict[str, tuple[int, int]]:
        """Per device, the oldest missed range noticed over ``older_than`` seconds ago (what to ask for)."""
        now = time.time() if now is None else now
        out = {}
        for device, gaps in self.db.execute("SELECT device, gaps FROM sequence"):
            due = [g for g in contract.loads(gaps) if now - g[2] >= older_than]
            if due:
                out[device] = (int(due[0][0]), int(due[0][1]))
        return out

    def add_ack(self, payload: dict, topic_device: str, received: float | None = None) -> str | None:
        """Store an ack (its flag may come later); the event_id, or None for a repeat.

        An ack counts only for a flag of the device whose topic it came on (the device hears only its own
        acks: one on another device's topic would close the row while the device escalates). Acks for flags
        this station has not seen are kept up to ``MAX_ORPHAN_ACKS`` for ``ORPHAN_ACK_KEEP_S``.
        """
        ack = AckMessage.parse(payload)
        received = time.time() if received is None else received
        cur = self.db.execute("INSERT OR IGNORE INTO acks (event_id, station, by_name, at, received_epoch, device) "
                              "VALUES (?,?,?,?,?,?)", (ack.event_id, ack.station, ack.by, ack.at, received, topic_device))
        if cur.rowcount and self.device_of(ack.event_id) is None:
            self._prune_orphan_acks(received)
        return ack.event_id if cur.rowcount else None

    def _prune_orphan_acks(self, now: float) -> int:
        """Acks without their flag: older than ``ORPHAN_ACK_KEEP_S``, or beyond the newest ``MAX_ORPHAN_ACKS``."""
        return self._prune_flagless("acks", now - ORPHAN_ACK_KEEP_S, MAX_ORPHAN_ACKS)

    def _prune_flagless(self, table: str, before: float, keep: int) -> int:
        """Delete the rows of ``table`` (acks, heat maps) whose flag is not here: those received before ``before``,
        and all but the newest ``keep``. Untrusted input may name any event id: this bounds what it can store."""
        cur = self.db.execute(
            f"DELETE FROM {table} WHERE rowid IN (SELECT a.rowid FROM {table} a "
            "WHERE NOT EXISTS (SELECT 1 FROM flags f WHERE f.event_id = a.event_id) "
            f"AND (a.received_epoch < ? OR a.rowid NOT IN (SELECT o.rowid FROM {table} o "
            "WHERE NOT EXISTS (SELECT 1 FROM flags g WHERE g.event_id = o.event_id) "
            "ORDER BY o.received_epoch DESC, o.rowid DESC LIMIT ?)))",
            (before, keep))
        return cur.rowcount

    def add_escalation(self, payload: dict, topic_device: str, received: float | None = None) -> Row:
        """Mark the flag escalated (highest count wins); add its row from the message when it is new here."""
        esc = EscalationMessage.parse(payload, topic_device)
        other = self.device_of(esc.event_id)
        if other is not None and other != topic_device:
            raise BadMessage(f"escalation of {esc.event_id}, a flag of device {other[:80]!r}")
        if other is None:
            if esc.flag is None:
                raise BadMessage("escalation of an unknown flag without that flag in 'flag'")
            self.add_flag(esc.flag, topic_device, received)
        self.db.execute("UPDATE flags SET escalation = MAX(escalation, ?), max_escalations = ?, escalated_at = ? "
                        "WHERE event_id = ?",
                        (esc.escalation, esc.max_escalations, esc.at, esc.event_id))
        row = self.row(esc.event_id)
        assert row is not None
        return row

    def add_study_update(self, payload: dict, topic_device: str, received: float | None = None) -> Row | None:
        """A study's news (an image that did not change its result, a refused view, its close): the row of its
        flag changes in place, no new row, no alert. Kept by its flag, the newest by the device's own ``at``
        (a copy delivered again later changes nothing), also before the flag is here (it is joined when the flag
        comes); None when there is no row to show yet, or the news is older than what is kept."""
        msg = StudyUpdate.parse(payload, topic_device)
        if msg.flag is None:
            return None  # none of its images scored yet: no row to show it on
        flag = self.db.execute("SELECT study FROM flags WHERE event_id = ? AND device = ?",
                               (msg.flag, msg.device)).fetchone()
        if flag is not None:
            if not flag[0]:
                raise BadMessage(f"study news for {msg.flag}, a flag without a study")
            if contract.loads(flag[0]).get("uid") != msg.study.uid:
                raise BadMessage(f"study news for {msg.flag} names study {msg.study.uid[:80]}, not the flag's")
        at = contract.parse_when(msg.at) if msg.at else 0.0
        kept = self.db.execute("SELECT at, study FROM study_news WHERE event_id = ? AND device = ?",
                               (msg.flag, msg.device)).fetchone()
        if kept is not None and (kept[0], *_progress(contract.loads(kept[1]))) > (at, *_progress(asdict(msg.study))):
            return None
        now = time.time() if received is None else received
        self.db.execute("INSERT OR REPLACE INTO study_news (event_id, device, uid, study, at, received_epoch) "
                        "VALUES (?,?,?,?,?,?)", (msg.flag, msg.device, msg.study.uid, _study_json(msg.study), at, now))
        self._prune_flagless("study_news", now - ORPHAN_ACK_KEEP_S, MAX_ORPHAN_ACKS)
        return self.row(msg.flag) if flag is not None else None

    def add_error(self, payload: dict, topic_device: str, received: float | None = None) -> ErrorRow | None:
        msg = ErrorMessage.parse(payload, topic_device)
        err = ErrorRow(event_id=msg.event_id, device=msg.device, file=msg.file, reason=msg.reason,
                       message=msg.message, at=msg.at)
        cur = self.db.execute(
            "INSERT OR IGNORE INTO errors (event_id, device, file, reason, message, at, received_epoch, supersedes) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (err.event_id, err.device, err.file, err.reason, err.message, err.at,
             time.time() if received is None else received, msg.supersedes))
        return err if cur.rowcount else None

    def set_status(self, device: str, status: str, received: float | None = None) -> None:
        if status not in ("online", "offline"):
            raise BadMessage(f"status {status!r} is neither online nor offline")
        self.db.execute("INSERT INTO devices (device, status, status_epoch) VALUES (?,?,?) ON CONFLICT(device) "
                        "DO UPDATE SET status = excluded.status, status_epoch = excluded.status_epoch",
                        (device, status, time.time() if received is None else received))

    def set_stats(self, device: str, payload: dict, retained: bool, received: float | None = None) -> None:
        """A retained copy may be old: then the message's own ``at`` counts, if it is earlier. Only the
        contract's ``StatsSummary`` of the payload is stored: nothing else of it reaches the page."""
        stats = StatsSummary.parse(payload)
        when = time.time() if received is None else received
        if retained:
            when = min(when, stats.at) if stats.at is not None else when - 3600 * 24
        self.db.execute("INSERT INTO devices (device, stats, stats_epoch) VALUES (?,?,?) ON CONFLICT(device) "
                        "DO UPDATE SET stats = excluded.stats, stats_epoch = excluded.stats_epoch",
                        (device, contract.dumps(stats.figures()), when))
        if stats.delivered_seq:
            self.note_delivered(device, stats.delivered_seq)

    def set_drift(self, device: str, msg: contract.DriftMessage) -> None:
        """The device's drift state as the page shows it: the state, its reason and since when (nothing else)."""
        shown = {"state": msg.state, "reason": msg.reason, "since": msg.since}
        self.db.execute("INSERT INTO devices (device, drift) VALUES (?,?) ON CONFLICT(device) "
                        "DO UPDATE SET drift = excluded.drift", (device, contract.dumps(shown)))

    def add_heatmap(self, event_id: str, topic_device: str, png: bytes, received: float | None = None) -> bool:
        """Store a heat map (checked by ``check_png``); False for a repeat delivery (the first copy stays)."""
        contract.check_event_id(event_id, "heat map event id")  # from its topic
        check_png(png)
        received = time.time() if received is None else received
        cur = self.db.execute("INSERT OR IGNORE INTO heatmaps (event_id, device, png, received_epoch) "
                              "VALUES (?,?,?,?)", (event_id, topic_device, png, received))
        if cur.rowcount and self.device_of(event_id) is None:
            log.info("heat map %s came before its flag (or without one): kept for %d s", event_id, ORPHAN_KEEP_S)
            self._prune_orphans(received)
        return bool(cur.rowcount)

    def heatmap(self, event_id: str) -> bytes | None:
        r = self.db.execute("SELECT png FROM heatmaps WHERE event_id = ?", (event_id,)).fetchone()
        return bytes(r[0]) if r else None

    def prune_heatmaps(self, now: float | None = None) -> int:
        """Drop the heat maps of rows no longer on the page (closed for over ``ACK_KEEP_S``, or beyond
        ``MAX_ROWS``), and those whose flag never came; the number dropped."""
        now = time.time() if now is None else now
        shown = {r.event_id for r in self.rows(now)}
        gone = [e for (e,) in self.db.execute(
            "SELECT h.event_id FROM heatmaps h JOIN flags f ON f.event_id = h.event_id")
            if e not in shown]
        for event_id in gone:
            self.db.execute("DELETE FROM heatmaps WHERE event_id = ?", (event_id,))
        dropped = len(gone) + self._prune_orphans(now)
        if dropped:
            log.info("dropped %d heat maps (their rows left the page, or their flag never came)", dropped)
        return dropped

    def _prune_orphans(self, now: float) -> int:
        """Heat maps without a flag: older than ``ORPHAN_KEEP_S``, or beyond the newest ``MAX_ORPHANS``."""
        return self._prune_flagless("heatmaps", now - ORPHAN_KEEP_S, MAX_ORPHANS)

    # ------------------------------------------------------------------ reads
    def row(self, event_id: str) -> Row | None:
        r = self.db.execute(_ROW_SQL + " WHERE f.event_id = ?", (event_id,)).fetchone()
        return _valid_row(r) if r else None

    def rows(self, now: float | None = None, limit: int = MAX_ROWS) -> list[Row]:
        """Open rows first, by priority (urgent, flag, routine) then oldest; then the closed ones (acknowledged,
        or replaced by a newer result for the same file), same order, for ``ACK_KEEP_S``."""
        now = time.time() if now is None else now
        since = now - ACK_KEEP_S
        sql = ("SELECT * FROM (" + _ROW_SQL + ") "
               "WHERE (by_name IS NULL OR received_epoch >= ?) AND (superseded_by IS NULL OR sort_epoch >= ?) "
               "ORDER BY (by_name IS NOT NULL OR superseded_by IS NOT NULL), rank, sort_epoch, event_id LIMIT ?")
        return [row for r in self.db.execute(sql, (since, since, limit)) if (row := _valid_row(r)) is not None]

    def superseded(self, payload: dict) -> Row | None:
        """The row a message says it replaces, if this station has it (to show it replaced)."""
        old = payload.get("supersedes") if isinstance(payload, dict) else None
        return self.row(old) if isinstance(old, str) and old else None

    def device_of(self, event_id: str) -> str | None:
        r = self.db.execute("SELECT device FROM flags WHERE event_id = ?", (event_id,)).fetchone()
        return r[0] if r else None

    def errors(self, limit: int = 20) -> list[ErrorRow]:
        sql = ("SELECT event_id, device, file, reason, message, at FROM errors "
               "ORDER BY received_epoch DESC, rowid DESC LIMIT ?")
        return [ErrorRow(*r) for r in self.db.execute(sql, (limit,))
                if all(v is None or isinstance(v, str) for v in r)]

    def devices(self, silent_after: float, now: float | None = None) -> list[DeviceState]:
        """offline from the status; silent when online but no stats for ``silent_after`` seconds."""
        now = time.time() if now is None else now
        out = []
        for device, status, status_epoch, stats, stats_epoch, drift in self.db.execute(
                "SELECT device, status, status_epoch, stats, stats_epoch, drift FROM devices ORDER BY device"):
            if status == "offline":
                state = "offline"
            elif status == "online":
                state = "silent" if stats_epoch is None or now - stats_epoch > silent_after else "online"
            else:
                state = "unknown"
            try:
                gaps = (self._sequence(device) or (0, []))[1]
                out.append(DeviceState(device=device, state=state,
                                       status_at=utc_iso(status_epoch) if status_epoch else None,
                                       stats_at=utc_iso(stats_epoch) if stats_epoch else None,
                                       stats=_stored_stats(device, stats),
                                       missed=sum(g[1] - g[0] + 1 for g in gaps),
                                       missed_ranges=[[g[0], g[1]] for g in gaps[:5]],
                                       drift=_stored_drift(device, drift)))
            except (ValueError, OverflowError, OSError, TypeError, IndexError) as exc:  # stored by an older version
                log.warning("skipped stored device %s that no longer validates: %s", device[:80], exc)
        return out

    def secret(self) -> bytes:
        """A random key made once per database: session cookies survive a restart, not a new database."""
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))
        return bytes.fromhex(self.db.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0])
