"""Who may read the worklist and acknowledge: password or bearer token, a signed session cookie, a CSRF
token bound to that session, and an Origin check on every POST.

- Without a password (allowed on loopback, or with ``--insecure``) every page gets a session cookie at
  ``/`` only so that its acknowledgements carry a CSRF token another site cannot read.
- Session cookies are ``HttpOnly; SameSite=Strict`` (``Secure`` behind HTTPS), signed with a key made from
  the worklist database's random secret and the password: a restart keeps sessions, a new password ends them.
- A bearer token (``Authorization: Bearer <password>``) is for scripts; a browser never sends it by itself,
  so it needs no CSRF token.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

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


def cross_site(request: web.Request) -> str | None:
    """Why a state-changing request looks cross-site (None when it does not): Sec-Fetch-Site, then Origin.

    Behind a reverse proxy the proxy must pass the Host header through (``proxy_set_header Host $host``).
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site is {site}"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    if origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower():
        return f"Origin {origin} is not this station ({request.host})"
    return None
