"""MQTT side: drains the outbox to the broker in order and deletes a row only on its PUBACK.

Each outbox row is handed to paho once per process; paho itself re-sends
unacknowledged QoS 1 messages after a reconnect, so an outage delivers
everything, in order, once. After a restart, rows still in the outbox are sent
again (at-least-once; ``event_id`` lets subscribers drop a repeat).

The daemon's session is persistent under its stable client id (MQTT 3.1.1
``clean_session = false``, MQTT 5 ``clean_start = false`` with a week's expiry),
so the broker keeps the QoS 1 acks published while the daemon is stopped or
cut off and delivers them when it is back. ``subscribed`` is set once the
broker has confirmed the subscriptions of the current connection.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional

import paho.mqtt.client as mqtt

from .config import Config
from .mqtt_client import connect_kwargs, describe_connect_error, make_client
from .stats import StepTimes
from .store import Store, StoreError

log = logging.getLogger(__name__)

MAX_INFLIGHT = 20


class Publisher:
    def __init__(self, cfg: Config, store: Store, steps: Optional[StepTimes] = None):
        self.cfg = cfg
        self.store = store
        self.steps = steps  # the daemon's stats: the fsync and send steps of each round
        self.status_topic = cfg.topics.status()
        self.client = make_client(cfg, cfg.client_id, will_topic=self.status_topic, clean=False)
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = self._on_subscribe
        self._logged_problems: set[str] = set()
        self._last_reminder = 0.0
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker confirmed this connection's subscriptions
        self._sub_mid: Optional[int] = None
        self._dropped_soon: list[float] = []  # monotonic times of connections lost soon after they were made
        self._connected_at = 0.0
        self._takeover_said = -1e9
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acks: "queue.Queue[int]" = queue.Queue()
        self._inflight: dict[int, int] = {}  # mid -> outbox seq; pump thread only
        self._handed_up_to = 0  # highest outbox seq handed to paho in this process
        self._thread: Optional[threading.Thread] = None
        self._subscriptions: list[str] = []
        self._last_read_error = -1e9
        #: set when the state disk refused an fsync: what it should have made durable is never sent, and the
        #: daemon exits 1 (after a failed fsync the kernel's copy of the data can no longer be trusted)
        self.sync_error: Optional[str] = None

    def subscribe(self, topic: str, handler) -> None:
        """Receive ``topic`` (QoS 1) on every (re)connection; ``handler(payload: bytes)`` runs on paho's thread."""
        self._subscriptions.append(topic)
        self.client.message_callback_add(topic, lambda client, userdata, msg: handler(msg.payload))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        host, port = self.cfg.broker_host_port
        log.info("connecting to MQTT broker %s:%d as %s", host, port, self.cfg.client_id)
        self.client.connect_async(host, port, keepalive=self.cfg.mqtt.keepalive, **connect_kwargs(self.cfg, self.client))
        self.client.loop_start()
        self._thread = threading.Thread(target=self._pump, name="outbox-pump", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (everything acknowledged)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.outbox_depth() == 0:
                return True
            self._wake.set()
            time.sleep(0.02)
        return self.store.outbox_depth() == 0

    def stop(self, timeout: float = 3.0) -> None:
        """Publish ``offline`` (retained), disconnect cleanly."""
        self._stop.set()
        self._wake.set()
        if self.connected.is_set():
            try:
                info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline status: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        if self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ non-durable publishes
    def publish_now(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        """Stats and status: current values only, not worth an outbox row."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    # ------------------------------------------------------------------ paho callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self._problem(f"broker refused the connection: {reason_code}")
            return
        self._logged_problems.clear()
        log.info("MQTT connected to %s (session %s)", self.cfg.mqtt.broker,
                 "resumed" if getattr(flags, "session_present", False) else "new")
        self._connected_at = time.monotonic()
        client.publish(self.status_topic, "online", qos=1, retain=True)
        if self._subscriptions:
            self._sub_mid = client.subscribe([(t, 1) for t in self._subscriptions])[1]
        else:
            self.subscribed.set()
        self.connected.set()
        self._wake.set()

    def _problem(self, text: str) -> None:
        """Log each connection problem once per outage (not at every retry), and a reminder a minute."""
        now = time.monotonic()
        if text not in self._logged_problems or now - self._last_reminder > 60:
            self._logged_problems.add(text)
            self._last_reminder = now
            waiting = self.store.outbox_depth()
            log.warning("MQTT %s: %s; retrying with backoff, %d results wait in the outbox",
                        self.cfg.mqtt.broker, text, waiting)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        if mid != self._sub_mid:
            return
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:  # an ACL that forbids our acks topic: acks never arrive, escalations follow
            log.error("MQTT broker refused the subscription to %s (%s): acknowledgements from the stations "
                      "cannot reach this daemon; allow it in the broker's ACL", ", ".join(self._subscriptions),
                      ", ".join(refused))
        self.subscribed.set()  # queued acks were delivered before the SUBACK (the broker sends them first)

    def _on_connect_fail(self, client, userdata) -> None:
        exc = getattr(client, "last_connect_error", None)
        self._problem(f"cannot connect: {describe_connect_error(exc)}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        if was and not self._stop.is_set():
            self._taken_over(reason_code)
        if not self._stop.is_set():
            self._problem(f"disconnected ({reason_code})" if was else
                          f"connection closed before the broker accepted it ({reason_code}; TLS client certificate?)")

    def _taken_over(self, reason_code) -> None:
        """Say clearly when another client keeps taking our client id (two daemons with one device id)."""
        now = time.monotonic()
        if getattr(reason_code, "value", None) != 142:  # MQTT 5 "Session taken over"; 3.1.1 just closes
            if now - self._connected_at > 10:
                return
            self._dropped_soon = [t for t in self._dropped_soon if now - t < 60] + [now]
            if len(self._dropped_soon) < 3:
                return
        self._dropped_soon = []
        if now - self._takeover_said < 300:  # once every five minutes, not at every flip
            return
        self._takeover_said = now
        log.error("MQTT client id %s is in use by another client, which takes the connection over (another "
                  "daemon with device id %s?): each device needs its own mqtt.device_id (or mqtt.client_id)",
                  self.cfg.client_id, self.cfg.mqtt.device_id)

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        # Called by paho's network thread while it holds its own lock: hand the ack
        # over to the pump thread (which owns mid -> seq) instead of taking ours.
        self._acks.put(mid)
        self._wake.set()

    def _process_acks(self) -> None:
        seqs = []
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            seq = self._inflight.pop(mid, None)
            if seq is not None:  # None: a status or stats publish
                seqs.append(seq)
        if not seqs:
            return
        try:
            self.store.ack(seqs)
        except StoreError as exc:  # re-sent after a restart: at-least-once
            log.error("could not remove %d acknowledged messages from the outbox: %s", len(seqs), exc)

    # ------------------------------------------------------------------ the pump
    def _sync(self) -> bool:
        """The results committed since the last round, fsync'd together (group commit): done here, not by
        the daemon's loop, which scores the next file while the disk works. Connected or not: a result
        waiting out a broker outage is as durable as a sent one. True when it made new results sendable."""
        if self.sync_error is not None:
            return False
        try:
            before = self.store.synced_seq
            return self.store.sync() != before
        except StoreError as exc:
            self.sync_error = f"fsync of the state database failed ({exc})"
            log.critical("%s: the results it held are not sent", self.sync_error)

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            self._process_acks()
            t_sync = time.perf_counter()
            synced = self._sync()
            t_synced = time.perf_counter()
            if not self.connected.is_set() or len(self._inflight) >= MAX_INFLIGHT * 4:
                continue
            try:
                rows = self.store.pending(limit=MAX_INFLIGHT * 2, after_seq=self._handed_up_to)
            except StoreError as exc:
                now = time.monotonic()
                if now - self._last_read_error > 60:  # once a minute, not twice a second
                    self._last_read_error = now
                    log.error("outbox read failed: %s", exc)
                continue
            for row in rows:
                if self._stop.is_set() or not self.connected.is_set():
                    break
                info = self.client.publish(row.topic, row.payload, qos=row.qos)
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho queued it
                    log.warning("publish of %s failed: %s", row.event_id, mqtt.error_string(info.rc))
                    break
                self._handed_up_to = row.seq
                self._inflight[info.mid] = row.seq
            if synced and rows and self.steps is not None:  # one row: a file that came alone
                self.steps.add("fsync", (t_synced - t_sync) * 1000.0, len(rows) == 1)
                self.steps.add("send", (time.perf_counter() - t_synced) * 1000.0, len(rows) == 1)
            if len(rows) == MAX_INFLIGHT * 2:
                self._wake.set()
            self._process_acks()
