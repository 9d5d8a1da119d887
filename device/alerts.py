"""``pneumoflag alerts``: a nursing-station terminal that prints flags as they arrive."""
from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from datetime import datetime
from typing import Optional, TextIO

from .config import Config
from .publisher import make_client

log = logging.getLogger(__name__)

COLOURS = {"urgent": "\033[1;97;41m", "flag": "\033[1;30;43m", "routine": "\033[32m"}
RESET = "\033[0m"
PRIORITY_ORDER = ("routine", "flag", "urgent")


def format_alert(msg: dict, colour: bool) -> str:
    prio = str(msg.get("priority", "?"))
    tag = f" {prio.upper():<7} "
    if colour and prio in COLOURS:
        tag = f"{COLOURS[prio]}{tag}{RESET}"
    try:
        when = datetime.fromisoformat(str(msg.get("scored_at", "")).replace("Z", "+00:00")).astimezone()
        stamp = when.strftime("%H:%M:%S")
    except ValueError:
        stamp = "--:--:--"
    extra = f"  accession {msg['accession_number']}" if msg.get("accession_number") else ""
    return (f"{stamp} {tag} p={float(msg.get('probability', float('nan'))):.3f}  {msg.get('file', '?')}"
            f"  [{msg.get('device', '?')}]{extra}")


class AlertListener:
    """Subscribes to ``{prefix}/+/flags/#`` (and errors) and yields decoded messages."""

    def __init__(self, cfg: Config, min_priority: str = "routine", device: str = "+", errors: bool = False,
                 client_id: Optional[str] = None, clean: bool = True):
        self.cfg = cfg
        self.min_rank = PRIORITY_ORDER.index(min_priority)
        prefix = cfg.mqtt.topic_prefix
        self.topics = [f"{prefix}/{device}/flags/{p}" for p in PRIORITY_ORDER[self.min_rank:]]
        if errors:
            self.topics.append(f"{prefix}/{device}/errors")
        self.queue: "queue.Queue[tuple[str, dict]]" = queue.Queue()
        cid = client_id or f"pneumoflag-alerts-{int(time.time() * 1000) % 10**9}"
        self.client = make_client(cfg, cid)
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.error: Optional[str] = None

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self.error = f"broker refused the connection: {reason_code}"
            return
        client.subscribe([(t, 1) for t in self.topics])
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        try:
            payload = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError):
            log.warning("ignored a non-JSON message on %s", message.topic)
            return
        self.queue.put((message.topic, payload))

    def start(self, timeout: float = 10.0) -> None:
        host, port = self.cfg.broker_host_port
        self.client.connect_async(host, port, keepalive=self.cfg.mqtt.keepalive)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise ConnectionError(self.error or f"no MQTT broker answered at {host}:{port} within {timeout:g} s")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_alerts(cfg: Config, min_priority: str, as_json: bool, count: Optional[int], timeout: Optional[float],
               errors: bool, out: TextIO = sys.stdout) -> int:
    listener = AlertListener(cfg, min_priority, errors=errors)
    listener.start()
    colour = out.isatty() and not as_json
    if not as_json:
        print(f"listening on {cfg.mqtt.broker} for {', '.join(listener.topics)} (Ctrl-C to stop)", file=sys.stderr)
    seen = 0
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while count is None or seen < count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                topic, msg = listener.queue.get(timeout=min(0.5, remaining) if remaining else 0.5)
            except queue.Empty:
                continue
            seen += 1
            if as_json:
                out.write(json.dumps({"topic": topic, **msg}) + "\n")
            elif topic.endswith("/errors"):
                out.write(f"{'':8}  ERROR    {msg.get('file')}: {msg.get('reason')} - {msg.get('message')}\n")
            else:
                out.write(format_alert(msg, colour) + "\n")
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
    return 0 if count is None or seen >= count else 1
