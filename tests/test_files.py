"""No file can stop the appliance (issue 14: 5, 15, 16 and the 12-bit JPEG), against the real daemon and Mosquitto.

A JPEG that decodes for a minute is refused within ``watch.max_decode_seconds`` while the
watchdog pings go on and the files behind it are scored; a file the daemon died on twice is
refused; an animated PNG and a 12-bit JPEG get a specific reason; a DICOM written header
first is scored once, when its pixels have arrived.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mqtt_helpers import Subscriber, drop, new_daemon, wait_until
from test_daemon import SAMPLE_FILES

GOOD = SAMPLE_FILES[0]


def slow_jpeg(fill_mb: int = 40) -> bytes:
    """A valid JPEG: legal 0xFF fill bytes after SOI, which Pillow skips one by one (about 1 s a MB)."""
    data = GOOD.read_bytes()
    return data[:2] + b"\xff" * (fill_mb * 2**20) + data[2:]


class WatchdogListener:
    """The service manager's end of $NOTIFY_SOCKET: counts WATCHDOG=1 pings, with their arrival times."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.pings: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.sock.recv(4096)
            except (socket.timeout, OSError):
                continue
            if b"WATCHDOG=1" in msg.split(b"\n"):
                self.pings.append(time.monotonic())

    def env(self) -> dict:
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_a_jpeg_that_decodes_for_a_minute_is_refused_in_time_and_the_watchdog_goes_on(broker, dirs, daemons,
                                                                                      tmp_path):
    watch, state = dirs
    wd = WatchdogListener(tmp_path / "notify.sock")
    try:
        sub = Subscriber(broker.address, "pneumoflag/#")
        d = new_daemon(daemons, watch, state, broker.address,
                       env={**wd.env(), "PNEUMOFLAG_WATCH_MAX_DECODE_SECONDS": "3"}).start()
        staging = tmp_path / "staging"
        staging.mkdir()
        (staging / "slow.jpeg").write_bytes(slow_jpeg())
        t_drop = time.monotonic()
        drop(staging / "slow.jpeg", watch)
        for f in SAMPLE_FILES[1:3]:
            drop(f, watch)
        (err,) = sub.wait_errors(1, timeout=60)
        t_err = time.monotonic()
        assert err["file"] == "slow.jpeg" and err["reason"] == "too-slow", err
        assert "watch.max_decode_seconds" in err["message"]
        flags = sub.wait_flags(2, timeout=60)
        assert sorted(f["file"] for f in flags) == sorted(f.name for f in SAMPLE_FILES[1:3])
        # the 3 s decode held the loop, yet pings kept coming (one every 0.5 s when healthy)
        during = [t for t in wd.pings if t_drop <= t <= t_err]
        assert len(during) >= 2, f"{len(during)} watchdog pings while the slow file decoded"
        assert d.proc.poll() is None
    finally:
        wd.close()


def _in_progress(state: Path, rel: str) -> int:
    try:
        with sqlite3.connect(f"file:{state / 'pneumoflag.db'}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute("SELECT attempts FROM in_progress WHERE path=?", (rel,)).fetchone()
    except sqlite3.Error:
        return 0
    return row[0] if row else 0


def test_a_file_the_daemon_died_on_twice_is_refused_with_its_reason(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    env = {"PNEUMOFLAG_WATCH_MAX_DECODE_SECONDS": "120"}  # so that only the kill ends the decode
    (watch / "slow.jpeg").write_bytes(slow_jpeg())
    for attempt in (1, 2):  # the daemon is killed (as the watchdog or the OOM killer would) mid-decode, twice
        d = new_daemon(daemons, watch, state, broker.address, env=env).start()
        wait_until(lambda n=attempt: _in_progress(state, "slow.jpeg") == n, 60, f"decode attempt {attempt}")
        d.kill()
    assert sub.errors() == [] and sub.flags() == []
    d = new_daemon(daemons, watch, state, broker.address, env=env).start()
    (err,) = sub.wait_errors(1, timeout=60)
    assert err["file"] == "slow.jpeg" and err["reason"] == "crashed-decoder", err
    assert "stopped 2 times while this file was being decoded" in err["message"]
    drop(GOOD, watch)
    (flag,) = sub.wait_flags(1, timeout=60)
    assert flag["file"] == GOOD.name
    assert _in_progress(state, "slow.jpeg") == 0 and d.proc.poll() is None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a killed one lingers as a zombie until reaped: not counted)."""
    out = []
    for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(c))
        except (OSError, IndexError):
            pass
    return out


def test_a_decoder_that_dies_on_a_file_twice_refuses_it_and_the_next_file_is_scored(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env={"PNEUMOFLAG_WATCH_MAX_DECODE_SECONDS": "120"}).start()
    (watch / "slow.jpeg").write_bytes(slow_jpeg())
    wait_until(lambda: _in_progress(state, "slow.jpeg") == 1, 60, "the decode to start")
    pid = d.proc.pid
    killed: list[int] = []
    for _ in range(2):  # one death may be the machine's (the file is tried in a new worker), two are the file's
        wait_until(lambda: [c for c in _children(pid) if c not in killed], 60, "a (new) worker")
        (worker,) = [c for c in _children(pid) if c not in killed]
        idle = _cpu_seconds(worker)  # an idle worker uses none: it waits on its socket
        wait_until(lambda w=worker, i=idle: _cpu_seconds(w) > i + 0.5, 60, "the worker to decode the file")
        os.kill(worker, signal.SIGKILL)  # as a segfault in a decoder library would end it
        killed.append(worker)
        if not sub.errors():
            wait_until(lambda: "once more in a new worker" in d.output() or sub.errors(), 30, "the retry")
    assert "once more in a new worker" in d.output()
    (err,) = sub.wait_errors(1, timeout=60)
    assert err["reason"] == "crashed-decoder" and "killed by signal 9" in err["message"], err
    drop(GOOD, watch)
    (flag,) = sub.wait_flags(1, timeout=60)
    assert flag["file"] == GOOD.name and d.proc.poll() is None


def test_sigterm_mid_decode_finishes_the_file_in_hand(broker, dirs, daemons):
    """systemd sends SIGTERM to the whole unit, the decoder worker included: the file is still decided."""
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env={"PNEUMOFLAG_WATCH_MAX_DECODE_SECONDS": "3"}).start()
    (watch / "slow.jpeg").write_bytes(slow_jpeg())
    wait_until(lambda: _in_progress(state, "slow.jpeg") == 1, 60, "the decode to start")
    pid = d.proc.pid
    for p in [pid, *[int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]]:
        os.kill(p, signal.SIGTERM)
    assert d.wait(60) == 0
    (err,) = sub.wait_errors(1, timeout=30)
    assert err["reason"] == "too-slow", err


def test_an_animated_png_and_a_12_bit_jpeg_are_refused_with_a_specific_reason(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    staging = tmp_path / "staging"
    staging.mkdir()
    im = Image.open(GOOD).convert("L")
    # a browser plays the animation; the daemon would score only its still frame
    im.save(staging / "anim.png", save_all=True, append_images=[im.rotate(90)], duration=500, loop=0)
    data = GOOD.read_bytes()
    sof = data.index(b"\xff\xc0")
    (staging / "deep.jpeg").write_bytes(data[: sof + 4] + b"\x0c" + data[sof + 5:])  # sample precision 12
    for f in sorted(staging.iterdir()):
        drop(f, watch)
    errors = {e["file"]: e for e in sub.wait_errors(2, timeout=60)}
    assert errors["anim.png"]["reason"] == "unsupported-image"
    assert "animated PNG (2 frames)" in errors["anim.png"]["message"]
    assert errors["deep.jpeg"]["reason"] == "unsupported-image"
    assert "12-bit JPEG" in errors["deep.jpeg"]["message"]
    time.sleep(1)
    assert sub.flags() == []


def test_a_dicom_written_header_first_is_scored_once_when_its_pixels_arrive(broker, dirs, daemons, tmp_path):
    from dicom_helpers import write_test_dicom

    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address,
               env={"PNEUMOFLAG_WATCH_INCOMPLETE_TIMEOUT": "30"}).start()
    src = write_test_dicom(tmp_path / "cr.dcm", np.asarray(Image.open(GOOD).convert("L")))
    data = src.read_bytes()
    cut = data.index(b"\xe0\x7f\x10\x00")  # the PixelData element: the writer pauses before it
    with open(watch / "cr.dcm", "wb") as f:
        f.write(data[:cut])
        f.flush()
        time.sleep(3)  # the daemon sees the header alone (settle_seconds is 0.3 s here)
        f.write(data[cut:])
    (flag,) = sub.wait_flags(1, timeout=60)
    assert flag["file"] == "cr.dcm" and flag.get("supersedes") is None
    time.sleep(1)
    assert sub.errors() == [] and len(sub.flags()) == 1


def test_large_header_floods_are_refused_without_decoding(broker, dirs, daemons, tmp_path):
    """Quick check of the scan's messages (the memory figures: tests/test_hardening.py)."""
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    data = GOOD.read_bytes()
    (tmp_path / "com.jpeg").write_bytes(data[:2] + b"\xff\xfe\x00\x02" * 5000 + data[2:])
    drop(tmp_path / "com.jpeg", watch)
    (err,) = sub.wait_errors(1, timeout=60)
    assert err["reason"] == "too-large" and "more than 1,000 JPEG segments" in err["message"], err


def test_a_stop_blames_only_the_file_it_stopped_on_not_the_one_beside_it(broker, dirs, daemons):
    """The worker holds two files, so a daemon killed mid-decode leaves two marks; after that stop, a marked
    file is decoded with nothing else in hand, and a second stop on it does not refuse its neighbour too."""
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    env = {"PNEUMOFLAG_WATCH_MAX_DECODE_SECONDS": "120"}  # so that only the kill ends the decode
    (watch / "slow.jpeg").write_bytes(slow_jpeg())
    shutil.copyfile(GOOD, watch / "beside.jpeg")
    os.utime(watch / "slow.jpeg", (time.time() - 20, time.time() - 20))  # the backlog goes oldest first
    os.utime(watch / "beside.jpeg", (time.time() - 10, time.time() - 10))
    d = new_daemon(daemons, watch, state, broker.address, env=env).start()
    wait_until(lambda: _in_progress(state, "slow.jpeg") == 1 and _in_progress(state, "beside.jpeg") == 1, 60,
               "both files in the worker")
    d.kill()
    d = new_daemon(daemons, watch, state, broker.address, env=env).start()
    wait_until(lambda: _in_progress(state, "slow.jpeg") == 2, 60, "the second decode of slow.jpeg")
    time.sleep(1.0)  # time enough for beside.jpeg to be taken up too, were it taken beside slow.jpeg
    assert _in_progress(state, "beside.jpeg") == 1
    d.kill()
    assert sub.errors() == [] and sub.flags() == []
    d = new_daemon(daemons, watch, state, broker.address, env=env).start()
    (err,) = sub.wait_errors(1, timeout=60)
    assert err["file"] == "slow.jpeg" and err["reason"] == "crashed-decoder", err
    (flag,) = sub.wait_flags(1, timeout=60)
    assert flag["file"] == "beside.jpeg"
    assert _in_progress(state, "beside.jpeg") == 0 and d.proc.poll() is None
