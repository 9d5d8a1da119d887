"""``pneumoflag alerts``: a nursing-station terminal that prints flags as they arrive."""
from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from typing import Optional, TextIO

from . import contract
from .config import Config
from .contract import Topics
from .mqtt_client import connect_kwargs, make_client
from .safe_text import printable
from .vocab import PRIORITIES, Priority

log = logging.getLogger(__name__)

COLOURS = {Priority.URGENT: "\033[1;97;41m", Priority.FLAG: "\033[1;30;43m", Priority.ROUTINE: "\033[32m"}
RESET = "\033[0m"
PRIORITY_ORDER = PRIORITIES[::-1]  # least pressing first
#: a flag is about 1 KB; anything far larger is not one of ours
MAX_MESSAGE_BYTES = 256 * 1024


def _text(msg: dict, key: str, default: str = "?") -> str:
    """A field from the broker, safe for a terminal (a file name may carry escape sequences)."""
    value = msg.get(key)
    return printable(str(value)) if value is not None else default


def format_alert(msg: dict, colour: bool) -> str:
    prio = _text(msg, "priority")
    tag = f" {prio.upper():<7} "
    if colour and prio in COLOURS:
        tag = f"{COLOURS[prio]}{tag}{RESET}"
    try:
        stamp = time.strftime("%H:%M:%S", time.localtime(contract.parse_when(str(msg.get("scored_at", "")))))
    except contract.ContractError:
        stamp = "--:--:--"
    try:
        p = f"{float(msg.get('probability', float('nan'))):.4f}"  # thresholds sit near 1: 0.999 says too little
    except (TypeError, ValueError):
        p = "?"
    extra = f"  accession {_text(msg, 'accession_number')}" if msg.get("accession_number") else ""
    return f"{stamp} {tag} p={p}  {_text(msg, 'file')}  [{_text(msg, 'device')}]{extra}"


def format_error(msg: dict) -> str:
    return f"{'':8}  ERROR    {_text(msg, 'file')}: {_text(msg, 'reason')} - {_text(msg, 'message')}"


def station_client_id(cfg: Config) -> str:
    """Stable per terminal, so the broker keeps its session (and its missed flags) while it is away."""
    return f"pneumoflag-alerts-{cfg.station.station_id}"


class AlertListener:
    """Subscribes to the flags of every device, or of one (and their errors), and queues them decoded:
    (topic, kind, message), the kind ``flag`` or ``error`` (:meth:`Topics.parse`).

    With ``clean=False`` it keeps a persistent session under a stable client id:
    flags published while the terminal was away arrive when it comes back.
    It says when it loses the broker and when it has it again.
    """

    def __init__(self, cfg: Config, min_priority: str = "routine", device: str = "+", errors: bool = False,
                 client_id: Optional[str] = None, clean: bool = True, notify: Optional[TextIO] = None):
        self.cfg = cfg
        self.min_rank = PRIORITY_ORDER.index(min_priority)
        self.contract_topics = Topics(cfg.mqtt.topic_prefix, device)
        self.topics = [self.contract_topics.flag(p) for p in PRIORITY_ORDER[self.min_rank:]]
        if errors:
            self.topics.append(self.contract_topics.error())
        self.queue: "queue.Queue[tuple[str, str, dict]]" = queue.Queue()
        cid = client_id or f"pneumoflag-alerts-{int(time.time() * 1000) % 10**9}"
        self.client = make_client(cfg, cid, clean=clean)
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.error: Optional[str] = None
        self.notify = notify
        self._lost_at: Optional[float] = None
        self._stopping = False

    def _say(self, text: str) -> None:
        if self.notify is not None:
            print(text, file=self.notify, flush=True)
        else:
            log.info("%s", text)

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self.error = f"broker refused the connection: {reason_code}"
            return
        client.subscribe([(t, 1) for t in self.topics])
        if self._lost_at is not None:
            self._say(f"{time.strftime('%H:%M:%S')}  broker {self.cfg.mqtt.broker} is back after "
                      f"{time.monotonic() - self._lost_at:.0f} s; flags sent meanwhile follow")
            self._lost_at = None
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if self._stopping or not self.connected.is_set():
            return
        self.connected.clear()
        self._lost_at = time.monotonic()
        self._say(f"{time.strftime('%H:%M:%S')}  LOST the broker {self.cfg.mqtt.broker} ({reason_code}): "
                  "no flags arrive until it is back; reconnecting")

    def _on_message(self, client, userdata, message) -> None:
        # runs on paho's thread: nothing from the broker may raise here, or the terminal goes deaf
        # (the contract's bounded parser: size and depth first; text is shown escaped, so a lone surrogate may pass)
        try:
            payload = contract.loads_object(message.payload, MAX_MESSAGE_BYTES, check_text=False)
        except contract.ContractError as exc:
            log.warning("ignored a message on %s: %s", printable(message.topic), printable(str(exc)))
            return
        where = self.contract_topics.parse(message.topic)
        self.queue.put((message.topic, where[1] if where else "unknown", payload))

    def start(self, timeout: float = 10.0) -> None:
        host, port = self.cfg.broker_host_port
        self.client.connect_async(host, port, keepalive=self.cfg.mqtt.keepalive, **connect_kwargs(self.cfg, self.client))
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise ConnectionError(self.error or f"no MQTT broker answered at {host}:{port} within {timeout:g} s")

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()


def run_alerts(cfg: Config, min_priority: str, as_json: bool, count: Optional[int], timeout: Optional[float],
               errors: bool, out: TextIO = sys.stdout, client_id: Optional[str] = None) -> int:
    listener = AlertListener(cfg, min_priority, errors=errors, client_id=client_id or station_client_id(cfg),
                             clean=False, notify=sys.stderr)
    listener.start(min(10.0, timeout) if timeout else 10.0)
    colour = out.isatty() and not as_json
    # on stderr, also with --json: a script can wait for it, stdout stays pure JSON
    print(f"listening on {cfg.mqtt.broker} for {', '.join(listener.topics)} (Ctrl-C to stop)", file=sys.stderr)
    seen = 0
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while count is None or seen < count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                topic, kind, msg = listener.queue.get(timeout=min(0.5, remaining) if remaining else 0.5)
            except queue.Empty:
                continue
            seen += 1
            if as_json:
                out.write(json.dumps({"topic": topic, **msg}, allow_nan=False) + "\n")
            elif kind == "error":
                out.write(format_error(msg) + "\n")
            else:
                out.write(format_alert(msg, colour) + "\n")
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
    if count is None or seen >= count:
        return 0
    if deadline is not None and time.monotonic() >= deadline:
        print(f"timed out after {timeout:g} s: {seen} of {count} messages received", file=sys.stderr)
    return 1
