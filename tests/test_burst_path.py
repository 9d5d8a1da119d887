"""The burst path's parts, each on real files: the double-buffered decoder worker, the burst interpreter,
a rename from outside the export folder, and the drift monitor's judging rate."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from mqtt_helpers import SHIPPED_MODEL, wait_until
from pneumoflag.device.config import Config, DriftConfig
from pneumoflag.device.decoder import DecodeWorker, decode_bytes
from pneumoflag.device.drift import JUDGE_SECONDS, DriftMonitor
from pneumoflag.device.ingest import Ingest
from pneumoflag.device.pipeline import Pipeline
from pneumoflag.device.preprocess import ImageDecodeError
from pneumoflag.device.scorer import load_scorer
from test_daemon import SAMPLE_FILES
from test_files import slow_jpeg


@pytest.fixture(scope="module")
def pipeline():
    scorer, card = load_scorer(SHIPPED_MODEL, "cpu", 2, burst_threads=1)
    return Pipeline(Config(), scorer, card)


@pytest.fixture
def worker(pipeline):
    w = DecodeWorker(pipeline.settings, 60.0)
    w.start()
    yield w
    w.stop()


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_worker_holds_two_files_and_gives_their_decodes_in_order(worker, pipeline):
    datas = [f.read_bytes() for f in SAMPLE_FILES[:5]]
    expected = [decode_bytes(d, f.name, pipeline.settings).pixels for d, f in zip(datas, SAMPLE_FILES, strict=False)]
    got = []
    worker.submit(datas[0], "0")
    for i in range(1, 5):
        worker.submit(datas[i], str(i))  # the next waits in the worker while the one before decodes
        assert worker.in_flight == 2
        got.append(worker.collect().pixels)
    got.append(worker.collect().pixels)
    assert worker.in_flight == 0
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(AssertionError):  # a third is the caller's mistake, not a silent queue
        worker.submit(datas[0], "a")
        worker.submit(datas[1], "b")
        worker.submit(datas[2], "c")


def test_a_slow_file_is_refused_and_the_file_queued_behind_it_is_still_decoded(pipeline):
    w = DecodeWorker(pipeline.settings, 1.5)
    w.start()
    try:
        w.submit(slow_jpeg(40), "slow.jpeg")
        good = SAMPLE_FILES[0].read_bytes()
        w.submit(good, "good.jpeg")
        with pytest.raises(ImageDecodeError) as exc:
            w.collect()
        assert exc.value.reason == "too-slow"
        d = w.collect()  # it was in the killed worker's socket: a new worker got it
        assert np.array_equal(d.pixels, decode_bytes(good, "good.jpeg", pipeline.settings).pixels)
    finally:
        w.stop()


def test_a_worker_killed_twice_on_a_file_refuses_it_and_the_file_behind_it_is_not_blamed(worker, pipeline):
    worker.submit(slow_jpeg(40), "slow.jpeg")
    good = SAMPLE_FILES[1].read_bytes()
    worker.submit(good, "good.jpeg")
    killed = []

    def kill_when_busy() -> None:
        pid = worker._proc.pid
        wait_until(lambda: _cpu(pid) > 0.3, 30, "the worker to decode")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    import threading

    def killer() -> None:
        kill_when_busy()
        wait_until(lambda: worker._proc is not None and worker._proc.pid not in killed, 30, "a new worker")
        kill_when_busy()

    t = threading.Thread(target=killer)
    t.start()
    try:
        with pytest.raises(ImageDecodeError) as exc:
            worker.collect()
    finally:
        t.join()
    assert exc.value.reason == "crashed-decoder" and "twice" in str(exc.value) and "signal 9" in str(exc.value)
    assert len(killed) == 2
    d = worker.collect()
    assert np.array_equal(d.pixels, decode_bytes(good, "good.jpeg", pipeline.settings).pixels)


def test_the_burst_interpreter_gives_the_same_probability(pipeline):
    scorer = pipeline.scorer
    assert scorer._burst is not None  # burst_threads (1) differs from threads (2) on the CPU
    for f in SAMPLE_FILES:
        px = decode_bytes(f.read_bytes(), f.name, pipeline.settings).pixels
        assert scorer.score(px, busy=True) == scorer.score(px, busy=False), f.name
    same, _ = load_scorer(SHIPPED_MODEL, "cpu", 1, burst_threads=1)
    assert same._burst is None  # nothing to gain: one interpreter


def test_a_file_renamed_in_from_outside_the_folder_is_ready_at_once(tmp_path):
    watch, outside = tmp_path / "export", tmp_path / "staging"
    watch.mkdir()
    outside.mkdir()
    ingest = Ingest(watch, settle_seconds=30.0)  # a file that had to settle would take 30 s
    ingest.start()
    try:
        (outside / "scan.jpeg").write_bytes(SAMPLE_FILES[0].read_bytes())
        (watch / "leaving.jpeg.part").write_bytes(b"x")
        t0 = time.monotonic()
        os.rename(outside / "scan.jpeg", watch / "scan.jpeg")
        os.rename(watch / "leaving.jpeg.part", outside / "leaving.jpeg")  # moved out: nothing to hand over
        item = ingest.get(timeout=5.0)
        assert item is not None and item.path == watch / "scan.jpeg" and item.how == "moved"
        assert time.monotonic() - t0 < 5.0
        assert ingest.get(timeout=0.5) is None and ingest.depth() == 0
    finally:
        ingest.stop()


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_daemons_drift_monitor_judges_at_most_once_a_second_and_the_rest_when_idle(pipeline):
    card = pipeline.card
    assert card.drift_reference is not None
    m = DriftMonitor(DriftConfig(window=20, min_images=5), card.drift_reference, "d", "m")
    m.judge_seconds = JUDGE_SECONDS
    clock = _Clock()
    m.monotonic = clock
    judged = []
    real = m.evaluate

    def counting():
        judged.append(len(m.window))
        return real()

    m.evaluate = counting
    px = decode_bytes(SAMPLE_FILES[0].read_bytes(), "a", pipeline.settings)
    for _ in range(10):  # back to back: the first is judged, the rest wait for the second to pass
        m.scored(0.05, "routine", px.inputs)
    assert judged == [1] and m.current.state == "unknown"
    m.judge()  # the daemon has no file in hand
    assert judged == [1, 10] and m.current.state != "unknown"
    m.judge()  # nothing new: not judged again
    assert judged == [1, 10]
    clock.t += JUDGE_SECONDS
    m.scored(0.05, "routine", px.inputs)
    assert judged == [1, 10, 11]
