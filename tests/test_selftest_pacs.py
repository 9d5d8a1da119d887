"""`pneumoflag selftest --pacs`, the field engineer's check of the DICOM network path, against a real Orthanc and a
real receiver: one PASS/FAIL line per destination and for the receiver's port, and the exit status to match."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

from conftest import run_cli
from mqtt_helpers import free_port
from orthanc_helpers import ORTHANC_AE, running_orthanc
from pneumoflag.device.dicom_net import DicomReceiver


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as o:
        yield o


def _config(tmp_path: Path, destinations: list[str], listen: str | None = None) -> Path:
    p = tmp_path / "pneumoflag.toml"
    text = "[pacs]\ndestinations = [" + ", ".join(f'"{d}"' for d in destinations) + ']\ntimeout_seconds = 5\n'
    if listen:
        text += f'[dicom_net]\nenabled = true\nlisten = "{listen}"\nallowed_callers = ["CR_ROOM2"]\n'
    p.write_text(text)
    return p


def _selftest(tmp_path: Path, conf: Path, capsys) -> tuple[int, str]:
    rc = run_cli("selftest", "--pacs", "--config", conf, "--state-dir", tmp_path / "state")
    return rc, capsys.readouterr().out


def _row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if name in line)


def test_a_reachable_pacs_and_a_free_receiver_port_pass(orthanc, tmp_path, capsys):
    port = free_port()
    rc, out = _selftest(tmp_path, _config(tmp_path, [f"{ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}"],
                                          f"127.0.0.1:{port}"), capsys)
    assert rc == 0, out
    assert _row(out, f"C-ECHO {ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}").split()[0] == "PASS"
    assert "C-ECHO success" in out
    assert _row(out, "DICOM receiver port").split()[0] == "PASS" and "is free" in out
    assert "RESULT: PASS" in out and "samples vs reference" not in out  # the network path only


def test_a_pacs_that_is_down_or_calls_itself_otherwise_fails_with_the_reason(orthanc, tmp_path, capsys):
    dead = free_port()
    dests = [f"{ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}", f"PACS@127.0.0.1:{dead}",
             f"WRONG_AE@127.0.0.1:{orthanc.dicom_port}"]
    rc, out = _selftest(tmp_path, _config(tmp_path, dests), capsys)
    assert rc == 1, out
    assert _row(out, dests[0]).split()[0] == "PASS"
    assert _row(out, dests[1]).split()[0] == "FAIL" and "cannot connect" in _row(out, dests[1])
    assert _row(out, dests[2]).split()[0] == "FAIL" and "rejected the association" in _row(out, dests[2])
    assert _row(out, "DICOM receiver port").split()[0] == "SKIP"
    assert "RESULT: FAIL" in out


def test_a_running_receiver_answers_and_a_port_taken_by_something_else_fails(tmp_path, capsys):
    r = DicomReceiver(tmp_path / "spool", listen="127.0.0.1:0", allowed_callers=["CR_ROOM2"], timeout=5).start()
    try:
        port = r.address[1]
        rc, out = _selftest(tmp_path, _config(tmp_path, [], f"127.0.0.1:{port}"), capsys)
    finally:
        r.stop()
    assert rc == 0, out
    assert "listening, PNEUMOFLAG answers C-ECHO" in _row(out, "DICOM receiver port")
    assert _row(out, "PACS destinations").split()[0] == "SKIP"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, out = _selftest(tmp_path, _config(tmp_path, [], f"127.0.0.1:{s.getsockname()[1]}"), capsys)
    assert rc == 1, out
    assert _row(out, "DICOM receiver port").split()[0] == "FAIL" and "does not answer C-ECHO" in out
