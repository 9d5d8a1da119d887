"""The DICOM receiver against real senders: dcmtk's storescu/echoscu as processes, pynetdicom for odd requests."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")

from conftest import run_cli  # noqa: E402
from dicom_helpers import (  # noqa: E402
    CR, CT, DX_PRESENTATION, DX_PROCESSING, ENCODERS, EXPLICIT, JPEG_LOSSLESS_SV1, LOSSY, PROPOSE, RLE,
    make_radiograph, encode, require_tools, sample_pixels, storescu,
)
from pneumoflag.device.config import ConfigError, load_config  # noqa: E402
from pneumoflag.device.dicom_net import DicomNetError, DicomReceiver, accepted_transfer_syntaxes  # noqa: E402

CALLERS = ["CR_ROOM2", "DX_ROOM3"]


@pytest.fixture(autouse=True)
def _tools():
    require_tools("storescu", "echoscu", "dcmconv", "dcmcjpeg", "dcmcjpls", "dcmcrle")


@pytest.fixture
def spool(tmp_path) -> Path:
    return tmp_path / "state" / "received"


@pytest.fixture
def receivers():
    started: list[DicomReceiver] = []

    def start(spool: Path, **kw) -> DicomReceiver:
        kw = {"listen": "127.0.0.1:0", "allowed_callers": CALLERS, "timeout": 5.0, **kw}
        r = DicomReceiver(spool, **kw).start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def stored(spool: Path) -> dict[str, Path]:
    """Finished instances in the spool by SOP Instance UID; a temporary file left behind fails the test."""
    if not spool.exists():
        return {}
    names = sorted(p.name for p in spool.iterdir())
    assert not [n for n in names if n.startswith(".")], f"temporary files left: {names}"
    return {n[:-4]: spool / n for n in names if n.endswith(".dcm")}


# ----------------------------------------------------------------------------------- transfer syntaxes


@pytest.mark.parametrize("syntax", list(ENCODERS), ids=lambda s: pydicom.uid.UID(s).name)
def test_storescu_sends_each_syntax_and_it_arrives_durable_and_decodable(tmp_path, spool, receivers, syntax):
    src = make_radiograph(tmp_path / "src.dcm")
    f = encode(src, tmp_path / "sent.dcm", syntax)
    sent = pydicom.dcmread(f)
    r = receivers(spool)
    out = storescu(*r.address, [f], "CR_ROOM2", "PNEUMOFLAG", PROPOSE[syntax], "-R")
    files = stored(spool)
    if syntax not in accepted_transfer_syntaxes():  # no decoder here: refused at negotiation, nothing stored
        assert out.returncode != 0 and files == {}, out.stderr
        return
    assert out.returncode == 0, out.stderr
    assert list(files) == [sent.SOPInstanceUID]
    got = pydicom.dcmread(files[sent.SOPInstanceUID])
    assert got.file_meta.TransferSyntaxUID == syntax  # as sent, not converted on the way
    assert got.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert got.PatientID == "PID-42" and got.SOPClassUID == CR
    original = pydicom.dcmread(src).pixel_array
    pixels = got.pixel_array
    assert pixels.shape == original.shape
    if syntax in LOSSY:
        assert abs(pixels.astype(int) - original.astype(int)).mean() < 3
    else:
        assert (pixels == original).all()


def test_only_syntaxes_with_an_installed_decoder_are_offered(monkeypatch):
    from pydicom.pixels import get_decoder

    offered = accepted_transfer_syntaxes()
    assert EXPLICIT in offered and RLE in offered  # pydicom decodes these itself
    for uid in offered:
        assert get_decoder(uid).is_available
    real = get_decoder

    class Missing:
        is_available = False

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: Missing() if uid == RLE else real(uid))
    assert RLE not in accepted_transfer_syntaxes() and EXPLICIT in accepted_transfer_syntaxes()


def test_a_syntax_without_a_decoder_is_refused_at_negotiation(spool, receivers, monkeypatch):
    from pynetdicom import AE

    if JPEG_LOSSLESS_SV1 in accepted_transfer_syntaxes():  # a decoder is installed: take one away
        real = pydicom.pixels.get_decoder

        class Missing:
            is_available = False

        monkeypatch.setattr("pydicom.pixels.get_decoder",
                            lambda uid: Missing() if uid == JPEG_LOSSLESS_SV1 else real(uid))
    r = receivers(spool)
    ae = AE("CR_ROOM2")
    ae.add_requested_context(CR, [JPEG_LOSSLESS_SV1])
    ae.add_requested_context(CR, [EXPLICIT])
    assoc = ae.associate(*r.address, ae_title="PNEUMOFLAG")
    try:
        assert assoc.is_established
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assert accepted == {EXPLICIT}
        assert [cx.result for cx in assoc.rejected_contexts] == [0x04]  # transfer syntaxes not supported
    finally:
        assoc.release()


@pytest.mark.parametrize("sop_class", [DX_PRESENTATION, DX_PROCESSING])
def test_dx_images_are_received(tmp_path, spool, receivers, sop_class):
    f = make_radiograph(tmp_path / "dx.dcm", sop_class=sop_class)
    r = receivers(spool)
    out = storescu(*r.address, [f], "DX_ROOM3")
    assert out.returncode == 0, out.stderr
    assert pydicom.dcmread(f).SOPInstanceUID in stored(spool)


# ----------------------------------------------------------------------------------- who may send what


def test_echoscu_and_dicom_echo_reach_it(spool, receivers, capsys):
    r = receivers(spool)
    host, port = r.address
    out = subprocess.run(["echoscu", "-aet", "CR_ROOM2", "-aec", "PNEUMOFLAG", host, str(port)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert run_cli("dicom-echo", f"PNEUMOFLAG@{host}:{port}", "--calling-ae", "CR_ROOM2", "--timeout", "5") == 0
    assert "C-ECHO success" in capsys.readouterr().out
    assert run_cli("dicom-echo", f"PNEUMOFLAG@{host}:{port}", "--calling-ae", "STRANGER", "--timeout", "5") == 1
    assert "rejected the association" in capsys.readouterr().err


def test_an_unknown_calling_ae_is_refused_at_association(tmp_path, spool, receivers, caplog):
    f = make_radiograph(tmp_path / "a.dcm")
    r = receivers(spool)
    with caplog.at_level(logging.WARNING, logger="pneumoflag.device.dicom_net"):
        out = storescu(*r.address, [f], "STRANGER")
    assert out.returncode != 0
    assert "Calling AE Title Not Recognized" in out.stderr
    assert stored(spool) == {}
    assert "'STRANGER'" in caplog.text and "allowed_callers" in caplog.text


def test_a_sender_calling_another_ae_title_is_refused(tmp_path, spool, receivers):
    out = storescu(*receivers(spool).address, [make_radiograph(tmp_path / "a.dcm")], "CR_ROOM2", "ANY-SCP")
    assert out.returncode != 0 and "Called AE Title Not Recognized" in out.stderr
    assert stored(spool) == {}


def test_any_caller_only_when_asked_for_and_then_with_a_warning(tmp_path, spool, receivers, caplog):
    with pytest.raises(DicomNetError, match="allowed_callers is empty"):
        DicomReceiver(spool, listen="127.0.0.1:0", allowed_callers=[])
    with caplog.at_level(logging.WARNING, logger="pneumoflag.device.dicom_net"):
        r = receivers(spool, allowed_callers=["*"])
    assert "accepts any calling AE title" in caplog.text
    assert storescu(*r.address, [make_radiograph(tmp_path / "a.dcm")], "WHOEVER").returncode == 0


def test_a_peer_outside_allowed_addresses_is_closed(tmp_path, spool, receivers):
    elsewhere = receivers(spool, allowed_addresses=["10.99.0.0/16"])
    out = subprocess.run(["echoscu", "-aet", "CR_ROOM2", "-aec", "PNEUMOFLAG", *map(str, elsewhere.address)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    loopback = receivers(spool, allowed_addresses=["127.0.0.0/8"])
    out = subprocess.run(["echoscu", "-aet", "CR_ROOM2", "-aec", "PNEUMOFLAG", *map(str, loopback.address)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("kind", ["ct", "sr"])
def test_other_sop_classes_are_refused_at_negotiation(tmp_path, spool, receivers, kind):
    if kind == "ct":
        f = make_radiograph(tmp_path / "ct.dcm", sop_class=CT, BodyPartExamined="CHEST")
    else:
        from test_sr import sample_sr

        f = tmp_path / "sr.dcm"
        sample_sr(tmp_path).save_as(f, enforce_file_format=True)
    out = storescu(*receivers(spool).address, [f], "CR_ROOM2", "PNEUMOFLAG", "-R")
    assert out.returncode != 0
    assert "no presentation context" in out.stderr.lower() or "no acceptable presentation contexts" in \
        out.stderr.lower(), out.stderr
    assert stored(spool) == {}


# ----------------------------------------------------------------------------------- what "stored" means


def test_a_retried_instance_is_success_without_rewriting(tmp_path, spool, receivers):
    f = make_radiograph(tmp_path / "a.dcm")
    r = receivers(spool)
    assert storescu(*r.address, [f]).returncode == 0
    (path,) = stored(spool).values()
    before = path.stat()
    time.sleep(0.05)
    out = storescu(*r.address, [f])
    assert out.returncode == 0, out.stderr
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(stored(spool)) == 1


def test_two_concurrent_senders_both_succeed(tmp_path, spool, receivers):
    r = receivers(spool)
    batches = {}
    for caller in CALLERS:
        d = tmp_path / caller
        d.mkdir()
        batches[caller] = [make_radiograph(d / f"{i}.dcm", sample_pixels(i)) for i in range(4)]
    host, port = r.address
    procs = [subprocess.Popen(["storescu", "-aet", caller, "-aec", "PNEUMOFLAG", host, str(port), *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for caller, files in batches.items()]
    seen_two = False
    deadline = time.monotonic() + 60
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        seen_two = seen_two or len([a for a in r._ae.active_associations if a.is_acceptor]) >= 2
        time.sleep(0.005)
    results = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    uids = {pydicom.dcmread(f).SOPInstanceUID for files in batches.values() for f in files}
    assert set(stored(spool)) == uids
    if not seen_two:
        pytest.xfail("the two senders did not overlap on this machine (each finished too fast)")


def test_on_stored_runs_after_the_file_is_in_place(tmp_path, spool, receivers):
    calls = []

    def on_stored(path: Path, ds) -> None:
        calls.append((path, path.exists(), str(ds.SOPInstanceUID), threading.current_thread().name))

    f = make_radiograph(tmp_path / "a.dcm")
    r = receivers(spool, on_stored=on_stored)
    assert storescu(*r.address, [f]).returncode == 0
    uid = pydicom.dcmread(f).SOPInstanceUID
    assert [(p.name, ok, u) for p, ok, u, _ in calls] == [(f"{uid}.dcm", True, uid)]


def test_an_instance_over_the_size_limit_is_out_of_resources(tmp_path, spool, receivers, caplog):
    f = make_radiograph(tmp_path / "a.dcm")
    r = receivers(spool, max_bytes=f.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="pneumoflag.device.dicom_net"):
        out = storescu(*r.address, [f])
    assert "Received Store Response (Refused: OutOfResources)" in out.stderr, out.stderr
    assert stored(spool) == {}
    assert "watch.max_file_mb" in caplog.text


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom says so as it sends our bad UID
def test_an_instance_without_a_valid_sop_instance_uid_cannot_be_understood(tmp_path, spool, receivers, monkeypatch):
    from pynetdicom import AE, _config

    r = receivers(spool)
    ae = AE("CR_ROOM2")
    ae.add_requested_context(CR, [EXPLICIT])
    bad = pydicom.dcmread(make_radiograph(tmp_path / "bad.dcm"))
    bad.SOPInstanceUID = "1.2.840.x/../../etc"
    missing = make_radiograph(tmp_path / "missing.dcm", SOPInstanceUID=None)  # the File Meta still names one
    assoc = ae.associate(*r.address, ae_title="PNEUMOFLAG")
    try:
        assert assoc.send_c_store(bad).Status == 0xC000
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the request's UID from the File Meta
        assert assoc.send_c_store(missing).Status == 0xC000
    finally:
        assoc.release()
    assert stored(spool) == {}


def _can_mount(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(probe)], check=True)
    return ok.returncode == 0


def test_a_full_disk_answers_out_of_resources_and_leaves_nothing(tmp_path, receivers):
    if os.geteuid() != 0 or not shutil.which("mount") or not _can_mount(tmp_path):
        pytest.skip("needs root and mount (a tiny tmpfs) to make a real full disk")
    spool = tmp_path / "tiny"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spool)], check=True)
    try:
        f = make_radiograph(tmp_path / "big.dcm", sample_pixels(side=512))  # ~250 KB: more than the disk
        r = receivers(spool)
        out = storescu(*r.address, [f])
        assert "Received Store Response (Refused: OutOfResources)" in out.stderr, out.stderr
        assert stored(spool) == {} and list(spool.iterdir()) == []
        small = make_radiograph(tmp_path / "small.dcm", sample_pixels(side=96))
        assert storescu(*r.address, [small]).returncode == 0  # the same disk takes what fits
        r.stop()
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=True)


# ----------------------------------------------------------------------------------- the server itself


def test_a_dead_peer_is_timed_out(spool, receivers):
    r = receivers(spool, timeout=1.0)
    with socket.create_connection(r.address, timeout=10) as s:  # connects, then says nothing
        start = time.monotonic()
        while s.recv(1024):  # an A-ABORT may come before the close; no close in 10 s raises
            pass
        elapsed = time.monotonic() - start
    assert 0.5 < elapsed < 8


def test_a_taken_port_stops_the_start_with_a_clear_error(spool, receivers):
    r = receivers(spool)
    host, port = r.address
    with pytest.raises(DicomNetError, match=f"dicom_net.listen {host}:{port}: cannot listen"):
        DicomReceiver(spool, listen=f"{host}:{port}", allowed_callers=CALLERS).start()


def test_leftovers_of_a_crash_are_removed_at_start(spool, receivers):
    spool.mkdir(parents=True)
    (spool / ".1.2.3.abcd.part").write_bytes(b"half")
    (spool / "1.2.3.dcm").write_bytes(b"kept")
    receivers(spool)
    assert sorted(p.name for p in spool.iterdir()) == ["1.2.3.dcm"]


def test_from_config_takes_dicom_net_and_the_size_limit(tmp_path):
    cfg = load_config(env={"PNEUMOFLAG_DICOM_NET_ALLOWED_CALLERS": "CR_ROOM2", "PNEUMOFLAG_WATCH_MAX_FILE_MB": "2",
                           "PNEUMOFLAG_DICOM_NET_LISTEN": "127.0.0.1:11112"})
    r = DicomReceiver.from_config(cfg, tmp_path)
    assert (r.callers, r.max_bytes, r.address, r.ae_title) == (["CR_ROOM2"], 2 * 2**20, ("127.0.0.1", 11112),
                                                               "PNEUMOFLAG")


@pytest.mark.parametrize("env, named", [
    ({"PNEUMOFLAG_DICOM_NET_AE_TITLE": "A" * 17}, "dicom_net.ae_title"),
    ({"PNEUMOFLAG_DICOM_NET_AE_TITLE": "BAD\\AE"}, "dicom_net.ae_title"),
    ({"PNEUMOFLAG_DICOM_NET_ENABLED": "true"}, "dicom_net.allowed_callers"),
    ({"PNEUMOFLAG_DICOM_NET_ALLOWED_CALLERS": "OK,WAY_TOO_LONG_A_TITLE"}, "dicom_net.allowed_callers"),
    ({"PNEUMOFLAG_DICOM_NET_ALLOWED_ADDRESSES": "ward-a"}, "dicom_net.allowed_addresses"),
    ({"PNEUMOFLAG_DICOM_NET_LISTEN": "11112"}, "dicom_net.listen"),
    ({"PNEUMOFLAG_DICOM_NET_TIMEOUT_SECONDS": "0"}, "dicom_net.timeout_seconds"),
    ({"PNEUMOFLAG_PACS_DESTINATIONS": "10.0.0.5:104"}, "pacs.destinations"),
    ({"PNEUMOFLAG_PACS_CALLING_AE": ""}, "pacs.calling_ae"),
])
def test_bad_dicom_settings_are_refused_with_the_key_named(env, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(env=env)
