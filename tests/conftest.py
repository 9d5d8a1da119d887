"""Shared fixtures: real images copied into temporary folders, a tiny model trained once per run."""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MINI = TESTS / "data" / "mini"  # 16 NORMAL + 16 PNEUMONIA 224 px training images (credit: tests/data/README.md)
MODELS = REPO / "models"


def _become_subreaper() -> bool:
    """Orphans of this process's children (a traced daemon whose strace was killed) become its children,
    where :func:`no_process_outlives_its_test` can see them instead of losing them to init."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


SUBREAPER = _become_subreaper()


def _children() -> dict[int, str]:
    """Child processes of this one: pid -> "STATE command line" (state Z: exited, not yet reaped)."""
    me, out = os.getpid(), {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me:
            out[int(entry.name)] = state + " " + cmd
    return out


def _check_no_new_children(before: set[int], what: str) -> None:
    def leaked() -> dict[int, str]:
        return {pid: c for pid, c in _children().items() if pid not in before and not c.startswith("Z")}

    deadline = time.monotonic() + 10  # a process killed in a teardown may take a moment to go
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = leaked()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left running after {what}: {left}"


def _shares_processes(request) -> bool:
    """The test uses a module- or session-scoped fixture, whose processes (a ward of stations, say) a test
    may restart and which end with the module: those are checked when the module ends."""
    defs = getattr(getattr(request.node, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(d.scope != "function" and d.argname != "no_process_outlives_its_module"
               and not getattr(d.func, "__module__", "").startswith("_pytest")
               for fixture_defs in defs.values() for d in fixture_defs)  # pytest's own (tmp_path_factory) start none


@pytest.fixture(autouse=True, scope="module")
def no_process_outlives_its_module():
    """A test module leaves no process running (its module fixtures' teardowns run before this check)."""
    before = set(_children())
    yield
    _check_no_new_children(before, "the test module")


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(request):
    """A test leaves no process running after it ends (its own fixtures' teardowns run before this check)."""
    before = set(_children())
    yield
    if not _shares_processes(request):
        _check_no_new_children(before, "the test")


def run_cli(*argv: str) -> int:
    from pneumoflag.device.cli import main

    return main([str(a) for a in argv])


@pytest.fixture
def mini_data(tmp_path: Path) -> Path:
    """A private copy of the mini data set that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(MINI, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """Train (2 epochs, 32 px) and convert a tiny model once, through the CLI."""
    root = tmp_path_factory.mktemp("tiny")
    data = root / "data"
    shutil.copytree(MINI, data)
    keras_path = root / "tiny.keras"
    assert run_cli("train", "--data", data, "--out", keras_path, "--size", "32", "--epochs", "2",
                   "--val-fraction", "0.3", "--seed", "7") == 0
    tflite = root / "models" / "tiny.tflite"
    tflite.parent.mkdir()
    assert run_cli("convert", keras_path, "--calibration", data, "--out", tflite, "--check-data", MINI,
                   "--num-calibration", "12", "--max-auroc-drop", "1.0", "--single-tier") == 0
    return {"root": root, "data": data, "keras": keras_path, "tflite": tflite,
            "card": tflite.with_suffix(".json")}


# ----------------------------------------------------------------------------- daemon tests


@pytest.fixture
def dirs(tmp_path):
    """An export folder and a state folder."""
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir()
    state.mkdir()
    return watch, state


@pytest.fixture
def daemons():
    """Daemon processes started by a test (via mqtt_helpers.new_daemon), killed afterwards."""
    started: list = []
    yield started
    for d in started:
        d.close()


@pytest.fixture
def subscribers():
    started: list = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def brokers():
    """Start Mosquitto instances with extra config; all stopped afterwards."""
    from mqtt_helpers import Mosquitto

    started: list = []

    def start(workdir: Path, extra: str = "") -> "Mosquitto":
        b = Mosquitto(workdir, extra=extra)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def broker(tmp_path, brokers):
    """A plain anonymous Mosquitto on a free loopback port."""
    return brokers(tmp_path / "broker")
