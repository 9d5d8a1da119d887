"""The one preprocessing path: file or array -> the model's input tensor.

Training, calibration and evaluation call :func:`preprocess`; the device's
decoder runs the same steps (:func:`decode_with_info`, :func:`resize`,
:func:`finish`) with the plausibility gate between them, so a radiograph
becomes exactly the same tensor wherever it is scored.

Steps, in order:
  1. decode to grayscale (JPEG at 1/2..1/8 scale straight from the DCT, the
     scale Pillow's draft mode picks, decoded once by libjpeg-turbo in strict
     mode through simplejpeg: the same pixels as Pillow's draft decode, and it
     says whether the stream needed repair; Pillow where simplejpeg cannot;
     PNG 8/16-bit; arrays);
  2. squash-resize to the model's input size: first a box reduction by 2, 4
     or 8 on the grid JPEG draft decoding uses (so PNG and DICOM sources match
     JPEG ones), then the border crop, then bilinear, antialiased;
  3. (before 2, at full resolution) map to 8 bits: 16-bit and float
     sources min-max to 0..255, so every format takes the same 8-bit path;
  4. contrast, one of (integer arithmetic, so bit-exact on every machine):
     ``equalize``, global histogram equalisation: invariant to monotonic
     grey-level changes (window/level, exposure, scanner LUTs);
     ``clahe``, contrast-limited adaptive equalisation on a tile grid: the
     same invariance locally, and it lifts the low-contrast, hazy lung fields
     that separate this data set's test split from its training split;
     ``none``;
     several, joined with ``+`` (``equalize+clahe``), make one channel each:
     an ensemble whose members were trained on different contrast steps
     takes them as one multi-channel input (one file, one invoke); a view
     may name its own border crop (``equalize+equalize@0.08``);
  5. replicate to the model's channel count (a single view); dtype uint8.

An optional border ``crop`` (a fraction of each side, before the resize)
keeps burned-in markers and exposure text in the corners away from the model.

The int8 TFLite model takes these uint8 pixels as they are; a float model
takes ``pixels * spec.scale``.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import WatchConfig
from .vocab import Reason

try:  # the strict single-pass JPEG decoder (a dependency; without it Pillow decodes and nothing is checked)
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

PREPROCESS_VERSION = 2
#: Versions whose cards this build still reads (1 had only ``equalize: bool``).
SUPPORTED_VERSIONS = (1, 2)
CONTRASTS = ("equalize", "clahe", "none")
#: Above this many pixels an image is refused as a likely decompression bomb
#: (the largest chest radiographs are about 4,300 x 3,500 = 15 MP).
DEFAULT_MAX_PIXELS = WatchConfig().max_pixels
#: Above this a decode is refused as too-large before it starts: a 4,300 x 3,500
#: 16-bit radiograph needs about 60 MiB; the appliance stays under 300 MB in all.
DEFAULT_MAX_DECODE_BYTES = WatchConfig().max_decode_bytes

#: Header structure a real radiograph never comes near; beyond it Pillow's own parsing keeps every
#: segment or chunk in Python lists (25 million empty COM segments took 1.9 GB), so the file is
#: refused from a scan of the raw bytes before Pillow sees it.
MAX_HEADER_SEGMENTS = 1_000  # JPEG segments before the image data, PNG chunks other than IDAT
MAX_HEADER_BYTES = 16 * 2**20  # JPEG APPn/COM and PNG ancillary chunk payload, in all
MAX_PNG_CHUNKS = 200_000  # all PNG chunks (IDAT included): 8 KB IDATs of a 100 MB file are 12,800

Source = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]


class ImageDecodeError(ValueError):
    """An input that cannot become a model tensor; ``reason`` is a stable code; ``ids``: a DICOM image's
    identifiers when its header was read before it was refused (its study names the refused view)."""

    def __init__(self, reason: str, message: str, ids: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.reason = str(reason)
        self.ids = ids


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects; stored in the model card and read back by the device."""

    height: int = 128
    width: int = 128
    channels: int = 1
    contrast: str = "equalize"
    #: float model input = uint8 pixels * scale (the int8 model takes raw pixels).
    scale: float = 1.0 / 255.0
    resize: str = "squash-bilinear"
    #: share of each side cut off before the resize (0 <= crop < 0.25)
    crop: float = 0.0
    #: CLAHE: clip limit (multiples of a flat histogram) and tiles per side
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ValueError(f"input size {self.height}x{self.width} is too small (min 8x8)")
        try:
            views = self.view_list()
        except ValueError:
            views = []
        bad = not views or any(c not in CONTRASTS or not 0.0 <= crop < 0.25 for c, crop in views)
        if bad or len(set(views)) != len(views):
            raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)} (or several views joined with '+', "
                             f"each once, a view optionally @CROP), not {self.contrast!r}")
        if len(self.views) > 1:
            if self.channels != len(self.views):
                raise ValueError(f"contrast {self.contrast!r} makes {len(self.views)} channels, not {self.channels}")
        elif self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.resize != "squash-bilinear":
            raise ValueError(f"unknown resize method {self.resize!r}")
        if not 0.0 <= self.crop < 0.25:
            raise ValueError(f"crop must be in [0, 0.25), not {self.crop}")
        if not (self.clahe_clip >= 1.0 and 1 <= self.clahe_grid <= min(self.height, self.width) // 4):
            raise ValueError(f"CLAHE clip {self.clahe_clip} / grid {self.clahe_grid} out of range")
        if self.version != PREPROCESS_VERSION:
            raise ValueError(
                f"preprocessing version {self.version} is not supported by this build "
                f"(it implements version {PREPROCESS_VERSION})"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def views(self) -> tuple[str, ...]:
        """The views, one per channel when there are several (``contrast`` or ``contrast@crop``)."""
        return tuple(self.contrast.split("+"))

    def view_list(self) -> list[tuple[str, float]]:
        """(contrast step, border crop) of each view."""
        out = []
        for token in self.views:
            name, at, crop = token.partition("@")
            out.append((name, float(crop) if at else self.crop))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        names = {
            "equalize": "global histogram equalisation",
            "clahe": f"CLAHE (clip {self.clahe_clip:g}, {self.clahe_grid}x{self.clahe_grid} tiles)",
            "none": "no contrast step",
        }
        if len(self.views) > 1:
            contrast = "one channel each: " + ", ".join(
                names[c] + (f" with {crop:.0%} cropped" if crop != self.crop else "")
                for c, crop in self.view_list()) + "; "
        else:
            contrast = "" if self.contrast == "none" else names[self.contrast] + "; "
        d["description"] = (
            "grayscale; 16-bit/float min-max to 8-bit; "
            "box-reduce by 2/4/8 as JPEG draft decoding does; "
            + (f"crop {self.crop:.0%} of each side; " if self.crop else "")
            + "squash-resize (bilinear, antialiased) to height x width; "
            + contrast
            + "uint8 pixels (float model input = pixels * scale)"
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        d = dict(d)
        version = d.get("version", PREPROCESS_VERSION)
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"preprocessing version {version} is not supported by this build "
                f"(it reads versions {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        if version == 1:  # the same pipeline, spelt with a boolean
            d["contrast"] = "equalize" if d.pop("equalize", False) else "none"
            d["version"] = PREPROCESS_VERSION
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- decode


#: Peak bytes per pixel of a decode to an 8-bit grey array, by Pillow mode: Pillow's raster
#: (multi-band modes take 4 bytes a pixel), the grey conversion and the numpy copy (deep
#: modes: the copy at their own depth, then the 8-bit result).
_PEAK_BYTES = {"L": 2, "1": 3, "P": 3, "I;16": 5, "I;16B": 5, "I;16L": 5, "I;16N": 5, "I": 9, "F": 9}


def decode_cost(mode: str, width: int, height: int) -> int:
    """Bytes a decode to 8-bit grayscale needs at its peak (budgeted before decoding)."""
    return width * height * _PEAK_BYTES.get(mode, 6)


def too_large(name: str, what: str, needed: int, max_bytes: int) -> ImageDecodeError:
    return ImageDecodeError(Reason.TOO_LARGE,
        f"{name}: {what} needs {needed / 2**20:.0f} MiB to decode, over the limit of "
        f"{max_bytes / 2**20:.0f} MiB (watch.max_decode_mb)",
    )


_FILL = re.compile(rb"\xff+")
#: JPEG markers without a length field (TEM, RSTn, SOI, EOI)
_STANDALONE = {0x01, *range(0xD0, 0xDA)}
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}


def _header_limit(name: str, what: str) -> ImageDecodeError:
    return ImageDecodeError(Reason.TOO_LARGE,
        f"{name}: {what} around the image data (at most {MAX_HEADER_SEGMENTS:,} header segments and "
        f"{MAX_HEADER_BYTES / 2**20:.0f} MiB of metadata are read); not decoded",
    )


def scan_jpeg_header(data: bytes, name: str) -> None:
    """Walk the JPEG segments up to the first scan (C-speed skips, no copies) and refuse what
    Pillow would keep or cannot decode: a metadata flood, a sample precision other than 8 bits."""
    i, n, segments, meta = 2, len(data), 0, 0
    while i < n:
        if data[i] != 0xFF:  # junk between segments: Pillow skips it and reads on, so the walk does too
            i = data.find(b"\xff", i)
            if i < 0:
                return
        j = _FILL.match(data, i).end()  # type: ignore[union-attr]
        if j >= n:
            return
        marker, i = data[j], j + 1
        if marker in _STANDALONE:
            if marker == 0xD9:
                return
            continue
        if marker == 0xDA or i + 2 > n:  # start of scan: header parsing ends here
            return
        length = int.from_bytes(data[i : i + 2], "big")
        if i + length > n:  # cut short (still being written?): Pillow's verdict stands
            return
        if marker in _SOF and i + 2 < n and data[i + 2] != 8:
            raise ImageDecodeError(Reason.UNSUPPORTED_IMAGE,
                f"{name}: a {data[i + 2]}-bit JPEG (SOF{marker - 0xC0}); only 8-bit JPEG is supported: export "
                "8-bit JPEG, PNG or DICOM",
            )
        segments += 1
        length = max(length, 2)  # a length of 0 or 1: Pillow reads on after the two length bytes
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            meta += length
        if segments > MAX_HEADER_SEGMENTS:
            raise _header_limit(name, f"more than {MAX_HEADER_SEGMENTS:,} JPEG segments")
        if meta > MAX_HEADER_BYTES:
            raise _header_limit(name, f"{meta / 2**20:.0f} MiB of JPEG APPn/COM segments")
        i += length


def scan_png_chunks(data: bytes, name: str) -> None:
    """Walk the PNG chunk headers and refuse what Pillow would keep (private chunks, in a list)
    or would show differently from what is scored (an animated PNG: a browser plays it)."""
    i, n, total, ancillary, meta = 8, len(data), 0, 0, 0
    while i + 8 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        cid = data[i + 4 : i + 8]
        if cid == b"IEND" or i + 12 + length > n:  # the end, or a chunk cut short: Pillow's verdict stands
            return
        total += 1
        if cid in (b"acTL", b"fcTL", b"fdAT"):  # any APNG: even "1 frame" may show a picture that is not scored
            frames = int.from_bytes(data[i + 8 : i + 12], "big") if cid == b"acTL" and length >= 4 else None
            raise ImageDecodeError(Reason.UNSUPPORTED_IMAGE,
                f"{name}: an animated PNG" + (f" ({frames} frame{'' if frames == 1 else 's'})" if frames is not None else "")
                + " is not supported: a viewer plays the animation while only its still image would be scored",
            )
        if cid != b"IDAT":
            ancillary += 1
            meta += length
        if ancillary > MAX_HEADER_SEGMENTS or total > MAX_PNG_CHUNKS:
            raise _header_limit(name, "more than " + (f"{MAX_PNG_CHUNKS:,} PNG chunks" if total > MAX_PNG_CHUNKS else f"{MAX_HEADER_SEGMENTS:,} PNG ancillary chunks"))
        if meta > MAX_HEADER_BYTES:
            raise _header_limit(name, f"{meta / 2**20:.0f} MiB of PNG ancillary chunks")
        i += 12 + length


def scan_header(data: bytes, name: str) -> None:
    """Refuse from the raw bytes what would cost Pillow unbounded memory (see MAX_HEADER_SEGMENTS)."""
    if data[:2] == b"\xff\xd8":
        scan_jpeg_header(data, name)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        scan_png_chunks(data, name)


def _open(source: Source, max_pixels: int, name: str = "<bytes>") -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError(Reason.EMPTY_FILE, f"{name}: empty file (0 bytes)")
        scan_header(bytes(source) if isinstance(source, bytearray) else source, name)
        fp: Any = io.BytesIO(source)
    else:
        path = Path(source)  # type: ignore[arg-type]
        name = str(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageDecodeError(Reason.NOT_FOUND, f"{name}: no such file") from None
        except PermissionError:
            raise ImageDecodeError(Reason.PERMISSION_DENIED, f"{name}: permission denied") from None
        if size == 0:
            raise ImageDecodeError(Reason.EMPTY_FILE, f"{name}: empty file (0 bytes)")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=("JPEG", "PNG"))
    except PermissionError:
        raise ImageDecodeError(Reason.PERMISSION_DENIED, f"{name}: permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(Reason.DECOMPRESSION_BOMB, f"{name}: refused, {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(Reason.UNSUPPORTED_FORMAT,
            f"{name}: not a JPEG or PNG image (cannot identify image file)",
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's words for broken headers
        raise ImageDecodeError(Reason.CORRUPT, f"{name}: corrupt image data ({exc})") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageDecodeError(Reason.DECOMPRESSION_BOMB,
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb)",
        )
    return img


@dataclass(frozen=True)
class SourceInfo:
    """What the header said, before any reduced-scale decoding."""

    width: int
    height: int
    format: str  # "JPEG", "PNG", "DICOM", "array"
    mode: str


def decode(
    source: Source,
    spec: PreprocessSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: Optional[str] = None,
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> np.ndarray:
    """Decode to a 2-D uint8 grayscale array at (about) the size needed; see :func:`decode_with_info`."""
    return decode_with_info(source, spec, max_pixels, name, max_bytes)[0]


def decode_with_info(
    source: Source,
    spec: PreprocessSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: Optional[str] = None,
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    strict_jpeg: bool = False,
) -> tuple[np.ndarray, SourceInfo]:
    """Decode to a 2-D uint8 grayscale array at (about) the size needed; no resizing yet.

    The cost is budgeted from the header before any pixel is decoded: a small
    file can hold a huge raster, and the appliance must stay within its memory
    whatever arrives (``too-large`` says how much it would have needed). JPEG is
    decoded straight to luma at a reduced DCT scale; deeper sources are mapped
    to 8 bits (min-max) at full resolution, like a viewer's export, so every
    format continues through the same 8-bit path.
    ``name`` labels errors when ``source`` is bytes already read from a file.
    ``strict_jpeg`` refuses (``corrupt``) a JPEG whose stream the decoder had
    to repair (bit errors), which Pillow would otherwise decode silently.
    """
    if isinstance(source, np.ndarray):
        g = to_uint8(_array_to_gray(source))
        return g, SourceInfo(g.shape[1], g.shape[0], "array", str(source.dtype))
    if isinstance(source, Image.Image):
        g = _image_to_gray(source, str(getattr(source, "filename", "<image>")))
        return g, SourceInfo(source.width, source.height, str(source.format), source.mode)
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    img = _open(source, max_pixels, name)
    try:
        info = SourceInfo(img.width, img.height, str(img.format), img.mode)
        if img.format == "JPEG":
            # Decode straight to luma at a reduced DCT scale (source_reduction):
            # 5-20x faster for scanner images, and the same grid as a box-reduce.
            k = source_reduction(img.width, img.height, spec)
            img.draft("L", (max(1, img.width // k), max(1, img.height // k)))
        w, h = img.size
        cost = decode_cost(img.mode, w, h)
        if cost > max_bytes:
            raise too_large(name, f"{w}x{h} {img.mode} {img.format}", cost, max_bytes)
        if img.format == "JPEG":
            data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
            return _decode_jpeg(bytes(data), img, name, strict_jpeg), info
        return _image_to_gray(img, name), info
    finally:
        img.close()


def _decode_jpeg(data: bytes, img: Image.Image, name: str, strict: bool) -> np.ndarray:
    """The JPEG at its draft scale, decoded once: libjpeg-turbo in strict mode, else Pillow.

    A strict decode that succeeds gives exactly Pillow's draft-mode pixels
    (``tests/test_preprocess.py`` compares them), so the daemon's hot path pays
    for one decode where a repair check used to cost a second one. A stream the
    strict decoder refuses (damaged, or a kind it does not convert, such as CMYK)
    goes to Pillow, which names what it cannot repair (``truncated``,
    ``corrupt``); what Pillow repaired is refused when ``strict``.
    """
    w, h = img.size  # after draft(): the scale libjpeg-turbo is asked for below
    damage: Optional[str] = None
    if simplejpeg is not None:
        try:
            out = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_width=w, min_height=h, strict=True)
        except ValueError as exc:
            damage = str(exc)
        else:
            if out.shape[:2] == (h, w):
                return out.reshape(h, w)
    gray = _image_to_gray(img, name)
    if strict and damage is not None:
        raise ImageDecodeError(Reason.CORRUPT, f"{name}: corrupt JPEG data ({damage}); not scored")
    return gray


def _image_to_gray(img: Image.Image, name: str) -> np.ndarray:
    try:
        img.load()
    except OSError as exc:
        reason = Reason.TRUNCATED if "truncated" in str(exc) else Reason.CORRUPT
        raise ImageDecodeError(reason, f"{name}: {reason} image data ({exc})") from None
    except (SyntaxError, ValueError) as exc:
        raise ImageDecodeError(Reason.CORRUPT, f"{name}: corrupt image data ({exc})") from None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return to_uint8(np.asarray(img))
    if mode != "L":
        img = img.convert("L")  # alpha is dropped: a radiograph has none worth keeping
    return np.asarray(img, dtype=np.uint8)


def _array_to_gray(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] in (3, 4):
        if a.dtype != np.uint8:
            a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        else:
            return np.asarray(Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB").convert("L"))
    if a.ndim != 2 or min(a.shape) < 1:
        raise ImageDecodeError(Reason.BAD_ARRAY, f"array of shape {arr.shape} is not an image")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageDecodeError(Reason.BAD_ARRAY, f"array dtype {a.dtype} is not numeric")
    return a


def apply_lut(a: np.ndarray, lut: np.ndarray, offset: int = 0, rows: int = 256) -> np.ndarray:
    """``lut[a - offset]`` for a large integer image, a band of rows at a time.

    Fancy indexing widens the whole index array to 8 bytes a pixel first; in
    bands the temporary stays small.
    """
    out = np.empty(a.shape, lut.dtype)
    for r in range(0, a.shape[0], rows):
        band = a[r : r + rows].astype(np.int64)
        if offset:
            band -= offset
        out[r : r + rows] = lut[band]
    return out


# --------------------------------------------------------------------------- prepare


def equalize_histogram(a: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of a uint8 image, bit-exact (integer maths)."""
    hist = np.bincount(a.ravel(), minlength=256).astype(np.int64)
    cdf = np.cumsum(hist)
    n = int(cdf[-1])
    cdf_min = int(cdf[np.flatnonzero(hist)[0]])
    denom = n - cdf_min
    if denom == 0:  # a constant image carries no contrast to stretch
        return a.copy()
    lut = ((cdf - cdf_min) * 255 + denom // 2) // denom
    return np.clip(lut, 0, 255).astype(np.uint8)[a]


def clahe(a: np.ndarray, clip: float = 2.0, grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 image, bit-exact.

    Each of ``grid`` x ``grid`` tiles gets a histogram clipped at ``clip`` times
    the flat level (the excess spread evenly), and each pixel is mapped through
    the bilinear blend of its four nearest tiles' maps, all in integers.
    """
    h0, w0 = a.shape
    # pad (reflect) to a multiple of the grid so every tile has the same size
    ph, pw = -h0 % grid, -w0 % grid
    img = np.pad(a, ((0, ph), (0, pw)), mode="reflect") if (ph or pw) else a
    h, w = img.shape
    th, tw = h // grid, w // grid
    tiles = img.reshape(grid, th, grid, tw).transpose(0, 2, 1, 3).reshape(grid * grid, th * tw)
    offsets = (np.arange(grid * grid, dtype=np.int64) * 256)[:, None]
    hist = np.bincount((tiles.astype(np.int64) + offsets).ravel(), minlength=grid * grid * 256)
    hist = hist.reshape(grid * grid, 256)
    n = th * tw
    limit = max(1, int(clip * n) // 256)
    excess = np.maximum(hist - limit, 0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess // 256
    rest = excess % 256  # the remainder: one each to bins spread evenly over the range
    step = np.maximum(256 // np.maximum(rest, 1), 1)
    bins = np.arange(256)[None, :]
    hist += ((bins % step == 0) & (bins // step < rest)).astype(np.int64)
    cdf = np.cumsum(hist, axis=1)
    lut = ((cdf * 255 + n // 2) // n).clip(0, 255).reshape(grid, grid, 256)

    def axis(size: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        # tile centres at t*i + (t-1)/2; weights in units of 1/(2t)
        pos = 2 * np.arange(size, dtype=np.int64) + 1 - t
        i0 = np.floor_divide(pos, 2 * t)
        r = pos - 2 * t * i0
        r = np.where(i0 < 0, 0, r)
        i0 = np.clip(i0, 0, grid - 1)
        i1 = np.minimum(i0 + 1, grid - 1)
        return i0, i1, r, 2 * t

    y0, y1, ry, dy = axis(h, th)
    x0, x1, rx, dx = axis(w, tw)
    v = img.astype(np.int64)
    ry, rx = ry[:, None], rx[None, :]
    top = lut[y0[:, None], x0[None, :], v] * (dx - rx) + lut[y0[:, None], x1[None, :], v] * rx
    bottom = lut[y1[:, None], x0[None, :], v] * (dx - rx) + lut[y1[:, None], x1[None, :], v] * rx
    d = dy * dx
    out = (top * (dy - ry) + bottom * ry + d // 2) // d
    return out[:h0, :w0].astype(np.uint8)


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Deeper grey levels to 8 bits, min-max, without full-size float copies."""
    if a.dtype == np.uint8:
        return a
    if a.size == 0:
        raise ImageDecodeError(Reason.BAD_ARRAY, "empty image")
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            raise ImageDecodeError(Reason.BAD_ARRAY, "image contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        out = np.empty(a.shape, np.uint8)
        for r in range(0, a.shape[0], 256):
            band = a[r : r + 256].astype(np.float64)
            out[r : r + 256] = np.round((band - lo) * (255.0 / (hi - lo))) if hi > lo else 0
        return out
    lo, hi = int(a.min()), int(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    if hi - lo < 1 << 20:
        lut = np.round(np.arange(hi - lo + 1, dtype=np.float64) * (255.0 / (hi - lo))).astype(np.uint8)
        return apply_lut(a, lut, lo)
    return to_uint8(a.astype(np.float32))


def reduce_factor(width: int, height: int, spec: PreprocessSpec) -> int:
    """The largest of 8, 4, 2 that keeps the image at least the model's size, else 1."""
    for k in (8, 4, 2):
        if -(-width // k) >= spec.width and -(-height // k) >= spec.height:
            return k
    return 1


def _crop_margins(width: int, height: int, crop: float) -> tuple[int, int]:
    dx, dy = int(round(width * crop)), int(round(height * crop))
    return (dx, dy) if width - 2 * dx >= 1 and height - 2 * dy >= 1 else (0, 0)


def source_reduction(width: int, height: int, spec: PreprocessSpec) -> int:
    """The one shrink factor for a source of this size: JPEG draft decode and box-reduce both use it.

    It is :func:`reduce_factor` of the region the most-cropped view keeps, so
    every view still has at least the model's size. JPEG draft decoding shrinks
    by exactly this factor inside the decoder (the DCT's block average, blocks
    aligned at the image's corner); PNG and DICOM sources are box-reduced by the
    same factor, from the same corner, *before* the crop, so one radiograph gives
    one tensor whichever format it came in.
    """
    crop = max(c for _, c in spec.view_list())
    dx, dy = _crop_margins(width, height, crop)
    return reduce_factor(width - 2 * dx, height - 2 * dy, spec)


def resize(gray: np.ndarray, spec: PreprocessSpec, crop: Optional[float] = None) -> np.ndarray:
    """Steps 1-2: box-reduce, crop and squash-resize a decoded image to the model's size (uint8, H x W).

    ``crop`` overrides ``spec.crop`` for a view with a crop of its own; the
    reduction factor is the file's (:func:`source_reduction`), the same for all views.
    """
    size = (spec.width, spec.height)
    gray = to_uint8(gray)
    k = source_reduction(gray.shape[1], gray.shape[0], spec)
    img = Image.fromarray(np.ascontiguousarray(gray), "L")
    if k > 1:
        img = img.reduce(k)
    dx, dy = _crop_margins(img.width, img.height, spec.crop if crop is None else crop)
    if dx or dy:
        img = img.crop((dx, dy, img.width - dx, img.height - dy))
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def contrast_step(small: np.ndarray, view: str, spec: PreprocessSpec) -> np.ndarray:
    if view == "equalize":
        return equalize_histogram(small)
    if view == "clahe":
        return clahe(small, spec.clahe_clip, spec.clahe_grid)
    return small


def finish(small: np.ndarray, spec: PreprocessSpec, gray: Optional[np.ndarray] = None) -> np.ndarray:
    """Steps 4-5: the contrast step(s) and the channel count: the model's uint8 input (H, W, C).

    ``small`` is :func:`resize` of the decoded image; views with a crop of their
    own are resized again from ``gray``.
    """
    views = spec.view_list()
    if len(views) > 1:
        smalls = {spec.crop: small}
        channels = []
        for contrast, crop in views:
            if crop not in smalls:
                if gray is None:
                    raise ValueError("a view with its own crop needs the decoded image")
                smalls[crop] = resize(gray, spec, crop)
            channels.append(contrast_step(smalls[crop], contrast, spec))
        return np.ascontiguousarray(np.stack(channels, axis=2))
    out = contrast_step(small, views[0][0], spec)[:, :, None]
    if spec.channels == 3:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out)


def prepare(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize a decoded grayscale array and finish it as the model's uint8 input (H, W, C)."""
    return finish(resize(gray, spec), spec, gray)


def preprocess(source: Source, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """File, bytes, PIL image or array -> uint8 tensor of shape ``spec.shape``.

    Raises :class:`ImageDecodeError` with a specific ``reason`` for bad input.
    """
    return prepare(decode(source, spec, max_pixels), spec)


def to_float_input(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 pixels -> what the float (Keras) model takes."""
    return pixels.astype(np.float32) * np.float32(spec.scale)
