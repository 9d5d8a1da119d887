"""Real parts for the daemon tests: a Mosquitto broker on a free loopback port, a persistent
subscriber, and the daemon as a real process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import paho.mqtt.client as mqtt

from pneumoflag.device.contract import ANY, Topics

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "models" / "pneumoflag-rn128.tflite"


def mosquitto_binary() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (.ci/run does this)")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Mosquitto:
    """A real broker with persistence, so sessions and queued QoS 1 messages survive a restart."""

    def __init__(self, workdir: Path, port: Optional[int] = None, extra: str = ""):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.proc: Optional[subprocess.Popen] = None
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"persistence true\npersistence_location {self.dir}/\n"
            f"log_dest file {self.log}\nlog_type all\n"
            # as root, mosquitto drops to user "mosquitto", which cannot write into pytest's
            # private tmp folders: no log, no persistence, sessions lost on restart
            + ("user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else "")
            + (self.extra if self.extra else "allow_anonymous true\n")
        )
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode()} {self.log_text()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(up, 10, "mosquitto to listen")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # saves persistence
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@dataclass
class Received:
    topic: str
    payload: dict | str
    retain: bool
    at: float


def topic_kind(topic: str) -> Optional[str]:
    """The contract's kind of a topic ("flag", "error", ...), read by the contract itself, or None."""
    parsed = Topics(topic.split("/", 1)[0], ANY).parse(topic)
    return parsed[1] if parsed else None


class Subscriber:
    """A nursing-station client: persistent session (clean_session=False), QoS 1, auto-reconnect."""

    def __init__(self, broker: str, topic: str = "#", client_id: Optional[str] = None, **client_kw):
        host, port = broker.rsplit(":", 1)
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{time.time_ns()}",
                                  clean_session=False)
        self.client.reconnect_delay_set(1, 1)
        for key, value in client_kw.items():
            getattr(self.client, key)(*value)
        self.topic = topic

        def on_connect(c, u, flags, rc, props=None):
            if not rc.is_failure:
                c.subscribe(topic, qos=1)
                self.connected.set()

        def on_message(c, u, m):
            try:
                payload = json.loads(m.payload)
            except (ValueError, RecursionError):
                payload = m.payload.decode(errors="replace")
            with self.lock:
                self.messages.append(Received(m.topic, payload, bool(m.retain), time.monotonic()))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect_async(host, int(port), keepalive=5)
        self.client.loop_start()
        wait_until(self.connected.is_set, 10, f"subscriber to connect to {broker}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def where(self, pred: Callable[[Received], bool]) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if pred(m)]

    def of_kind(self, kind: str) -> list[dict]:
        """The payloads on the contract's topics of ``kind`` (any prefix, any device)."""
        return [m.payload for m in self.where(lambda m: topic_kind(m.topic) == kind)]

    def flags(self) -> list[dict]:
        return self.of_kind("flag")

    def errors(self) -> list[dict]:
        return self.of_kind("error")

    def wait_flags(self, n: int, timeout: float = 20) -> list[dict]:
        wait_until(lambda: len(self.flags()) >= n, timeout, f"{n} flags (have {len(self.flags())})")
        return self.flags()

    def wait_errors(self, n: int, timeout: float = 20) -> list[dict]:
        wait_until(lambda: len(self.errors()) >= n, timeout, f"{n} errors (have {len(self.errors())})")
        return self.errors()


class DaemonProc:
    """``pneumoflag watch`` as a real process, the way systemd runs it."""

    def __init__(self, watch_dir: Path, state_dir: Path, broker: str, model: Path = SHIPPED_MODEL,
                 device_id: str = "test", args: tuple = (), env: Optional[dict] = None,
                 wrapper: tuple = ()):
        self.cmd = [*wrapper, sys.executable, "-m", "pneumoflag.device.cli", "-v", "watch", str(watch_dir),
                    "--state-dir", str(state_dir), "--model", str(model), "--device-id", device_id, *args]
        if broker:
            self.cmd += ["--broker", broker]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PNEUMOFLAG_WATCH_SETTLE_SECONDS": "0.3", "PNEUMOFLAG_WATCH_INCOMPLETE_TIMEOUT": "1.5",
                    "PNEUMOFLAG_MQTT_STATS_INTERVAL": "1", "PNEUMOFLAG_MQTT_RECONNECT_MAX": "1",
                    **(env or {})}
        self.env.pop("PNEUMOFLAG_CONFIG", None)
        self.log = state_dir.parent / f"daemon-{time.time_ns()}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, wait: bool = True) -> "DaemonProc":
        self._fh = open(self.log, "wb")
        # its own process group, so close() ends a wrapper (strace) and the daemon it runs together
        self.proc = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(REPO), start_new_session=True)
        if wait:
            wait_until(lambda: "watching " in self.output() or self.proc.poll() is not None, 30, "daemon start")
            assert self.proc.poll() is None, f"daemon exited at start:\n{self.output()}"
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc:
            try:  # the whole group: killing only a wrapper would leave the traced daemon running
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self.proc.poll() is None:
                self.proc.wait(10)
        if getattr(self, "_fh", None):
            self._fh.close()


def drop(src: Path, dst_dir: Path, name: Optional[str] = None) -> Path:
    """Copy like a scanner export does: write to a temp name, then rename into place."""
    dst = dst_dir / (name or src.name)
    tmp = dst_dir / f".{dst.name}.part"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def new_daemon(registry: list, *args, **kwargs) -> DaemonProc:
    """A DaemonProc that the ``daemons`` fixture cleans up."""
    d = DaemonProc(*args, **kwargs)
    registry.append(d)
    return d


def private_tmpfs(state: Path, size: str = "3m") -> tuple:
    """A wrapper that gives the daemon a small state disk of its own (a tmpfs in a private mount namespace)."""
    return ("unshare", "--mount", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs {state} && exec "$@"', "sh")


def fill_state_disk(daemon: "DaemonProc", state: Path) -> Path:
    """Fill the daemon's private state disk (see :func:`private_tmpfs`) to the last byte; the filling file."""
    filler = Path(f"/proc/{daemon.proc.pid}/root") / str(state).lstrip("/") / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler
