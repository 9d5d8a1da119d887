"""Training augmentation: make another plausible *source image* of the same radiograph.

Every augmentation runs on the decoded grayscale image, before the one
preprocessing function (:func:`pneumoflag.device.preprocess.prepare`), so an
augmented image goes through exactly what a new file goes through on the device.

Profiles (``--augment``):

``none``
    the decoded image as it is.
``geometric``
    positioning: rotation, zoom, shift (about what 1.0.0 was trained with).
``export``
    ``geometric`` plus what differs between two exports of the same radiograph:
    another window (a little of either end clipped) and gamma, a different
    downscaling filter and size, JPEG re-compression. The decoded grey levels
    change, the anatomy does not: one radiograph should get one answer.
``scanner``
    ``geometric`` (with a wider zoom: collimation differs between sites) plus what differs between scanners, exports and decoders and
    is the known shift of this data set: gamma and window, haze (contrast
    reduced towards a blurred copy), blur, sensor noise, JPEG re-compression
    and a different downscaling filter and size (the device decodes JPEG in
    draft mode, a PACS export may have been resized with anything).

Randomness comes from a generator seeded per (seed, epoch, batch), so a run is
repeatable whatever the thread scheduling.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

AUGMENTATIONS = ("none", "geometric", "export", "scanner")
_RESAMPLERS = (
    Image.Resampling.NEAREST,
    Image.Resampling.BOX,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
)


def _geometric(img: Image.Image, rng: np.random.Generator, zoom_range: tuple[float, float] = (0.9, 1.1),
               shift: float = 0.06) -> Image.Image:
    w, h = img.size
    angle = np.deg2rad(rng.uniform(-8.0, 8.0))
    zoom = rng.uniform(*zoom_range)
    tx, ty = rng.uniform(-shift, shift) * w, rng.uniform(-shift, shift) * h
    # inverse map: output (x, y) -> input, about the centre
    c, s = np.cos(angle) / zoom, np.sin(angle) / zoom
    cx, cy = w / 2.0, h / 2.0
    a, b = c, s
    d, e = -s, c
    off_x = cx - a * (cx + tx) - b * (cy + ty)
    off_y = cy - d * (cx + tx) - e * (cy + ty)
    return img.transform((w, h), Image.Transform.AFFINE, (a, b, off_x, d, e, off_y),
                         resample=Image.Resampling.BILINEAR, fillcolor=0)


def _lut(img: Image.Image, table: np.ndarray) -> Image.Image:
    return img.point(np.clip(np.round(table), 0, 255).astype(np.uint8).tolist())


def _window(img: Image.Image, rng: np.random.Generator, gamma: tuple[float, float]) -> Image.Image:
    x = np.arange(256, dtype=np.float64) / 255.0
    if rng.random() < 0.8:  # gamma: exposure and detector response
        x = x ** rng.uniform(*gamma)
    if rng.random() < 0.5:  # another window: clip a little of either end
        lo, hi = rng.uniform(0.0, 0.08), rng.uniform(0.92, 1.0)
        x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return _lut(img, x * 255.0)


def _photometric(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = _window(img, rng, (0.6, 1.6))
    if rng.random() < 0.4:  # haze: local contrast pulled towards a blurred copy
        k = int(rng.integers(6, 17))  # a cheap wide blur: shrink, then enlarge again
        fog = img.reduce(k).resize(img.size, Image.Resampling.BILINEAR)
        img = Image.blend(img, fog, rng.uniform(0.15, 0.5))
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.4)))
    if rng.random() < 0.4:
        a = np.asarray(img, np.float32) + rng.normal(0.0, rng.uniform(1.0, 7.0), img.size[::-1])
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    return img


def _resample(img: Image.Image, rng: np.random.Generator, min_side: int) -> Image.Image:
    w, h = img.size
    if rng.random() < 0.5:  # a different downscaling, never below what the model takes
        f = rng.uniform(min(1.0, min_side / min(w, h)), 1.0)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        img = img.resize(size, _RESAMPLERS[rng.integers(len(_RESAMPLERS))])
    if rng.random() < 0.5:  # JPEG re-compression
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(30, 96)))
        buf.seek(0)
        img = Image.open(buf)
        img.load()
    return img


def make_augmenter(profile: str, min_side: int, flip: bool = False) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """A function (decoded gray image, rng) -> another plausible decoded gray image."""
    if profile not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, not {profile!r}")

    def augment(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if profile == "none" and not flip:
            return gray
        if gray.dtype != np.uint8:  # deep sources: augment after the 8-bit mapping
            from ..device.preprocess import to_uint8

            gray = to_uint8(gray)
        img = Image.fromarray(gray, "L")
        if flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if profile in ("geometric", "export"):
            img = _geometric(img, rng)
        if profile == "export":
            img = _window(img, rng, (0.8, 1.25))
            img = _resample(img, rng, min_side)
        if profile == "scanner":
            # collimation differs between sites too: a wider zoom range
            img = _geometric(img, rng, (0.85, 1.25), 0.08)
            img = _photometric(img, rng)
            img = _resample(img, rng, min_side)
        return np.asarray(img, dtype=np.uint8)

    return augment
