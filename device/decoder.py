"""Bytes -> the model's input, in-process or in a long-lived worker process with a deadline.

No file may stop the appliance: a legal JPEG can take a minute to decode (60 MB
of 0xFF fill bytes), and a decoder can crash. The daemon therefore decodes in
one worker process, started once and reused (a fork per file would add its cost
to every flag); a decode still running after ``watch.max_decode_seconds`` is
ended by killing the worker, the file is refused as ``too-slow`` and a new worker
is started for the next file. A worker that dies on a file refuses that file as
``crashed-decoder``. While it waits, the caller's ``tick`` runs about twice a
second, so the daemon's watchdog pings go on: the wait is bounded, the loop is
alive. :meth:`DecodeWorker.submit` returns at once, so the daemon infers one file
while the worker decodes the next (both cores busy in a burst).

The worker is ``python -m pneumoflag.device.decoder FD``: it imports only the
decoding modules, gets its settings as the first message on the socket ``FD``
and ends when the daemon's end of that socket closes (the daemon died).
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

import numpy as np

from .dicom import is_dicom, read_dicom
from .drift_inputs import InputSignature, describe
from .gate import GateLimits, check_pixels, check_source
from .preprocess import (ImageDecodeError, PreprocessSpec, SourceInfo, decode_with_info, finish, resize,
                         scan_header)
from .vocab import Reason

log = logging.getLogger(__name__)

#: how often the caller's tick runs while a decode is in the worker
TICK_SECONDS = 0.5


#: how long a new worker may take to import its modules
START_SECONDS = 60.0


class DecoderUnavailable(RuntimeError):
    """The worker process cannot be started (a broken install): nothing can be scored."""


@dataclass
class Decoded:
    pixels: np.ndarray  # the model's uint8 input (H, W, C)
    dicom_ids: Optional[dict[str, str]]
    decode_ms: float
    acquired_at: Optional[float] = None  # POSIX time from the DICOM header, when it has one
    inputs: Optional[InputSignature] = None  # the drift monitor's figures (device/drift_inputs.py)


@dataclass
class DecodeSettings:
    """Everything a decode needs (picklable: it is sent to the worker once)."""

    spec: PreprocessSpec
    gate: GateLimits
    max_pixels: int
    max_bytes: int
    dicom: dict[str, Any] = field(default_factory=dict)  # read_dicom's keyword arguments


def decode_bytes(data: bytes, name: str, s: DecodeSettings) -> Decoded:
    """Decode (JPEG/PNG, or DICOM through pydicom), the plausibility gate, then the shared ``resize``
    and ``finish`` steps of the one preprocessing function."""
    t0 = time.perf_counter()
    ids, acquired, equipment = None, None, (None, None)
    if is_dicom(data[:132]):
        gray, info = read_dicom(data, name=name, **s.dicom)
        ids = info.ids()
        acquired = info.acquired_at.timestamp() if info.acquired_at else None
        equipment = (info.manufacturer, info.model_name)
        src = SourceInfo(gray.shape[1], gray.shape[0], "DICOM", "L")
    else:
        # Pillow repairs a damaged JPEG stream silently; the strict decode refuses it (``corrupt``)
        gray, src = decode_with_info(data, s.spec, s.max_pixels, name=name, max_bytes=s.max_bytes,
                                     strict_jpeg=s.gate.enabled and s.gate.strict_jpeg)
    check_source(src, s.gate, name)
    small = resize(gray, s.spec)
    check_pixels(small, s.gate, name)
    pixels = finish(small, s.spec, gray)
    del gray
    return Decoded(pixels, ids, (time.perf_counter() - t0) * 1000.0, acquired,
                   describe(small, src.width, src.height, *equipment))


class DecodeWorker:
    """One reused worker process; :meth:`decode` returns within ``max_seconds`` (plus a kill)."""

    def __init__(self, settings: DecodeSettings, max_seconds: float, tick: Callable[[], None] = lambda: None):
        self.settings = settings
        self.max_seconds = float(max_seconds)
        self.tick = tick
        self._proc: Optional[subprocess.Popen] = None
        self._conn: Optional[Connection] = None
        self._pending: Optional[tuple[str, float]] = None  # (name, deadline) of the file in the worker

    def start(self) -> None:
        parent, child = socket.socketpair()
        # the service manager's notifications are the daemon's alone (NotifyAccess=main)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
        # one thread of maths: the worker is one of the pipeline's two stages, and a BLAS call that starts
        # its own threads (which spin while they wait) takes the core the daemon infers on
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pneumoflag.device.decoder", str(child.fileno()), str(os.getpid())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, close_fds=True, env=env)
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        try:
            self._conn.send_bytes(pickle.dumps(self.settings))
            if not self._conn.poll(START_SECONDS):
                raise EOFError
            self._conn.recv_bytes()  # b"ready": its imports are done
        except (EOFError, OSError):
            self._proc.kill()
            code = self._reap()
            raise DecoderUnavailable(f"the decoder worker process did not start (exit status {code}); "
                                     f"try: {sys.executable} -m pneumoflag.device.decoder") from None
        log.debug("decoder worker %d started", self._proc.pid)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def decode(self, data: bytes, name: str) -> Decoded:
        """Raises :class:`ImageDecodeError`: the decode's own reason, ``too-slow`` or ``crashed-decoder``."""
        self.submit(data, name)
        return self.collect()

    def submit(self, data: bytes, name: str) -> None:
        """Hand the worker one file and return at once: the caller infers the previous one meanwhile.

        One file at a time: :meth:`collect` its result before the next ``submit``. Raises
        :class:`ImageDecodeError` for a header flood (refused here, before a copy goes to the worker) and
        :class:`DecoderUnavailable` when no worker can be started.
        """
        assert self._pending is None, "collect() the file in the worker first"
        scan_header(data, name)
        if not self.alive():
            self._reap()
            self.start()
        assert self._conn is not None
        try:
            self._conn.send_bytes(name.encode("utf-8", "surrogateescape"))
            self._conn.send_bytes(data)
        except OSError:
            pass  # the worker died: collect() says so, as for a death during the decode
        self._pending = (name, time.monotonic() + self.max_seconds)

    def collect(self) -> Decoded:
        """The submitted file's decode, within ``max_seconds`` of its submission (the tick runs meanwhile)."""
        assert self._pending is not None, "nothing submitted"
        name, deadline = self._pending
        self._pending = None
        conn = self._conn
        assert conn is not None
        try:
            while not conn.poll(max(0.0, min(TICK_SECONDS, deadline - time.monotonic()))):
                self.tick()
                if time.monotonic() >= deadline:
                    self._kill(f"over watch.max_decode_seconds on {name!r}")
                    raise ImageDecodeError(
                        Reason.TOO_SLOW,
                        f"{name}: still decoding after {self.max_seconds:g} s (watch.max_decode_seconds); "
                        "refused, so that no file holds up the others",
                    )
            kind, payload = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            code = self._reap()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            raise ImageDecodeError(
                Reason.CRASHED_DECODER, f"{name}: the decoder crashed on this file ({how}); refused") from None
        if kind == "ok":
            return payload
        if kind == "error":
            raise ImageDecodeError(*payload)
        raise RuntimeError(payload)  # an unexpected exception in the worker: the daemon's internal-error

    def _kill(self, why: str) -> None:
        if self._proc is not None and self._proc.poll() is None:
            log.warning("decoder worker %d killed (%s); a new one starts for the next file", self._proc.pid, why)
            self._proc.kill()
        self._reap()

    def _reap(self) -> Optional[int]:
        code = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                code = self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                code = self._proc.wait()
            self._proc = None
        return code

    def stop(self) -> None:
        """Close the socket (the worker exits on EOF), then wait for it."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def _die_with(parent: int) -> None:
    """Linux: be killed when the daemon dies, even in the middle of a long decode (which reads no EOF)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker ends at its next read instead
        log.debug("PR_SET_PDEATHSIG unavailable")
    if os.getppid() != parent:  # the daemon died before the line above
        os._exit(0)


def _serve(fd: int, parent: int) -> int:
    """The worker: settings once, then (name, bytes) -> ("ok", Decoded) | ("error", (reason, message))."""
    _die_with(parent)
    # a Ctrl-C or systemd's SIGTERM to the whole unit is the daemon's to handle (it finishes the image in
    # hand, which this worker may be decoding); EOF or the daemon's death ends the worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        settings: DecodeSettings = pickle.loads(conn.recv_bytes())
        conn.send_bytes(b"ready")
        while True:
            name = conn.recv_bytes().decode("utf-8", "surrogateescape")
            data = conn.recv_bytes()
            try:
                out: tuple = ("ok", decode_bytes(data, name, settings))
            except ImageDecodeError as exc:
                out = ("error", (exc.reason, str(exc)))
            except Exception as exc:  # noqa: BLE001 - reported to the daemon, which logs it as internal-error
                out = ("internal", f"{type(exc).__name__}: {exc}")
            del data
            conn.send_bytes(pickle.dumps(out))
    except (EOFError, OSError):
        return 0


if __name__ == "__main__":
    # the package's module, not this __main__ copy: what is pickled must name pneumoflag.device.decoder
    from pneumoflag.device.decoder import _serve as serve

    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2])))
