"""The MQTT/HTTP contract in one place, for the daemon and the station alike: topics, messages, JSON, times.

- **Topics**: :class:`Topics` builds every topic from the prefix and a device id and parses every topic a
  subscriber receives; :data:`TOPICS` is the one list of their kinds (a test holds the code and the README
  to it, so a topic is spelled nowhere else).
- **Messages**: the dataclasses the daemon publishes (:class:`FlagMessage`, :class:`ErrorMessage`,
  :class:`EscalationMessage`) and the stations publish (:class:`AckMessage`, :class:`ResendRequest`), each
  with ``to_dict`` for sending and a validating ``parse`` for receiving.
- **JSON**: everything that arrives over MQTT or HTTP is untrusted. :func:`loads` parses it with the size and
  the nesting depth checked *before* ``json.loads`` runs (a ``[[[[...`` of 50,000 levels would raise
  ``RecursionError`` in the parser, on paho's thread), and refuses what cannot be stored or sent on:
  ``NaN``/``Infinity`` (not JSON; browsers throw on it), numbers that do not fit SQLite's 64-bit integers or a
  float, and text that is not valid UTF-8 (a lone surrogate such as ``"\\ud800"`` cannot be encoded for SQLite
  or a log). The field validators (:func:`text`, :func:`event_id`, :func:`number`, :func:`integer`,
  :func:`when`) check one field each: its type, a finite value within range, text of bounded length, a date
  within sane years (one Python can also convert and print back). :func:`dumps` is the only way JSON goes out
  (MQTT, SQLite, HTTP, SSE): it refuses ``NaN``.
- **Times**: :func:`utc_iso`/:func:`utc_now` write the contract's one timestamp form, :func:`parse_when` reads
  any ISO 8601 one.

A message that fails raises :class:`ContractError` with a short, specific reason; callers log it (rate-limited
with :class:`RateLimitedLog`), acknowledge it to the broker and drop it, so no message can stop delivery.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from .safe_text import printable
from .vocab import PRIORITIES

FLAG_SCHEMA = "pneumoflag.flag/1"
ERROR_SCHEMA = "pneumoflag.error/1"
STATS_SCHEMA = "pneumoflag.stats/1"
ACK_SCHEMA = "pneumoflag.ack/1"
ESCALATION_SCHEMA = "pneumoflag.escalation/1"
RESEND_SCHEMA = "pneumoflag.resend/1"
DRIFT_SCHEMA = "pneumoflag.drift/1"
STUDY_SCHEMA = "pneumoflag.study/1"
#: the drift monitor's states, best first; ``unknown``: the window holds too few images to judge
DRIFT_STATES = ("ok", "watch", "alarm", "unknown")
#: the most checks a drift message may carry
MAX_DRIFT_CHECKS = 16
#: the most flags one resend request brings back (a station asks again for the rest)
MAX_RESEND = 1000

#: the most a message may weigh (a flag is ~1 KB, an escalation carries one flag)
MAX_MESSAGE_BYTES = 64 * 1024
#: the deepest nesting of objects/arrays a message may have (the contract's deepest is 3: escalation.flag.model)
MAX_DEPTH = 16
#: digits in an integer: anything longer cannot be stored as SQLite's 64-bit INTEGER
MAX_INT_DIGITS = 18
#: text fields are kept (and shown) up to this many characters
MAX_TEXT = 1024
#: names in acks (station, nurse) are kept up to this many characters
MAX_NAME = 200
#: dates outside these years are not the appliance's (and some do not survive a conversion to UTC)
MIN_YEAR, MAX_YEAR = 1970, 9000
#: the largest duration (seconds or milliseconds) a message may carry
MAX_DURATION = 1e12

#: what an event id may look like wherever one arrives (an ack, a heat map's topic or URL): the daemon's own are
#: UUIDs; no dots, colons or slashes, so an id is also a safe file name and URL segment
EVENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
#: a nursing station's name (in acks, its client id, its replay topic): a safe MQTT topic level
STATION_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: the DICOM identifiers a flag may carry at its top level (the patient's only when the site enables them)
DICOM_IDS = ("study_instance_uid", "sop_instance_uid", "accession_number", "patient_name", "patient_id")


class ContractError(ValueError):
    """A message that does not follow the contract; the text says which rule it broke."""


# ---------------------------------------------------------------------------------------------- times


def utc_iso(ts: float) -> str:
    """A POSIX timestamp in the contract's one form: UTC ISO 8601, milliseconds, ``Z``."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return utc_iso(time.time())


def parse_when(value: str) -> float:
    """ISO 8601 (``Z``/offset; naive is UTC) to epoch seconds, within ``MIN_YEAR``-``MAX_YEAR`` in UTC."""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        utc = when.astimezone(timezone.utc)  # year 1 at +14:00 is year 0 in UTC: OverflowError
    except (ValueError, OverflowError):
        raise ContractError(f"{value[:64]!r} is not an ISO 8601 date Python can convert") from None
    if not MIN_YEAR <= utc.year <= MAX_YEAR:
        raise ContractError(f"{value[:64]!r} is outside the years {MIN_YEAR}-{MAX_YEAR}")
    return utc.timestamp()


# ---------------------------------------------------------------------------------------------- topics

#: a subscriber's wildcard for one topic level (any device, any priority, any event id)
ANY = "+"

#: every kind of topic under ``{prefix}/{device}/``: its level there, and what the one level after it names
#: (None: the topic ends there). The one list of the contract's topics.
TOPICS: dict[str, tuple[str, Optional[str]]] = {
    "flag": ("flags", "priority"),
    "error": ("errors", None),
    "status": ("status", None),
    "stats": ("stats", None),
    "selftest": ("selftest", None),
    "ack": ("acks", None),
    "escalation": ("escalations", None),
    "resend": ("resend", None),
    "replay": ("replay", "station"),
    "heatmap": ("heatmaps", "event_id"),
    "drift": ("drift", None),
    "study": ("studies", None),
}
_KIND_OF_LEVEL = {level: kind for kind, (level, _) in TOPICS.items()}


@dataclass(frozen=True)
class Topics:
    """Every topic of the contract, ``{prefix}/{device}/{level}[/{arg}]``, built and parsed here only.

    ``device`` is one appliance (the daemon's own topics) or :data:`ANY`, a subscriber's filter over all of
    them (the station, ``alerts``); :meth:`parse` reads what such a filter delivers.
    """

    prefix: str
    device: str = ANY

    def build(self, kind: str, arg: Optional[str] = None) -> str:
        """The one place a topic is put together; ``arg`` exactly when the kind takes a level after its own."""
        level, takes = TOPICS[kind]
        if (takes is None) != (arg is None):
            raise ValueError(f"a {kind} topic takes {'one ' + takes if takes else 'no'} level after {level}")
        return "/".join([self.prefix, self.device, level, *([arg] if arg is not None else [])])

    def flag(self, priority: str) -> str:
        return self.build("flag", priority)

    def error(self) -> str:
        return self.build("error")

    def status(self) -> str:
        return self.build("status")

    def stats(self) -> str:
        return self.build("stats")

    def selftest(self) -> str:
        """Never under ``flags/``: nobody gets paged by a self-test."""
        return self.build("selftest")

    def ack(self) -> str:
        return self.build("ack")

    def escalation(self) -> str:
        return self.build("escalation")

    def resend(self) -> str:
        return self.build("resend")

    def replay(self, station: str) -> str:
        """Flags sent again for one station only (``device.resend``), so no other station sees them twice."""
        return self.build("replay", station)

    def heatmap(self, event_id: str) -> str:
        return self.build("heatmap", event_id)

    def drift(self) -> str:
        """Retained: whether what the device scores still looks like its card's reference (``device/drift.py``)."""
        return self.build("drift")

    def study(self) -> str:
        """A study's news that alerts nobody: an image that did not raise its priority, a view refused, its close."""
        return self.build("study")

    def filter(self, kind: str) -> str:
        """A subscriber's filter for every topic of ``kind`` (any priority, station or event id)."""
        return self.build(kind, ANY if TOPICS[kind][1] else None)

    def tree(self) -> str:
        """The filter for every topic of this device (or of all devices, for :data:`ANY`)."""
        return f"{self.prefix}/{self.device}/#"

    def parse(self, topic: str) -> Optional[tuple[str, str, Optional[str]]]:
        """``pneumoflag/xray-1/flags/urgent`` -> ("xray-1", "flag", "urgent"): (device, kind, the level after
        the kind's or None). None for a topic that is not one of the contract's under this prefix (and, unless
        ``device`` is :data:`ANY`, this device)."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != self.prefix or self.device not in (ANY, parts[1]):
            return None
        kind = _KIND_OF_LEVEL.get(parts[2])
        if kind is None or len(parts) != (4 if TOPICS[kind][1] else 3):
            return None
        return parts[1], kind, parts[3] if len(parts) == 4 else None


# ---------------------------------------------------------------------------------------------- JSON

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def dumps(value: Any) -> str:
    """Compact JSON that any parser (a browser's too) reads: NaN and Infinity refused (``ValueError``). The one
    JSON writer of the contract: MQTT, the station's database, HTTP and its event stream."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def encode(payload: dict[str, Any]) -> bytes:
    return dumps(payload).encode()


def _depth(raw: bytes) -> int:
    """The deepest bracket nesting outside strings, without parsing (cheap, no recursion)."""
    deepest = depth = 0
    for b in _BRACKETS.findall(_STRINGS.sub(b"", raw)):
        if b in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ContractError(f"{name} is not a number JSON allows")


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ContractError(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(digits)


def _float(digits: str) -> float:
    value = float(digits)
    if not math.isfinite(value):
        raise ContractError(f"the number {digits[:40]} is out of range")
    return value


def _check_text(value: Any) -> None:
    """Every string (keys too) must be encodable as UTF-8; nesting is already bounded by the scan."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ContractError("text that is not valid UTF-8 (a lone surrogate)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, list):
        for v in value:
            _check_text(v)


def loads(raw: bytes | bytearray | str, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_DEPTH,
          check_text: bool = True) -> Any:
    """Parse untrusted JSON: size, UTF-8, nesting depth, then ``json.loads`` with no NaN, huge or lone-surrogate
    values; :class:`ContractError` says why not. ``check_text=False`` lets lone surrogates through, for a reader
    that only ever shows text escaped (the alerts terminal) and would rather show a broken name than drop it."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise ContractError("text that is not valid UTF-8 (a lone surrogate)") from None
    raw = bytes(raw)
    if len(raw) > max_bytes:
        raise ContractError(f"{len(raw)} bytes, over the {max_bytes} byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ContractError("not UTF-8") from None
    if _depth(raw) > max_depth:
        raise ContractError(f"nested deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_int=_int, parse_float=_float)
    except ContractError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ContractError(f"not JSON ({type(exc).__name__})") from None
    if check_text:
        _check_text(value)
    return value


def loads_object(raw: bytes | bytearray | str, max_bytes: int = MAX_MESSAGE_BYTES,
                 check_text: bool = True) -> dict[str, Any]:
    """:func:`loads`, and the message must be a JSON object (every message of the contract is one)."""
    value = loads(raw, max_bytes, check_text=check_text)
    if not isinstance(value, dict):
        raise ContractError("not a JSON object")
    return value


# ---------------------------------------------------------------------------------------------- fields


def text(msg: dict, key: str, required: bool = True, max_len: int = MAX_TEXT) -> str | None:
    """A text field: a string (non-empty when required), encodable, cut to ``max_len`` characters."""
    value = msg.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise ContractError(f"{key!r} must be a non-empty string" if required else f"{key!r} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ContractError(f"{key!r} is not valid UTF-8 (a lone surrogate)") from None
    return value[:max_len]


def check_event_id(value: Any, what: str = "event_id") -> str:
    """``value`` if it is an event id of the :data:`EVENT_ID` form (never cut: a cut id would be another event's)."""
    if not isinstance(value, str) or not EVENT_ID.match(value):
        shown = value[:80] if isinstance(value, str) else value
        raise ContractError(f"{what} {shown!r}: not an event id (it is not of the form {EVENT_ID.pattern})")
    return value


def event_id(msg: dict, key: str = "event_id", required: bool = True) -> str | None:
    """An event id field (see :func:`check_event_id`)."""
    value = msg.get(key)
    if value is None and not required:
        return None
    return check_event_id(value, key)


def number(msg: dict, key: str, lo: float, hi: float, required: bool = True) -> float | None:
    """A finite number (not a bool) in [lo, hi]."""
    value = msg.get(key)
    if value is None and not required:
        return None
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not lo <= value <= hi):
        raise ContractError(f"{key} {str(value)[:40]} is not a number in [{lo:g}, {hi:g}]")
    return float(value)


def integer(msg: dict, key: str, lo: int, hi: int, required: bool = True) -> int | None:
    """A whole number (not a bool) in [lo, hi]."""
    value = msg.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ContractError(f"{key} {str(value)[:40]} is not a whole number in [{lo}, {hi}]")
    return value


def when(msg: dict, key: str, required: bool = False) -> tuple[str | None, float | None]:
    """A date field: its text (as sent) and its epoch seconds; (None, None) when absent and not required."""
    value = text(msg, key, required=required, max_len=64)
    if not value:
        return None, None
    return value, parse_when(value)


def check_schema(msg: dict, schema: str) -> None:
    """For a receiver that takes only this version of a message (the daemon: acks, resend requests)."""
    if msg.get("schema") != schema:
        raise ContractError(f"not a {schema} message")


def _object(payload: Any, what: str) -> dict:
    if not isinstance(payload, dict):
        raise ContractError(f"{what} must be a JSON object")
    return payload


def _name(msg: dict, key: str) -> str:
    """A person's or a station's name: text with something in it besides blanks."""
    value = text(msg, key, max_len=MAX_NAME)
    if not value.strip():
        raise ContractError(f"{key!r} must not be blank")
    return value


def _device(msg: dict, topic_device: Optional[str]) -> str:
    """The topic names the device (the broker's ACL guards it; acks go back there): the message must agree."""
    device = text(msg, "device", required=topic_device is None, max_len=MAX_NAME)
    if topic_device is None:
        return device
    if device and device != topic_device:
        raise ContractError(f"device {device[:80]!r} in the message, {topic_device[:80]!r} in its topic")
    return topic_device


# ---------------------------------------------------------------------------------------------- messages


def new_event_id() -> str:
    return str(uuid.uuid4())


@dataclass
class ModelRef:
    name: str
    version: str
    sha256: str

    @classmethod
    def parse(cls, value: Any) -> Optional[ModelRef]:
        if value is None:
            return None
        d = _object(value, "'model'")
        return cls(name=text(d, "name"), version=text(d, "version"), sha256=text(d, "sha256", max_len=128))


@dataclass
class Timings:
    decode: float
    infer: float
    total: float

    @classmethod
    def parse(cls, value: Any) -> Optional[Timings]:
        if value is None:
            return None
        d = _object(value, "'timings_ms'")
        return cls(**{k: number(d, k, 0.0, MAX_DURATION) for k in ("decode", "infer", "total")})


def _thresholds(msg: dict) -> Optional[dict[str, Optional[float]]]:
    """The operating points a flag was scored against: a name -> probability (None: a tier not in use)."""
    value = msg.get("thresholds")
    if value is None:
        return None
    d = _object(value, "'thresholds'")
    return {k[:MAX_NAME]: number(d, k, 0.0, 1.0, required=False) for k in d}


def _dicom_ids(msg: dict) -> Optional[dict[str, str]]:
    ids = {k: v for k in DICOM_IDS if (v := text(msg, k, required=False))}
    return ids or None


#: the most rejected views a study result names (the rest are counted in the journal only)
MAX_REJECTED = 32
#: the most images a study may count
MAX_STUDY_IMAGES = 10**6


@dataclass
class RejectedView:
    """An image of a study that was not scored (a lateral, a non-chest view): its file and its reason code."""

    file: str
    reason: str

    @classmethod
    def parse(cls, value: Any) -> RejectedView:
        d = _object(value, "a rejected view")
        return cls(file=text(d, "file"), reason=text(d, "reason", max_len=64))


@dataclass
class StudyInfo:
    """What a study result says about its study (``device/studies.py``): its StudyInstanceUID, how many of its
    images were scored, which were refused and why, and whether it is closed (no new image for
    ``dicom.study_quiet_seconds``)."""

    uid: str
    images: int
    rejected: list[RejectedView] = field(default_factory=list)
    closed: bool = False

    @classmethod
    def parse(cls, value: Any) -> Optional[StudyInfo]:
        if value is None:
            return None
        d = _object(value, "'study'")
        rejected = d.get("rejected", [])
        if not isinstance(rejected, list) or len(rejected) > MAX_REJECTED:
            raise ContractError(f"'rejected' must be a list of at most {MAX_REJECTED}")
        closed = d.get("closed", False)
        if not isinstance(closed, bool):
            raise ContractError("'closed' must be true or false")
        return cls(uid=text(d, "uid", max_len=64), images=integer(d, "images", 0, MAX_STUDY_IMAGES),
                   rejected=[RejectedView.parse(r) for r in rejected], closed=closed)


@dataclass
class FlagMessage:
    """One scored radiograph. Published on ``Topics.flag(priority)``, QoS 1.

    The daemon fills every field. Receivers rely on ``event_id``, ``priority``, ``probability`` and ``file``
    only, so :meth:`parse` leaves the descriptive fields (``sha256``, ``thresholds``, ``model``,
    ``accelerator``, ``timings_ms``) None when a publisher left them out, and checks them when it did not.
    """

    device: str
    file: str  # relative to the watched folder
    sha256: Optional[str]
    probability: float
    priority: str  # urgent | flag | routine
    thresholds: Optional[dict[str, Optional[float]]]
    model: Optional[ModelRef]
    accelerator: Optional[str]
    timings_ms: Optional[Timings]
    event_id: str = field(default_factory=new_event_id)
    scored_at: Optional[str] = field(default_factory=utc_now)
    #: when the image was written (DICOM acquisition/content time when present, else the file's mtime)
    written_at: Optional[str] = None
    #: when the daemon first saw the file
    seen_at: Optional[str] = None
    #: the event this one replaces: an earlier result for the same path (an error, or other content)
    supersedes: Optional[str] = None
    dicom: Optional[dict[str, str]] = None
    #: this device's flag number, 1, 2, ... without gaps; given when the flag is journaled (``Store.record``)
    seq: Optional[int] = None
    schema: str = FLAG_SCHEMA
    #: the calling AE title of the modality or PACS that sent the image over DICOM; absent for a file from the folder
    received_from: Optional[str] = None
    #: the image's study (a DICOM image with a StudyInstanceUID): this flag is the study's current result
    study: Optional[StudyInfo] = None

    #: ``written_at`` and ``scored_at`` as POSIX times, for the records of whoever holds it (not published)
    written_ts: Optional[float] = field(default=None, repr=False)
    scored_ts: Optional[float] = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["written_ts"], d["scored_ts"]
        d["probability"] = round(self.probability, 6)
        if d["timings_ms"] is not None:
            d["timings_ms"] = {k: round(v, 2) for k, v in d["timings_ms"].items()}
        for optional in ("received_from", "study"):
            if d[optional] is None:
                del d[optional]
        ids = d.pop("dicom") or {}
        d.update(ids)  # study_instance_uid, sop_instance_uid, accession_number (+ patient ids if enabled)
        return d

    @classmethod
    def parse(cls, payload: Any, device: Optional[str] = None) -> FlagMessage:
        """A received flag, checked; ``device``: its topic's, which the message's own must match."""
        msg = _object(payload, "a flag")
        eid = event_id(msg)
        priority = msg.get("priority")
        if not isinstance(priority, str) or priority not in PRIORITIES:
            raise ContractError(f"priority {str(priority)[:40]!r} is not one of {', '.join(PRIORITIES)}")
        probability = number(msg, "probability", 0.0, 1.0)
        written_at, written_ts = when(msg, "written_at")
        scored_at, scored_ts = when(msg, "scored_at")
        return cls(device=_device(msg, device), file=text(msg, "file"), sha256=text(msg, "sha256", False, 128),
                   probability=probability, priority=priority, thresholds=_thresholds(msg),
                   model=ModelRef.parse(msg.get("model")), accelerator=text(msg, "accelerator", False, MAX_NAME),
                   timings_ms=Timings.parse(msg.get("timings_ms")), event_id=eid, scored_at=scored_at,
                   written_at=written_at, seen_at=when(msg, "seen_at")[0],
                   supersedes=event_id(msg, "supersedes", required=False), dicom=_dicom_ids(msg),
                   seq=integer(msg, "seq", 1, 2**53, required=False),  # absent from older daemons' flags
                   schema=text(msg, "schema", False, 64) or FLAG_SCHEMA, written_ts=written_ts, scored_ts=scored_ts,
                   received_from=text(msg, "received_from", False, 16), study=StudyInfo.parse(msg.get("study")))


#: the largest figure a stats message may show (a count, seconds, milliseconds): beyond it, not the daemon's
MAX_FIGURE = 1e15


def _figure(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= MAX_FIGURE


@dataclass
class StatsSummary:
    """What a station takes of a device's stats (``Topics.stats()``, made by ``device/stats.py``): the figures of
    its devices panel and the highest flag number the broker has taken. The rest of the message is for
    dashboards. A figure that is not a finite number in range is left out (None), not refused: one bad figure
    must not hide the others; ``delivered_seq`` out of range is refused (it decides what a station asks for)."""

    scored: Optional[float] = None  # images scored, all priorities
    errors: Optional[float] = None
    queue_depth: Optional[float] = None
    outbox: Optional[float] = None
    uptime_s: Optional[float] = None
    p50_ms: Optional[float] = None  # file seen -> flag queued, p50
    delivered_seq: Optional[int] = None
    at: Optional[float] = None  # when the device sent it (a retained copy may be old)

    @classmethod
    def parse(cls, payload: Any) -> StatsSummary:
        msg = _object(payload, "stats")
        out = cls(delivered_seq=integer(msg, "delivered_seq", 0, 2**53, required=False))
        scored = msg.get("scored")
        if isinstance(scored, dict) and all(_figure(v) for v in scored.values()) and \
                _figure(total := sum(scored.values())):
            out.scored = total
        for key in ("errors", "queue_depth", "outbox", "uptime_s"):
            if _figure(msg.get(key)):
                setattr(out, key, msg[key])
        latency = msg.get("latency_ms")
        if isinstance(latency, dict) and _figure(latency.get("p50")):
            out.p50_ms = latency["p50"]
        try:
            out.at = when(msg, "at")[1]
        except ContractError:
            out.at = None  # only dates a retained copy
        return out

    def figures(self) -> dict[str, float]:
        """The panel's figures that the message had."""
        return {k: v for k in ("scored", "errors", "queue_depth", "outbox", "uptime_s", "p50_ms")
                if (v := getattr(self, k)) is not None}


@dataclass
class StudyUpdate:
    """A study's news that alerts nobody, on ``Topics.study()``, QoS 1: an image that did not raise its
    priority (the new count), a view refused while it has a result (named), or its close.

    ``flag`` is the event id of the study's current flag (None: no image of it scored yet), whose row a station
    updates in place: no new alert, no acknowledgement cleared.
    """

    device: str
    study: StudyInfo
    flag: Optional[str]
    priority: Optional[str]  # the study's, as its flag says
    event_id: str = field(default_factory=new_event_id)
    at: Optional[str] = field(default_factory=utc_now)
    accession_number: Optional[str] = None
    schema: str = STUDY_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["accession_number"] is None:
            del d["accession_number"]
        return d

    @classmethod
    def parse(cls, payload: Any, device: Optional[str] = None) -> StudyUpdate:
        """A received study update, checked; ``device``: its topic's, which the message's own must match."""
        msg = _object(payload, "a study update")
        eid = event_id(msg)
        study = StudyInfo.parse(msg.get("study"))
        if study is None:
            raise ContractError("'study' is missing")
        priority = msg.get("priority")
        if priority is not None and priority not in PRIORITIES:
            raise ContractError(f"priority {str(priority)[:40]!r} is not one of {', '.join(PRIORITIES)}")
        at, _ = when(msg, "at")
        return cls(device=_device(msg, device), study=study, flag=event_id(msg, "flag", required=False),
                   priority=priority, event_id=eid, at=at, accession_number=text(msg, "accession_number", False, 64),
                   schema=text(msg, "schema", False, 64) or STUDY_SCHEMA)


@dataclass
class ErrorMessage:
    """A file that could not be scored, with the reason. Published on ``Topics.error()``, QoS 1.

    The daemon fills ``file``, ``reason`` and ``message``; a receiver needs only the ``event_id``.
    """

    device: str
    file: Optional[str]
    reason: Optional[str]  # stable code, e.g. "truncated", "dicom-modality"
    message: Optional[str]  # human-readable detail
    sha256: Optional[str] = None
    event_id: str = field(default_factory=new_event_id)
    at: Optional[str] = field(default_factory=utc_now)
    #: reason duplicate-of: the event of the first file with this content
    duplicate_of: Optional[str] = None
    #: the event this one replaces (an earlier result for the same path)
    supersedes: Optional[str] = None
    schema: str = ERROR_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, payload: Any, device: Optional[str] = None) -> ErrorMessage:
        """A received error, checked; ``device``: its topic's, which the message's own must match."""
        msg = _object(payload, "an error")
        eid = event_id(msg)
        at, _ = when(msg, "at")
        return cls(device=_device(msg, device), file=text(msg, "file", False), reason=text(msg, "reason", False),
                   message=text(msg, "message", False), sha256=text(msg, "sha256", False, 128), event_id=eid, at=at,
                   duplicate_of=event_id(msg, "duplicate_of", required=False),
                   supersedes=event_id(msg, "supersedes", required=False),
                   schema=text(msg, "schema", False, 64) or ERROR_SCHEMA)


@dataclass
class AckMessage:
    """A nurse acknowledged a flag. Stations publish it on ``Topics.ack()``, QoS 1, not retained."""

    event_id: str
    station: str
    by: str
    at: str = field(default_factory=utc_now)
    schema: str = ACK_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, payload: Any) -> AckMessage:
        """A received ack, checked (by the daemon that journals it and the stations that show it alike)."""
        msg = _object(payload, "an ack")
        eid = event_id(msg)
        station, by = _name(msg, "station"), _name(msg, "by")
        at, _ = when(msg, "at", required=True)
        return cls(event_id=eid, station=station, by=by, at=at, schema=text(msg, "schema", False, 64) or ACK_SCHEMA)


@dataclass
class EscalationMessage:
    """An urgent flag nobody acknowledged in time, published again on ``Topics.escalation()``.

    The daemon fills every field; a receiver needs the ``event_id`` and the ``escalation`` count, and ``flag``
    only for a flag it has not seen.
    """

    event_id: str  # the flag's
    device: str
    escalation: int  # 1, 2, ... up to alerts.max_escalations
    max_escalations: Optional[int]
    unacknowledged_s: Optional[float]  # since the flag was delivered
    flag: Optional[dict[str, Any]]  # the flag message as first published
    at: Optional[str] = field(default_factory=utc_now)
    schema: str = ESCALATION_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, payload: Any, device: Optional[str] = None) -> EscalationMessage:
        """A received escalation, checked; ``flag`` is left as sent (parse it with :meth:`FlagMessage.parse`)."""
        msg = _object(payload, "an escalation")
        eid = event_id(msg)
        level = integer(msg, "escalation", 1, 1000)
        top = integer(msg, "max_escalations", 0, 1000, required=False)
        waited = number(msg, "unacknowledged_s", 0.0, MAX_DURATION, required=False)
        at, _ = when(msg, "at")
        flag = msg.get("flag")
        if flag is not None and (not isinstance(flag, dict) or flag.get("event_id") != eid):
            raise ContractError("'flag' is not the escalated flag")
        return cls(event_id=eid, device=_device(msg, device), escalation=level, max_escalations=top,
                   unacknowledged_s=waited, flag=flag, at=at, schema=text(msg, "schema", False, 64) or ESCALATION_SCHEMA)


@dataclass
class ResendRequest:
    """A station missed flags ``first``..``last`` of a device (its broker queue overflowed while it was away).

    Published on ``Topics.resend()``, QoS 1; the device sends copies on ``Topics.replay(station)``, so no other
    station sees them twice.
    """

    station: str
    first: int
    last: int
    at: Optional[str] = field(default_factory=utc_now)
    schema: str = RESEND_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, payload: Any) -> ResendRequest:
        """A received request, checked: the station is a safe topic level, 1 <= first <= last < 2**53."""
        msg = _object(payload, "a resend request")
        station, first, last = msg.get("station"), msg.get("first"), msg.get("last")
        if not isinstance(station, str) or not STATION_ID.match(station):
            raise ContractError("station is not a station id")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, last)) or not 1 <= first <= last:
            raise ContractError("first and last must be whole numbers with 1 <= first <= last")
        if last >= 2**53:
            raise ContractError("last is out of range")
        return cls(station=station, first=first, last=last, at=text(msg, "at", False, 64),
                   schema=text(msg, "schema", False, 64) or RESEND_SCHEMA)


@dataclass
class DriftCheck:
    """One figure the drift monitor compared: its name, its level (a :data:`DRIFT_STATES` value) and the words."""

    check: str
    level: str
    text: str
    value: Optional[float] = None

    @classmethod
    def parse(cls, value: Any) -> DriftCheck:
        msg = _object(value, "a drift check")
        level = text(msg, "level", max_len=16)
        if level not in DRIFT_STATES:
            raise ContractError(f"drift check level {level[:20]!r} is not one of {', '.join(DRIFT_STATES)}")
        return cls(check=text(msg, "check", max_len=64), level=level, text=text(msg, "text"),
                   value=number(msg, "value", -1e12, 1e12, required=False))


@dataclass
class DriftMessage:
    """The drift monitor's state, retained on ``Topics.drift()``: ``state`` and ``reason`` in words, the figures
    behind them (``checks``), how many images the window holds, and since when the state holds."""

    device: str
    state: str  # one of DRIFT_STATES
    reason: str
    images: int  # in the window, scored or refused
    scored: int
    checks: list[DriftCheck]
    model: str  # name and version
    reference: str  # what the reference was made from, in words
    since: Optional[str] = None  # when the state began
    at: Optional[str] = field(default_factory=utc_now)
    schema: str = DRIFT_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, payload: Any, device: Optional[str] = None) -> DriftMessage:
        """A received drift message, checked: a known state, bounded texts and counts, at most
        :data:`MAX_DRIFT_CHECKS` checks."""
        msg = _object(payload, "a drift message")
        state = text(msg, "state", max_len=16)
        if state not in DRIFT_STATES:
            raise ContractError(f"drift state {state[:20]!r} is not one of {', '.join(DRIFT_STATES)}")
        checks = msg.get("checks")
        if not isinstance(checks, list) or len(checks) > MAX_DRIFT_CHECKS:
            raise ContractError(f"'checks' must be a list of at most {MAX_DRIFT_CHECKS}")
        since, _ = when(msg, "since")
        at, _ = when(msg, "at")
        return cls(device=_device(msg, device), state=state, reason=text(msg, "reason"),
                   images=integer(msg, "images", 0, 10**9), scored=integer(msg, "scored", 0, 10**9),
                   checks=[DriftCheck.parse(c) for c in checks], model=text(msg, "model", max_len=MAX_NAME),
                   reference=text(msg, "reference"), since=since, at=at,
                   schema=text(msg, "schema", False, 64) or DRIFT_SCHEMA)


# ---------------------------------------------------------------------------------------------- logging


@dataclass
class RateLimitedLog:
    """At most ``burst`` warnings per ``every`` seconds for refused messages; the first line after a quiet spell
    says how many were refused unlogged meanwhile.

    A flood of bad messages must not flood the log (or the disk) either, while a few distinct refusals are each
    worth a line. The counts by kind are kept for whoever shows them (the station's ``/api/state``).
    """

    logger: logging.Logger
    every: float = 60.0
    burst: int = 10
    counts: dict[str, int] = field(default_factory=dict)
    _window: float = field(default=-1e9, repr=False)
    _logged: int = field(default=0, repr=False)
    _unlogged: int = field(default=0, repr=False)

    def refused(self, kind: str, why: str, where: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._window >= self.every:
            self._window, self._logged = now, 0
        if self._logged >= self.burst:
            self._unlogged += 1
            return
        self._logged += 1
        more = f" ({self._unlogged} more refused unlogged before this one)" if self._unlogged else ""
        if self._logged == self.burst:
            more += f"; the next are not logged for {self.every:g} s"
        self.logger.warning("dropped a %s message on %s: %s%s", kind, printable(where[:200]), printable(why[:300]),
                            more)
        self._unlogged = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())
