"""``pneumoflag explain --layers``: a contact sheet of each conv block's activation maps.

The "pixels to prognosis" view of the source work: the radiograph, then for
every conv block the feature maps it computes, strongest first. It needs the
float ``.keras`` model (and so TensorFlow): the int8 model on the device keeps
no intermediate tensors worth showing, and the float model is what the int8
one was converted from (the card records its sha256; a mismatch is logged).

Each block shows its post-activation output (the ReLU after conv + batch
norm), each map scaled to its own range, in the same perceptual colour map
as the heat maps; channels are ordered by mean activation, dead ones (all
zero for this image) are counted, not drawn.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..device.card import ModelCard, sha256_file
from ..device.explain import NOTICE, colormap_lut, pillow_font, reference_view
from ..device.preprocess import PreprocessSpec, to_float_input

log = logging.getLogger(__name__)

TOOLCHAIN_HINT = "pip install 'pneumoflag[convert]'"


class LayersUnavailable(RuntimeError):
    """The contact sheet cannot be made here (no TensorFlow, no float model); the message says why."""


def require_keras() -> None:
    """Raise :class:`LayersUnavailable` with the install hint when Keras/TensorFlow is missing."""
    try:
        import keras  # noqa: F401
    except ImportError as exc:
        raise LayersUnavailable(
            f"--layers needs TensorFlow and Keras (the model toolchain), which are not installed "
            f"({exc.name or exc}): {TOOLCHAIN_HINT}"
        ) from None


def keras_beside(model_path: Path, card: Optional[ModelCard] = None) -> Path:
    """The float model a .tflite was converted from: the card's ``source_model.file`` beside it, else NAME.keras."""
    paths = card.source_model_paths(model_path) if card is not None else []
    return paths[0] if paths and paths[0].is_file() else model_path.with_suffix(".keras")


@dataclass
class Block:
    """One conv block's output for one image."""

    name: str
    maps: np.ndarray  # (H, W, C) float32, post-activation


class ActivationModel:
    """The float model cut at each conv block's activation (built once, reused for every image)."""

    def __init__(self, keras_path: Path, card: Optional[ModelCard] = None):
        keras_path = Path(keras_path)
        if not keras_path.is_file():
            raise LayersUnavailable(f"no float Keras model at {keras_path} for --layers (give --keras PATH)")
        require_keras()
        import keras

        expected = (card.raw.get("source_model") or {}).get("sha256") if card is not None else None
        if expected and sha256_file(keras_path) != expected:
            log.warning("%s is not the float model the card's int8 model was converted from (sha256 differs): "
                        "the contact sheet shows another model's features", keras_path)
        try:
            model = keras.models.load_model(keras_path, compile=False)
        except Exception as exc:  # noqa: BLE001 - keras raises many types for bad files
            raise LayersUnavailable(f"{keras_path}: cannot load as a Keras model ({type(exc).__name__})") from None
        self.path = keras_path
        model = _conv_model(model)
        self.names = _block_outputs(model)
        if not self.names:
            raise LayersUnavailable(f"{keras_path}: no convolution layers to show")
        self._model = keras.Model(model.inputs[0], [model.get_layer(n).output for n in self.names])
        self._to_numpy = keras.ops.convert_to_numpy
        self.channels = int(model.inputs[0].shape[-1])
        record = keras_path.with_name(keras_path.stem + ".train.json")
        self.view: Optional[tuple[str, float]] = None  # an ensemble member's own (contrast step, crop)
        if record.is_file():
            pre = json.loads(record.read_text()).get("preprocessing", {})
            self.view = (pre.get("contrast", "equalize"), float(pre.get("crop", 0.0)))

    def member_input(self, pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
        """The channel of an ensemble's multi-view input that this (member) model reads."""
        if pixels.shape[2] == self.channels:
            return pixels
        views = spec.view_list()
        i = views.index(self.view) if self.view in views else reference_view(spec)
        return pixels[:, :, i : i + 1]

    def blocks(self, pixels: np.ndarray, spec: PreprocessSpec) -> list[Block]:
        x = to_float_input(self.member_input(pixels, spec)[None], spec)
        outs = self._model(x, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return [Block(n, np.asarray(self._to_numpy(o))[0].astype(np.float32))
                for n, o in zip(self.names, outs, strict=True)]

    def write(self, pixels: np.ndarray, spec: PreprocessSpec, out: Path, title: str) -> Path:
        """Compute the blocks for one preprocessed input and write its contact sheet to ``out``."""
        out.write_bytes(contact_sheet(self.member_input(pixels, spec), self.blocks(pixels, spec), title))
        return out


def _conv_model(model):
    """The model, or the first model nested in it that holds the convolutions.

    An adapted member (``pneumoflag adapt``) runs its convolutional layers as a
    nested ``trunk`` shared by its fold heads (``--train all``: the first fold's copy).
    """
    import keras

    if any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers):
        return model
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner = _conv_model(layer)
            if any(isinstance(x, keras.layers.Conv2D) for x in inner.layers):
                return inner
    return model


def _block_outputs(model) -> list[str]:
    """For each Conv2D, the layer whose output is the block's activation (the conv itself if none follows)."""
    import keras

    layers = model.layers
    names: list[str] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        act = getattr(layer, "activation", None)
        chosen = layer.name
        if getattr(act, "__name__", "linear") == "linear":
            for nxt in layers[i + 1 :]:
                if isinstance(nxt, keras.layers.Conv2D):
                    break
                if isinstance(nxt, (keras.layers.ReLU, keras.layers.Activation, keras.layers.LeakyReLU)):
                    chosen = nxt.name
                    break
        names.append(chosen)
    return names


def contact_sheet(pixels: np.ndarray, blocks: list[Block], title: str, per_block: int = 16, tile: int = 64,
                  cmap: str = "viridis") -> bytes:
    """A PNG: the input on the left, one row of ``per_block`` strongest maps per block, labelled."""
    cols = 8
    lines_per_block = -(-per_block // cols)
    pad, label_h = 6, 16
    font = pillow_font(12)
    left = 2 * tile + 2 * pad
    row_h = label_h + lines_per_block * (tile + 2) + pad
    width = left + cols * (tile + 2) + pad
    height = 24 + max(len(blocks) * row_h, 2 * tile + label_h + pad) + 20
    sheet = Image.new("RGB", (width, height), (16, 16, 16))
    d = ImageDraw.Draw(sheet)
    d.text((pad, 5), title, fill=(255, 255, 255), font=font)
    g = pixels[:, :, 0] if pixels.ndim == 3 else pixels
    sheet.paste(Image.fromarray(np.ascontiguousarray(g), "L").resize((2 * tile, 2 * tile), Image.Resampling.LANCZOS)
                .convert("RGB"), (pad, 24 + label_h))
    d.text((pad, 24), "model input", fill=(200, 200, 200), font=font)
    lut = colormap_lut(cmap)
    for b, block in enumerate(blocks):
        y0 = 24 + b * row_h
        h, w, c = block.maps.shape
        strength = block.maps.reshape(-1, c).mean(axis=0)
        live = np.flatnonzero(block.maps.reshape(-1, c).max(axis=0) > 0)
        order = live[np.argsort(-strength[live], kind="stable")][:per_block]
        d.text((left, y0), f"{block.name}: {h}x{w}, {c} maps, {c - live.size} silent; "
               f"{order.size} strongest shown", fill=(200, 200, 200), font=font)
        for k, ch in enumerate(order):
            m = block.maps[:, :, ch]
            lo, hi = float(m.min()), float(m.max())
            u8 = np.round((m - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros((h, w), np.uint8)
            resample = Image.Resampling.NEAREST if h <= tile else Image.Resampling.BOX  # pixels up, averages down
            im = Image.fromarray(lut[u8], "RGB").resize((tile, tile), resample)
            sheet.paste(im, (left + (k % cols) * (tile + 2), y0 + label_h + (k // cols) * (tile + 2)))
    d.text((pad, height - 17), NOTICE, fill=(255, 255, 255), font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def open_activation_sheet(model_path: Path, card: ModelCard, keras_path: Optional[Path] = None) -> "ActivationModel":
    """Entry point (group ``pneumoflag.layers``): what ``pneumoflag explain --layers`` draws with.

    The device CLI finds it through the entry point and never imports the toolchain by name.
    """
    return ActivationModel(keras_path or keras_beside(model_path, card), card)
