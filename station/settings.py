"""What one station process needs to know, derived once from the shared configuration.

The exposure rule lives here so that it is checked before anything listens: a console reachable from
the ward network without a password is refused unless the operator said ``--insecure``.
"""
from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pneumoflag.device.config import Config, StationConfig, parse_host_port
from pneumoflag.device.contract import STATION_ID

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?$")


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header (or config entry, or Origin netloc) -> (name, port), None when malformed.

    The name is lower-case, without a trailing dot (``LocalHost.`` is ``localhost``), an IPv6 address
    without its brackets; ``[::1]:8080`` -> ``("::1", 8080)``.
    """
    v = value.strip().lower()
    if v.startswith("["):
        name, sep, rest = v[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        colon, port = rest[:1], rest[1:]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
    else:
        name, colon, port = v.partition(":")
        if name.endswith("."):
            name = name[:-1]
        if not _NAME.match(name):
            return None
    if colon and not (port.isdigit() and 0 < int(port) < 65536):
        return None
    return name, int(port) if port else None


class StationError(Exception):
    """A user-facing refusal (bad station id, unsafe listen address, unreadable password file)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; a host name other than localhost counts as exposed."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class StationSettings:
    station_id: str
    host: str
    port: int
    db_path: Path
    password: str | None  # the console's password or bearer token; None = no login
    insecure: bool
    chime: bool
    silent_after: float
    topic_prefix: str
    allowed_hosts: tuple[str, ...] = ()  # more Host names than the built-in ones (security.AllowedHosts)
    login_failures: int = StationConfig.login_failures  # per client address and login_window
    login_failures_total: int = StationConfig.login_failures_total  # all clients together
    login_window: float = StationConfig.login_window

    @property
    def client_id(self) -> str:
        """Stable across restarts, so the broker keeps this station's session and queued flags."""
        return f"pneumoflag-station-{self.station_id}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @classmethod
    def from_config(cls, cfg: Config) -> StationSettings:
        st = cfg.station
        if not STATION_ID.match(st.station_id):
            raise StationError(f"station.station_id: {st.station_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        host, port = parse_host_port(st.listen, "station.listen")
        password = None
        if st.password_file:
            try:
                password = Path(st.password_file).read_text().strip()
            except OSError as exc:
                raise StationError(f"station.password_file: cannot read {st.password_file} ({exc.strerror})") from None
            if len(password) < 8:
                raise StationError(f"station.password_file: {st.password_file} holds fewer than 8 characters")
        for entry in st.allowed_hosts:
            if split_host(entry) is None:
                raise StationError(f"station.allowed_hosts: {entry!r} is not NAME, NAME:PORT or [IPv6]:PORT")
        db_path = Path(st.db) if st.db else Path(cfg.state.dir) / f"station-{st.station_id}.db"
        return cls(station_id=st.station_id, host=host, port=port, db_path=db_path, password=password,
                   insecure=st.insecure, chime=st.chime, silent_after=st.silent_after,
                   topic_prefix=cfg.mqtt.topic_prefix, allowed_hosts=tuple(st.allowed_hosts),
                   login_failures=st.login_failures, login_failures_total=st.login_failures_total,
                   login_window=st.login_window)

    def check_exposure(self) -> None:
        """Refuse a non-loopback listen address without a password, unless ``insecure`` says so."""
        if is_loopback(self.host) or self.password:
            return
        if not self.insecure:
            raise StationError(
                f"refusing to listen on {self.host}:{self.port} without a password: anyone on that network could "
                "read the worklist and acknowledge flags. Set station.password_file (--password-file FILE), "
                "listen on 127.0.0.1 behind a TLS reverse proxy, or pass --insecure if the network is trusted")
        log.warning("listening on %s:%d WITHOUT a password (--insecure): anyone who can reach it can acknowledge "
                    "flags", self.host, self.port)
