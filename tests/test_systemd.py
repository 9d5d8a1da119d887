"""The systemd side of the daemon: sd_notify protocol and the shipped unit file."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Dict, List

import pytest

from pneumoflag.device.sdnotify import Notifier
from pneumoflag.device.samples import SAMPLES_DIR

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "pneumoflag.service"
SHIPPED_EXEC = "/usr/local/bin/pneumoflag"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="AF_UNIX datagrams / abstract namespace are Linux features")


# --- sd_notify ----------------------------------------------------------------


def _receiver(address: str) -> socket.socket:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(address)
    rx.settimeout(5)
    return rx


@pytest.fixture
def notify_path(tmp_path: Path):
    """A datagram socket bound in tmp_path, as systemd binds /run/systemd/notify."""
    path = tmp_path / "notify.sock"
    short_dir = None
    if len(os.fsencode(path)) >= 100:  # sun_path is 108 bytes; long test names can exceed it
        short_dir = tempfile.mkdtemp(prefix="pf-")
        path = Path(short_dir) / "notify.sock"
    rx = _receiver(str(path))
    yield str(path), rx
    rx.close()
    if short_dir:
        shutil.rmtree(short_dir, ignore_errors=True)


@linux_only
def test_ready_watchdog_stopping_over_path_socket(notify_path) -> None:
    path, rx = notify_path
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        assert n.enabled
        assert n.ready("x") is True
        assert rx.recv(4096) == b"READY=1\nSTATUS=x"
        assert n.watchdog() is True
        assert rx.recv(4096) == b"WATCHDOG=1"
        assert n.status("scoring 3 images") is True
        assert rx.recv(4096) == b"STATUS=scoring 3 images"
        assert n.stopping() is True
        assert rx.recv(4096) == b"STOPPING=1"
    finally:
        n.close()
    # close() is not final: the next call opens a fresh socket.
    assert n.ready() is True
    assert rx.recv(4096) == b"READY=1"
    n.close()


@linux_only
def test_abstract_namespace_socket() -> None:
    name = f"pneumoflag-test-{uuid.uuid4().hex[:12]}"
    rx = _receiver("\0" + name)
    try:
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as n:
            assert n.ready("x") is True
            assert rx.recv(4096) == b"READY=1\nSTATUS=x"
            assert n.watchdog() is True
            assert rx.recv(4096) == b"WATCHDOG=1"
    finally:
        rx.close()


def test_reads_os_environ_by_default(monkeypatch, notify_path) -> None:
    path, rx = notify_path
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier() as n:
        assert n.enabled and n.stopping()
        assert rx.recv(4096) == b"STOPPING=1"


def test_without_notify_socket_is_a_quiet_no_op(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier({}), Notifier()):
        assert not n.enabled
        assert n.notify(READY="1") is False
        assert n.ready("x") is False
        assert n.watchdog() is False
        n.close()


def test_unreachable_socket_returns_false(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled
    assert n.ready("x") is False  # OSError is logged, not raised
    assert n.watchdog() is False
    n.close()
    # A relative path is not a valid NOTIFY_SOCKET.
    assert not Notifier({"NOTIFY_SOCKET": "relative.sock"}).enabled


def test_watchdog_interval() -> None:
    usec = {"WATCHDOG_USEC": "30000000"}
    assert Notifier(usec).watchdog_interval() == 15.0
    assert Notifier({**usec, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 15.0
    assert Notifier({**usec, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() is None
    assert Notifier({}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval() is None


# --- the unit file ------------------------------------------------------------------


def _parse_unit(text: str) -> Dict[str, Dict[str, List[str]]]:
    """Sections -> key -> every assignment in order (systemd keys may repeat)."""
    sections: Dict[str, Dict[str, List[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"continuation lines are not expected: {raw!r}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"stray line: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_declares_the_required_hardening() -> None:
    unit = _parse_unit(UNIT.read_text())
    svc = {key: values[-1] for key, values in unit["Service"].items()}  # the last assignment wins
    required = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "StateDirectory": "pneumoflag",
        "ConfigurationDirectory": "pneumoflag",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "UMask": "0077",
        "SystemCallArchitectures": "native",
        "DevicePolicy": "closed",
        "ProtectClock": "yes",
        "PrivateMounts": "yes",
        "ProcSubset": "pid",
        "IPAddressDeny": "any",
    }
    for key, value in required.items():
        assert key in svc, f"{key}= missing from the unit"
        assert svc[key] == value, f"{key}={svc[key]!r}, expected {value!r}"
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "/dev/apex_0 rw" in unit["Service"]["DeviceAllow"]  # the Coral stays reachable
    families = svc["RestrictAddressFamilies"].split()
    assert "AF_UNIX" in families and "AF_INET" in families
    assert not svc["RestrictAddressFamilies"].startswith("~")
    assert int(svc["WatchdogSec"]) > 0
    assert svc["ExecStart"].split()[:2] == [SHIPPED_EXEC, "watch"]
    assert "PYTHONUNBUFFERED=1" in svc["Environment"].split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def _pneumoflag_exe() -> str:
    exe = shutil.which("pneumoflag") or str(Path(sys.prefix) / "bin" / "pneumoflag")
    if not os.access(exe, os.X_OK):
        pytest.skip(f"the pneumoflag console script is not installed ({exe}); pip install -e . first")
    return exe


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on a copy whose ExecStart names an executable that exists here."""
    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.access(analyze, os.X_OK):
        pytest.skip("systemd-analyze is not installed")
    assert f"ExecStart={SHIPPED_EXEC} " in text
    text = text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={_pneumoflag_exe()} ")
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    cmd = [analyze, "verify"]
    # Judge only this unit, not dependencies that may be broken or absent on
    # the host (option added in systemd 250).
    helptext = subprocess.run([analyze, "--help"], capture_output=True, text=True).stdout
    if "--recursive-errors" in helptext:
        cmd.append("--recursive-errors=no")
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "warning", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    proc = subprocess.run(cmd + [str(copy)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    return proc


def _complaints(proc: subprocess.CompletedProcess) -> List[str]:
    """Lines about our unit file that systemd would log and then ignore at runtime.

    verify exits 0 for an unknown key or an unparsable value (systemd skips the
    line), so the output, not the exit status, is what catches a typo.
    """
    out = proc.stdout + proc.stderr
    markers = ("Unknown key", "Unknown section", "Invalid", "Failed", "ignoring")
    return [line for line in out.splitlines()
            if UNIT.name in line and any(m in line for m in markers)]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = _verify(tmp_path, UNIT.read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _complaints(proc) == [], proc.stdout + proc.stderr


@pytest.mark.parametrize("good, bad, expected", [
    ("Restart=on-failure", "Restat=on-failure", "Unknown key"),
    ("Type=notify", "Type=notifyy", "Failed to parse service type"),
])
def test_verify_catches_a_broken_unit(tmp_path: Path, good: str, bad: str, expected: str) -> None:
    text = UNIT.read_text()
    assert f"\n{good}\n" in text
    proc = _verify(tmp_path, text.replace(f"\n{good}\n", f"\n{bad}\n", 1))
    complaints = _complaints(proc)
    assert any(expected in line for line in complaints), proc.stdout + proc.stderr


def _exposure(proc: subprocess.CompletedProcess) -> float:
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    return float(m.group(1))


def test_unit_exposure_is_at_most_1_5(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` scores the shipped unit (it was 2.1)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (Debian: systemd); .ci/run installs it"
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={_pneumoflag_exe()} "))
    proc = subprocess.run([analyze, "security", "--offline=true", str(copy)], capture_output=True, text=True,
                          env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}, timeout=120)
    assert _exposure(proc) <= 1.5


def _forbidden_syscalls() -> list[str]:
    """Every system call in the unit's deny list (@privileged, @resources), groups expanded."""
    analyze = shutil.which("systemd-analyze")
    names: set[str] = set()
    todo = ["@privileged", "@resources"]
    while todo:
        group = todo.pop()
        out = subprocess.run([analyze, "syscall-filter", group], capture_output=True, text=True).stdout
        for line in out.splitlines()[1:]:
            item = line.strip()
            if not item or item.startswith("#"):
                continue
            if item.startswith("@"):
                todo.append(item)
            else:
                names.add(item)
    return sorted(names)


def test_the_daemon_works_when_every_syscall_the_unit_forbids_fails(tmp_path: Path, broker, dirs, daemons) -> None:
    """No systemd here to apply the seccomp filter, so strace does what it would: each forbidden call fails
    with EPERM (SystemCallErrorNumber=EPERM). The daemon must still score and deliver."""
    from mqtt_helpers import Subscriber, drop, new_daemon

    strace = shutil.which("strace")
    assert strace and shutil.which("systemd-analyze"), "strace and systemd-analyze are needed; .ci/run installs them"
    known = [c for c in _forbidden_syscalls()
             if subprocess.run([strace, "-e", f"trace={c}", "true"], capture_output=True).returncode == 0]
    assert "mbind" in known and "setrlimit" in known and "fchown" in known
    trace = tmp_path / "injected.txt"
    calls = ",".join(known)
    wrapper = (strace, "-f", "-qq", "-o", str(trace), "-e", f"trace={calls}", "-e", f"inject={calls}:error=EPERM")
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address, wrapper=wrapper).start()
    samples = sorted(SAMPLES_DIR.rglob("*.jpeg"))[:3]
    for f in samples:
        drop(f, watch)
    assert sorted(f["file"] for f in sub.wait_flags(3, timeout=60)) == sorted(p.name for p in samples)
    assert "(INJECTED)" in trace.read_text()  # the daemon did try some of them, and went on


def test_unit_dropin_comes_from_the_configuration(tmp_path: Path, capsys) -> None:
    from conftest import run_cli

    cfg = tmp_path / "p.toml"
    cfg.write_text('[watch]\ndir = "/srv/xray-export"\narchive_dir = "/srv/xray-archive"\n'
                   '[mqtt]\nbroker = "127.0.0.1:8883"\n')
    assert run_cli("config", "--config", cfg, "--unit-dropin") == 0
    dropin = capsys.readouterr().out
    assert "ReadWritePaths=/srv/xray-export /srv/xray-archive" in dropin
    assert "IPAddressAllow=127.0.0.1" in dropin
    # appended to the unit, systemd accepts every line of it
    extra = "\n".join(ln for ln in dropin.splitlines() if not ln.startswith("[Service]"))
    text = UNIT.read_text().replace("[Install]", extra + "\n\n[Install]")
    assert _complaints(_verify(tmp_path, text)) == []
