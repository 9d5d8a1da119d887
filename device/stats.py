"""What the daemon publishes on ``{prefix}/{device}/stats``: counts, latency, time-to-notification, health."""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import __version__
from .config import Config
from .contract import STATS_SCHEMA, utc_now
from .vocab import PRIORITIES

#: the window of the time-to-notification figures in stats
TTN_WINDOW_S = 86400


#: one scored file's steps, in order (``stats`` ``steps_ms``): watcher -> intake queue, reading and the journal's
#: rules, the decoder worker (with any wait behind an earlier file), inference, message and journal commit, the
#: publisher's fsync of the commit, and the publisher's hand-over to the MQTT client
STEPS = ("queue", "admit", "decode", "infer", "journal", "fsync", "send")


@dataclass
class StepTimes:
    """Each step's last :data:`window` durations, apart for a file that came ``alone`` (nothing else in hand:
    the path one radiograph takes on a quiet ward) and one that came while others waited (``busy``: a burst).

    Filled by the daemon's loop and the publisher thread (a deque's append is atomic).
    """

    window: int = 1000
    alone: dict = field(init=False)
    busy: dict = field(init=False)

    def __post_init__(self) -> None:
        self.alone = {k: deque(maxlen=self.window) for k in STEPS}
        self.busy = {k: deque(maxlen=self.window) for k in STEPS}

    def add(self, step: str, ms: float, alone: bool) -> None:
        (self.alone if alone else self.busy)[step].append(ms)

    def summary(self) -> dict:
        return {kind: {k: _percentiles(list(v)) for k, v in getattr(self, kind).items()} for kind in ("alone", "busy")}


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    by_priority: Counter = field(default_factory=Counter)
    errors: int = 0
    duplicates: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=1000))
    steps: StepTimes = field(default_factory=StepTimes)

    def snapshot(self, cfg: Config, queue_depth: int, outbox: int, accelerator: str, model: str,
                 health: dict, ttn: dict, drift: Optional[dict] = None) -> dict:
        lat = np.array(self.latencies) if self.latencies else None
        return {
            "schema": STATS_SCHEMA,
            "device": cfg.mqtt.device_id,
            "at": utc_now(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "scored": {k: self.by_priority.get(k, 0) for k in PRIORITIES},
            "errors": self.errors,
            "duplicates": self.duplicates,
            "queue_depth": queue_depth,
            "outbox": outbox,
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 2) if lat is not None else None,
                "p95": round(float(np.percentile(lat, 95)), 2) if lat is not None else None,
                "n": len(self.latencies),
            },
            "steps_ms": self.steps.summary(),
            "accelerator": accelerator,
            "model": model,
            "version": __version__,
            "time_to_notification_s": ttn,
            "drift": drift,  # device/drift.py's state and reason; None with drift.enabled = false
            **health,
        }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "n": 0}
    a = np.array(values)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2), "n": len(a)}


def time_to_notification(rows: list[tuple]) -> dict:
    """p50/p95 of written -> delivered and delivered -> acknowledged, from ``Store.flag_times`` rows."""
    written_to_delivered = [d - w for _, w, _, _, d, _, _ in rows if w is not None and d is not None]
    delivered_to_acked = [a - d for _, _, _, _, d, a, _ in rows if d is not None and a is not None]
    return {"window_s": TTN_WINDOW_S, "written_to_delivered": _percentiles(written_to_delivered),
            "delivered_to_acknowledged": _percentiles(delivered_to_acked)}
