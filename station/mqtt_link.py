"""The station's one MQTT connection: a persistent session under a stable client id.

Guarantees:

- client id ``pneumoflag-station-<station_id>`` with ``clean_session = false`` (MQTT 3.1.1) or
  ``clean_start = false`` and a week's session expiry (MQTT 5) (``device.mqtt_client.make_client(clean=False)``):
  the broker queues the QoS 1 flags published while this station is down and delivers them when it is back;
- every subscription is QoS 1 (stats arrive as the daemon sends them, QoS 0), heat maps (raw PNG bytes)
  included; the contract's ``Topics`` builds the filters and reads each message's topic;
- a QoS 1 message is acknowledged to the broker (paho's manual ack) only once the handler has stored it,
  so a station that dies half-way gets the message again (and drops the repeat by event_id);
- every message is parsed by the contract (``device.contract.loads``: size and nesting depth checked before
  ``json.loads``, no NaN, huge numbers or lone surrogates); one that fails, and one whose handling raises
  anything, is logged (rate-limited), acknowledged and dropped: nothing from the broker raises out of paho's
  thread or holds up the in-flight window. Only a failure of the database itself (``sqlite3.OperationalError``:
  disk full, I/O) leaves a message unacknowledged, for redelivery;
- a connection that cannot be made says why (refused, unreachable, DNS), once per cause, as the daemon does;
- an ack the nurse sends while the broker is away waits in paho's queue and goes out after the reconnect
  (in memory only: a station restarted before that shows the row still open).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from pneumoflag.device import contract
from pneumoflag.device.config import Config
from pneumoflag.device.contract import AckMessage, ResendRequest, Topics, encode
from pneumoflag.device.mqtt_client import connect_kwargs, describe_connect_error, make_client

from .settings import StationSettings

log = logging.getLogger(__name__)

#: the kinds of topic the station subscribes to for every device (and "replay", for its own station id only)
KINDS = ("flag", "error", "status", "stats", "ack", "escalation", "heatmap", "drift", "study")
#: the longest device name (a topic level) the station stores
MAX_DEVICE = 200
#: a status is "online" or "offline"; anything much longer is not one
MAX_STATUS_BYTES = 64


@dataclass
class Incoming:
    """One message off the broker, parsed on paho's thread and handled on the event loop's."""

    kind: str  # flag | replay | error | status | stats | ack | escalation | heatmap | drift | study
    device: str  # from the topic
    payload: dict[str, Any] | str | bytes  # JSON object, the status text, or a heat map's PNG bytes
    retained: bool
    mid: int
    qos: int
    event_id: str | None = None  # a heat map's, from its topic


def _route(prefix: str, topic: str, station: str | None) -> tuple[str, str, str | None] | None:
    """(kind, device, the level after the kind's: a heat map's event id), or None for a topic the station
    ignores (the contract's ``Topics.parse``, less what is not for this station)."""
    where = Topics(prefix).parse(topic)
    if where is None:
        return None
    device, kind, rest = where
    if kind in KINDS or (kind == "replay" and rest == station):
        return kind, device, rest
    return None


def classify(prefix: str, topic: str, station: str | None = None) -> tuple[str, str] | None:
    """``pneumoflag/xray-1/flags/urgent`` -> ("flag", "xray-1"); None for a topic the station ignores.

    Flags sent again for this station (``Topics.replay(station)``, see ``device.resend``) are "replay": a flag,
    with the ack it had (if any) when the device sent it again.
    """
    where = _route(prefix, topic, station)
    return (where[0], where[1]) if where else None


def _topic(message: mqtt.MQTTMessage) -> str:
    """The topic for a log line, even when it is not UTF-8 (paho raises on ``.topic`` then)."""
    try:
        return message.topic
    except UnicodeDecodeError:
        return repr(bytes(message._topic))[:200]


def build_client(cfg: Config, client_id: str) -> mqtt.Client:
    """The shared client (credentials, TLS, protocol) with a persistent session and manual acks."""
    client = make_client(cfg, client_id, clean=False)
    client.manual_ack_set(True)
    return client


class MqttLink:
    """Hands each message to ``on_message`` on the event loop; acknowledges it when that returns True."""

    def __init__(self, cfg: Config, settings: StationSettings, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[Incoming], bool], on_link: Callable[[bool, str], None],
                 refused: contract.RateLimitedLog | None = None):
        self.cfg = cfg
        self.settings = settings
        self.loop = loop
        self.on_message = on_message
        self.on_link = on_link
        self.prefix = settings.topic_prefix
        self.client = build_client(cfg, settings.client_id)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_connect_fail = self._on_connect_fail
        self.connected = False
        #: refused messages, counted by kind (used on the event loop's thread only)
        self.refused = refused or contract.RateLimitedLog(log)
        self._problems: dict[str, float] = {}  # connection problem -> when last logged

    @property
    def topics(self) -> list[str]:
        every = Topics(self.prefix)
        return [every.filter(kind) for kind in KINDS] + [every.replay(self.settings.station_id)]

    def start(self) -> None:
        host, port = self.cfg.broker_host_port
        log.info("connecting to MQTT broker %s:%d as %s (persistent session)", host, port, self.settings.client_id)
        self.client.connect_async(host, port, keepalive=self.cfg.mqtt.keepalive,
                                  **connect_kwargs(self.cfg, self.client))
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------ paho's thread
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            self._link(False, f"refused: {reason_code}")
            return
        self._problems.clear()
        log.info("connected to the broker (session %s)", "resumed" if flags.session_present else "new")
        client.subscribe([(t, 1) for t in self.topics])
        self._link(True, "connected")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("the broker refused some subscriptions (%s): check its ACL for %s", ", ".join(refused),
                      self.settings.client_id)
        else:
            log.info("subscribed to %s", ", ".join(self.topics))

    def _on_connect_fail(self, client, userdata) -> None:
        """paho retries quietly; say why it cannot connect (once per cause, a reminder a minute)."""
        exc = getattr(client, "last_connect_error", None)
        text = f"cannot connect to {self.cfg.mqtt.broker}: {describe_connect_error(exc)}"
        now = time.monotonic()
        if now - self._problems.get(text, -1e9) >= 60:
            self._problems[text] = now
            log.warning("%s; retrying", text)
        self._link(False, text)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        log.warning("MQTT disconnected (%s); reconnecting", reason_code)
        self._link(False, f"disconnected: {reason_code}")

    def _link(self, up: bool, text: str) -> None:
        self.connected = up
        self.loop.call_soon_threadsafe(self.on_link, up, text)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        # paho's thread: nothing may raise out of here (paho would stop delivering), and every message that is
        # not handed on is acknowledged at once (an unacknowledged one holds a slot of the in-flight window)
        try:
            item = self._parse(message)
        except Exception as exc:  # noqa: BLE001 - any failure of one message is that message's, not the link's
            client.ack(message.mid, message.qos)
            self.loop.call_soon_threadsafe(self._refuse, self._kind_of(message), str(exc), _topic(message))
            return
        if item is None:
            client.ack(message.mid, message.qos)
            return
        self.loop.call_soon_threadsafe(self._handle, item)

    def _parse(self, message: mqtt.MQTTMessage) -> Incoming | None:
        """The message as the handler takes it; None for a topic the station ignores; ContractError if bad."""
        where = _route(self.prefix, message.topic, self.settings.station_id)
        if where is None:
            return None
        kind, device, rest = where
        payload: dict[str, Any] | str | bytes
        if len(device) > MAX_DEVICE:
            raise contract.ContractError(f"a device name of {len(device)} characters (at most {MAX_DEVICE})")
        if kind == "heatmap":
            payload = bytes(message.payload)  # checked (PNG, size) where it is stored
        elif kind == "status":
            if len(message.payload) > MAX_STATUS_BYTES:
                raise contract.ContractError(f"a status of {len(message.payload)} bytes")
            try:
                payload = bytes(message.payload).decode("utf-8")
            except UnicodeDecodeError:
                raise contract.ContractError("a status that is not UTF-8") from None
        else:
            payload = contract.loads_object(message.payload)
        return Incoming(kind=kind, device=device, payload=payload, retained=bool(message.retain),
                        mid=message.mid, qos=message.qos,
                        event_id=rest if kind == "heatmap" else None)

    def _kind_of(self, message: mqtt.MQTTMessage) -> str:
        """The kind its topic says (for the refused counts), or "unreadable" when even the topic is not."""
        try:
            where = classify(self.prefix, message.topic, self.settings.station_id)
        except UnicodeDecodeError:
            return "unreadable"
        return where[0] if where else "unreadable"

    # ------------------------------------------------------------------ the event loop's thread
    def _refuse(self, kind: str, why: str, where: str) -> None:
        self.refused.refused(kind, why, where)

    def _handle(self, item: Incoming) -> None:
        try:
            stored = self.on_message(item)
        except Exception as exc:  # a handler bug must not leave the message in flight for ever
            log.debug("handling a %s message failed", item.kind, exc_info=True)
            self.refused.refused(item.kind, f"handling failed ({type(exc).__name__}: {exc})", item.device)
            stored = True
        if stored:
            self.client.ack(item.mid, item.qos)

    def ask_resend(self, device: str, first: int, last: int) -> None:
        """Ask a device for the flags numbered ``first``..``last`` that never reached this station."""
        req = ResendRequest(station=self.settings.station_id, first=first, last=last)
        self.client.publish(Topics(self.prefix, device).resend(), encode(req.to_dict()), qos=1, retain=False)

    async def publish_ack(self, device: str, ack: AckMessage, timeout: float = 5.0) -> bool:
        """Publish the ack QoS 1; True once the broker acknowledged it, False while it waits for a reconnect."""
        topic = Topics(self.prefix, device).ack()
        info = self.client.publish(topic, encode(ack.to_dict()), qos=1, retain=False)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            log.warning("ack of %s queued: not connected to the broker", ack.event_id)
            return False
        try:
            await self.loop.run_in_executor(None, info.wait_for_publish, timeout)
        except (RuntimeError, ValueError) as exc:
            log.warning("ack of %s not published yet: %s", ack.event_id, exc)
            return False
        return info.is_published()
