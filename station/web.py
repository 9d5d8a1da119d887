"""The console's HTTP side (aiohttp): one page, its live event stream, the acknowledge endpoint, login.

Routes:

- ``GET /`` the page; ``GET /static/...`` its CSS and JavaScript (shipped in the package, nothing external)
- ``GET /events`` server-sent events: a ``snapshot`` first, then ``row``, ``device``, ``rejected``, ``link``
- ``GET /api/state`` the same snapshot as JSON
- ``POST /api/ack`` ``{"event_id", "by"}`` with the ``X-CSRF-Token`` header: publishes the ack (202)
- ``GET /heatmap/EVENT_ID.png`` the appliance's heat-map overlay for that flag (404 when the station has none)
- ``GET|POST /login``, ``POST /logout`` when a password is configured

Every response carries a strict Content-Security-Policy (no inline script, nothing from elsewhere). The
page renders MQTT data with ``textContent`` only; the policy is the second line of defence.

Every request, whatever its path, first needs a ``Host`` that names this station (421 otherwise: DNS
rebinding); a wrong password, from the form or as a bearer token, counts against the client and against
everyone (429 with ``Retry-After`` past the limit; see security.Throttle).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from pneumoflag.device import contract
from pneumoflag.device.config import Config
from pneumoflag.device.contract import EVENT_ID

from .events import sse_frame
from .security import AllowedHosts, QuietLog, Throttle, cross_site, retry_after
from .service import AckRefused, Station, UnknownFlag
from .settings import StationError, StationSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 15.0
STATION_KEY: web.AppKey[Station] = web.AppKey("station", Station)
HOSTS_KEY: web.AppKey[AllowedHosts] = web.AppKey("hosts", AllowedHosts)
THROTTLE_KEY: web.AppKey[Throttle] = web.AppKey("throttle", Throttle)
QUIET_KEY: web.AppKey[QuietLog] = web.AppKey("quiet_log", QuietLog)
FAILURE_DELAY_S = 1.0  # a wrong password from the form is answered after this long
PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/static/style.css"), ("GET", "/favicon.ico")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
LOGIN_FAILED = '<p class="message" role="alert">Wrong password.</p>'
LOCKED_OUT = ('<p class="message" role="alert">Too many wrong passwords from here: try again in {seconds} s.'
              '</p>')

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


#: an ack's body is {"event_id", "by"}: a few hundred bytes
MAX_ACK_BODY = 4096


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON as every browser parses it: ``contract.dumps`` refuses NaN and Infinity (bare ``NaN`` is a
    ``SyntaxError`` in ``JSON.parse``, and the page would show no rows)."""
    return web.json_response(data, status=status, headers=headers, dumps=contract.dumps)


def _station(request: web.Request) -> Station:
    return request.app[STATION_KEY]


def _forbidden(request: web.Request, why: str) -> web.Response:
    log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, why)
    return json_response({"error": why}, status=403)


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")  # no-referrer would make form posts send Origin: null
    response.headers.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException):
        raise response
    return response


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


def _quietly(request: web.Request, key: str, message: str, *args: object) -> None:
    """A warning, at most one per key every few seconds; the count held back goes with the next one."""
    held = request.app[QUIET_KEY].due(key)
    if held is not None:
        log.warning(message + (f" ({held} more like it not logged)" if held else ""), *args)


def _too_many(request: web.Request, wait: float, what: str) -> None:
    _quietly(request, f"locked:{_client(request)}", "refused %s from %s: too many wrong passwords; retry in %s s",
             what, _client(request), retry_after(wait))


def _wrong_password(request: web.Request, what: str) -> None:
    """Logged without the password; the count says whether it is a typo or a guessing run."""
    throttle, client = request.app[THROTTLE_KEY], _client(request)
    _quietly(request, f"wrong:{client}", "wrong password (%s) from %s: %d in the last %g s", what, client,
             throttle.failures(client), throttle.window)


@web.middleware
async def host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a Host that is not this station's: a page on another name must not read or ack (DNS rebinding)."""
    host = request.headers.get("Host")
    if not request.app[HOSTS_KEY].allows(host):
        _quietly(request, f"host:{_client(request)}", "refused %s %s from %s: Host %r is not one of this "
                 "station's names (station.allowed_hosts)", request.method, request.path, _client(request), host)
        return json_response(
            {"error": f"this station does not answer to Host {host!r}: open it by its own address, or add that "
                      "name to station.allowed_hosts (e.g. a reverse proxy's public name)"}, status=421)
    return await handler(request)


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A bearer token first (counted like a login), then login (except the login page), then no cross-site
    POST, then the CSRF token."""
    guard = _station(request).guard
    scheme = request.headers.get("Authorization", "").partition(" ")[0]
    if guard.login_required and scheme.lower() == "bearer":  # not Basic: a proxy's own login passes through
        throttle, client = request.app[THROTTLE_KEY], _client(request)
        wait = throttle.reserve(client)
        if wait:
            _too_many(request, wait, "a bearer token")
            return json_response({"error": f"too many wrong passwords; retry in {retry_after(wait)} s"},
                                 status=429, headers={"Retry-After": retry_after(wait)})
        if guard.bearer(request):
            throttle.forgive(client)
        else:
            _wrong_password(request, "bearer token")
            return json_response({"error": "wrong bearer token"}, status=401)
    if (request.method, request.path) not in PUBLIC and not guard.authenticated(request):
        if request.method == "GET" and request.path == "/":
            raise web.HTTPSeeOther("/login")
        return json_response({"error": "log in first"}, status=401)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        why = cross_site(request, request.app[HOSTS_KEY])
        if why:
            return _forbidden(request, why)
        if request.path != "/login" and not guard.csrf_ok(request):
            return _forbidden(request, "missing or wrong CSRF token (reload the page)")
    return await handler(request)


async def index(request: web.Request) -> web.StreamResponse:
    guard = _station(request).guard
    response = web.FileResponse(STATIC / "index.html")
    if guard.session(request) is None:  # no password: a session only to bind the CSRF token to
        guard.set_cookie(request, response, guard.new_session())
    return response


async def login_page(request: web.Request) -> web.StreamResponse:
    if not _station(request).guard.login_required:
        raise web.HTTPSeeOther("/")
    html = (STATIC / "login.html").read_text()
    html = html.replace("<!--message-->", LOGIN_FAILED if "failed" in request.query else "")
    return web.Response(text=html, content_type="text/html")


async def login(request: web.Request) -> web.StreamResponse:
    station = _station(request)
    guard = station.guard
    if not guard.login_required:
        raise web.HTTPSeeOther("/")
    form = await request.post()
    given = form.get("password")
    throttle, client = request.app[THROTTLE_KEY], _client(request)
    wait = throttle.reserve(client)  # counted before the check: concurrent guesses cannot race past it
    if wait:
        _too_many(request, wait, "a login")
        html = (STATIC / "login.html").read_text().replace("<!--message-->",
                                                           LOCKED_OUT.format(seconds=retry_after(wait)))
        return web.Response(text=html, content_type="text/html", status=429,
                            headers={"Retry-After": retry_after(wait)})
    if isinstance(given, str) and guard.password_ok(given):
        throttle.forgive(client)
        response = web.HTTPSeeOther("/")
        guard.set_cookie(request, response, guard.new_session())
        log.info("login from %s", client)
        return response
    _wrong_password(request, "login form")
    await asyncio.sleep(FAILURE_DELAY_S)
    raise web.HTTPSeeOther("/login?failed=1")


async def no_icon(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


async def logout(request: web.Request) -> web.StreamResponse:
    guard = _station(request).guard
    session = guard.session(request)
    if session:
        guard.revoke(session)
    response = json_response({"logged_out": True})
    response.del_cookie(guard.cookie_name, path="/")
    return response


def _csrf(request: web.Request) -> str | None:
    guard = _station(request).guard
    session = guard.session(request)
    return guard.csrf_token(session) if session else None


async def state(request: web.Request) -> web.StreamResponse:
    return json_response(_station(request).snapshot(_csrf(request)))


async def events(request: web.Request) -> web.StreamResponse:
    station = _station(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    queue = station.hub.subscribe()  # before the snapshot, so nothing falls between the two
    try:
        await response.write(b"retry: 1000\n\n")
        await response.write(sse_frame("snapshot", station.snapshot(_csrf(request))))
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event is None:
                break
            await response.write(sse_frame(*event))
    except ConnectionResetError:  # the page went away
        pass
    finally:
        station.hub.unsubscribe(queue)
    return response


async def ack(request: web.Request) -> web.StreamResponse:
    try:
        body = contract.loads_object(await request.read(), max_bytes=MAX_ACK_BODY)
    except contract.ContractError as exc:
        return json_response({"error": f"the body must be a JSON object of valid text: {exc}"}, status=400)
    try:
        result = await _station(request).acknowledge(body.get("event_id"), body.get("by"))
    except UnknownFlag as exc:
        return json_response({"error": str(exc)}, status=404)
    except AckRefused as exc:
        return json_response({"error": str(exc)}, status=400)
    return json_response({"event_id": result.event_id, "delivered": result.delivered}, status=202)


async def heatmap(request: web.Request) -> web.StreamResponse:
    """The PNG as the appliance sent it; never stored by a shared cache (it is about a patient)."""
    name = request.match_info["name"]
    event_id = name.removesuffix(".png")
    if event_id == name or not EVENT_ID.match(event_id):
        return json_response({"error": "not a heat map name: /heatmap/EVENT_ID.png"}, status=400)
    png = _station(request).worklist.heatmap(event_id)
    if png is None:
        return json_response({"error": f"no heat map for {event_id}"}, status=404)
    return web.Response(body=png, content_type="image/png",
                        headers={"Cache-Control": "private, no-store"})


def make_app(station: Station) -> web.Application:
    app = web.Application(middlewares=[headers_middleware, host_middleware, guard_middleware],
                          client_max_size=64 * 1024)
    app[STATION_KEY] = station
    settings = station.settings
    app[HOSTS_KEY] = AllowedHosts.for_listen(settings.host, settings.allowed_hosts)
    app[THROTTLE_KEY] = Throttle(settings.login_failures, settings.login_failures_total, settings.login_window)
    app[QUIET_KEY] = QuietLog()
    app.add_routes([
        web.get("/", index),
        web.get("/login", login_page),
        web.get("/favicon.ico", no_icon),
        web.post("/login", login),
        web.post("/logout", logout),
        web.get("/api/state", state),
        web.get("/events", events),
        web.post("/api/ack", ack),
        web.get("/heatmap/{name}", heatmap),
        web.static("/static", STATIC, show_index=False, follow_symlinks=False),
    ])

    async def end_streams(app: web.Application) -> None:
        station.hub.close()

    app.on_shutdown.append(end_streams)
    return app


async def serve(cfg: Config, settings: StationSettings) -> None:
    """Run until SIGTERM or SIGINT: the page first (it shows the broker's state), then the MQTT link."""
    try:
        station = Station(cfg, settings)
    except sqlite3.Error as exc:
        raise StationError(f"worklist {settings.db_path}: {exc}") from None
    runner = web.AppRunner(make_app(station), access_log=None, shutdown_timeout=3)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.host, settings.port).start()
        except OSError as exc:
            raise StationError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
        station.start()
        log.info("station %s listening on %s (worklist %s; MQTT %s as %s)", settings.station_id, settings.url,
                 settings.db_path, cfg.mqtt.broker, settings.client_id)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("station %s stopping", settings.station_id)
    finally:
        await station.stop()
        await runner.cleanup()
        station.worklist.close()
