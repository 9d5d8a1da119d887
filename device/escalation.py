"""Acknowledgements from the nursing stations, and escalation of urgent flags nobody acknowledged.

A station publishes ``{prefix}/{device}/acks``; the daemon journals each one
against its flag. An ``urgent`` flag still unacknowledged ``alerts.escalate_after``
seconds after the broker took it is published again on
``{prefix}/{device}/escalations``, at most ``alerts.max_escalations`` times. An
escalation goes through the outbox like a flag: it survives a broker outage and
a restart, and it is counted in the same transaction that queues it.
"""
from __future__ import annotations

import json
import logging
import queue
import time

from . import contract
from .config import Config
from .messages import ACK_SCHEMA, EVENT_ID, EscalationMessage, encode
from .publisher import Publisher
from .safe_text import printable
from .store import Store, StoreError

log = logging.getLogger(__name__)

#: an ack is a few hundred bytes; anything much larger is not one (and is never parsed)
MAX_ACK_BYTES = 4096
#: acks journaled per pass of the main loop, so a flood cannot hold up the next radiograph
ACKS_PER_PASS = 50
#: at most this many messages waiting (a flood beyond it is dropped, and counted)
MAX_WAITING = 10_000
_FIELD_LIMITS = {"station": 200, "by": 200, "at": 64}


class AckError(ValueError):
    """Not an acknowledgement this daemon can journal; the message says why."""


def parse_ack(raw: bytes) -> dict[str, str]:
    """The four fields of a ``pneumoflag.ack/1`` message, or :class:`AckError`.

    Anything on the acks topic is untrusted: size, nesting, types, text that
    is not valid UTF-8 (a lone surrogate) and field lengths are checked before
    anything is stored or logged.
    """
    try:
        ack = contract.loads(raw, max_bytes=MAX_ACK_BYTES)  # size, depth, NaN, huge numbers, lone surrogates
    except contract.ContractError as exc:
        raise AckError(str(exc)) from None
    if not isinstance(ack, dict) or ack.get("schema") != ACK_SCHEMA:
        raise AckError(f"not a {ACK_SCHEMA} message")
    fields = {}
    for key in ("event_id", "station", "by", "at"):
        value = ack.get(key)
        if not isinstance(value, str) or not value.strip():
            raise AckError(f"{key} missing or not text")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AckError(f"{key} is not valid UTF-8") from None
        if key == "event_id" and not EVENT_ID.match(value):
            raise AckError("event_id is not an event id")
        if len(value) > _FIELD_LIMITS.get(key, 128):
            raise AckError(f"{key} longer than {_FIELD_LIMITS.get(key, 128)} characters")
        fields[key] = value
    return fields


class AckDesk:
    """Receives acks on paho's thread, journals them and escalates on the daemon's main loop."""

    def __init__(self, cfg: Config, store: Store, publisher: Publisher):
        self.cfg, self.store, self.publisher = cfg, store, publisher
        self._received: "queue.Queue[bytes]" = queue.Queue(MAX_WAITING)
        self._dropped = 0  # acks beyond MAX_WAITING, since the last report
        self._refused: dict[str, int] = {}  # why -> count, since the last report
        self._last_report = 0.0
        publisher.subscribe(cfg.topic("acks"), self._receive)

    def _receive(self, raw: bytes) -> None:
        try:
            self._received.put_nowait(bytes(raw))
        except queue.Full:
            self._dropped += 1

    def journal_received(self) -> None:
        """Journal up to ACKS_PER_PASS acknowledgements (the rest wait for the next pass)."""
        good: list[dict[str, str]] = []
        for _ in range(ACKS_PER_PASS):
            try:
                raw = self._received.get_nowait()
            except queue.Empty:
                break
            try:
                good.append(parse_ack(raw))
            except AckError as exc:
                self._refused[str(exc)] = self._refused.get(str(exc), 0) + 1
        if good:
            try:
                results = self.store.record_acks(good)
            except StoreError as exc:
                log.error("could not journal %d acknowledgements (%s); they are lost unless the stations send them "
                          "again", len(good), exc)
                results = []
            for ack, (known, new) in zip(good, results, strict=False):
                if new and len(good) <= 5:  # one line per ack, not per ack of a flood
                    log.info("flag %s acknowledged by %s at station %s%s", printable(ack["event_id"]),
                             printable(ack["by"]), printable(ack["station"]), "" if known else " (not a flag of ours)")
            if len(good) > 5:
                log.info("%d acknowledgements journaled in one pass", sum(new for _, new in results))
        self._report()

    def _report(self) -> None:
        """Refused and dropped acks: one summary line a minute at most (a flood must not flood the log)."""
        now = time.monotonic()
        if not (self._refused or self._dropped) or now - self._last_report < 60:
            return
        self._last_report = now
        parts = [f"{why}: {n}" for why, n in sorted(self._refused.items())]
        if self._dropped:
            parts.append(f"dropped, more than {MAX_WAITING} waiting: {self._dropped}")
        log.warning("ignored messages on %s that are not acknowledgements: %s", self.cfg.topic("acks"),
                    printable("; ".join(parts)))
        self._refused.clear()
        self._dropped = 0

    def escalate_due(self) -> None:
        """Queue an escalation for each urgent flag that has waited too long, and say so."""
        alerts = self.cfg.alerts
        if alerts.max_escalations <= 0:
            return
        try:
            due = self.store.due_escalations(time.time(), alerts.escalate_after, alerts.max_escalations)
        except StoreError:
            return
        for d in due:
            n = d.escalations + 1
            msg = EscalationMessage(event_id=d.event_id, device=self.cfg.mqtt.device_id, escalation=n,
                                    max_escalations=alerts.max_escalations,
                                    unacknowledged_s=round(time.time() - d.delivered_at, 1),
                                    flag=json.loads(d.payload))
            try:
                self.store.record_escalation(d.event_id, n, self.cfg.topic("escalations"), encode(msg.to_dict()))
            except StoreError as exc:
                log.error("could not queue the escalation of %s: %s", d.event_id, exc)
                return
            self.publisher.wake()
            log.warning("urgent flag %s (%s) unacknowledged for %.0f s: escalation %d of %d", d.event_id,
                        printable(msg.flag.get("file", "?")), msg.unacknowledged_s, n, alerts.max_escalations)
