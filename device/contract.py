"""The MQTT/HTTP contract's checks, one place for the daemon and the station alike.

Everything that arrives over MQTT or HTTP is untrusted. :func:`loads` parses it with the size and the nesting
depth checked *before* ``json.loads`` runs (a ``[[[[...`` of 50,000 levels would raise ``RecursionError`` in
the parser, on paho's thread), and refuses what cannot be stored or sent on: ``NaN``/``Infinity`` (not JSON;
browsers throw on it), numbers that do not fit SQLite's 64-bit integers or a float, and text that is not valid
UTF-8 (a lone surrogate such as ``"\\ud800"`` cannot be encoded for SQLite or a log). The field validators
(:func:`text`, :func:`event_id`, :func:`number`, :func:`integer`, :func:`when`) check one field each: its type,
a finite value within range, text of bounded length, a date within sane years (one Python can also convert and
print back). :func:`dumps` is the only way JSON goes out (MQTT, SQLite, HTTP, SSE): it refuses ``NaN``.

A message that fails raises :class:`ContractError` with a short, specific reason; callers log it (rate-limited
with :class:`RateLimitedLog`), acknowledge it to the broker and drop it, so no message can stop delivery.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .messages import EVENT_ID, dumps  # noqa: F401 - dumps: the contract's one JSON writer, kept here too
from .safe_text import printable

#: the most a message may weigh (a flag is ~1 KB, an escalation carries one flag)
MAX_MESSAGE_BYTES = 64 * 1024
#: the deepest nesting of objects/arrays a message may have (the contract's deepest is 3: escalation.flag.model)
MAX_DEPTH = 16
#: digits in an integer: anything longer cannot be stored as SQLite's 64-bit INTEGER
MAX_INT_DIGITS = 18
#: text fields are kept (and shown) up to this many characters
MAX_TEXT = 1024
#: dates outside these years are not the appliance's (and some do not survive a conversion to UTC)
MIN_YEAR, MAX_YEAR = 1970, 9000

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


class ContractError(ValueError):
    """A message that does not follow the contract; the text says which rule it broke."""


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


def event_id(msg: dict, key: str = "event_id", required: bool = True) -> str | None:
    """An event id of the :data:`EVENT_ID` form (never cut: a cut id would be another event's)."""
    value = msg.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not EVENT_ID.match(value):
        shown = value[:80] if isinstance(value, str) else value
        raise ContractError(f"{key} {shown!r} is not of the form {EVENT_ID.pattern}")
    return value


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


def when(msg: dict, key: str, required: bool = False) -> tuple[str | None, float | None]:
    """A date field: its text (as sent) and its epoch seconds; (None, None) when absent and not required."""
    value = text(msg, key, required=required, max_len=64)
    if not value:
        return None, None
    return value, parse_when(value)


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
