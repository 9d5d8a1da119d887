"""Load a float model (.keras, Keras-2 .h5, SavedModel) behind one small interface."""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """The file is not a model we can load; the message says what it is instead."""


@dataclass
class FloatModel:
    path: Path
    kind: str  # "keras", "h5", "savedmodel"
    input_shape: tuple[int, int, int]  # H, W, C
    call: Callable[[Any], Any]  # float32 batch -> probabilities (TF tensor or array)
    keras_model: Any = None
    summary: list[str] = field(default_factory=list)
    parameters: Optional[int] = None

    def predict(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch_size):
            y = self.call(x[i : i + batch_size])
            out.append(np.asarray(y, dtype=np.float64).reshape(len(x[i : i + batch_size]), -1)[:, -1])
        return np.concatenate(out) if out else np.zeros(0)

    def frozen_function(self):
        """A batch-1 concrete function with variables folded in (what the TFLite converter wants)."""
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        spec = tf.TensorSpec([1, *self.input_shape], tf.float32, name="image")
        fn = tf.function(lambda x: self.call(x), input_signature=[spec], autograph=False)
        return convert_variables_to_constants_v2(fn.get_concrete_function())


def _shape_from(shape, path: Path) -> tuple[int, int, int]:
    dims = list(shape)
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise ModelLoadError(f"{path}: model input must be (batch, height, width, channels), got {dims}")
    h, w, c = (int(d) for d in dims[1:])
    if c not in (1, 3):
        raise ModelLoadError(f"{path}: model input has {c} channels; grayscale (1) or RGB (3) expected")
    return h, w, c


def load_float_model(path: Path | str) -> FloatModel:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ModelLoadError(f"{path}: a folder but not a SavedModel (no saved_model.pb)")
        return _load_savedmodel(path)
    suffix = path.suffix.lower()
    if suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise ModelLoadError(f"{path}: not a Keras model (a .keras file is a zip archive; this is not)")
        return _load_keras(path, "keras")
    if suffix in (".h5", ".hdf5"):
        with open(path, "rb") as f:
            if f.read(8) != b"\x89HDF\r\n\x1a\n":
                raise ModelLoadError(f"{path}: not a Keras .h5 model (no HDF5 signature)")
        return _load_keras(path, "h5")
    raise ModelLoadError(f"{path}: unknown model format {suffix!r}; give a .keras, .h5 or SavedModel folder")


def _load_keras(path: Path, kind: str) -> FloatModel:
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - keras raises many types for bad files
        raise ModelLoadError(f"{path}: cannot load as a Keras model ({type(exc).__name__}: {str(exc)[:200]})") from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelLoadError(f"{path}: expected one input and one output, found {len(model.inputs)} and {len(model.outputs)}")
    out_shape = list(model.outputs[0].shape)
    if out_shape[-1] not in (1, 2):
        raise ModelLoadError(f"{path}: output shape {out_shape}; a single sigmoid (or 2-way softmax) expected")
    shape = _shape_from(model.inputs[0].shape, path)
    from .model import architecture_summary

    return FloatModel(
        path=path, kind=kind, input_shape=shape,
        call=lambda x: model(x, training=False), keras_model=model,
        summary=architecture_summary(model), parameters=int(model.count_params()),
    )


def _load_savedmodel(path: Path) -> FloatModel:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot load SavedModel ({type(exc).__name__}: {str(exc)[:200]})") from None
    sig = loaded.signatures.get("serving_default")
    if sig is None:
        raise ModelLoadError(f"{path}: SavedModel has no 'serving_default' signature")
    _, kwargs = sig.structured_input_signature
    if len(kwargs) != 1:
        raise ModelLoadError(f"{path}: serving signature must take one input, takes {len(kwargs)}")
    (in_name, in_spec), = kwargs.items()
    shape = _shape_from(in_spec.shape, path)
    outs = list(sig.structured_outputs)
    if len(outs) != 1:
        raise ModelLoadError(f"{path}: serving signature must have one output, has {len(outs)}")
    out_name = outs[0]
    params = int(sum(np.prod(v.shape) for v in getattr(loaded, "variables", []))) or None

    def call(x, _keep_alive=loaded):  # the signature needs its object's variables
        return sig(**{in_name: tf.convert_to_tensor(x, tf.float32)})[out_name]

    return FloatModel(path=path, kind="savedmodel", input_shape=shape, call=call,
                      summary=[f"SavedModel signature serving_default: {in_name} {list(in_spec.shape)} -> {out_name}"],
                      parameters=params)
