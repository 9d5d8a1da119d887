"""The result back to PACS: a real daemon sends each scored DICOM image's SR to a real Orthanc through its own
durable outbox; read back through Orthanc's REST API, parsed by dsrdump, checked by dciodvfy; an Orthanc that is
down keeps the rows until it takes them, in order."""
from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from dicom_helpers import make_radiograph, require_tools, sample_pixels, storescu  # noqa: E402
from mqtt_helpers import Subscriber, drop, free_port, new_daemon, wait_until  # noqa: E402
from orthanc_helpers import ORTHANC_AE, Orthanc  # noqa: E402
from pneumoflag.device.pacs_outbox import derived_uid  # noqa: E402
from pneumoflag.device.sr import DISCLAIMER, device_uid  # noqa: E402
from test_sr import ALLOWED_WARNINGS, COMPREHENSIVE_3D_SR, _content  # noqa: E402

CALLER = "CR_ROOM2"


@pytest.fixture(autouse=True)
def _tools():
    require_tools("storescu", "dsrdump", "dciodvfy")


@pytest.fixture
def orthanc(tmp_path):
    o = Orthanc(tmp_path / "orthanc")
    yield o
    o.stop()


def _env(orthanc: Orthanc, port: int | None = None, quiet: float = 1.0) -> dict:
    """A study's SR is queued when it closes: ``quiet`` seconds after its last image."""
    env = {"PNEUMOFLAG_PACS_DESTINATIONS": f"{ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}",
           "PNEUMOFLAG_PACS_TIMEOUT_SECONDS": "5", "PNEUMOFLAG_DICOM_STUDY_QUIET_SECONDS": str(quiet)}
    if port:
        env.update({"PNEUMOFLAG_DICOM_NET_ENABLED": "true", "PNEUMOFLAG_DICOM_NET_LISTEN": f"127.0.0.1:{port}",
                    "PNEUMOFLAG_DICOM_NET_ALLOWED_CALLERS": CALLER})
    return env


def _srs(orthanc: Orthanc) -> dict[str, bytes]:
    """SOP Instance UID -> the Part 10 file of every SR Orthanc holds."""
    out = {}
    for oid in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{oid}/simplified-tags")
        if tags.get("Modality") == "SR":
            out[tags["SOPInstanceUID"]] = orthanc.get(f"/instances/{oid}/file", raw=True)
    return out


def _srs_in_arrival_order(orthanc: Orthanc) -> list[str]:
    changes = orthanc.get("/changes?limit=1000")["Changes"]
    uids = []
    for c in sorted(changes, key=lambda c: c["Seq"]):
        if c["ChangeType"] == "NewInstance":
            tags = orthanc.get(f"/instances/{c['ID']}/simplified-tags")
            if tags.get("Modality") == "SR":
                uids.append(tags["SOPInstanceUID"])
    return uids


def _outbox(state: Path) -> list[tuple]:
    with sqlite3.connect(state / "pneumoflag.db") as db:
        return db.execute("SELECT event_id, destination, attempts, last_error FROM pacs_outbox ORDER BY id").fetchall()


def test_each_scored_dicom_image_arrives_in_orthanc_as_an_sr_that_references_it(broker, dirs, daemons, orthanc,
                                                                               tmp_path):
    watch, state = dirs
    orthanc.start()
    port = free_port()
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env=_env(orthanc, port)).start()
    by_network = make_radiograph(tmp_path / "net.dcm", sample_pixels(0, side=256), PatientID="PID-NET")
    by_folder = make_radiograph(tmp_path / "folder.dcm", sample_pixels(1, side=256), PatientID="PID-FOLDER")
    out = storescu("127.0.0.1", port, [by_network], CALLER, "PNEUMOFLAG")
    assert out.returncode == 0, out.stderr
    drop(by_folder, watch, "CR0001.dcm")
    flags = {f["sop_instance_uid"]: f for f in sub.wait_flags(2, timeout=60)}
    wait_until(lambda: len(_srs(orthanc)) == 2, 60, f"two SRs in Orthanc\n{d.output()[-3000:]}")
    srs = _srs(orthanc)
    for source_path in (by_network, by_folder):
        source = pydicom.dcmread(source_path)
        flag = flags[source.SOPInstanceUID]
        uid = derived_uid(flag["event_id"], "sr")
        assert uid in srs, (uid, list(srs))
        f = tmp_path / f"{uid}.dcm"
        f.write_bytes(srs[uid])
        sr = pydicom.dcmread(f)
        assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
        for kw in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
            assert getattr(sr, kw) == getattr(source, kw), kw
        (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
        refs = {(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID)
                for series in evidence.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
        assert refs == {(source.SOPClassUID, source.SOPInstanceUID)}
        items = _content(sr)
        (finding,) = [i.ConceptCodeSequence[0].CodeMeaning for i in items
                      if i.ConceptNameCodeSequence[0].CodeMeaning == "Pneumonia" and "ConceptCodeSequence" in i]
        assert finding == ("Not suspected" if flag["priority"] == "routine" else "Suspected")
        (p,) = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
                if i.ConceptNameCodeSequence[0].CodeMeaning == "Probability"]
        assert p == pytest.approx(flag["probability"], abs=1e-6)
        (tier,) = [i.ConceptCodeSequence[0].CodeValue for i in items
                   if i.ConceptNameCodeSequence[0].CodeMeaning == "Priority"]
        assert tier == flag["priority"].upper()
        (equipment,) = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "pneumoflag"]
        model = flag["model"]
        assert (equipment.ManufacturerModelName, equipment.SoftwareVersions, equipment.DeviceUID) == (
            model["name"], model["version"], device_uid(model["sha256"]))
        assert DISCLAIMER in sr.SeriesDescription
        dump = subprocess.run(["dsrdump", str(f)], capture_output=True, text=True, timeout=30)
        assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout, dump.stderr
        check = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        lines = (check.stdout + check.stderr).splitlines()
        assert "Comprehensive3DSR" in lines and [ln for ln in lines if ln.startswith("Error")] == [], lines
        assert [w for w in lines if w.startswith("Warning") and not any(a.search(w) for a in ALLOWED_WARNINGS)] == []
    wait_until(lambda: _outbox(state) == [], 10, "the outbox to empty")
    assert d.terminate() == 0
    sub.stop()


def test_results_wait_while_orthanc_is_down_and_arrive_in_order_once_it_is_back(broker, dirs, daemons, orthanc,
                                                                                tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env=_env(orthanc)).start()  # Orthanc not started
    for i in range(4):
        drop(make_radiograph(tmp_path / f"img{i}.dcm", sample_pixels(i, side=256)), watch, f"CR{i:04d}.dcm")
        sub.wait_flags(i + 1, timeout=60)  # one after the other: their order is the flags' order
    flags = sorted(sub.flags(), key=lambda f: f["seq"])
    dest = f"{ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}"
    wait_until(lambda: len(_outbox(state)) == 4 and _outbox(state)[0][2] >= 2, 30, "the oldest row tried twice")
    rows = _outbox(state)
    assert [r[0] for r in rows] == [f["event_id"] for f in flags] and {r[1] for r in rows} == {dest}
    assert "cannot connect" in rows[0][3]
    assert [r[2] for r in rows[1:]] == [0, 0, 0]  # in order: nothing passes the oldest
    wait_until(lambda: any(isinstance(m.payload, dict) and m.payload.get("pacs", {}).get(dest, {}).get("depth") == 4
                           for m in sub.where(lambda m: m.topic.endswith("/stats"))), 20, "stats to show the outbox")
    stats = [m.payload for m in sub.where(lambda m: m.topic.endswith("/stats"))][-1]
    assert "cannot connect" in stats["pacs"][dest]["last_error"]
    report = subprocess.run([sys.executable, "-m", "pneumoflag.device.cli", "report", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert f"SRs waiting for PACS {dest}: 4" in report.stdout and "cannot connect" in report.stdout, report.stdout
    time.sleep(2)
    assert len(_outbox(state)) == 4  # nothing deleted before success
    orthanc.start()
    wait_until(lambda: _outbox(state) == [], 120, f"the outbox to empty\n{d.output()[-3000:]}")
    assert _srs_in_arrival_order(orthanc) == [derived_uid(f["event_id"], "sr") for f in flags]
    assert "takes results again" in d.output()
    assert d.terminate() == 0
    sub.stop()


def test_a_study_of_several_images_gets_one_sr_at_its_close_with_its_highest_result(broker, dirs, daemons, orthanc,
                                                                                   tmp_path):
    watch, state = dirs
    orthanc.start()
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env=_env(orthanc, quiet=3.0)).start()
    study = pydicom.uid.generate_uid()
    images = [make_radiograph(tmp_path / f"img{k}.dcm", sample_pixels(i, side=256), StudyInstanceUID=study,
                              InstanceNumber=k + 1) for k, i in enumerate((0, 4, 1))]  # routine, urgent, routine
    for k, img in enumerate(images[:2]):
        drop(img, watch, f"CR{k}.dcm")
        sub.wait_flags(k + 1, timeout=60)
    drop(images[2], watch, "CR2.dcm")
    wait_until(lambda: [m for m in sub.of_kind("study") if m["study"]["images"] == 3], 30, "the third image counted")
    assert _srs(orthanc) == {}  # open: nothing sent yet
    wait_until(lambda: len(_srs(orthanc)) == 1, 60, f"the study's SR in Orthanc\n{d.output()[-3000:]}")
    flags = sub.flags()
    assert [f["priority"] for f in flags] == ["routine", "urgent"]
    (uid, data), = _srs(orthanc).items()
    assert uid == derived_uid(flags[1]["event_id"], "sr")  # the study's current result: the urgent image's
    f = tmp_path / "study-sr.dcm"
    f.write_bytes(data)
    sr = pydicom.dcmread(f)
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence  # every image of the study that was scored
    assert {r.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence for r in s.ReferencedSOPSequence} \
        == {pydicom.dcmread(i).SOPInstanceUID for i in images}
    (tier,) = [i.ConceptCodeSequence[0].CodeValue for i in _content(sr)
               if i.ConceptNameCodeSequence[0].CodeMeaning == "Priority"]
    assert tier == "URGENT" and sr.StudyInstanceUID == study
    # a late routine image reopens the study; it closes again with the same result: no second SR
    drop(make_radiograph(tmp_path / "late.dcm", sample_pixels(2, side=256), StudyInstanceUID=study), watch, "late.dcm")
    wait_until(lambda: len([m for m in sub.of_kind("study") if m["study"]["closed"]]) == 2, 60, "the second close")
    wait_until(lambda: _outbox(state) == [], 10, "the outbox to empty")
    assert len(_srs(orthanc)) == 1 and len(sub.flags()) == 2
    assert d.terminate() == 0
    sub.stop()


def test_a_resend_after_a_crash_is_the_same_sr_instance(tmp_path):
    """The SR built twice from one outbox row (as after a kill -9 between Orthanc's answer and the deletion)."""
    from pneumoflag.device.config import load_config
    from pneumoflag.device.contract import FlagMessage, ModelRef
    from pneumoflag.device.pacs_outbox import build, pacs_item
    from pneumoflag.device.store import PacsRow

    src = make_radiograph(tmp_path / "a.dcm", sample_pixels(0, side=128))
    cfg = load_config(env={}, overrides={"pacs.destinations": ["PACS@127.0.0.1:104"]})
    ds = pydicom.dcmread(src)
    msg = FlagMessage(device="d", file="a.dcm", sha256=None, probability=0.5, priority="flag",
                      thresholds={"flag": 0.3, "urgent": 0.9}, model=ModelRef("m", "1", "ab" * 32), accelerator=None,
                      timings_ms=None, dicom={"study_instance_uid": ds.StudyInstanceUID,
                                              "sop_instance_uid": ds.SOPInstanceUID})
    item = pacs_item(cfg, src.read_bytes(), msg)
    assert item is not None and item.destinations == ("PACS@127.0.0.1:104",)
    assert json.loads(item.finding)["threshold"] == 0.3
    row = PacsRow(1, msg.event_id, "PACS@127.0.0.1:104", item.header, item.finding, 0)
    a, b = build(row), build(row)
    assert a.SOPInstanceUID == b.SOPInstanceUID == derived_uid(msg.event_id, "sr")
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert "PixelData" not in pydicom.dcmread(io.BytesIO(item.header))
    no_study = FlagMessage(**{**msg.__dict__, "dicom": None})
    assert pacs_item(cfg, src.read_bytes(), no_study) is None  # a JPEG, or DICOM without study identity: no SR


def test_with_send_heatmap_the_heat_map_follows_its_sr_as_a_secondary_capture(broker, dirs, daemons, orthanc,
                                                                              tmp_path):
    import numpy as np
    from PIL import Image
    from test_notification import PNEUMONIA, _three_tier_model

    watch, state = dirs
    orthanc.start()
    model = _three_tier_model(tmp_path)
    env = {**_env(orthanc), "PNEUMOFLAG_EXPLAIN_ENABLED": "true", "PNEUMOFLAG_PACS_SEND_HEATMAP": "true"}
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, model=model, env=env).start()
    with Image.open(PNEUMONIA[0]) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.uint8)
    src = make_radiograph(tmp_path / "urgent.dcm", pixels)
    drop(src, watch, "CR0001.dcm")
    (flag,) = sub.wait_flags(1, timeout=60)
    assert flag["priority"] != "routine", flag  # a heat map is made for flag and urgent images only
    sc_uid, sr_uid = derived_uid(flag["event_id"], "heatmap"), derived_uid(flag["event_id"], "sr")
    wait_until(lambda: sc_uid in _instances(orthanc), 120, f"the heat map in Orthanc\n{d.output()[-3000:]}")
    assert _srs_in_arrival_order(orthanc) == [sr_uid]
    order = [uid for uid in _arrivals(orthanc) if uid in (sr_uid, sc_uid)]
    assert order == [sr_uid, sc_uid]  # the SR first: it is the result, the map an aid
    f = tmp_path / "sc.dcm"
    f.write_bytes(_instances(orthanc)[sc_uid])
    sc = pydicom.dcmread(f)
    source = pydicom.dcmread(src, stop_before_pixels=True)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID and sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.pixel_array.ndim == 3 and sc.pixel_array.shape[2] == 3
    assert sc.ContributingEquipmentSequence[0].DeviceUID == device_uid(flag["model"]["sha256"])
    check = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
    assert [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")] == []
    wait_until(lambda: _outbox(state) == [], 10, "the outbox to empty")
    assert d.terminate() == 0
    sub.stop()


def _instances(orthanc: Orthanc) -> dict[str, bytes]:
    out = {}
    for oid in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{oid}/simplified-tags")
        out[tags["SOPInstanceUID"]] = orthanc.get(f"/instances/{oid}/file", raw=True)
    return out


def _arrivals(orthanc: Orthanc) -> list[str]:
    changes = sorted(orthanc.get("/changes?limit=1000")["Changes"], key=lambda c: c["Seq"])
    return [orthanc.get(f"/instances/{c['ID']}/simplified-tags")["SOPInstanceUID"] for c in changes
            if c["ChangeType"] == "NewInstance"]
