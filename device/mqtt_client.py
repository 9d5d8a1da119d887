"""The one MQTT client factory: protocol, session, credentials and TLS from the config.

The daemon's publisher, the ``alerts`` terminal, the self-test and the nursing station all connect through
:func:`make_client`, so a site's broker settings (``[mqtt]``) mean the same thing to each of them, and a
connection that fails is described the same way (:func:`describe_connect_error`).
"""
from __future__ import annotations

import socket
import ssl
from typing import Optional

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import Config, ConfigError


class _Client(mqtt.Client):
    """paho swallows the exception of a failed (re)connect; keep it so it can be logged."""

    last_connect_error: Optional[BaseException] = None

    def reconnect(self):
        try:
            return super().reconnect()
        except OSError as exc:  # refused, unreachable, TLS handshake failure
            self.last_connect_error = exc
            raise


#: MQTT 5 session expiry for a persistent (clean=False) session: a week away still gets its flags
SESSION_EXPIRY_S = 7 * 24 * 3600


def make_client(cfg: Config, client_id: str, will_topic: Optional[str] = None, clean: bool = True) -> mqtt.Client:
    """A paho 2.x client with the configured protocol, credentials and TLS (daemon, alerts, self-test and station alike).

    ``clean=False``: a persistent session (MQTT 3.1.1 clean_session=0, MQTT 5 a
    session expiry), so a subscriber that was away receives the QoS 1 messages
    it missed. Pass ``clean`` on to :func:`connect_properties` for MQTT 5.
    """
    v5 = cfg.mqtt.protocol == "5"
    client = _Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        **({} if v5 else {"clean_session": clean}),
    )
    client.pneumoflag_clean = clean
    if cfg.mqtt.username:
        client.username_pw_set(cfg.mqtt.username, cfg.mqtt_password())
    if cfg.mqtt.tls:
        try:
            client.tls_set(
                ca_certs=cfg.mqtt.ca_file or None,
                certfile=cfg.mqtt.cert_file or None,
                keyfile=cfg.mqtt.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"mqtt TLS files: {exc}") from None
        if cfg.mqtt.tls_insecure:
            client.tls_insecure_set(True)
    if will_topic:
        client.will_set(will_topic, "offline", qos=1, retain=True)
    client.reconnect_delay_set(min_delay=max(1, int(cfg.mqtt.reconnect_min)), max_delay=int(cfg.mqtt.reconnect_max))
    return client


def connect_kwargs(cfg: Config, client: mqtt.Client) -> dict:
    """``connect_async`` arguments for the protocol: MQTT 5 sessions are kept by expiry, not a flag."""
    if cfg.mqtt.protocol != "5":
        return {}
    props = Properties(PacketTypes.CONNECT)
    clean = getattr(client, "pneumoflag_clean", True)
    if not clean:
        props.SessionExpiryInterval = SESSION_EXPIRY_S
    return {"clean_start": clean, "properties": props}


def describe_connect_error(exc: BaseException | None) -> str:
    """Why a connection could not be made, in the words of whoever runs the network (daemon and station)."""
    if exc is None:
        return "no answer"
    if isinstance(exc, socket.gaierror):
        return f"the broker's name does not resolve (DNS: {exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (no broker listening on that port)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out (host unreachable or filtered)"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"unreachable ({exc.strerror or exc})"
    return str(exc) or type(exc).__name__
