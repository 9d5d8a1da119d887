"""Flags a station missed, sent again: requests on ``{prefix}/{device}/resend``, copies on
``{prefix}/{device}/replay/{station}``.

Each flag carries this device's number for it (``seq``, 1, 2, ... without gaps, given in the transaction that
journals it). A station that was away longer than its broker would queue for it (Mosquitto drops what is over
``max_queued_messages``, 1000 by default) sees a jump in the numbers, or a ``delivered_seq`` in stats beyond
the last flag it has, and asks for the missing ones. The copies are the flags exactly as first published,
queued through the outbox like any message, on the asking station's own topic: no other station or terminal
sees them twice. Requests are untrusted input, so they are bounded: a small message, a station name that is
a safe topic level, at most ``MAX_RESEND`` flags and one request per station every ``MIN_INTERVAL_S``, and
never more than ``MAX_BACKLOG`` copies waiting in the outbox for all stations together: a new flag queues
behind what waits there, and a requester that changes its station name every time must not delay it.
"""
from __future__ import annotations

import logging
import queue
import time

from . import contract
from .config import Config
from .contract import MAX_RESEND, RESEND_SCHEMA, ResendRequest
from .publisher import Publisher
from .safe_text import printable
from .store import Store, StoreError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024
MIN_INTERVAL_S = 5.0
#: requests waiting for the main loop; a flood beyond this is dropped
MAX_WAITING = 100
REQUESTS_PER_PASS = 5
#: copies waiting to go out, all stations together; a request beyond it gets what fits (the station asks again)
MAX_BACKLOG = 500


class ResendError(ValueError):
    """Not a resend request this daemon answers; the message says why."""


def parse_resend(raw: bytes) -> ResendRequest:
    """A ``pneumoflag.resend/1`` request (:meth:`ResendRequest.parse`), or :class:`ResendError`."""
    try:
        msg = contract.loads_object(raw, max_bytes=MAX_REQUEST_BYTES)
        contract.check_schema(msg, RESEND_SCHEMA)
        return ResendRequest.parse(msg)
    except contract.ContractError as exc:
        raise ResendError(str(exc)) from None


class ResendDesk:
    """Receives requests on paho's thread and answers them on the daemon's main loop."""

    def __init__(self, cfg: Config, store: Store, publisher: Publisher):
        self.cfg, self.store, self.publisher = cfg, store, publisher
        self._received: queue.Queue[bytes] = queue.Queue(MAX_WAITING)
        self._last: dict[str, float] = {}  # station -> monotonic time of its last answered request
        self.refused = contract.RateLimitedLog(log)
        publisher.subscribe(cfg.topics.resend(), self._receive)

    def _receive(self, raw: bytes) -> None:
        try:
            self._received.put_nowait(bytes(raw))
        except queue.Full:
            pass  # a flood: the stations ask again

    def serve_requests(self) -> None:
        for _ in range(REQUESTS_PER_PASS):
            try:
                raw = self._received.get_nowait()
            except queue.Empty:
                return
            try:
                req = parse_resend(raw)
            except ResendError as exc:
                self.refused.refused("resend", str(exc), self.cfg.topics.resend())
                continue
            now = time.monotonic()
            if now - self._last.get(req.station, -MIN_INTERVAL_S) < MIN_INTERVAL_S:
                continue
            self._last[req.station] = now
            if len(self._last) > 1000:  # bounded: forget the oldest
                self._last.pop(next(iter(self._last)))
            try:
                room = MAX_BACKLOG - self.store.resend_backlog()
                if room <= 0:
                    log.debug("resend request of %s deferred: %d copies wait already", req.station, MAX_BACKLOG)
                    continue
                flags = self.store.flags_between(req.first, min(req.last, req.first + room - 1))
                self.store.queue_resend(self.cfg.topics.replay(req.station), flags, req.station)
            except StoreError as exc:
                log.error("could not answer %s's resend request: %s", printable(req.station), exc)
                continue
            self.publisher.wake()
            log.info("station %s missed flags %d-%d: %d sent again%s", printable(req.station), req.first, req.last,
                     len(flags), f" (at most {MAX_RESEND} a request)" if req.last - req.first + 1 > MAX_RESEND else "")
