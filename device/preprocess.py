"""The one preprocessing function: file or array -> the model's input tensor.

Training, calibration, evaluation and the device all call :func:`preprocess`,
so a radiograph becomes exactly the same tensor wherever it is scored.

Steps, in order:
  1. decode to grayscale (JPEG via Pillow's draft mode, so a 2,000 px scan is
     decoded at 1/2..1/8 scale straight from the DCT; PNG 8/16-bit; arrays);
  2. squash-resize to the model's input size (bilinear, antialiased);
  3. map to 8 bits (16-bit and float sources: min-max to 0..255);
  4. optional global histogram equalisation (integer arithmetic, so it is
     bit-exact on every machine). It makes the input invariant to monotonic
     grey-level changes (window/level, exposure, scanner LUTs), which is the
     main shift between this data set's splits and between scanners;
  5. replicate to the model's channel count; dtype uint8.

The int8 TFLite model takes these uint8 pixels as they are; a float model
takes ``pixels * spec.scale``.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

PREPROCESS_VERSION = 1
#: Above this many pixels an image is refused as a likely decompression bomb
#: (the largest chest radiographs are about 4,300 x 3,500 = 15 MP).
DEFAULT_MAX_PIXELS = 60_000_000

Source = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]


class ImageDecodeError(ValueError):
    """An input that cannot become a model tensor; ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects; stored in the model card and read back by the device."""

    height: int = 128
    width: int = 128
    channels: int = 1
    equalize: bool = True
    #: float model input = uint8 pixels * scale (the int8 model takes raw pixels).
    scale: float = 1.0 / 255.0
    resize: str = "squash-bilinear"
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ValueError(f"input size {self.height}x{self.width} is too small (min 8x8)")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.resize != "squash-bilinear":
            raise ValueError(f"unknown resize method {self.resize!r}")
        if self.version != PREPROCESS_VERSION:
            raise ValueError(
                f"preprocessing version {self.version} is not supported by this build "
                f"(it implements version {PREPROCESS_VERSION})"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["description"] = (
            "grayscale; squash-resize (bilinear, antialiased) to height x width; "
            "16-bit/float min-max to 8-bit; "
            + ("global histogram equalisation; " if self.equalize else "")
            + "uint8 pixels (float model input = pixels * scale)"
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- decode


def _open(source: Source, max_pixels: int, name: str = "<bytes>") -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError("empty-file", f"{name}: empty file (0 bytes)")
        fp: Any = io.BytesIO(source)
    else:
        path = Path(source)  # type: ignore[arg-type]
        name = str(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageDecodeError("not-found", f"{name}: no such file") from None
        except PermissionError:
            raise ImageDecodeError("permission-denied", f"{name}: permission denied") from None
        if size == 0:
            raise ImageDecodeError("empty-file", f"{name}: empty file (0 bytes)")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=("JPEG", "PNG"))
    except PermissionError:
        raise ImageDecodeError("permission-denied", f"{name}: permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("decompression-bomb", f"{name}: refused, {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "unsupported-format",
            f"{name}: not a JPEG or PNG image (cannot identify image file)",
        ) from None
    except (OSError, SyntaxError) as exc:  # Pillow's words for broken headers
        raise ImageDecodeError("corrupt", f"{name}: corrupt image data ({exc})") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageDecodeError(
            "decompression-bomb",
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb)",
        )
    return img


def decode(
    source: Source, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS, name: Optional[str] = None
) -> np.ndarray:
    """Decode to a 2-D grayscale array at (about) the size needed; no resizing yet.

    Returns uint8 for 8-bit sources, uint16/int32/float32 for deeper ones.
    ``name`` labels errors when ``source`` is bytes already read from a file.
    """
    if isinstance(source, np.ndarray):
        return _array_to_gray(source)
    if isinstance(source, Image.Image):
        return _image_to_gray(source, str(getattr(source, "filename", "<image>")))
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    img = _open(source, max_pixels, name)
    try:
        if img.format == "JPEG":
            # Decode straight to luma at the smallest DCT scale that is still
            # >= the model's input size: 5-20x faster for scanner images.
            img.draft("L", (spec.width, spec.height))
        return _image_to_gray(img, name)
    finally:
        img.close()


def _image_to_gray(img: Image.Image, name: str) -> np.ndarray:
    try:
        img.load()
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise ImageDecodeError(reason, f"{name}: {reason} image data ({exc})") from None
    except (SyntaxError, ValueError) as exc:
        raise ImageDecodeError("corrupt", f"{name}: corrupt image data ({exc})") from None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16)
    if mode in ("I", "F"):
        return np.asarray(img)
    if mode != "L":
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA").convert("RGB")
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8)


def _array_to_gray(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] in (3, 4):
        if a.dtype != np.uint8:
            a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        else:
            return np.asarray(Image.fromarray(a[..., :3], "RGB").convert("L"))
    if a.ndim != 2 or min(a.shape) < 1:
        raise ImageDecodeError("bad-array", f"array of shape {arr.shape} is not an image")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageDecodeError("bad-array", f"array dtype {a.dtype} is not numeric")
    return a


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


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    f = a.astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise ImageDecodeError("bad-array", "image contains NaN or infinite values")
    lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((f - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def prepare(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize a decoded grayscale array and finish it as the model's uint8 input (H, W, C)."""
    size = (spec.width, spec.height)
    if gray.dtype == np.uint8:
        img = Image.fromarray(gray, "L")
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        out = np.asarray(img, dtype=np.uint8)
    else:
        img = Image.fromarray(gray.astype(np.float32), "F")
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        out = _to_uint8(np.asarray(img, dtype=np.float32))
    if spec.equalize:
        out = equalize_histogram(out)
    out = out[:, :, None]
    if spec.channels == 3:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out)


def preprocess(source: Source, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """File, bytes, PIL image or array -> uint8 tensor of shape ``spec.shape``.

    Raises :class:`ImageDecodeError` with a specific ``reason`` for bad input.
    """
    return prepare(decode(source, spec, max_pixels), spec)


def to_float_input(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 pixels -> what the float (Keras) model takes."""
    return pixels.astype(np.float32) * np.float32(spec.scale)
