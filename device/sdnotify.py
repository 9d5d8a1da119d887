"""The systemd ``NOTIFY_SOCKET`` protocol (sd_notify(3)), without dependencies.

Under ``Type=notify`` systemd only considers the daemon started once it sends
``READY=1``, and with ``WatchdogSec=`` it restarts the service when the
``WATCHDOG=1`` pings stop. The protocol is one AF_UNIX datagram of
``KEY=value`` lines, so a few lines of socket code spare the appliance a
C binding. Outside systemd (no ``NOTIFY_SOCKET``) every call is a cheap no-op,
so the daemon runs the same from a shell, a container or a test.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Mapping, Optional

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes and watchdog pings to the service manager.

    Notifications are best effort: a lost ``STATUS=`` must never take the
    daemon down, so :meth:`notify` logs and returns ``False`` instead of
    raising. The socket is created on first use and kept open, because the
    watchdog pings for the lifetime of the process.
    """

    def __init__(self, env: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if env is None else env
        self._address = self._parse_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()  # the watchdog may ping from its own thread

    @staticmethod
    def _parse_address(raw: str) -> Optional[str]:
        """A filesystem path, or '@name' for the Linux abstract namespace (a leading NUL)."""
        if not raw:
            return None
        if raw.startswith("@"):
            return "\0" + raw[1:]
        if raw.startswith("/"):
            return raw
        # sd_notify(3) accepts only absolute paths and '@'; anything else is a misconfiguration.
        log.debug("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor '@name'", raw)
        return None

    @property
    def enabled(self) -> bool:
        """True when a service manager asked to be notified."""
        return self._address is not None

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; ``True`` when it was sent."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # non-inheritable by default (PEP 446)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                log.debug("sd_notify to %r failed: %s", self._address, exc)
                self._close_locked()
                return False
        return True

    def ready(self, status: str = "") -> bool:
        """Tell systemd start-up finished, so units ordered after us may start."""
        if status:
            return self.notify(READY="1", STATUS=status)
        return self.notify(READY="1")

    def status(self, text: str) -> bool:
        """A one-line state shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        """Tell systemd the shutdown is deliberate, not a crash."""
        return self.notify(STOPPING="1")

    def watchdog(self) -> bool:
        """Ping the watchdog; only send it from the loop whose liveness it proves."""
        return self.notify(WATCHDOG="1")

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

        ``None`` when no watchdog is configured or it is meant for another
        process (``WATCHDOG_PID`` names a different pid, e.g. a parent shell).
        """
        if not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.debug("ignoring WATCHDOG_USEC=%r: not an integer", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                log.debug("ignoring watchdog: WATCHDOG_PID=%r is not an integer", self._watchdog_pid)
                return None
            if pid != os.getpid():
                return None
        return usec / 2 / 1e6

    def close(self) -> None:
        """Release the socket; a later :meth:`notify` opens a new one."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
