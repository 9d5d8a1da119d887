"""The SR sent to a real PACS (Orthanc) and read back through its REST API; the sender's failures in words."""
from __future__ import annotations

import io
import socket
import threading
import time

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from conftest import run_cli  # noqa: E402
from dicom_helpers import require_tools  # noqa: E402
from orthanc_helpers import ORTHANC_AE, running_orthanc  # noqa: E402
from pneumoflag.device.config import PacsConfig  # noqa: E402
from pneumoflag.device.pacs import Destination, destinations, echo, instances_to_send, send  # noqa: E402
from test_sr import MODEL, URGENT, build_sr, study  # noqa: E402

CALLING = "PNEUMOFLAG"


@pytest.fixture(autouse=True)
def _tools():
    require_tools("Orthanc")


@pytest.fixture
def orthanc(tmp_path):
    with running_orthanc(tmp_path / "orthanc") as o:
        yield o


def _dest(o) -> Destination:
    return Destination(ORTHANC_AE, "127.0.0.1", o.dicom_port)


def _instance_id(o, sop_instance_uid: str) -> str:
    """Orthanc's id of the one instance with this SOP Instance UID."""
    found = [i["ID"] for i in o.get("/instances?expand") if i["MainDicomTags"]["SOPInstanceUID"] == sop_instance_uid]
    assert len(found) == 1, found
    return found[0]


def test_the_sr_arrives_in_orthanc_with_references_finding_model_and_study(tmp_path, orthanc):
    images = study(tmp_path)
    sr = build_sr(images, URGENT, MODEL)
    result = send(sr, _dest(orthanc), CALLING, timeout=10)
    assert result.ok and result.status == 0x0000, result.message
    oid = _instance_id(orthanc, sr.SOPInstanceUID)
    tags = orthanc.get(f"/instances/{oid}/tags?simplify")
    for kw in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert tags[kw] == str(getattr(images[0], kw)), kw
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34" and tags["Modality"] == "SR"
    # the file as Orthanc keeps it: every reference, the finding and the model identity intact
    stored = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{oid}/file", raw=True)))
    evidence = stored.CurrentRequestedProcedureEvidenceSequence[0]
    refs = {r.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert refs == {i.SOPInstanceUID for i in images}
    text = str(stored)
    assert "233604007" in text and "415684004" in text and "URGENT" in text and "0.9921" in text
    (eq,) = [e for e in stored.ContributingEquipmentSequence if e.Manufacturer == "pneumoflag"]
    assert (eq.ManufacturerModelName, eq.SoftwareVersions, eq.DeviceUID) == (MODEL.name, MODEL.version,
                                                                             MODEL.device_uid)
    series = orthanc.get(f"/instances/{oid}/series")
    assert series["MainDicomTags"]["SeriesInstanceUID"] == sr.SeriesInstanceUID
    assert orthanc.get(f"/instances/{oid}/study")["MainDicomTags"]["StudyInstanceUID"] == images[0].StudyInstanceUID


def test_orthanc_stopped_is_a_clear_failure_and_back_it_succeeds(tmp_path, orthanc):
    sr = build_sr(study(tmp_path), URGENT, MODEL)
    orthanc.stop()
    down = send(sr, _dest(orthanc), CALLING, timeout=3)
    assert not down.ok and down.status is None
    assert "cannot connect" in down.message and "Connection refused" in down.message, down.message
    orthanc.start()
    up = send(sr, _dest(orthanc), CALLING, timeout=10)
    assert up.ok, up.message
    assert _instance_id(orthanc, sr.SOPInstanceUID)


def test_a_wrong_called_ae_title_is_a_rejection_with_its_reason(tmp_path, orthanc):
    sr = build_sr(study(tmp_path), URGENT, MODEL)
    result = send(sr, Destination("NOT_ORTHANC", "127.0.0.1", orthanc.dicom_port), CALLING, timeout=10)
    assert not result.ok and "rejected the association" in result.message
    assert "Called AE title not recognised" in result.message, result.message


def test_a_peer_that_never_answers_times_out(tmp_path):
    """A TCP listener that accepts and says nothing: the association wait is bounded by ``timeout``."""
    sr = build_sr(study(tmp_path), URGENT, MODEL)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        held: list = []
        t = threading.Thread(target=lambda: held.append(server.accept()), daemon=True)
        t.start()
        start = time.monotonic()
        result = send(sr, Destination("SILENT", "127.0.0.1", server.getsockname()[1]), CALLING, timeout=1.5)
        elapsed = time.monotonic() - start
        for conn, _ in held:
            conn.close()
    assert not result.ok and "no association answer within 1.5 s" in result.message, result.message
    assert elapsed < 10


def test_echo_and_dicom_echo_against_orthanc(orthanc, capsys):
    assert echo(_dest(orthanc), CALLING, 10).ok
    assert run_cli("dicom-echo", f"{ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}", "--timeout", "10") == 0
    assert "C-ECHO success" in capsys.readouterr().out
    orthanc.stop()
    assert run_cli("dicom-echo", f"127.0.0.1:{orthanc.dicom_port}", "--timeout", "3") == 1
    assert "cannot connect" in capsys.readouterr().err


def test_dicom_echo_refuses_a_bad_peer_with_status_1(capsys):
    assert run_cli("dicom-echo", "BAD\\AE@127.0.0.1:104") == 1
    assert "AE title" in capsys.readouterr().err
    assert run_cli("dicom-echo", "127.0.0.1") == 1
    assert "HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("text, ae, host, port", [
    ("PACS@10.0.0.5:104", "PACS", "10.0.0.5", 104),
    ("MAIN_PACS@pacs.ward.example:11112", "MAIN_PACS", "pacs.ward.example", 11112),
    ("PACS@[fd00::5]:104", "PACS", "fd00::5", 104),
])
def test_destination_parse(text, ae, host, port):
    d = Destination.parse(text)
    assert (d.ae_title, d.host, d.port) == (ae, host, port)
    assert Destination.parse(str(d)) == d


@pytest.mark.parametrize("text, says", [
    ("10.0.0.5:104", "AE@HOST:PORT"),
    ("@10.0.0.5:104", "1-16 characters"),
    ("A_VERY_LONG_AE_TITLE@10.0.0.5:104", "1-16 characters"),
    ("BAD\\AE@10.0.0.5:104", "backslash"),
    ("BAD\tAE@10.0.0.5:104", "backslash"),
    ("PACS@10.0.0.5", "HOST:PORT"),
    ("PACS@10.0.0.5:99999", "out of range"),
])
def test_destination_parse_says_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        Destination.parse(text)


def test_what_goes_where_follows_the_pacs_section():
    cfg = PacsConfig(destinations=["PACS@10.0.0.5:104", "ARCHIVE@10.0.0.6:11112"])
    assert [str(d) for d in destinations(cfg)] == ["PACS@10.0.0.5:104", "ARCHIVE@10.0.0.6:11112"]
    assert instances_to_send(cfg, "sr", "map") == ["sr"]
    cfg.send_heatmap = True
    assert instances_to_send(cfg, "sr", "map") == ["sr", "map"] and instances_to_send(cfg, "sr") == ["sr"]
