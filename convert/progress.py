"""A dependency-free progress bar on stderr (quiet when stderr is not a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, stream=None, min_interval: float = 0.2):
        self.label, self.total = label, max(total, 0)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval = min_interval
        self._last = 0.0
        self._start = time.monotonic()

    def __call__(self, done: int, total: int | None = None) -> None:
        total = self.total if total is None else total
        now = time.monotonic()
        if done < total and now - self._last < self.min_interval:
            return
        self._last = now
        frac = done / total if total else 1.0
        rate = done / max(now - self._start, 1e-9)
        if self.tty:
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {done}/{total} {rate:5.0f}/s")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif done >= total:
            self.stream.write(f"{self.label}: {done}/{total} in {now - self._start:.1f} s\n")
