"""Acknowledgements from the nursing stations, and escalation of urgent flags nobody acknowledged.

A station publishes ``{prefix}/{device}/acks``; the daemon journals each one
against its flag. An ``urgent`` flag still unacknowledged ``alerts.escalate_after``
seconds after the broker took it is published again on
``{prefix}/{device}/escalations``, at most ``alerts.max_escalations`` times. An
escalation goes through the outbox like a flag: it survives a broker outage and
a restart, and it is counted in the same transaction that queues it.

Waits are measured on the monotonic clock from the moment this process first
saw the flag delivered (or escalated), so a wall-clock step (NTP, a wrong RTC
fixed by hand) moves no escalation. Across a restart the monotonic clock is not
comparable: the wait already elapsed is then taken from the wall-clock stamps in
the journal, clamped to between 0 and ``escalate_after`` (a step while the
daemon was down brings an escalation forward to the restart, or delays it by at
most one ``escalate_after``). No escalation is queued until the daemon's MQTT
session is connected and subscribed, so the acks the broker kept for it while
it was away are journaled first.
"""
from __future__ import annotations

import json
import logging
import queue
import time
from typing import Callable

from . import contract
from .config import Config
from .contract import ACK_SCHEMA, AckMessage, EscalationMessage, encode
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


class AckError(ValueError):
    """Not an acknowledgement this daemon can journal; the message says why."""


def parse_ack(raw: bytes) -> dict[str, str]:
    """The fields of a ``pneumoflag.ack/1`` message (:meth:`AckMessage.parse`, as the stations read it), or
    :class:`AckError`.

    Anything on the acks topic is untrusted: size, nesting, types, text that
    is not valid UTF-8 (a lone surrogate) and field lengths are checked before
    anything is stored or logged.
    """
    try:
        msg = contract.loads_object(raw, max_bytes=MAX_ACK_BYTES)  # size, depth, NaN, huge numbers, surrogates
        contract.check_schema(msg, ACK_SCHEMA)
        ack = AckMessage.parse(msg)
    except contract.ContractError as exc:
        raise AckError(str(exc)) from None
    return {"event_id": ack.event_id, "station": ack.station, "by": ack.by, "at": ack.at}


class AckDesk:
    """Receives acks on paho's thread, journals them and escalates on the daemon's main loop."""

    def __init__(self, cfg: Config, store: Store, publisher: Publisher,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic):
        self.cfg, self.store, self.publisher = cfg, store, publisher
        self._wall, self._mono = wall, mono  # injectable: tests step the wall clock, never the machine's
        # event_id -> (monotonic time its current wait started, monotonic time it was delivered)
        self._clock: dict[str, tuple[float, float]] = {}
        self._received: "queue.Queue[bytes]" = queue.Queue(MAX_WAITING)
        self._dropped = 0  # acks beyond MAX_WAITING, since the last report
        self._refused: dict[str, int] = {}  # why -> count, since the last report
        self._last_report = 0.0
        publisher.subscribe(cfg.topics.ack(), self._receive)

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
        log.warning("ignored messages on %s that are not acknowledgements: %s", self.cfg.topics.ack(),
                    printable("; ".join(parts)))
        self._refused.clear()
        self._dropped = 0

    def escalate_due(self) -> None:
        """Queue an escalation for each urgent flag that has waited too long, and say so."""
        alerts = self.cfg.alerts
        if alerts.max_escalations <= 0:
            return
        if not self.publisher.subscribed.is_set():
            return  # acks kept by the broker for our session may still be on their way
        try:
            open_flags = self.store.open_urgent(alerts.max_escalations)
        except StoreError:
            return
        mono, wall, after = self._mono(), self._wall(), alerts.escalate_after
        clock = {}
        due = []
        for d in open_flags:
            if d.event_id not in self._clock:  # delivered moments ago, or before a restart: see the docstring
                waited = min(max(wall - (d.last_escalated or d.delivered_at), 0.0), after)
                since = min(max(wall - d.delivered_at, 0.0), after * (d.escalations + 1))
                self._clock[d.event_id] = (mono - waited, mono - since)
            clock[d.event_id] = self._clock[d.event_id]
            if mono - clock[d.event_id][0] >= after:
                due.append(d)
        self._clock = clock  # acknowledged flags, and those escalated their last time, leave it
        for d in due:
            n = d.escalations + 1
            msg = EscalationMessage(event_id=d.event_id, device=self.cfg.mqtt.device_id, escalation=n,
                                    max_escalations=alerts.max_escalations,
                                    unacknowledged_s=round(mono - self._clock[d.event_id][1], 1),
                                    flag=json.loads(d.payload))
            try:
                self.store.record_escalation(d.event_id, n, self.cfg.topics.escalation(), encode(msg.to_dict()))
            except StoreError as exc:
                log.error("could not queue the escalation of %s: %s", d.event_id, exc)
                return
            self._clock[d.event_id] = (mono, self._clock[d.event_id][1])
            self.publisher.wake()
            log.warning("urgent flag %s (%s) unacknowledged for %.0f s: escalation %d of %d", d.event_id,
                        printable(msg.flag.get("file", "?")), msg.unacknowledged_s, n, alerts.max_escalations)
