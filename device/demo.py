"""``pneumoflag demo``: the whole flow on a fresh machine, in one command, and then it stops.

Runs the real daemon (embedded broker unless one is configured) on a fresh
export folder, subscribes like a nursing station, drops the bundled sample
radiographs in the way a scanner exports (write to a temporary name, rename),
prints each alert as it arrives over MQTT, and exits once all are scored.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional, TextIO

from .alerts import AlertListener, format_alert
from .config import Config
from .daemon import Daemon, StartupError
from .selftest import sample_files
from .store import STATE_DB
from .vocab import PRIORITIES

CREDIT = ("Sample radiographs: Kermany, Zhang, Goldbaum et al., Chest X-Ray Images (Pneumonia), "
          "Mendeley Data v2 (2018), CC BY 4.0")


def run_demo(cfg: Config, samples: Path, export_dir: Optional[Path] = None, interval: float = 0.3,
             timeout: float = 120.0, out: TextIO = sys.stdout, state_dir: Optional[Path] = None) -> int:
    """``state_dir`` keeps the demo's journal there (for ``pneumoflag report``); it must hold none yet, since
    a journal that has seen the samples would take them as repeats and alert nothing."""
    files = sample_files(samples)
    if not files:
        raise StartupError(f"no sample images in {samples}")
    if state_dir is not None and (Path(state_dir) / STATE_DB).exists():
        raise StartupError(f"--state-dir {state_dir} already holds a journal ({STATE_DB}); the demo needs a fresh "
                           "one (its samples would be repeats there): give an empty or new folder")
    work = Path(tempfile.mkdtemp(prefix="pneumoflag-demo-"))
    try:  # the temporary folder goes whatever happens, a broker that cannot be reached included
        return _demo(cfg, files, work, export_dir, interval, timeout, out, state_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _demo(cfg: Config, files: list[Path], work: Path, export_dir: Optional[Path], interval: float,
          timeout: float, out: TextIO, state_dir: Optional[Path]) -> int:
    export = Path(export_dir) if export_dir else work / "export"
    export.mkdir(parents=True, exist_ok=True)
    cfg.watch.dir = str(export)
    cfg.state.dir = str(state_dir or work / "state")  # a fresh journal: the samples are new images to it
    daemon = Daemon(cfg)
    ready = threading.Event()
    daemon.on_ready = lambda d: ready.set()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)
            ready.set()

    t = threading.Thread(target=run, name="daemon", daemon=True)
    t.start()
    if not ready.wait(60) or failure:
        daemon.stop_event.set()
        t.join(30)
        raise StartupError(str(failure[0]) if failure else "the daemon did not start within 60 s")
    card, rep = daemon.card, daemon.scorer.report
    p = lambda s="": print(s, file=out, flush=True)  # noqa: E731
    p(f"pneumoflag demo — model {card.name} {card.version} on {rep.accelerator} ({rep.runtime})")
    p(f"  thresholds: {card.thresholds.describe()}")
    p(f"  export folder: {export}")
    p(f"  MQTT broker:   {cfg.mqtt.broker}"
      + (" (embedded)" if daemon.broker is not None else ""))
    p(f"  subscribe elsewhere with: pneumoflag alerts --broker {cfg.mqtt.broker}")
    p()
    listener = AlertListener(cfg, errors=True, device=cfg.mqtt.device_id)
    received: dict[str, dict] = {}
    counts: Counter = Counter()
    t0 = time.monotonic()
    colour = out.isatty()
    try:
        listener.start()
        p(f"dropping {len(files)} sample radiographs into the export folder...")
        for f in files:
            tmp = export / f".{f.name}.part"
            shutil.copyfile(f, tmp)
            os.replace(tmp, export / f.name)
            time.sleep(interval)
            _drain(listener, received, counts, p, colour)
        deadline = time.monotonic() + timeout
        while len(received) < len(files) and time.monotonic() < deadline and t.is_alive():
            _drain(listener, received, counts, p, colour, wait=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
        daemon.stop_event.set()
        t.join(30)
    p()
    p(f"{len(received)} of {len(files)} scored and delivered over MQTT in {time.monotonic() - t0:.1f} s: "
      + ", ".join(f"{counts[k]} {k}" for k in (*PRIORITIES, "error") if counts[k]))
    if state_dir is not None:
        p(f"journal kept in {state_dir}: pneumoflag report --state-dir {state_dir}")
    p(CREDIT)
    p("pneumoflag is a triage aid that orders the reading queue; it is not a diagnostic device.")
    if failure:
        raise StartupError(str(failure[0]))
    return 0 if len(received) == len(files) else 1


def _drain(listener: AlertListener, received: dict, counts: Counter, p, colour: bool, wait: float = 0.0) -> None:
    while True:
        try:
            _, kind, msg = listener.queue.get(timeout=wait) if wait else listener.queue.get_nowait()
        except queue.Empty:
            return
        wait = 0.0
        name = msg.get("file", "?")
        if name in received:
            continue
        received[name] = msg
        if kind == "error":
            counts["error"] += 1
            p(f"{'':8}  ERROR    {name}: {msg.get('reason')}")
        else:
            counts[msg.get("priority", "?")] += 1
            p(format_alert(msg, colour))


def quiet_logging(verbose: int) -> None:
    if verbose == 0:
        logging.getLogger("pneumoflag").setLevel(logging.WARNING)
