"""DICOM input: real radiographs written as DICOM files, read back through read_dicom()."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import MINI
from pneumoflag.device.dicom import DICOM_PREAMBLE_MAGIC, DicomInfo, is_dicom, read_dicom
from pneumoflag.device.preprocess import ImageDecodeError, PreprocessSpec, prepare

pydicom = pytest.importorskip("pydicom")
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import JPEGLSLossless, generate_uid  # noqa: E402

from dicom_helpers import write_test_dicom  # noqa: E402

SPEC = PreprocessSpec(64, 64, 1, contrast="equalize")
JPEG = sorted((MINI / "PNEUMONIA").glob("*.jpeg"))[0]

# 12-bit CR encoding of the 8-bit radiograph: stored = gray * 16 + 10 (<= 4090),
# physical value = stored * SLOPE + INTERCEPT.
BITS = 12
SLOPE, INTERCEPT = 0.5, -1024.0


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    with Image.open(JPEG) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def _stored(gray: np.ndarray) -> np.ndarray:
    return gray.astype(np.uint16) * 16 + 10


def _window(stored_lo: float, stored_hi: float) -> tuple[float, float]:
    """Window centre/width (physical units) covering the middle 90 % of a stored range."""
    lo, hi = stored_lo * SLOPE + INTERCEPT, stored_hi * SLOPE + INTERCEPT
    return (lo + hi) / 2, 0.9 * (hi - lo)


def _mono2(path: Path, gray: np.ndarray, **tags: Any) -> Path:
    s = _stored(gray)
    center, width = _window(s.min(), s.max())
    tags = {"BitsStored": BITS, "HighBit": BITS - 1, "RescaleSlope": SLOPE,
            "RescaleIntercept": INTERCEPT, "WindowCenter": center, "WindowWidth": width, **tags}
    return write_test_dicom(path, s, **tags)


def _mono1(path: Path, gray: np.ndarray) -> Path:
    """The same image as the MONOCHROME2 file, stored inverted with the window mirrored."""
    s2 = _stored(gray)
    s1 = (2**BITS - 1) - s2
    center2, width = _window(s2.min(), s2.max())
    # physical v1 = (4095 - s2) * SLOPE + INTERCEPT = 4095 * SLOPE + 2 * INTERCEPT - v2
    center1 = (2**BITS - 1) * SLOPE + 2 * INTERCEPT - center2
    return write_test_dicom(
        path, s1.astype(np.uint16), PhotometricInterpretation="MONOCHROME1", BitsStored=BITS,
        HighBit=BITS - 1, RescaleSlope=SLOPE, RescaleIntercept=INTERCEPT,
        WindowCenter=center1, WindowWidth=width,
    )


def _reason(source: Any, **kw: Any) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as ei:
        read_dicom(source, **kw)
    return ei.value


# --------------------------------------------------------------------------- pixels


def test_monochrome2_with_rescale_and_window_matches_source(tmp_path, gray):
    arr, info = read_dicom(_mono2(tmp_path / "m2.dcm", gray))
    assert arr.dtype == np.uint8 and arr.shape == gray.shape
    assert info.modality == "CR" and info.photometric == "MONOCHROME2"
    # The window clips 5 % of the range at each end: the 8-bit output spans 0..255 and stays
    # monotonic with the source grey levels.
    assert arr.min() == 0 and arr.max() == 255
    order = np.argsort(gray.ravel(), kind="stable")
    assert np.all(np.diff(arr.ravel()[order].astype(int)) >= 0)
    assert np.corrcoef(arr.ravel(), gray.ravel())[0, 1] > 0.99
    src = prepare(gray, SPEC).astype(int)
    got = prepare(arr, SPEC).astype(int)
    assert np.abs(got - src).mean() < 4


def test_monochrome1_is_inverted_to_match_monochrome2(tmp_path, gray):
    a2, _ = read_dicom(_mono2(tmp_path / "m2.dcm", gray))
    a1, info1 = read_dicom(_mono1(tmp_path / "m1.dcm", gray))
    assert info1.photometric == "MONOCHROME1"
    # The LINEAR window's half-unit offsets are not mirror-symmetric, so the 8-bit arrays
    # may differ by a level where a value sits on a rounding edge.
    assert np.abs(a1.astype(int) - a2.astype(int)).max() <= 1
    p2 = prepare(a2, SPEC).astype(int)
    p1 = prepare(a1, SPEC).astype(int)
    # Measured on this image: max abs diff 3 grey levels, mean 0.22 (equalisation turns
    # sub-level differences at bin edges into a few levels; without it max is 1).
    diff = np.abs(p1 - p2)
    assert diff.max() <= 4 and diff.mean() < 0.5
    # Without the inversion the two would be negatives of each other.
    flipped = prepare(255 - a1, SPEC).astype(int)
    assert np.abs(flipped - p2).mean() > 60


def test_no_window_maps_the_rescaled_values_linearly_to_8_bits(tmp_path, gray):
    path = _mono2(tmp_path / "nowin.dcm", gray, WindowCenter=None, WindowWidth=None)
    arr, _ = read_dicom(path)
    physical = _stored(gray) * SLOPE + INTERCEPT
    expected = np.round((physical - physical.min()) * 255.0 / (physical.max() - physical.min()))
    np.testing.assert_array_equal(arr, expected.astype(np.uint8))


def test_bytes_source_reads_like_path(tmp_path, gray):
    path = _mono2(tmp_path / "b.dcm", gray)
    a_path, i_path = read_dicom(path)
    a_bytes, i_bytes = read_dicom(path.read_bytes())
    np.testing.assert_array_equal(a_path, a_bytes)
    assert i_path == i_bytes


# --------------------------------------------------------------------------- refusals


def test_ct_modality_refused(tmp_path, gray):
    path = write_test_dicom(tmp_path / "ct.dcm", gray, Modality="CT")
    err = _reason(path)
    assert err.reason == "dicom-modality"
    assert str(err).startswith(str(path)) and "CT" in str(err) and "CR, DX" in str(err)
    # A caller may widen the accepted modalities.
    arr, info = read_dicom(path, accept_modalities=("CR", "DX", "CT"))
    assert info.modality == "CT" and arr.shape == gray.shape


def test_missing_modality_accepted(tmp_path, gray):
    arr, info = read_dicom(write_test_dicom(tmp_path / "nomod.dcm", gray, Modality=None))
    assert info.modality is None and arr.shape == gray.shape


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_body_part(tmp_path, gray):
    err = _reason(write_test_dicom(tmp_path / "abd.dcm", gray, BodyPartExamined="ABDOMEN"))
    assert err.reason == "dicom-body-part" and "ABDOMEN" in str(err)
    _, info = read_dicom(write_test_dicom(tmp_path / "lc.dcm", gray, BodyPartExamined="chest "))
    assert info.body_part == "chest"
    _, info = read_dicom(write_test_dicom(tmp_path / "none.dcm", gray, BodyPartExamined=None))
    assert info.body_part is None


def test_no_pixel_data(tmp_path):
    path = write_test_dicom(tmp_path / "nopix.dcm", None, Rows=224, Columns=224)
    err = _reason(path)
    assert err.reason == "dicom-no-pixels" and str(err).startswith(str(path))


def test_garbage_after_magic_is_invalid(tmp_path):
    junk = b"\0" * 128 + DICOM_PREAMBLE_MAGIC + bytes(range(256)) * 4
    path = tmp_path / "junk.dcm"
    path.write_bytes(junk)
    err = _reason(path)
    assert err.reason == "dicom-invalid"
    assert str(err).startswith(f"{path}: not a readable DICOM file")
    err = _reason(junk)
    assert err.reason == "dicom-invalid" and str(err).startswith("<bytes>: ")


def test_truncated_file_is_invalid(tmp_path, gray):
    data = _mono2(tmp_path / "full.dcm", gray).read_bytes()
    assert _reason(data[: len(data) // 2]).reason == "dicom-invalid"


def test_header_size_checked_before_decoding(tmp_path, gray):
    path = write_test_dicom(tmp_path / "small.dcm", gray)
    err = _reason(path, max_pixels=224 * 224 - 1)
    assert err.reason == "decompression-bomb" and "50,176" in str(err)
    read_dicom(path, max_pixels=224 * 224)  # exactly at the limit passes
    # A header claiming 65535 x 65535 over a few bytes: refused on the header alone,
    # where decoding first would fail differently (pixel data length mismatch).
    bomb = write_test_dicom(tmp_path / "bomb.dcm", gray[:4, :4], Rows=65535, Columns=65535)
    assert _reason(bomb).reason == "decompression-bomb"


def test_multiframe_and_colour_unsupported(tmp_path, gray):
    two = write_test_dicom(tmp_path / "mf.dcm", gray, NumberOfFrames="2",
                           PixelData=gray.tobytes() * 2)
    err = _reason(two)
    assert err.reason == "dicom-unsupported" and "multi-frame" in str(err)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    colour = write_test_dicom(tmp_path / "rgb.dcm", gray, SamplesPerPixel=3,
                              PhotometricInterpretation="RGB", PlanarConfiguration=0,
                              PixelData=rgb.tobytes())
    err = _reason(colour)
    assert err.reason == "dicom-unsupported" and "colour" in str(err)


def test_compressed_without_decoder_unsupported(tmp_path, gray):
    """A compressed transfer syntax no installed decoder reads is ``dicom-unsupported``, named."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

    missing = [(uid, name) for uid, name in ((JPEGLosslessSV1, "JPEG Lossless"), (JPEGLSLossless, "JPEG-LS"),
                                            (JPEG2000Lossless, "JPEG 2000")) if not get_decoder(uid).is_available]
    if not missing:
        pytest.skip("every compressed syntax tried here has a decoder installed")
    uid, name = missing[0]
    path = write_test_dicom(tmp_path / "c.dcm", gray, TransferSyntaxUID=uid,
                            PixelData=encapsulate([b"\xff\xd8\xff\xc3not really compressed"]))
    err = _reason(path)
    assert err.reason == "dicom-unsupported" and name.split()[0] in str(err), str(err)


def test_pydicom_missing(monkeypatch, tmp_path, gray):
    path = write_test_dicom(tmp_path / "ok.dcm", gray)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    err = _reason(path)
    assert err.reason == "dicom-unavailable" and "pip install 'pneumoflag[dicom]'" in str(err)


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "absent.dcm").reason == "not-found"


# --------------------------------------------------------------------------- ids


def test_ids_carried(tmp_path, gray):
    study, sop = generate_uid(), generate_uid()
    path = write_test_dicom(tmp_path / "ids.dcm", gray, StudyInstanceUID=study,
                            SOPInstanceUID=sop, AccessionNumber="A-12345")
    _, info = read_dicom(path)
    assert info.ids() == {"study_instance_uid": study, "sop_instance_uid": sop,
                          "accession_number": "A-12345"}


def test_empty_accession_is_none(tmp_path, gray):
    _, info = read_dicom(write_test_dicom(tmp_path / "acc.dcm", gray, AccessionNumber=""))
    assert info.accession_number is None and "accession_number" not in info.ids()


def test_patient_identifiers_only_on_request(tmp_path, gray):
    path = write_test_dicom(tmp_path / "pat.dcm", gray)
    _, info = read_dicom(path)
    assert info.patient_name is None and info.patient_id is None
    assert "patient_name" not in info.ids() and "patient_id" not in info.ids()
    _, info = read_dicom(path, include_patient_identifiers=True)
    assert info.ids()["patient_name"] == "Doe^Jane" and info.ids()["patient_id"] == "PID-42"


def test_dicominfo_ids_omits_none():
    info = DicomInfo("1.2", None, None, "CR", None, None, patient_id="P")
    assert info.ids() == {"study_instance_uid": "1.2", "patient_id": "P"}


def test_is_dicom(tmp_path, gray):
    head = write_test_dicom(tmp_path / "x.dcm", gray).read_bytes()[:132]
    assert is_dicom(head)
    assert not is_dicom(JPEG.read_bytes()[:132])
    assert not is_dicom(b"\0" * 128 + b"DIC")  # too short
    assert not is_dicom(b"DICM" + b"\0" * 128)  # magic at the wrong offset
