"""Fan-out of worklist changes to the open pages as server-sent events.

Each page holds one bounded queue. A page that falls that far behind is dropped rather than slowing the
station down; its browser reconnects by itself and starts again from a fresh snapshot.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from pneumoflag.device import contract

log = logging.getLogger(__name__)

Event = tuple[str, Any] | None  # None ends the stream


def sse_frame(kind: str, data: Any) -> bytes:
    """One SSE event; JSON never contains a raw newline, so one ``data:`` line is enough. ``contract.dumps``:
    no NaN or Infinity, which the page's ``JSON.parse`` would throw on."""
    return f"event: {kind}\ndata: {contract.dumps(data)}\n\n".encode()


class EventHub:
    def __init__(self, max_queue: int = 1000):
        self.max_queue = max_queue
        self._queues: set[asyncio.Queue[Event]] = set()

    def subscribe(self) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue(self.max_queue)
        self._queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        self._queues.discard(q)

    def publish(self, kind: str, data: Any) -> None:
        for q in list(self._queues):
            try:
                q.put_nowait((kind, data))
            except asyncio.QueueFull:
                log.warning("a page fell %d events behind; dropping it (it reconnects)", self.max_queue)
                self._end(q)

    def close(self) -> None:
        """End every stream (shutdown)."""
        for q in list(self._queues):
            self._end(q)

    def _end(self, q: asyncio.Queue[Event]) -> None:
        self._queues.discard(q)
        while not q.empty():
            q.get_nowait()
        q.put_nowait(None)

    def __len__(self) -> int:
        return len(self._queues)
