"""DICOM input: a radiograph file -> a 2-D grayscale array plus the ids to report.

Hospitals send chest X-rays as DICOM, not JPEG. This module turns one such file
into the 2-D array that :func:`pneumoflag.device.preprocess.prepare` takes, with
the display pipeline a radiologist's viewer applies (modality LUT, then VOI LUT
or window, then MONOCHROME1 inversion), so the model sees bone as bright
whatever the scanner stored. It also refuses, with a stable ``reason`` code,
what the model was never trained on (CT, abdomen, colour, cine loops) and what
could exhaust the appliance (header sizes over ``max_pixels``), before any
pixel data is decoded.

pydicom is an optional dependency (``pip install 'pneumoflag[dicom]'``) and is
imported only when a DICOM file arrives.
"""
from __future__ import annotations

import io
import logging
import re
import warnings
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .config import DicomConfig
from .contract import DICOM_IDS
from .preprocess import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, ImageDecodeError, apply_lut, too_large
from .vocab import Reason

log = logging.getLogger(__name__)

#: Part 10 files carry these 4 bytes after a 128-byte preamble.
DICOM_PREAMBLE_MAGIC = b"DICM"
_MAGIC_OFFSET = 128

DicomSource = Union[Path, str, bytes]

#: SOP classes that hold a projection radiograph (or a capture of one); anything else
#: (MR, CT, ultrasound...) is refused even when Modality/BodyPart were relabelled.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
}
#: The storage SOP classes the C-STORE receiver takes (device/dicom_net.py): projection radiographs as modalities
#: send them; a secondary capture is a screenshot of one, which a modality does not send.
RADIOGRAPH_STORAGE = tuple(RADIOGRAPH_SOP_CLASSES)[:3]
#: a DICOM UID (PS3.5 9.1): dot-separated numbers without leading zeros, at most 64 characters; also what keeps a
#: UID safe as a file name
UID_PATTERN = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")
#: Acquisition tags only an MR scanner writes.
MR_TAGS = ("EchoTime", "RepetitionTime", "MagneticFieldStrength", "ScanningSequence", "ImagingFrequency")


def is_uid(value: object) -> bool:
    """True for a well-formed DICOM UID of at most 64 characters (and so a safe file name)."""
    return isinstance(value, str) and len(value) <= 64 and UID_PATTERN.fullmatch(value) is not None


def is_dicom(head: bytes) -> bool:
    """True when ``head`` (the first >= 132 bytes of a file) is a DICOM Part 10 file."""
    return bytes(head[_MAGIC_OFFSET:_MAGIC_OFFSET + 4]) == DICOM_PREAMBLE_MAGIC


@dataclass
class DicomInfo:
    """What the daemon reports about a DICOM image; patient identifiers only on request."""

    study_instance_uid: Optional[str]
    sop_instance_uid: Optional[str]
    accession_number: Optional[str]
    modality: Optional[str]
    body_part: Optional[str]
    photometric: Optional[str]
    patient_name: Optional[str] = None  # only filled when include_patient_identifiers
    patient_id: Optional[str] = None  # only filled when include_patient_identifiers
    acquired_at: Optional[datetime] = None  # AcquisitionDateTime, or Acquisition/Content date and time
    manufacturer: Optional[str] = None  # Manufacturer and ManufacturerModelName: the drift monitor's equipment
    model_name: Optional[str] = None

    def ids(self) -> dict[str, str]:
        """The identifiers that go into a result message (None values left out)."""
        return {k: v for k in DICOM_IDS if (v := getattr(self, k)) is not None}


def _text(ds: Any, keyword: str) -> Optional[str]:
    """A tag's value as a stripped string; missing or empty -> None."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value must not hide the image
        log.debug("cannot read DICOM tag %s", keyword, exc_info=True)
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def acquisition_time(ds: Any) -> Optional[datetime]:
    """When the image was taken: AcquisitionDateTime, else Acquisition or Content date + time.

    DICOM times are local to the modality unless TimezoneOffsetFromUTC says
    otherwise; without it the appliance's own zone is assumed (it sits beside
    the scanner).
    """
    text = _text(ds, "AcquisitionDateTime")
    if not text:
        for d, t in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
            date, time_ = _text(ds, d), _text(ds, t)
            if date:
                text = date + (time_ or "")
                break
    if not text:
        return None
    zone = None
    for sign in "+-":
        if sign in text[8:]:
            text, zone = text[: text.index(sign, 8)], text[text.index(sign, 8):]
    main, _, frac = text.strip().partition(".")
    if len(main) < 8 or not main.isdigit():
        return None
    try:
        when = datetime.strptime(main[:14].ljust(14, "0"), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    if frac.isdigit():
        when += timedelta(microseconds=int((frac + "000000")[:6]))
    offset = zone or _text(ds, "TimezoneOffsetFromUTC")
    if offset and len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        sign = 1 if offset[0] == "+" else -1
        return when.replace(tzinfo=timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))))
    return when.astimezone()  # naive = local time of this machine


def _int(ds: Any, keyword: str, default: Optional[int]) -> Optional[int]:
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return default


DEFLATED = "1.2.840.10008.1.2.1.99"


def _meta_end(data: bytes) -> Optional[int]:
    """Where the file meta group ends (after its mandatory group length element), if it says."""
    if len(data) < 144 or data[132:134] != b"\x02\x00" or data[134:136] != b"\x00\x00":
        return None
    return 144 + int.from_bytes(data[140:144], "little")


def _check_inflated_size(data: bytes, name: str, max_bytes: int) -> None:
    """A deflated dataset is inflated whole by the reader: measure it first, in bounded steps."""
    end = _meta_end(data)
    if end is None or DEFLATED.encode() not in data[:end]:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, pos = 0, end
    try:
        while pos < len(data) or inflater.unconsumed_tail:
            chunk = inflater.unconsumed_tail or data[pos : pos + 65536]
            if not inflater.unconsumed_tail:
                pos += 65536
            size += len(inflater.decompress(chunk, 1 << 20))
            if size > max_bytes:
                raise ImageDecodeError(Reason.TOO_LARGE, f"{name}: a deflated DICOM dataset that inflates to more "
                                       f"than {max_bytes / 2**20:.0f} MiB (watch.max_decode_mb)")
            if inflater.eof:
                break
    except zlib.error as exc:
        raise ImageDecodeError(Reason.DICOM_INVALID, f"{name}: deflated data is corrupt ({exc})") from None


def _parse(source: DicomSource, name: str, pydicom: Any, max_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> Any:
    """Read the whole dataset; anything pydicom cannot make sense of is dicom-invalid."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError(Reason.EMPTY_FILE, f"{name}: empty input (0 bytes)")
        _check_inflated_size(source, name, max_bytes)
        fp: Any = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            if path.stat().st_size == 0:
                raise ImageDecodeError(Reason.EMPTY_FILE, f"{name}: empty file (0 bytes)")
        except FileNotFoundError:
            raise ImageDecodeError(Reason.NOT_FOUND, f"{name}: no such file") from None
        except PermissionError:
            raise ImageDecodeError(Reason.PERMISSION_DENIED, f"{name}: permission denied") from None
        fp = path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(fp)
        except PermissionError:
            raise ImageDecodeError(Reason.PERMISSION_DENIED, f"{name}: permission denied") from None
        except Exception as exc:  # noqa: BLE001 - InvalidDicomError, EOFError, struct.error, ...
            raise ImageDecodeError(Reason.DICOM_INVALID, f"{name}: not a readable DICOM file ({exc})"
            ) from None
    for w in caught:
        log.debug("%s: pydicom: %s", name, w.message)
    # pydicom parses random bytes after "DICM" into junk elements without
    # complaint; a real Part 10 file always names its transfer syntax.
    meta = getattr(ds, "file_meta", None)
    if meta is None or not _text(meta, "TransferSyntaxUID"):
        raise ImageDecodeError(Reason.DICOM_INVALID,
            f"{name}: not a readable DICOM file (no file meta information / transfer syntax)",
        )
    return ds


def _check_decodable(ds: Any, name: str) -> None:
    """Refuse compressed data that no installed pydicom plugin can decode."""
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.TransferSyntaxUID
    label = f"{getattr(tsyntax, 'name', tsyntax)} ({tsyntax})"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageDecodeError(Reason.DICOM_UNSUPPORTED, f"{name}: transfer syntax {label} is not supported"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no decoder plugin"
        raise ImageDecodeError(Reason.DICOM_UNSUPPORTED,
            f"{name}: cannot decompress transfer syntax {label} (needs one of: {missing})",
        )


def _require(value: Optional[str], accepted: Sequence[str], reason: str, message: str) -> None:
    """A tag that is present must be one of ``accepted`` (case-insensitive); absent passes."""
    if value is not None and value.strip().upper() not in {a.strip().upper() for a in accepted}:
        raise ImageDecodeError(reason, f"{message} (accepted: {', '.join(accepted)})")


def read_dicom(
    source: DicomSource,
    *,
    include_patient_identifiers: bool = DicomConfig().include_patient_identifiers,
    accept_modalities: Sequence[str] = tuple(DicomConfig().accept_modalities),
    accept_body_parts: Sequence[str] = tuple(DicomConfig().accept_body_parts),
    accept_views: Sequence[str] = tuple(DicomConfig().accept_views),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: Optional[str] = None,
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> tuple[np.ndarray, DicomInfo]:
    """DICOM file (path or bytes) -> (uint8 2-D display-ready array, DicomInfo).

    Raises :class:`ImageDecodeError` with a stable ``reason`` for refused input;
    ``name`` labels errors when ``source`` is bytes already read from a file.
    """
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    ds = _parse(source, name, _import_pydicom(name), max_bytes)
    info = _header_info(ds, include_patient_identifiers)
    try:
        # Refuse what the model was not trained on, cheapest checks first.
        _require(info.modality, accept_modalities, Reason.DICOM_MODALITY,
                 f"{name}: modality {info.modality} is not a radiograph")
        _require(info.body_part, accept_body_parts, Reason.DICOM_BODY_PART,
                 f"{name}: body part {info.body_part} is not accepted")
        _plausible_radiograph(ds, accept_views, name)
        frames = _check_single_grey_frame(ds, info.photometric, name)
        rows, cols, bits = _check_raster_size(ds, frames, name, max_pixels, max_bytes)
        _check_decodable(ds, name)
        _check_pixel_data_size(ds, rows, cols, bits, name, max_bytes)
        out = _decode_display(ds, info.photometric, name)
    except ImageDecodeError as exc:  # its study names it as a refused view
        exc.ids = info.ids()
        raise
    log.debug("%s: DICOM %s %s %dx%d %s", name, info.modality, info.body_part, cols, rows, info.photometric)
    return out, info


def _import_pydicom(name: str) -> Any:
    """pydicom is an optional extra: its absence is a refusal of this file, not a crash of the daemon."""
    try:
        import pydicom
        import pydicom.pixels  # the decoders and LUT functions _display_uint8 uses
    except ImportError:
        raise ImageDecodeError(Reason.DICOM_UNAVAILABLE,
            f"{name}: DICOM support needs pydicom: pip install 'pneumoflag[dicom]'",
        ) from None
    return pydicom


def _header_info(ds: Any, include_patient_identifiers: bool) -> DicomInfo:
    """The study's identifiers and what it shows; patient identifiers only when asked for."""
    info = DicomInfo(
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        accession_number=_text(ds, "AccessionNumber"),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        photometric=_text(ds, "PhotometricInterpretation"),
        manufacturer=_text(ds, "Manufacturer"),
        model_name=_text(ds, "ManufacturerModelName"),
    )
    if include_patient_identifiers:
        info.patient_name = _text(ds, "PatientName")
        info.patient_id = _text(ds, "PatientID")
    info.acquired_at = acquisition_time(ds)
    return info


def _check_single_grey_frame(ds: Any, photometric: Optional[str], name: str) -> int:
    """Pixel data of one greyscale frame, the only kind the model reads; returns the frame count (1)."""
    if "PixelData" not in ds:
        raise ImageDecodeError(Reason.DICOM_NO_PIXELS, f"{name}: DICOM file has no pixel data")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise ImageDecodeError(Reason.DICOM_UNSUPPORTED, f"{name}: multi-frame image ({frames} frames) is not supported"
        )
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise ImageDecodeError(Reason.DICOM_UNSUPPORTED,
            f"{name}: colour image ({samples} samples per pixel) is not supported",
        )
    if photometric not in (None, "MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(Reason.DICOM_UNSUPPORTED,
            f"{name}: photometric interpretation {photometric} is not supported "
            "(only MONOCHROME1/2)",
        )
    return frames


def _check_raster_size(ds: Any, frames: int, name: str, max_pixels: int, max_bytes: int) -> tuple[int, int, int]:
    """The header's size, checked before any decompression allocates it: (rows, cols, bits allocated)."""
    rows, cols = _int(ds, "Rows", None), _int(ds, "Columns", None)
    if rows is None or cols is None or rows < 1 or cols < 1:
        raise ImageDecodeError(Reason.DICOM_INVALID, f"{name}: not a readable DICOM file (missing or bad Rows/Columns)"
        )
    if rows * cols > max_pixels:
        raise ImageDecodeError(Reason.DECOMPRESSION_BOMB,
            f"{name}: {cols}x{rows} = {rows * cols:,} pixels exceeds the limit of "
            f"{max_pixels:,} (possible decompression bomb)",
        )
    bits = _int(ds, "BitsAllocated", 16) or 16
    if bits > 16:
        raise ImageDecodeError(Reason.DICOM_UNSUPPORTED,
                               f"{name}: {bits}-bit pixel data: a radiograph has at most 16 bits a pixel")
    # decompression may hold the raster twice; then the 8-bit image
    need = rows * cols * frames * (-(-bits // 8)) * 2 + rows * cols
    if need > max_bytes:
        raise too_large(name, f"{cols}x{rows} {bits}-bit DICOM", need, max_bytes)
    return rows, cols, bits


def _decode_display(ds: Any, photometric: Optional[str], name: str) -> np.ndarray:
    """Decode the checked pixel data to the 8-bit display image; pydicom's warnings go to the debug log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            arr = ds.pixel_array
        except (NotImplementedError, RuntimeError) as exc:  # no usable decoder after all
            raise ImageDecodeError(Reason.DICOM_UNSUPPORTED, f"{name}: cannot decode pixel data ({exc})"
            ) from None
        except Exception as exc:  # noqa: BLE001 - truncated data, inconsistent header, corrupt stream
            raise ImageDecodeError(Reason.DICOM_INVALID, f"{name}: not a readable DICOM file ({exc})"
            ) from None
        if arr.ndim != 2:
            raise ImageDecodeError(Reason.DICOM_UNSUPPORTED, f"{name}: pixel array of shape {arr.shape} is not 2-D"
            )
        out = _display_uint8(arr, ds, photometric == "MONOCHROME1", name)
    for w in caught:
        log.debug("%s: pydicom: %s", name, w.message)
    return out


def _plausible_radiograph(ds: Any, accept_views: Sequence[str], name: str) -> None:
    """Tags that no frontal chest radiograph carries, whatever Modality and BodyPart say."""
    sop = _text(ds, "SOPClassUID")
    if sop and sop not in RADIOGRAPH_SOP_CLASSES:
        label = getattr(getattr(ds, "SOPClassUID", None), "name", sop)
        raise ImageDecodeError(Reason.NOT_A_RADIOGRAPH,
                               f"{name}: SOP class {label} is not a radiograph (whatever its Modality tag says)")
    mr = [t for t in MR_TAGS if _text(ds, t)]
    if mr:
        raise ImageDecodeError(Reason.NOT_A_RADIOGRAPH,
                               f"{name}: carries MR acquisition tags ({', '.join(mr)}): not a radiograph")
    view = _text(ds, "ViewPosition")
    if view and accept_views:
        _require(view, accept_views, Reason.NOT_A_RADIOGRAPH,
                 f"{name}: view {view} is not a frontal chest radiograph the model reads")


def _check_pixel_data_size(ds: Any, rows: int, cols: int, bits: int, name: str, max_bytes: int) -> None:
    """The pixel data must be what the header describes, before a decoder trusts either.

    Native data longer than Rows x Columns makes a decoder read extra frames;
    a compressed frame can hold a far larger image than the header says.
    """
    data = ds.PixelData
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = (rows * cols * bits + 7) // 8
        if len(data) > expected + 1:  # one byte of padding to an even length
            raise ImageDecodeError(Reason.DICOM_INVALID, f"{name}: the pixel data holds {len(data):,} bytes, but "
                                   f"the header describes {expected:,} ({cols}x{rows}, {bits} bits)")
        return
    try:
        from pydicom.encaps import generate_frames

        first = next(generate_frames(data, number_of_frames=1))
    except Exception as exc:  # noqa: BLE001 - a malformed encapsulation, whatever pydicom calls it
        raise ImageDecodeError(Reason.DICOM_INVALID, f"{name}: encapsulated pixel data is malformed ({exc})") from None
    size = frame_size(first)
    if size is None:
        return
    w, h = size
    if (w, h) != (cols, rows):
        raise ImageDecodeError(Reason.DICOM_INVALID, f"{name}: the compressed frame is {w}x{h}, but the header "
                               f"says {cols}x{rows}")


def frame_size(frame: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a JPEG, JPEG-LS or JPEG 2000 codestream's own header, when it has one."""
    if frame[:2] == b"\xff\xd8":  # JPEG / JPEG-LS: the first SOF marker
        i = 2
        while i + 9 < len(frame):
            if frame[i] != 0xFF:
                return None
            marker = frame[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = int.from_bytes(frame[i + 2 : i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xF7:
                return int.from_bytes(frame[i + 7 : i + 9], "big"), int.from_bytes(frame[i + 5 : i + 7], "big")
            i += 2 + length
        return None
    at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # JPEG 2000: SIZ follows SOC (also inside a JP2 box)
    if at >= 0 and at + 28 <= len(frame):
        xsiz, ysiz, x0, y0 = (int.from_bytes(frame[at + 8 + 4 * k : at + 12 + 4 * k], "big") for k in range(4))
        return xsiz - x0, ysiz - y0
    return None


def _display_uint8(arr: np.ndarray, ds: Any, invert: bool, name: str) -> np.ndarray:
    """Stored values -> what a viewer shows, as 8 bits: modality LUT, then VOI LUT or window.

    For integer pixels both LUTs are evaluated once per stored value, not per
    pixel, and applied as one 8-bit table: no full-size float copies of a
    4,000 px image. MONOCHROME1 (low values shown white) is inverted so bone is
    bright, as in MONOCHROME2, which is what the model was trained on.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    integer = np.issubdtype(arr.dtype, np.integer)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    small = integer and hi - lo < 1 << 20
    values = np.arange(lo, hi + 1, dtype=arr.dtype if small else np.float64) if small else arr
    try:
        shown = np.asarray(apply_voi_lut(apply_modality_lut(values, ds), ds), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a bad LUT
        raise ImageDecodeError(Reason.DICOM_INVALID, f"{name}: bad modality/VOI LUT or window ({exc})") from None
    if not np.all(np.isfinite(shown)):
        raise ImageDecodeError(Reason.DICOM_INVALID, f"{name}: pixel values are not finite")
    s_lo, s_hi = float(shown.min()), float(shown.max())
    lut = (np.round((shown - s_lo) * 255.0 / (s_hi - s_lo)) if s_hi > s_lo else np.zeros_like(shown)).astype(np.uint8)
    if invert:
        lut = 255 - lut
    return apply_lut(arr, lut, lo) if small else lut
