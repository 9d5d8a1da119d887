"""The embedded demo broker: QoS 1, retained messages, last will, port clashes, restart.

Every wait is bounded (WAIT seconds) so a broken broker fails a test instead of
hanging it. Each test gets its own free port; 1883 is never touched.
"""
from __future__ import annotations

import logging
import queue
import socket
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

pytest.importorskip("amqtt")
mqtt = pytest.importorskip("paho.mqtt.client")

from pneumoflag.device.broker import BrokerStartError, EmbeddedBroker, port_in_use  # noqa: E402

HOST = "127.0.0.1"
WAIT = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(HOST, _free_port())
    b.start(timeout=WAIT)
    try:
        yield b
    finally:
        b.stop(timeout=WAIT)


class Probe:
    """A paho 2.x client with a background loop; received messages land in a queue."""

    def __init__(self, port: int, name: str, *, start_loop: bool = True, **will) -> None:
        self.messages: "queue.Queue[mqtt.MQTTMessage]" = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.reason = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        if will:
            self.client.will_set(**will)
        self.client.connect(HOST, port, keepalive=30)
        self._loop = start_loop
        if start_loop:
            self.client.loop_start()
            assert self.connected.wait(WAIT), f"{name}: no CONNACK within {WAIT}s"
        else:  # drive the loop by hand so no thread reconnects after we break the socket
            for _ in range(int(WAIT / 0.1)):
                self.client.loop(timeout=0.1)
                if self.connected.is_set():
                    break
            assert self.connected.is_set(), f"{name}: no CONNACK within {WAIT}s"
        assert not self.reason.is_failure, f"{name}: connection refused: {self.reason}"

    def _on_connect(self, _c, _u, _flags, reason_code, _props) -> None:
        self.reason = reason_code
        self.connected.set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=qos)
        assert self.subscribed.wait(WAIT), f"no SUBACK for {topic} within {WAIT}s"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT)  # QoS 1: returns once the broker's PUBACK is in
        assert info.is_published(), f"no PUBACK for {topic} within {WAIT}s"

    def next_message(self) -> "mqtt.MQTTMessage":
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"no message within {WAIT}s")

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            if self._loop:
                self.client.loop_stop()


@pytest.fixture
def probes(broker: EmbeddedBroker) -> Iterator[list[Probe]]:
    made: list[Probe] = []
    yield made
    for p in made:
        p.close()


def _probe(probes: list[Probe], broker: EmbeddedBroker, name: str, **kw) -> Probe:
    p = Probe(broker.port, name, **kw)
    probes.append(p)
    return p


def test_start_reports_address_and_running(broker: EmbeddedBroker) -> None:
    assert broker.running
    assert broker.address == f"{HOST}:{broker.port}"
    assert port_in_use(HOST, broker.port)


def test_qos1_publish_subscribe(broker: EmbeddedBroker, probes: list[Probe]) -> None:
    sub = _probe(probes, broker, "sub")
    sub.subscribe("pneumoflag/flags/#", qos=1)
    pub = _probe(probes, broker, "pub")
    pub.publish("pneumoflag/flags/urgent", b'{"p": 0.93}', qos=1)

    msg = sub.next_message()
    assert msg.topic == "pneumoflag/flags/urgent"
    assert msg.payload == b'{"p": 0.93}'
    assert msg.qos == 1
    assert not msg.retain


def test_retained_message_reaches_late_subscriber(broker: EmbeddedBroker, probes: list[Probe]) -> None:
    topic = "pneumoflag/status/retained"
    pub = _probe(probes, broker, "pub")
    # Wait for our own echo: amqtt stores the retained copy before it fans out, so
    # after the echo the retained message is guaranteed to be in place (PUBACK alone is
    # sent before the broker's message loop has handled the publish).
    pub.subscribe(topic)
    pub.publish(topic, b"online", qos=1, retain=True)
    assert pub.next_message().payload == b"online"

    late = _probe(probes, broker, "late")
    # Plain amqtt 0.12 pushes retained messages for *other* clients' filters to every new
    # connection at QoS 0 (EmbeddedBroker patches that). A SUBACK round trip orders us
    # after any such replay, so an empty queue here means none was sent.
    late.subscribe("pneumoflag/unrelated", qos=1)
    assert late.messages.empty(), "retained message pushed before subscribing"

    late.subscribe(topic, qos=1)
    msg = late.next_message()
    assert (msg.topic, msg.payload, msg.retain, msg.qos) == (topic, b"online", True, 1)
    late.subscribe("pneumoflag/unrelated2", qos=1)
    assert late.messages.empty(), "retained message delivered twice"


def test_last_will_on_unclean_disconnect(broker: EmbeddedBroker, probes: list[Probe]) -> None:
    topic = "pneumoflag/status/device-1"
    watcher = _probe(probes, broker, "watcher")
    watcher.subscribe(topic, qos=1)

    dying = _probe(probes, broker, "dying", start_loop=False, topic=topic, payload=b"offline", qos=1, retain=True)
    # Break the TCP connection without sending DISCONNECT (as a crash or a pulled cable
    # would). No loop thread runs for this client, so nothing tries to reconnect.
    sock = dying.client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()

    msg = watcher.next_message()
    assert (msg.topic, msg.payload) == (topic, b"offline")

    # will_set(retain=True): a subscriber that arrives later still learns the device is gone.
    late = _probe(probes, broker, "late")
    late.subscribe(topic, qos=1)
    msg = late.next_message()
    assert (msg.topic, msg.payload, msg.retain) == (topic, b"offline", True)


def test_clean_disconnect_sends_no_will(broker: EmbeddedBroker, probes: list[Probe]) -> None:
    topic = "pneumoflag/status/device-2"
    watcher = _probe(probes, broker, "watcher")
    watcher.subscribe(topic, qos=1)
    polite = Probe(broker.port, "polite", topic=topic, payload=b"offline", qos=1, retain=False)
    polite.close()  # sends DISCONNECT: the will must be discarded

    # A marker published after the disconnect arrives first if no will was sent.
    marker = _probe(probes, broker, "marker")
    marker.publish(topic, b"marker", qos=1)
    assert watcher.next_message().payload == b"marker"
    assert watcher.messages.empty()


def test_mqtt5_clients_are_refused(broker: EmbeddedBroker) -> None:
    """amqtt 0.12 speaks MQTT 3.1.1 only: a v5 CONNECT gets 'Unsupported protocol version'."""
    reasons: "queue.Queue[object]" = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, _f, reason_code, _p: reasons.put(reason_code)
    client.connect(HOST, broker.port)
    for _ in range(int(WAIT / 0.1)):
        client.loop(timeout=0.1)
        if not reasons.empty():
            break
    client.disconnect()
    assert not reasons.empty(), f"no CONNACK within {WAIT}s"
    reason = reasons.get_nowait()
    assert reason.is_failure
    assert "protocol version" in str(reason).lower()


def test_second_broker_on_same_port_fails_clearly(broker: EmbeddedBroker) -> None:
    other = EmbeddedBroker(HOST, broker.port)
    with pytest.raises(BrokerStartError, match="already in use") as info:
        other.start(timeout=WAIT)
    assert broker.address in str(info.value)
    assert "\n" not in str(info.value)
    assert not other.running
    other.stop()  # never started: a no-op
    assert broker.running  # the first one is unharmed


def test_losing_the_port_race_still_says_in_use(broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the port is taken between our check and amqtt's bind, the message is the same."""
    import pneumoflag.device.broker as mod

    monkeypatch.setattr(mod, "port_in_use", lambda host, port: False)
    with pytest.raises(BrokerStartError, match="already in use"):
        EmbeddedBroker(HOST, broker.port).start(timeout=WAIT)
    assert broker.running


def test_port_held_by_plain_socket_fails_clearly() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(BrokerStartError, match=r"already in use \(another MQTT broker\?\)"):
            EmbeddedBroker(HOST, port).start(timeout=WAIT)


def test_stop_is_idempotent_and_port_can_be_reused() -> None:
    port = _free_port()
    first = EmbeddedBroker(HOST, port)
    first.start(timeout=WAIT)
    p = Probe(port, "client")  # leave a live connection behind to make shutdown do real work
    try:
        first.stop(timeout=WAIT)
    finally:
        p.client.loop_stop()
    assert not first.running
    first.stop(timeout=WAIT)
    first.stop(timeout=WAIT)
    assert not port_in_use(HOST, port)

    with EmbeddedBroker(HOST, port) as second:
        assert second.running
        q = Probe(port, "again")
        q.subscribe("t", qos=1)
        q.publish("t", b"x", qos=1)
        assert q.next_message().payload == b"x"
        q.close()
    assert not second.running
    second.stop()


def test_missing_amqtt_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amqtt.broker", None)  # makes `import amqtt.broker` fail
    with pytest.raises(BrokerStartError, match=r"pip install 'pneumoflag\[demo\]'"):
        EmbeddedBroker(HOST, _free_port()).start(timeout=WAIT)


def test_amqtt_failure_becomes_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import pneumoflag.device.broker as mod

    monkeypatch.setattr(mod, "_broker_config", lambda host, port: {"listeners": {"default": {"type": "nonsense"}}})
    b = EmbeddedBroker(HOST, _free_port())
    with pytest.raises(BrokerStartError, match="failed to start") as info:
        b.start(timeout=WAIT)
    assert "\n" not in str(info.value)
    assert not b.running
    b.stop()


@pytest.mark.parametrize("ours, expected", [(logging.INFO, logging.WARNING), (logging.DEBUG, logging.NOTSET)])
def test_amqtt_logging_is_quiet_unless_debugging(ours: int, expected: int) -> None:
    mine, theirs = logging.getLogger("pneumoflag.device.broker"), logging.getLogger("amqtt")
    saved = (mine.level, theirs.level)
    mine.setLevel(ours)
    theirs.setLevel(logging.NOTSET)
    try:
        with EmbeddedBroker(HOST, _free_port()):
            assert theirs.level == expected
    finally:
        mine.setLevel(saved[0])
        theirs.setLevel(saved[1])
