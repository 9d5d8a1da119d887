"""Bytes -> the model's input, in-process or in a long-lived worker process with a deadline.

No file may stop the appliance: a legal JPEG can take a minute to decode (60 MB
of 0xFF fill bytes), and a decoder can crash. The daemon therefore decodes in
one worker process, started once and reused (a fork per file would add its cost
to every flag); a decode still running after ``watch.max_decode_seconds`` is
ended by killing the worker, the file is refused as ``too-slow`` and a new worker
takes the files after it. A worker that dies on a file gets the file once more in
a new worker; a second death refuses it as ``crashed-decoder``. While it waits,
the caller's ``tick`` runs about twice a second, so the daemon's watchdog pings go
on: the wait is bounded, the loop is alive. :meth:`DecodeWorker.submit` returns at
once and the worker holds two files, so the daemon infers one file while the
worker decodes the next and the one after waits in its socket (both cores busy in
a burst, neither stage waiting for the other).

The worker is ``python -m pneumoflag.device.decoder FD PID JOBS``: it imports only
the decoding modules, gets its settings as the first message on the socket ``FD``,
each file as a name and a memory file's descriptor on the socket ``JOBS``, and
ends when the daemon's end of that socket closes (or the daemon ``PID`` dies).
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
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

import numpy as np

from .dicom import is_dicom, read_dicom
from .drift_inputs import InputSignature, describe
from .gate import GateLimits, check_pixels, check_source
from .preprocess import (ImageDecodeError, PreprocessSpec, SourceInfo, decode_with_info, finish, resize,
                         scan_header)
from .safe_text import printable
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
    try:
        check_source(src, s.gate, name)
        small = resize(gray, s.spec)
        check_pixels(small, s.gate, name)
    except ImageDecodeError as exc:  # a DICOM image's study names it as a refused view
        exc.ids = ids
        raise
    pixels = finish(small, s.spec, gray)
    del gray
    return Decoded(pixels, ids, (time.perf_counter() - t0) * 1000.0, acquired,
                   describe(small, src.width, src.height, *equipment))


@dataclass
class _InFlight:
    """A file handed to the worker and not yet collected (kept whole, to hand to a new worker)."""

    data: bytes
    name: str
    # set when it becomes the oldest in flight (the one before it collected); the worker may have begun it up
    # to one inference earlier, so a decode's budget is max_seconds plus at most that
    deadline: Optional[float] = None
    deaths: int = 0  # workers that died while on it


class DecodeWorker:
    """One reused worker process, fed :data:`DEPTH` files at a time; each decode ends within ``max_seconds``
    of the worker's taking it up (plus a kill)."""

    #: files in the worker at once: the one it decodes and the next, so it never waits for the daemon
    DEPTH = 2

    def __init__(self, settings: DecodeSettings, max_seconds: float, tick: Callable[[], None] = lambda: None):
        self.settings = settings
        self.max_seconds = float(max_seconds)
        self.tick = tick
        self._proc: Optional[subprocess.Popen] = None
        self._conn: Optional[Connection] = None  # settings out, results back
        self._jobs: Optional[socket.socket] = None  # files out: a name and a memory file's descriptor each
        self._flight: deque[_InFlight] = deque()

    def start(self) -> None:
        parent, child = socket.socketpair()
        jobs, jobs_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # the service manager's notifications are the daemon's alone (NotifyAccess=main)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
        # one thread of maths: the worker is one of the pipeline's two stages, and a BLAS call that starts
        # its own threads (which spin while they wait) takes the core the daemon infers on
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pneumoflag.device.decoder", str(child.fileno()), str(os.getpid()),
                 str(jobs_child.fileno())],
                pass_fds=(child.fileno(), jobs_child.fileno()), stdin=subprocess.DEVNULL, close_fds=True, env=env)
        finally:
            child.close()
            jobs_child.close()
        self._conn = Connection(parent.detach())
        self._jobs = jobs
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
        # the files a dead worker had: the oldest first, each with its own deadline from now on
        for f in self._flight:
            f.deadline = None
            self._send(f)
        if self._flight:
            self._flight[0].deadline = time.monotonic() + self.max_seconds

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    def decode(self, data: bytes, name: str) -> Decoded:
        """Raises :class:`ImageDecodeError`: the decode's own reason, ``too-slow`` or ``crashed-decoder``."""
        self.submit(data, name)
        return self.collect()

    def submit(self, data: bytes, name: str) -> None:
        """Hand the worker one more file and return at once: the caller infers an earlier one meanwhile.

        At most :data:`DEPTH` in flight; :meth:`collect` gives their results in order. The bytes go as a
        memory file's descriptor (written once, read by the worker without a pipe's copies and context
        switches; a second file never waits for the first's decode to be sent). Raises
        :class:`ImageDecodeError` for a header flood (refused here, before it goes to the worker) and
        :class:`DecoderUnavailable` when no worker can be started.
        """
        assert len(self._flight) < self.DEPTH, "collect() a file first"
        scan_header(data, name)
        f = _InFlight(data, name)
        self._flight.append(f)
        if not self.alive():
            self._reap()
            try:
                self.start()  # sends every file in flight, this one too
            except DecoderUnavailable:
                self._flight.pop()
                raise
            return
        self._send(f)
        if f is self._flight[0]:
            f.deadline = time.monotonic() + self.max_seconds

    def _send(self, f: _InFlight) -> None:
        fd = os.memfd_create("pneumoflag-file", os.MFD_CLOEXEC)
        try:
            view = memoryview(f.data)
            while view:
                view = view[os.write(fd, view):]
            assert self._jobs is not None
            socket.send_fds(self._jobs, [f.name.encode("utf-8", "surrogateescape")], [fd])
        except OSError:
            pass  # the worker died: collect() says so, as for a death during the decode
        finally:
            os.close(fd)  # the socket holds it until the worker takes it

    def collect(self) -> Decoded:
        """The oldest file's decode, within ``max_seconds`` of the worker's taking it up (the tick runs
        meanwhile). A worker that dies on a file gets it once more in a new one (one death may be the
        machine's: the OOM killer, a kill by hand); a second death is the file's (``crashed-decoder``)."""
        assert self._flight, "nothing submitted"
        while True:
            f = self._flight[0]
            try:
                kind, payload = self._wait(f)
            except _WorkerDied as died:
                f.deaths += 1
                if f.deaths >= 2:
                    self._flight.popleft()
                    self._restart()
                    raise ImageDecodeError(
                        Reason.CRASHED_DECODER,
                        f"{f.name}: the decoder crashed on this file twice ({died}); refused") from None
                log.warning("%s: the decoder worker died on it (%s); once more in a new worker", printable(f.name), died)
                self._restart()
                continue
            except ImageDecodeError:
                self._flight.popleft()
                self._restart()
                raise
            self._flight.popleft()
            if self._flight:  # the worker takes up the next one now
                self._flight[0].deadline = time.monotonic() + self.max_seconds
            if kind == "ok":
                return payload
            if kind == "error":
                raise ImageDecodeError(*payload)
            raise RuntimeError(payload)  # an unexpected exception in the worker: the daemon's internal-error

    def _wait(self, f: _InFlight) -> tuple[str, Any]:
        conn = self._conn
        if conn is None:
            raise _WorkerDied("no worker")
        assert f.deadline is not None
        try:
            while not conn.poll(max(0.0, min(TICK_SECONDS, f.deadline - time.monotonic()))):
                self.tick()
                if time.monotonic() >= f.deadline:
                    self._kill(f"over watch.max_decode_seconds on {f.name!r}")
                    raise ImageDecodeError(
                        Reason.TOO_SLOW,
                        f"{f.name}: still decoding after {self.max_seconds:g} s (watch.max_decode_seconds); "
                        "refused, so that no file holds up the others",
                    )
            return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            code = self._reap()
            raise _WorkerDied(f"killed by signal {-code}" if code is not None and code < 0
                              else f"exit status {code}") from None

    def _restart(self) -> None:
        """After a death or a kill: a new worker for the files still in flight (none: at the next submit)."""
        self._reap()
        if self._flight:
            self.start()

    def _kill(self, why: str) -> None:
        if self._proc is not None and self._proc.poll() is None:
            log.warning("decoder worker %d killed (%s); a new one starts for the next file", self._proc.pid, why)
            self._proc.kill()
        self._reap()

    def _reap(self) -> Optional[int]:
        code = None
        for end in (self._conn, self._jobs):
            if end is not None:
                end.close()
        self._conn = self._jobs = None
        if self._proc is not None:
            try:
                code = self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                code = self._proc.wait()
            self._proc = None
        return code

    def stop(self) -> None:
        """Close the sockets (the worker exits on EOF), then wait for it."""
        for end in (self._conn, self._jobs):
            if end is not None:
                end.close()
        self._conn = self._jobs = None
        self._flight.clear()
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


class _WorkerDied(Exception):
    """The worker ended before it answered (said as its signal or exit status)."""


def _die_with(parent: int) -> None:
    """Linux: be killed when the daemon dies, even in the middle of a long decode (which reads no EOF)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker ends at its next read instead
        log.debug("PR_SET_PDEATHSIG unavailable")
    if os.getppid() != parent:  # the daemon died before the line above
        os._exit(0)


def _serve(fd: int, parent: int, jobs_fd: int) -> int:
    """The worker: settings once, then (name, memory file) -> ("ok", Decoded) | ("error", (reason, message))."""
    _die_with(parent)
    # a Ctrl-C or systemd's SIGTERM to the whole unit is the daemon's to handle (it finishes the image in
    # hand, which this worker may be decoding); EOF or the daemon's death ends the worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    jobs = socket.socket(fileno=jobs_fd)
    try:
        settings: DecodeSettings = pickle.loads(conn.recv_bytes())
        conn.send_bytes(b"ready")
        while True:
            msg, fds, _, _ = socket.recv_fds(jobs, 1 << 16, 1)
            if not fds:
                return 0  # the daemon's end closed
            name = msg.decode("utf-8", "surrogateescape")
            try:
                data = os.pread(fds[0], os.fstat(fds[0]).st_size, 0)
            finally:
                for extra in fds:
                    os.close(extra)
            try:
                out: tuple = ("ok", decode_bytes(data, name, settings))
            except ImageDecodeError as exc:
                out = ("error", (exc.reason, str(exc), exc.ids))
            except Exception as exc:  # noqa: BLE001 - reported to the daemon, which logs it as internal-error
                out = ("internal", f"{type(exc).__name__}: {exc}")
            del data
            conn.send_bytes(pickle.dumps(out))
    except (EOFError, OSError):
        return 0


if __name__ == "__main__":
    # the package's module, not this __main__ copy: what is pickled must name pneumoflag.device.decoder
    from pneumoflag.device.decoder import _serve as serve

    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
