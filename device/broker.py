"""Embedded MQTT broker for the zero-configuration demo.

`pneumoflag watch DIR` with no broker configured starts one of these on
127.0.0.1:1883 so a fresh machine shows the whole flow (watch -> score ->
publish -> subscribe) with one command. It is amqtt (pure Python) running in a
daemon thread with its own asyncio loop, so the rest of the daemon stays
synchronous. It is a demo/bench broker: MQTT 3.1.1 only, anonymous, in memory
(retained messages are lost on stop). Production sites point at their own
broker instead.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any, Optional, Type

log = logging.getLogger(__name__)

# amqtt logs every connection, plugin load and state transition at INFO (and
# `transitions` logs each callback): noise in a daemon's log unless debugging.
_NOISY_LOGGERS = ("amqtt", "transitions")


class BrokerStartError(RuntimeError):
    """The embedded broker could not start; the message is one line fit for the CLI."""


def port_in_use(host: str, port: int) -> bool:
    """True when something already holds (or serves) host:port.

    Checked before amqtt binds so the user gets a clear sentence instead of an
    asyncio traceback. Binding is the authoritative test; SO_REUSEADDR mirrors
    what amqtt's listener does, so TIME_WAIT leftovers from a broker we just
    stopped do not count as "in use". A connect probe backs it up on platforms
    where a specific-address bind can coexist with a wildcard listener.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if os.name != "nt":  # on Windows SO_REUSEADDR would let us steal a live port
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES) or getattr(exc, "winerror", None) in (10048, 10013):
                return True
            raise
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt 0.12 config: one TCP listener, anonymous auth, nothing else.

    Uses the `plugins` form (the `auth`/`topic-check`/`sys_interval` keys are
    deprecated in 0.12 and switch amqtt to entry-point plugin loading). Listing
    only AnonymousAuthPlugin leaves out the default $SYS publisher (sys_interval
    would otherwise be 20 s), the packet/event loggers and any topic ACL; no
    plugin here writes files or needs extras. Without an auth plugin amqtt
    rejects every client, so this one is required.
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "timeout_disconnect_delay": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class _DropStartupTraceback(logging.Filter):
    """Drop amqtt's 'Broker startup failed' traceback: start() re-raises it as a one-line BrokerStartError."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Broker startup failed" or log.isEnabledFor(logging.DEBUG)


_startup_filter = _DropStartupTraceback()


def _quiet_amqtt() -> None:
    """Cap amqtt's loggers at WARNING unless we are debugging (or the user set them)."""
    amqtt_broker_log = logging.getLogger("amqtt.broker")
    if _startup_filter not in amqtt_broker_log.filters:
        amqtt_broker_log.addFilter(_startup_filter)
    if log.isEnabledFor(logging.DEBUG):
        return
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.WARNING)


class EmbeddedBroker:
    """amqtt on a background thread; start() blocks until clients can connect.

    Usable as a context manager: ``with EmbeddedBroker(port=p): ...``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = int(port)
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop_event: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set() and self._error is None

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; returns once the listener accepts TCP connections.

        Raises BrokerStartError (one line) if the port is taken, amqtt is not
        installed, or amqtt fails or does not come up within `timeout`.
        """
        with self._lock:
            if self.running:
                return
            try:
                busy = port_in_use(self.host, self.port)
            except OSError as exc:  # e.g. an address this machine does not have
                raise BrokerStartError(f"cannot listen on {self.address}: {exc}") from exc
            if busy:
                raise BrokerStartError(self._in_use_message())
            try:
                from amqtt.broker import Broker  # noqa: F401  (import check only; used in the thread)
            except ImportError as exc:
                raise BrokerStartError(
                    "no broker is configured and the embedded one needs the 'demo' extra "
                    f"({exc}): pip install 'pneumoflag[demo]', or set mqtt.broker / --broker HOST:PORT"
                ) from exc
            _quiet_amqtt()

            self._ready.clear()
            self._error = None
            self._thread = threading.Thread(target=self._run, name=f"pneumoflag-broker-{self.port}", daemon=True)
            deadline = time.monotonic() + timeout
            self._thread.start()
            if not self._ready.wait(timeout):
                self._shutdown(max(0.5, deadline - time.monotonic()))
                raise BrokerStartError(f"embedded MQTT broker on {self.address} did not start within {timeout:g} s")
            if self._error is not None:
                err = self._error
                self._thread.join(max(0.5, deadline - time.monotonic()))
                self._thread = None
                if _is_addr_in_use(err):  # lost a race for the port after our check
                    raise BrokerStartError(self._in_use_message()) from err
                raise BrokerStartError(f"embedded MQTT broker on {self.address} failed to start: {_root_cause(err)}") from err
            log.info("embedded MQTT broker listening on %s (MQTT 3.1.1)", self.address)

    def _in_use_message(self) -> str:
        return (f"{self.address} is already in use (another MQTT broker?): stop it, "
                "or point pneumoflag at that broker instead of starting the embedded one")

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the broker down and join its thread; safe to call repeatedly."""
        with self._lock:
            if self._thread is None:
                return
            self._shutdown(timeout)
            log.info("embedded MQTT broker on %s stopped", self.address)

    def _shutdown(self, timeout: float) -> None:
        thread, loop, ev = self._thread, self._loop, self._stop_event
        if loop is not None and ev is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed between the check and the call
                pass
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("embedded MQTT broker thread did not stop within %.1f s (daemon thread; abandoned)", timeout)
        self._thread = None
        self._ready.clear()

    def _run(self) -> None:
        """Thread body: a private event loop that lives as long as the broker."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start(); never kill the interpreter from here
            if not self._ready.is_set():
                self._error = exc
            else:
                log.error("embedded MQTT broker crashed: %s", _root_cause(exc))
        finally:
            self._ready.set()
            try:
                _cancel_leftovers(loop)
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                self._loop = None
                self._stop_event = None

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        broker = _make_broker_class()(_broker_config(self.host, self.port))
        await broker.start()  # returns after asyncio.start_server(): the socket is listening
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await broker.shutdown()

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedBroker({self.address}, running={self.running})"


def _make_broker_class() -> type:
    """amqtt's Broker with one protocol fix (amqtt 0.12.1).

    On every CONNECT amqtt replays retained messages for *every* topic filter any
    client has subscribed to, at QoS 0, to the new client, before it subscribes
    to anything (broker.py: ``for topic in self._subscriptions:
    _publish_retained_messages_for_subscription((topic, QOS_0), session)``). A
    fresh subscriber would get unsolicited, duplicated flags. MQTT 3.1.1 sends
    retained messages when a subscription is made, so we only let the replay
    through for filters the session itself holds, at the QoS it was granted.
    """
    from amqtt.broker import Broker

    class _Broker(Broker):  # type: ignore[misc,valid-type]
        async def _publish_retained_messages_for_subscription(self, subscription: Any, session: Any) -> None:
            topic_filter = subscription[0]
            granted = [q for s, q in self._subscriptions.get(topic_filter, ()) if s.client_id == session.client_id]
            if not granted:
                return
            await super()._publish_retained_messages_for_subscription((topic_filter, granted[0]), session)

    return _Broker


def _is_addr_in_use(exc: BaseException) -> bool:
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
            return True
        e = e.__cause__
    return False


def _root_cause(exc: BaseException) -> str:
    """amqtt wraps errors in BrokerError('... can't be started: ...'); show the innermost one on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel tasks amqtt left behind (client handlers, keep-alives) so the loop closes cleanly."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
