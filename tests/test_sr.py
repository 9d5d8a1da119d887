"""The result as a TID 1500 structured report: parsed by dcmtk's dsrdump, checked by dicom3tools' dciodvfy."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from dicom_helpers import CR, DX_PRESENTATION, make_radiograph, require_tools, sample_pixels  # noqa: E402
from pneumoflag.device.card import Thresholds  # noqa: E402
from pneumoflag.device.sr import (  # noqa: E402
    DISCLAIMER, ModelIdentity, StudyFinding, build_heatmap_sc, build_sr, device_uid,
)
from pneumoflag.device.vocab import Priority  # noqa: E402

MODEL = ModelIdentity("pneumoflag-rn128", "3.0.0", "3f" * 32)
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: what dciodvfy may still say about an SR of ours, and why each is fine
ALLOWED_WARNINGS = (
    # our private coding scheme (the tiers, "not suspected"): declared in the Coding Scheme Identification
    # Sequence, which dciodvfy does not consult
    re.compile(r"Unrecognized defined term <99PNEUMOFLAG> for value 1 of attribute <Coding Scheme Designator>"),
    # Device UID in the Contributing Equipment Sequence, as IHE AI Results asks; this dciodvfy's tables predate
    # it, hence also "Standard Extended SOP Class"
    re.compile(r"Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID"),
    re.compile(r"Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard Extended"),
)


@pytest.fixture(autouse=True)
def _tools():
    require_tools("dsrdump", "dciodvfy")


def study(tmp_path: Path, n: int = 2) -> list:
    """``n`` images of one study (a PA and an AP), as read back from their files."""
    uid = pydicom.uid.generate_uid()
    tmp_path.mkdir(parents=True, exist_ok=True)
    classes = [CR, DX_PRESENTATION]
    return [pydicom.dcmread(make_radiograph(tmp_path / f"img{i}.dcm", sample_pixels(i), sop_class=classes[i % 2],
                                            StudyInstanceUID=uid, ViewPosition=("PA", "AP")[i % 2]))
            for i in range(n)]


URGENT = StudyFinding(0.9921, Priority.URGENT, 0.8109)


def sample_sr(tmp_path: Path, finding: StudyFinding = URGENT):
    """An urgent two-image study's SR (test_dicom_net and test_pacs send it)."""
    return build_sr(study(tmp_path), finding, MODEL)


def _content(ds) -> list:
    """Every content item of the tree, depth first."""
    out = []
    for item in getattr(ds, "ContentSequence", []):
        out.append(item)
        out.extend(_content(item))
    return out


def _named(ds, meaning: str) -> list:
    return [i for i in _content(ds) if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def test_dsrdump_shows_the_finding_the_model_and_the_notice(tmp_path):
    f = tmp_path / "sr.dcm"
    sample_sr(tmp_path).save_as(f, enforce_file_format=True)
    out = subprocess.run(["dsrdump", "-Ee", "+Pl", str(f)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Comprehensive 3D SR" in text and '"Imaging Measurement Report"' in text
    assert '(233604007,SCT,"Pneumonia")' in text and '(415684004,SCT,"Suspected")' in text
    assert '"Probability")="0.9921"' in text and '"Threshold Value")="0.8109"' in text
    assert '(URGENT,99PNEUMOFLAG,"Urgent")' in text
    assert '"Algorithm Name")="pneumoflag-rn128"' in text and '"Algorithm Version")="3.0.0"' in text
    assert f'"Device Observer UID")="{MODEL.device_uid}"' in text
    assert DISCLAIMER in text
    assert text.count("Source of Measurement") == 2


@pytest.mark.parametrize("finding", [StudyFinding(0.9921, Priority.URGENT, 0.8109),
                                     StudyFinding(0.05, Priority.ROUTINE, 0.1347)], ids=["urgent", "routine"])
def test_dciodvfy_finds_no_error(tmp_path, finding):
    f = tmp_path / "sr.dcm"
    build_sr(study(tmp_path), finding, MODEL).save_as(f, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    assert "Comprehensive3DSR" in lines, lines  # it checked the SR IOD, not something else
    assert [ln for ln in lines if ln.startswith("Error")] == []
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    unexplained = [w for w in warnings if not any(a.search(w) for a in ALLOWED_WARNINGS)]
    assert unexplained == []


def test_references_identity_and_finding_read_back(tmp_path):
    images = study(tmp_path)
    f = tmp_path / "sr.dcm"
    build_sr(images, StudyFinding(0.05, Priority.ROUTINE, 0.1347), MODEL).save_as(f, enforce_file_format=True)
    sr = pydicom.dcmread(f)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    for kw in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
               "StudyID", "StudyDate"):
        assert getattr(sr, kw) == getattr(images[0], kw), kw
    assert sr.SeriesInstanceUID not in {i.SeriesInstanceUID for i in images}
    assert sr.SOPInstanceUID not in {i.SOPInstanceUID for i in images}
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    refs = {(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID)
            for series in evidence.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert refs == {(i.SOPClassUID, i.SOPInstanceUID) for i in images}
    sources = {(i.ReferencedSOPSequence[0].ReferencedSOPClassUID, i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
               for i in _named(sr, "Source of Measurement")}
    assert sources == refs
    (value,) = [i.ConceptCodeSequence[0] for i in _named(sr, "Pneumonia")]
    assert (value.CodeValue, value.CodeMeaning) == ("NOT-SUSPECTED", "Not suspected")  # never "Absent"
    (tier,) = [i.ConceptCodeSequence[0].CodeValue for i in _named(sr, "Priority")]
    assert tier == "ROUTINE"
    (p,) = [float(i.MeasuredValueSequence[0].NumericValue) for i in _named(sr, "Probability")]
    assert p == pytest.approx(0.05)
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "pneumoflag"]
    assert (equipment.ManufacturerModelName, equipment.SoftwareVersions, equipment.DeviceUID) == (
        "pneumoflag-rn128", "3.0.0", MODEL.device_uid)
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert DISCLAIMER in sr.SeriesDescription
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"


def test_device_uid_follows_the_model_sha256():
    a, b = device_uid("3f" * 32), device_uid("3f" * 31 + "40")
    assert a == device_uid(("3F" * 32)) == ModelIdentity("other-name", "9", "3f" * 32).device_uid  # same model
    assert a != b  # a retrained model is a new device
    for uid in (a, b):
        assert uid.startswith("2.25.") and len(uid) <= 64 and re.fullmatch(r"2\.25\.[1-9][0-9]*", uid)
    with pytest.raises(ValueError, match="64 hex"):
        device_uid("abc")


def test_each_sr_is_a_new_instance_and_can_join_a_series(tmp_path):
    images = study(tmp_path)
    finding = StudyFinding(0.5, Priority.FLAG, 0.1347)
    first = build_sr(images, finding, MODEL)
    second = build_sr(images, finding, MODEL, series_instance_uid=first.SeriesInstanceUID, instance_number=2)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert (second.SeriesInstanceUID, second.InstanceNumber) == (first.SeriesInstanceUID, 2)


def test_images_of_two_studies_or_none_are_refused(tmp_path):
    a, b = study(tmp_path / "a", 1), study(tmp_path / "b", 1)
    finding = StudyFinding(0.5, Priority.FLAG, 0.1347)
    with pytest.raises(ValueError, match="one valid StudyInstanceUID"):
        build_sr(a + b, finding, MODEL)
    with pytest.raises(ValueError, match="at least one"):
        build_sr([], finding, MODEL)


@pytest.mark.parametrize("p, tier, threshold", [(0.9, Priority.URGENT, 0.8), (0.5, Priority.FLAG, 0.1347),
                                                (0.1, Priority.ROUTINE, 0.1347)])
def test_the_finding_follows_the_card(p, tier, threshold):
    f = StudyFinding.from_thresholds(p, Thresholds(flag=0.1347, urgent=0.8))
    assert (f.priority, f.threshold, f.suspected) == (tier, threshold, tier is not Priority.ROUTINE)
    with pytest.raises(ValueError, match="does not follow"):
        StudyFinding(p, Priority.ROUTINE if tier is not Priority.ROUTINE else Priority.FLAG, threshold)


def test_the_heat_map_is_a_secondary_capture_of_the_study(tmp_path):
    (image,) = study(tmp_path, 1)
    overlay = np.zeros((64, 80, 3), np.uint8)
    overlay[..., 0] = np.arange(80, dtype=np.uint8)
    f = tmp_path / "sc.dcm"
    build_heatmap_sc(image, overlay, MODEL).save_as(f, enforce_file_format=True)
    sc = pydicom.dcmread(f)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID == image.StudyInstanceUID
    assert sc.PatientID == image.PatientID and sc.SeriesInstanceUID != image.SeriesInstanceUID
    assert (sc.pixel_array == overlay).all()
    assert sc.ContributingEquipmentSequence[0].DeviceUID == MODEL.device_uid
    out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
    assert [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")] == []
