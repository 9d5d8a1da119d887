"""The station's one MQTT connection: a persistent session under a stable client id.

Guarantees:

- client id ``pneumoflag-station-<station_id>`` with ``clean_session = false`` (MQTT 3.1.1) or
  ``clean_start = false`` and a week's session expiry (MQTT 5) (``device.publisher.make_client(clean=False)``):
  the broker queues the QoS 1 flags published while this station is down and delivers them when it is back;
- every subscription is QoS 1 (stats arrive as the daemon sends them, QoS 0), heat maps
  (``{prefix}/+/heatmaps/+``, raw PNG bytes) included;
- a QoS 1 message is acknowledged to the broker (paho's manual ack) only once the handler has stored it,
  so a station that dies half-way gets the message again (and drops the repeat by event_id);
- an ack the nurse sends while the broker is away waits in paho's queue and goes out after the reconnect
  (in memory only: a station restarted before that shows the row still open).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from pneumoflag.device.config import Config
from pneumoflag.device.messages import AckMessage, ResendRequest, encode
from pneumoflag.device.publisher import connect_kwargs, make_client

from .settings import StationSettings

log = logging.getLogger(__name__)

#: topic suffixes the station subscribes to under ``{prefix}/+/``, and the kind each carries
KINDS = {"flags/+": "flag", "errors": "error", "status": "status", "stats": "stats", "acks": "ack",
         "escalations": "escalation", "heatmaps/+": "heatmap"}


@dataclass
class Incoming:
    """One message off the broker, parsed on paho's thread and handled on the event loop's."""

    kind: str  # flag | error | status | stats | ack | escalation | heatmap
    device: str  # from the topic
    payload: dict[str, Any] | str | bytes  # JSON object, the status text, or a heat map's PNG bytes
    retained: bool
    mid: int
    qos: int
    event_id: str | None = None  # a heat map's, from its topic


def classify(prefix: str, topic: str, station: str | None = None) -> tuple[str, str] | None:
    """``pneumoflag/xray-1/flags/urgent`` -> ("flag", "xray-1"); None for a topic the station ignores.

    Flags sent again for this station (``{prefix}/{device}/replay/{station}``, see ``device.resend``) are flags.
    """
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != prefix:
        return None
    device, rest = parts[1], parts[2:]
    if len(rest) == 2 and (rest[0] == "flags" or (rest[0] == "replay" and rest[1] == station)):
        return "flag", device
    if len(rest) == 2 and rest[0] == "heatmaps":
        return "heatmap", device
    if len(rest) == 1 and rest[0] in KINDS:
        return KINDS[rest[0]], device
    return None


def build_client(cfg: Config, client_id: str) -> mqtt.Client:
    """The shared client (credentials, TLS, protocol) with a persistent session and manual acks."""
    client = make_client(cfg, client_id, clean=False)
    client.manual_ack_set(True)
    return client


class MqttLink:
    """Hands each message to ``on_message`` on the event loop; acknowledges it when that returns True."""

    def __init__(self, cfg: Config, settings: StationSettings, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[Incoming], bool], on_link: Callable[[bool, str], None]):
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
        self.connected = False

    @property
    def topics(self) -> list[str]:
        return [f"{self.prefix}/+/{suffix}" for suffix in KINDS] + [f"{self.prefix}/+/replay/{self.settings.station_id}"]

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

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        log.warning("MQTT disconnected (%s); reconnecting", reason_code)
        self._link(False, f"disconnected: {reason_code}")

    def _link(self, up: bool, text: str) -> None:
        self.connected = up
        self.loop.call_soon_threadsafe(self.on_link, up, text)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        where = classify(self.prefix, message.topic, self.settings.station_id)
        payload: dict[str, Any] | str | bytes | None = None
        if where is not None and where[0] == "heatmap":
            payload = bytes(message.payload)  # checked (PNG, size) where it is stored
        elif where is not None:
            try:
                text = message.payload.decode()
                payload = text if where[0] == "status" else json.loads(text)
            except (UnicodeDecodeError, ValueError):
                log.warning("ignored an unreadable message on %s", message.topic)
        if where is None or payload is None:
            client.ack(message.mid, message.qos)
            return
        item = Incoming(kind=where[0], device=where[1], payload=payload, retained=bool(message.retain),
                        mid=message.mid, qos=message.qos,
                        event_id=message.topic.rsplit("/", 1)[1] if where[0] == "heatmap" else None)
        self.loop.call_soon_threadsafe(self._handle, item)

    # ------------------------------------------------------------------ the event loop's thread
    def _handle(self, item: Incoming) -> None:
        if self.on_message(item):
            self.client.ack(item.mid, item.qos)

    def ask_resend(self, device: str, first: int, last: int) -> None:
        """Ask a device for the flags numbered ``first``..``last`` that never reached this station."""
        req = ResendRequest(station=self.settings.station_id, first=first, last=last)
        self.client.publish(f"{self.prefix}/{device}/resend", encode(req.to_dict()), qos=1, retain=False)

    async def publish_ack(self, device: str, ack: AckMessage, timeout: float = 5.0) -> bool:
        """Publish the ack QoS 1; True once the broker acknowledged it, False while it waits for a reconnect."""
        topic = f"{self.prefix}/{device}/acks"
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
