"""Who may read the worklist and acknowledge: password or bearer token, a signed session cookie, a CSRF
token bound to that session, and an Origin check on every POST.

- Without a password (allowed on loopback, or with ``--insecure``) every page gets a session cookie at
  ``/`` only so that its acknowledgements carry a CSRF token another site cannot read.
- Session cookies are ``HttpOnly; SameSite=Strict`` (``Secure`` behind HTTPS), signed with a key made from
  the worklist database's random secret and the password: a restart keeps sessions, a new password ends them.
- A bearer token (``Authorization: Bearer <password>``) is for scripts; a browser never sends it by itself,
  so it needs no CSRF token.
- Every request's ``Host`` must be one of the station's own names (``AllowedHosts``): a page elsewhere
  whose name an attacker re-points at this machine (DNS rebinding) sends its own name, and is refused.
- Wrong passwords, from the form or as a bearer token, are counted per client address and overall
  (``Throttle``); a guess is counted *before* it is checked, so concurrent guesses cannot race past the limit.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from .settings import split_host

SESSION_TTL_S = 12 * 3600  # one shift
CSRF_HEADER = "X-CSRF-Token"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@dataclass
class Guard:
    station_id: str
    password: str | None
    secret: bytes
    _revoked: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._key = hmac.new(self.secret, _digest(self.password or ""), hashlib.sha256).digest()

    @property
    def cookie_name(self) -> str:
        """Per station: cookies ignore the port, and two stations may share a host."""
        return f"pneumoflag_station_{self.station_id}"

    @property
    def login_required(self) -> bool:
        return self.password is not None

    # ------------------------------------------------------------------ sessions
    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        body = f"{int(time.time())}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._sign(body)}"

    def session(self, request: web.Request) -> str | None:
        """The request's session cookie when it is ours, unexpired and not logged out."""
        value = request.cookies.get(self.cookie_name, "")
        body, _, sig = value.rpartition(".")
        if not body or not hmac.compare_digest(sig, self._sign(body)) or value in self._revoked:
            return None
        try:
            issued = int(body.split(".", 1)[0])
        except ValueError:
            return None
        return value if 0 <= time.time() - issued < SESSION_TTL_S else None

    def revoke(self, session: str) -> None:
        self._revoked.add(session)

    def set_cookie(self, request: web.Request, response: web.StreamResponse, session: str) -> None:
        secure = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        response.set_cookie(self.cookie_name, session, max_age=SESSION_TTL_S, path="/", httponly=True,
                            samesite="Strict", secure=secure)

    def csrf_token(self, session: str) -> str:
        return self._sign("csrf:" + session)

    # ------------------------------------------------------------------ checks
    def password_ok(self, given: str) -> bool:
        return self.password is not None and hmac.compare_digest(_digest(given), _digest(self.password))

    def bearer(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.password_ok(token.strip())

    def authenticated(self, request: web.Request) -> bool:
        return not self.login_required or self.bearer(request) or self.session(request) is not None

    def csrf_ok(self, request: web.Request) -> bool:
        if self.bearer(request):
            return True
        session = self.session(request)
        given = request.headers.get(CSRF_HEADER, "")
        return session is not None and bool(given) and hmac.compare_digest(given, self.csrf_token(session))


DEFAULT_PORTS = {"http": 80, "https": 443}


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class AllowedHosts:
    """The names this station answers to: a browser always sends the name it used in ``Host``.

    Built in (any port): the listen address, ``localhost``, loopback addresses, and, when listening beyond
    loopback, this machine's host name and, on a wildcard address (0.0.0.0, ::), any IP address: an address
    cannot be re-pointed elsewhere, only a name can. ``extra`` holds ``station.allowed_hosts``: NAME (any port)
    or NAME:PORT (that port only), such as a reverse proxy's public name.
    """

    names: frozenset[str]
    extra: frozenset[tuple[str, int | None]] = frozenset()
    listen_ip: str | None = None
    any_address: bool = False

    @classmethod
    def for_listen(cls, host: str, extra: Iterable[str] = ()) -> AllowedHosts:
        listen = split_host(f"[{host}]" if ":" in host else host)
        name = listen[0] if listen else host.lower()
        names = {"localhost", name}
        ip = _ip(name)
        loopback = name == "localhost" or (ip is not None and ip.is_loopback)
        if not loopback:
            short = socket.gethostname().lower()
            names |= {short, short.split(".")[0]}
        entries = set()
        for entry in extra:
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"station.allowed_hosts: {entry!r} is not NAME or NAME:PORT")
            entries.add(parsed)
        return cls(frozenset(n for n in names if n), frozenset(entries), str(ip) if ip else None,
                   ip is not None and ip.is_unspecified)

    def _builtin(self, name: str) -> bool:
        if name in self.names:
            return True
        ip = _ip(name)
        return ip is not None and (ip.is_loopback or self.any_address or str(ip) == self.listen_ip)

    def _configured(self, name: str, port: int | None) -> bool:
        return (name, None) in self.extra or (name, port) in self.extra

    def allows(self, host_header: str | None) -> bool:
        """Whether a request's ``Host`` names this station (ports are not compared: see ``origin_ok``)."""
        parsed = split_host(host_header) if host_header else None
        return parsed is not None and (self._builtin(parsed[0]) or self._configured(*parsed))

    def origin_ok(self, origin: str, host_header: str | None) -> bool:
        """An ``Origin`` is this station when it names one of its hosts *and* is the very host and port the
        request went to (another port on the same machine is another site), or is a configured name."""
        parts = urlsplit(origin)
        if parts.scheme not in DEFAULT_PORTS or parts.path or parts.query:
            return False
        theirs, ours = split_host(parts.netloc), split_host(host_header or "")
        if theirs is None or ours is None:
            return False
        default = DEFAULT_PORTS[parts.scheme]
        name, port = theirs[0], theirs[1] or default
        if self._configured(name, port):
            return True
        return self._builtin(name) and (name, port) == (ours[0], ours[1] or default)


def cross_site(request: web.Request, hosts: AllowedHosts) -> str | None:
    """Why a state-changing request looks cross-site (None when it does not): Sec-Fetch-Site, then Origin.

    Behind a reverse proxy the proxy must pass the Host header through (``proxy_set_header Host $host``),
    or its public name must be in ``station.allowed_hosts``.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site is {site}"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    if not hosts.origin_ok(origin, request.headers.get("Host")):
        return f"Origin {origin} is not this station ({request.headers.get('Host')})"
    return None


@dataclass
class Throttle:
    """Wrong passwords per client address and overall, in a sliding window.

    ``reserve`` counts an attempt as wrong before the password is checked (there is no ``await`` between
    the count and the check, so a hundred concurrent guesses get ``per_client`` answers, not a hundred);
    ``forgive`` takes it back when the password was right, so a nurse's typos before it still count, and
    nobody can reset an attacker's count by logging in.
    """

    per_client: int = 5
    overall: int = 30
    window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _clients: dict[str, deque[float]] = field(default_factory=dict)
    _all: deque[float] = field(default_factory=deque)

    def _prune(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def reserve(self, client: str) -> float:
        """0 when this attempt may be checked (it is counted); else the seconds until one may."""
        now = self.clock()
        if len(self._clients) > 4096:  # forget clients whose failures have all expired
            for key in [k for k, t in self._clients.items() if not t or t[-1] <= now - self.window]:
                del self._clients[key]
        mine = self._clients.setdefault(client, deque())
        self._prune(mine, now)
        self._prune(self._all, now)
        waits = [times[0] + self.window - now for times, limit in ((mine, self.per_client), (self._all, self.overall))
                 if len(times) >= limit]
        if waits:
            return max(waits)
        mine.append(now)
        self._all.append(now)
        return 0.0

    def forgive(self, client: str) -> None:
        """The reserved attempt was the right password: it does not count."""
        mine = self._clients.get(client)
        if mine:
            mine.pop()
        if self._all:
            self._all.pop()

    def failures(self, client: str) -> int:
        mine = self._clients.get(client, deque())
        self._prune(mine, self.clock())
        return len(mine)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


@dataclass
class QuietLog:
    """At most one log line per key and ``interval``: a flood of refusals must not flood the journal.

    ``due(key)`` returns None to stay quiet, else how many lines were held back since the last one.
    """

    interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _last: dict[str, tuple[float, int]] = field(default_factory=dict)

    def due(self, key: str) -> int | None:
        now = self.clock()
        last, held = self._last.get(key, (-math.inf, 0))
        if now - last < self.interval:
            self._last[key] = (last, held + 1)
            return None
        if len(self._last) > 4096:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
        self._last[key] = (now, 0)
        return held
