"""DICOM files made from the bundled sample radiographs, in the transfer syntaxes modalities send.

The encoders are real: dcmtk's dcmconv/dcmcjpeg/dcmcjpls/dcmcrle, and Pillow's OpenJPEG for JPEG 2000 (dcmtk
has no free JPEG 2000 codec). Also the peers' command-line tools the DICOM tests drive.
"""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoflag.device.samples import SAMPLES_DIR

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SAMPLES = sorted(SAMPLES_DIR.rglob("*.jpeg"))

IMPLICIT, EXPLICIT, DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"
JPEG_BASELINE, JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS, J2K_LOSSLESS, RLE = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"
#: the syntaxes the tests make, and how: a dcmtk command (input, output appended) or "j2k"
ENCODERS: dict[str, Sequence[str]] = {
    IMPLICIT: ("dcmconv", "+ti"),
    EXPLICIT: ("dcmconv", "+te"),
    DEFLATED: ("dcmconv", "+td"),
    JPEG_BASELINE: ("dcmcjpeg", "+eb"),
    JPEG_LOSSLESS_SV1: ("dcmcjpeg", "+e1"),
    JPEG_LS_LOSSLESS: ("dcmcjpls", "+el"),
    RLE: ("dcmcrle",),
    J2K_LOSSLESS: ("j2k",),
}
LOSSY = {JPEG_BASELINE}
#: storescu's option that proposes the syntax (it proposes only uncompressed ones by default)
PROPOSE = {IMPLICIT: "-xi", EXPLICIT: "-xe", DEFLATED: "-xd", JPEG_BASELINE: "-xy", JPEG_LOSSLESS_SV1: "-xs",
           JPEG_LS_LOSSLESS: "-xt", RLE: "-xr", J2K_LOSSLESS: "-xv"}


def sample_pixels(index: int = 0, side: int = 384) -> np.ndarray:
    """A sample radiograph as 8-bit greyscale, its longer side ``side`` px (small: the tests send many)."""
    with Image.open(SAMPLES[index % len(SAMPLES)]) as img:
        g = img.convert("L")
        g.thumbnail((side, side))
        return np.asarray(g, dtype=np.uint8)


def write_test_dicom(path: Path, pixels: Optional[np.ndarray], sop_class: str = CR, **tags: Any) -> Path:
    """Write a Part 10 chest radiograph of ``sop_class`` with ``pixels`` (uint8/uint16, 2-D) to ``path``.

    Keyword arguments set DICOM tags by keyword and override the defaults; a value of
    ``None`` removes the tag. ``pixels=None`` writes no PixelData (give Rows/Columns in
    ``tags`` if wanted). ``TransferSyntaxUID`` goes to the file meta.
    """
    path = Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = tags.pop("TransferSyntaxUID", ExplicitVRLittleEndian)
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-42"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if pixels is not None:
        a = np.ascontiguousarray(pixels)
        assert a.ndim == 2 and a.dtype in (np.uint8, np.uint16), (a.shape, a.dtype)
        ds.Rows, ds.Columns = a.shape
        ds.BitsAllocated = ds.BitsStored = a.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    else:
        meta.MediaStorageSOPInstanceUID = generate_uid()
    if meta.TransferSyntaxUID.is_encapsulated and "PixelData" in ds:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def make_radiograph(path: Path, pixels: Optional[np.ndarray] = None, sop_class: str = CR, **tags: Any) -> Path:
    """A sample radiograph as a complete explicit little endian study image (the identity a modality sends);
    ``tags`` override by keyword (None removes)."""
    study = {"Modality": "CT" if sop_class == CT else ("DX" if sop_class != CR else "CR"), "ViewPosition": "PA",
             "PatientBirthDate": "19700101", "PatientSex": "F", "StudyID": "S1", "StudyDate": "20261125",
             "StudyTime": "140309", "ReferringPhysicianName": "", "SeriesNumber": 1, "InstanceNumber": 1}
    return write_test_dicom(path, sample_pixels() if pixels is None else pixels, sop_class, **{**study, **tags})


def encode(src: Path, dst: Path, syntax: str) -> Path:
    """``src`` (explicit little endian) re-encoded in ``syntax`` by a real encoder."""
    cmd = ENCODERS[syntax]
    if cmd[0] == "j2k":
        return _j2k(src, dst)
    out = subprocess.run([*cmd, str(src), str(dst)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr}"
    return dst


def _j2k(src: Path, dst: Path) -> Path:
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(src)
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array).save(buf, format="JPEG2000", irreversible=False)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = J2K_LOSSLESS
    ds.save_as(dst, enforce_file_format=True)
    return dst


def require_tools(*names: str) -> None:
    """The peers are the point of these tests: a missing one is a failure that says what to install."""
    missing = [n for n in names if shutil.which(n) is None]
    assert not missing, f"missing {', '.join(missing)}: apt-get install dcmtk orthanc dicom3tools (.ci/run does)"


def storescu(host: str, port: int, files: Sequence[Path], calling: str = "CR_ROOM2", called: str = "PNEUMOFLAG",
             *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """dcmtk's storescu, verbose (its log names each response status)."""
    return subprocess.run(["storescu", "-v", "-aet", calling, "-aec", called, "-to", "10", "-ta", "10", "-td", "10",
                           *extra, host, str(port), *map(str, files)], capture_output=True, text=True,
                          timeout=timeout)
