"""The one preprocessing function: formats, errors, and agreement between toolchain and device."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MINI
from pneumoflag.device.preprocess import (
    ImageDecodeError, PreprocessSpec, decode, equalize_histogram, preprocess, to_float_input,
)

SPEC = PreprocessSpec(128, 128, 1, contrast="equalize")
JPEG = sorted((MINI / "PNEUMONIA").glob("*.jpeg"))[0]


def _xray(h=600, w=500, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 120 + 80 * np.sin(xx / 37.0) * np.cos(yy / 53.0) + rng.normal(0, 10, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_output_shape_dtype_and_channels():
    x = preprocess(JPEG, SPEC)
    assert x.shape == (128, 128, 1) and x.dtype == np.uint8
    x3 = preprocess(JPEG, PreprocessSpec(96, 80, 3))
    assert x3.shape == (96, 80, 3)
    assert np.array_equal(x3[..., 0], x3[..., 2])


def test_equalisation_is_exact_and_invariant_to_monotonic_grey_changes():
    a = _xray()
    eq = equalize_histogram(a)
    assert eq.min() == 0 and eq.max() == 255
    # a brighter / gamma-changed copy of the same image equalises to the same picture
    lut = np.clip(np.round(255 * (np.arange(256) / 255) ** 0.7), 0, 255).astype(np.uint8)
    assert np.all(np.diff(lut.astype(int)) >= 0)  # a monotonic grey-level change
    b = lut[a]
    same = (equalize_histogram(b).astype(int) - eq.astype(int))
    assert np.abs(same).max() <= 3
    const = np.full((10, 10), 7, np.uint8)
    assert np.array_equal(equalize_histogram(const), const)


def test_png_8_and_16_bit_and_rgb(tmp_path: Path):
    a8 = _xray()
    Image.fromarray(a8, "L").save(tmp_path / "g8.png")
    Image.fromarray(np.stack([a8] * 3, -1), "RGB").save(tmp_path / "rgb.png")
    a16 = (a8.astype(np.uint16) * 257)  # same picture on a 16-bit scale
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    p8 = preprocess(tmp_path / "g8.png", SPEC)
    assert np.array_equal(p8, preprocess(tmp_path / "rgb.png", SPEC))
    p16 = preprocess(tmp_path / "g16.png", SPEC)
    d = np.abs(p16.astype(int) - p8.astype(int))  # 16-bit resizes in float, 8-bit in uint8
    assert d.max() <= 8 and d.mean() < 1.5
    assert np.array_equal(p8, preprocess(a8, SPEC))  # an array goes through the same steps


def test_jpeg_draft_decodes_large_scans_at_reduced_scale(tmp_path: Path):
    big = _xray(2000, 1800)
    Image.fromarray(big, "L").save(tmp_path / "big.jpg", quality=90)
    g = decode(tmp_path / "big.jpg", SPEC)
    assert 128 <= min(g.shape) < 500  # decoded at 1/8 scale, not 2000 px
    assert preprocess(tmp_path / "big.jpg", SPEC).shape == (128, 128, 1)


@pytest.mark.parametrize("crop, contrast", [(0.0, "equalize"), (0.08, "equalize"), (0.12, "equalize+equalize@0.04")])
def test_jpeg_draft_and_full_decode_give_one_tensor(tmp_path: Path, crop: float, contrast: str):
    """Draft decoding and a box-reduce of the full decode share one grid, whatever the crop.

    A crop used to be taken before the PNG path's reduction but after the
    JPEG's: for a 1376 x 1048 scan the two paths then read the image at 1/4 and
    1/8 scale, several grey levels apart after equalisation.
    """
    spec = PreprocessSpec(128, 128, len(contrast.split("+")), contrast=contrast, crop=crop)
    big = _xray(1048, 1376, seed=3)
    Image.fromarray(big, "L").save(tmp_path / "scan.jpg", quality=95)
    full = np.asarray(Image.open(tmp_path / "scan.jpg").convert("L"))
    Image.fromarray(full, "L").save(tmp_path / "scan.png")
    draft, png = preprocess(tmp_path / "scan.jpg", spec), preprocess(tmp_path / "scan.png", spec)
    assert min(decode(tmp_path / "scan.jpg", spec).shape) < 1048 // 2  # really decoded in draft mode
    d = np.abs(draft.astype(int) - png.astype(int))
    assert d.mean() < 0.5 and d.max() <= 8, (d.mean(), d.max())


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty-file"),
        (b"this is a text file, not a radiograph\n" * 10, "unsupported-format"),
        (b"GIF89a" + b"\0" * 100, "unsupported-format"),
    ],
)
def test_bad_files_get_specific_reasons(tmp_path: Path, content: bytes, reason: str):
    f = tmp_path / "bad.jpg"
    f.write_bytes(content)
    with pytest.raises(ImageDecodeError) as exc:
        preprocess(f, SPEC)
    assert exc.value.reason == reason
    assert str(f) in str(exc.value)


def test_truncated_jpeg(tmp_path: Path):
    data = JPEG.read_bytes()
    f = tmp_path / "trunc.jpeg"
    f.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageDecodeError) as exc:
        preprocess(f, SPEC)
    assert exc.value.reason in ("truncated", "corrupt")


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path):
    f = tmp_path / "bomb.png"
    Image.new("L", (5000, 5000)).save(f)  # 25 MP of zeros: a few KB on disk
    assert f.stat().st_size < 100_000
    with pytest.raises(ImageDecodeError) as exc:
        preprocess(f, SPEC, max_pixels=10_000_000)
    assert exc.value.reason == "decompression-bomb"


def test_missing_file():
    with pytest.raises(ImageDecodeError) as exc:
        preprocess(Path("/nonexistent/x.jpeg"), SPEC)
    assert exc.value.reason == "not-found"


def test_float_input_scale():
    x = preprocess(JPEG, SPEC)
    f = to_float_input(x, SPEC)
    assert f.dtype == np.float32 and f.max() <= 1.0 and np.allclose(f * 255, x)


def test_spec_round_trip_and_validation():
    assert PreprocessSpec.from_dict(SPEC.to_dict()) == SPEC
    with pytest.raises(ValueError):
        PreprocessSpec(128, 128, 2)
    with pytest.raises(ValueError, match="version"):
        PreprocessSpec.from_dict({**SPEC.to_dict(), "version": 99})


def test_the_header_scan_refuses_floods_but_leaves_cut_files_to_the_decoder():
    """Floods of JPEG segments / PNG chunks are too-large before Pillow keeps them; a file cut short
    (still being written) is not mistaken for one, and gets Pillow's verdict."""
    from pneumoflag.device.preprocess import scan_header

    jpeg = JPEG.read_bytes()
    with pytest.raises(ImageDecodeError) as e:
        scan_header(jpeg[:2] + b"\xff\xfe\x00\x02" * 1001 + jpeg[2:], "x.jpeg")
    assert e.value.reason == "too-large"
    with pytest.raises(ImageDecodeError) as e:
        scan_header(jpeg[:2] + (b"\xff\xe1\xff\xff" + b"\0" * 65533) * 300 + jpeg[2:], "x.jpeg")
    assert e.value.reason == "too-large" and "MiB of JPEG APPn/COM segments" in str(e.value)
    # the walk does not stop where Pillow reads on: a length of 0, or junk between segments, before the flood
    for lead in (b"\xff\xfe\x00\x00", b"\xff\xfe\x00\x01", b"\x00\x13\x37"):
        with pytest.raises(ImageDecodeError) as e:
            scan_header(jpeg[:2] + lead + b"\xff\xfe\x00\x02" * 1001 + jpeg[2:], "x.jpeg")
        assert e.value.reason == "too-large", lead
    scan_header(jpeg, "x.jpeg")  # a real radiograph passes
    scan_header(jpeg[: len(jpeg) // 50], "x.jpeg")  # cut short: no verdict here
    scan_header(b"\x89PNG\r\n\x1a\n garbage", "x.png")


def test_any_animated_png_is_refused_also_one_of_one_frame():
    """An APNG of "1 frame" whose frame is not the still image shows a viewer a picture that is not scored."""
    import io
    import zlib

    from PIL import Image
    from pneumoflag.device.preprocess import scan_header

    buf = io.BytesIO()
    Image.open(JPEG).convert("L").save(buf, format="PNG")
    png = buf.getvalue()
    body = b"acTL" + (1).to_bytes(4, "big") + (0).to_bytes(4, "big")
    actl = (8).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    at = 8 + 25  # after the signature and IHDR
    scan_header(png, "still.png")
    with pytest.raises(ImageDecodeError) as e:
        scan_header(png[:at] + actl + png[at:], "anim.png")
    assert e.value.reason == "unsupported-image" and "animated PNG (1 frame)" in str(e.value)


def _pillow_draft(data: bytes, k: int) -> np.ndarray:
    """What the decode was before libjpeg-turbo's strict single pass: Pillow's draft mode."""
    import io

    im = Image.open(io.BytesIO(data))
    im.draft("L", (max(1, im.width // k), max(1, im.height // k)))
    return np.asarray(im.convert("L") if im.mode != "L" else im)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_the_single_strict_jpeg_decode_gives_pillows_draft_pixels(tmp_path: Path, k: int):
    """The hot path decodes a JPEG once with simplejpeg (strict) instead of Pillow plus a strict re-decode:
    the pixels must be Pillow's, bit for bit, for grey, colour and progressive files at every draft scale."""
    from pneumoflag.device.preprocess import _decode_jpeg

    files = sorted(MINI.rglob("*.jpeg"))[:8]
    for i, (mode, progressive) in enumerate([("L", False), ("RGB", False), ("L", True), ("RGB", True)]):
        img = Image.fromarray(_xray(1900 + 37 * i, 1500 + 11 * i, seed=i), "L").convert(mode)
        path = tmp_path / f"scan{i}.jpg"
        img.save(path, quality=88, progressive=progressive)
        files.append(path)
    for f in files:
        data = f.read_bytes()
        with Image.open(f) as im:
            im.draft("L", (max(1, im.width // k), max(1, im.height // k)))
            ours = _decode_jpeg(data, im, f.name, strict=True)
        assert ours.dtype == np.uint8 and ours.flags.c_contiguous
        assert np.array_equal(ours, _pillow_draft(data, k)), f"{f.name} at 1/{k}"


def test_a_jpeg_the_strict_decoder_cannot_convert_still_decodes_through_pillow(tmp_path: Path):
    """CMYK: libjpeg-turbo will not make grey of it; the toolchain's (not strict) decode reads it through Pillow."""
    Image.fromarray(_xray(700, 600), "L").convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    g = decode(tmp_path / "cmyk.jpg", SPEC)
    assert g.ndim == 2 and g.dtype == np.uint8 and g.std() > 10
