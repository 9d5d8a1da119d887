"""What the daemon publishes: dataclasses with a stable JSON form (the MQTT contract)."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

FLAG_SCHEMA = "pneumoflag.flag/1"
ERROR_SCHEMA = "pneumoflag.error/1"
STATS_SCHEMA = "pneumoflag.stats/1"
ACK_SCHEMA = "pneumoflag.ack/1"
ESCALATION_SCHEMA = "pneumoflag.escalation/1"
RESEND_SCHEMA = "pneumoflag.resend/1"
#: the most flags one resend request brings back (a station asks again for the rest)
MAX_RESEND = 1000


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_iso(ts: float) -> str:
    """A POSIX timestamp as the contract's UTC ISO form."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: what an event id may look like wherever one arrives (an ack, a heat map's topic or URL): the daemon's own are
#: UUIDs; no dots, colons or slashes, so an id is also a safe file name and URL segment
EVENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


#: a nursing station's name (in acks, its client id, its replay topic): a safe MQTT topic level
STATION_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def new_event_id() -> str:
    return str(uuid.uuid4())


@dataclass
class ModelRef:
    name: str
    version: str
    sha256: str


@dataclass
class Timings:
    decode: float
    infer: float
    total: float


@dataclass
class FlagMessage:
    """One scored radiograph. Published on ``{prefix}/{device}/flags/{priority}``, QoS 1."""

    device: str
    file: str  # relative to the watched folder
    sha256: str
    probability: float
    priority: str  # urgent | flag | routine
    thresholds: dict[str, float]
    model: ModelRef
    accelerator: str
    timings_ms: Timings
    event_id: str = field(default_factory=new_event_id)
    scored_at: str = field(default_factory=utc_now)
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

    #: ``written_at`` as a POSIX time, for the daemon's records (not published)
    written_ts: Optional[float] = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("written_ts")
        d["probability"] = round(self.probability, 6)
        d["timings_ms"] = {k: round(v, 2) for k, v in d["timings_ms"].items()}
        ids = d.pop("dicom") or {}
        d.update(ids)  # study_instance_uid, sop_instance_uid, accession_number (+ patient ids if enabled)
        return d

    def topic_suffix(self) -> str:
        return f"flags/{self.priority}"


@dataclass
class ErrorMessage:
    """A file that could not be scored, with the reason. Published on ``{prefix}/{device}/errors``, QoS 1."""

    device: str
    file: str
    reason: str  # stable code, e.g. "truncated", "dicom-modality"
    message: str  # human-readable detail
    sha256: Optional[str] = None
    event_id: str = field(default_factory=new_event_id)
    at: str = field(default_factory=utc_now)
    #: reason duplicate-of: the event of the first file with this content
    duplicate_of: Optional[str] = None
    #: the event this one replaces (an earlier result for the same path)
    supersedes: Optional[str] = None
    schema: str = ERROR_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def topic_suffix(self) -> str:
        return "errors"


@dataclass
class AckMessage:
    """A nurse acknowledged a flag. Stations publish it on ``{prefix}/{device}/acks``, QoS 1, not retained."""

    event_id: str
    station: str
    by: str
    at: str = field(default_factory=utc_now)
    schema: str = ACK_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EscalationMessage:
    """An urgent flag nobody acknowledged in time, published again on ``{prefix}/{device}/escalations``."""

    event_id: str  # the flag's
    device: str
    escalation: int  # 1, 2, ... up to alerts.max_escalations
    max_escalations: int
    unacknowledged_s: float  # since the flag was delivered
    flag: dict[str, Any]  # the flag message as first published
    at: str = field(default_factory=utc_now)
    schema: str = ESCALATION_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ResendRequest:
    """A station missed flags ``first``..``last`` of a device (its broker queue overflowed while it was away).

    Published on ``{prefix}/{device}/resend``, QoS 1; the device sends copies on
    ``{prefix}/{device}/replay/{station}``, so no other station sees them twice.
    """

    station: str
    first: int
    last: int
    at: str = field(default_factory=utc_now)
    schema: str = RESEND_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dumps(value: Any) -> str:
    """Compact JSON that any parser (a browser's too) reads: NaN and Infinity refused (``ValueError``). The one
    JSON writer of the contract: MQTT, the station's database, HTTP and its event stream."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def encode(payload: dict[str, Any]) -> bytes:
    return dumps(payload).encode()
