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

from .config import Config
from .messages import ACK_SCHEMA, EscalationMessage, encode
from .publisher import Publisher
from .safe_text import printable
from .store import Store, StoreError

log = logging.getLogger(__name__)


class AckDesk:
    """Receives acks on paho's thread, journals them and escalates on the daemon's main loop."""

    def __init__(self, cfg: Config, store: Store, publisher: Publisher):
        self.cfg, self.store, self.publisher = cfg, store, publisher
        self._received: "queue.Queue[bytes]" = queue.Queue()
        publisher.subscribe(cfg.topic("acks"), self._received.put)

    def journal_received(self) -> None:
        """Journal what nursing stations acknowledged since the last call."""
        while True:
            try:
                raw = self._received.get_nowait()
            except queue.Empty:
                return
            try:
                ack = json.loads(raw)
                fields = {k: ack[k] for k in ("event_id", "station", "by", "at")}
                if ack.get("schema") != ACK_SCHEMA or not all(isinstance(v, str) and v for v in fields.values()):
                    raise ValueError("not a pneumoflag.ack/1 message")
            except (ValueError, KeyError, TypeError):
                log.warning("ignored an acknowledgement that is not %s: %s", ACK_SCHEMA, printable(repr(raw[:200])))
                continue
            try:
                known = self.store.record_ack(fields["event_id"], fields["station"], fields["by"], fields["at"])
            except StoreError as exc:
                log.error("could not journal an acknowledgement (%s); it is lost unless the station sends it again",
                          exc)
                continue
            log.info("flag %s acknowledged by %s at station %s%s", printable(fields["event_id"]),
                     printable(fields["by"]), printable(fields["station"]), "" if known else " (not a flag of ours)")

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
