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
    call: Callable[[Any], Any]  # float32 batch -> probabilities, or logits when output == "logit"
    keras_model: Any = None
    summary: list[str] = field(default_factory=list)
    parameters: Optional[int] = None
    #: "probability" (ends in a sigmoid/softmax) or "logit" (the score before it)
    output: str = "probability"

    def raw(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The model's output as it is (logits for a logit model)."""
        out = []
        for i in range(0, len(x), batch_size):
            y = self.call(x[i : i + batch_size])
            out.append(np.asarray(y, dtype=np.float64).reshape(len(x[i : i + batch_size]), -1)[:, -1])
        return np.concatenate(out) if out else np.zeros(0)

    def predict(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities of pneumonia."""
        r = self.raw(x, batch_size)
        return sigmoid(r) if self.output == "logit" else r

    def frozen_function(self):
        """A batch-1 concrete function with variables folded in (what the TFLite converter wants)."""
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        spec = tf.TensorSpec([1, *self.input_shape], tf.float32, name="image")
        fn = tf.function(lambda x: self.call(x), input_signature=[spec], autograph=False)
        return convert_variables_to_constants_v2(fn.get_concrete_function())


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _logit_tensor(model):
    """The pre-activation score of a Keras model that ends in a sigmoid or a 2-way softmax.

    Returns a Keras tensor, or None when the output is not one we can undo exactly.
    An int8 sigmoid has 256 output levels of 1/256 and saturates: images above
    p = 0.996 all tie, and their order is lost. The logit keeps it.
    """
    import keras

    last = model.layers[-1]
    act = getattr(last, "activation", None)
    act_name = getattr(act, "__name__", str(act))
    if isinstance(last, keras.layers.Activation) and act_name == "sigmoid":
        return last.input
    if isinstance(last, keras.layers.Dense) and act_name in ("sigmoid", "softmax"):
        w, *b = last.get_weights()
        b = b[0] if b else np.zeros(w.shape[1], w.dtype)
        if act_name == "sigmoid" and w.shape[1] == 1:
            w1, b1 = w, b
        elif act_name == "softmax" and w.shape[1] == 2:  # p1 = sigmoid(z1 - z0)
            w1, b1 = (w[:, 1] - w[:, 0])[:, None], np.array([b[1] - b[0]], w.dtype)
        else:
            return None
        dense = keras.layers.Dense(1, name="logit_of_" + last.name)
        out = dense(last.input)
        dense.set_weights([w1, b1])
        return out
    return None


def logit_model(fm: "FloatModel") -> "FloatModel":
    """The same Keras model cut before its final sigmoid/softmax, so int8 ends at the logit.

    A model whose output cannot be undone exactly (a SavedModel, another head)
    is returned as it is; the conversion checks then show whether its
    probability output saturates.
    """
    if fm.keras_model is None or fm.output == "logit":
        return fm
    import keras

    t = _logit_tensor(fm.keras_model)
    if t is None:
        log.warning("%s: the output is not a sigmoid or 2-way softmax we can cut; converting it as it is", fm.path)
        return fm
    m = keras.Model(fm.keras_model.inputs[0], t, name=fm.keras_model.name + "_logit")
    return FloatModel(path=fm.path, kind=fm.kind, input_shape=fm.input_shape,
                      call=lambda x: m(x, training=False), keras_model=m, summary=fm.summary,
                      parameters=fm.parameters, output="logit")


def ensemble(models: "list[FloatModel]", member_channel: Optional[list[int]] = None,
             input_shape: Optional[tuple[int, int, int]] = None) -> "FloatModel":
    """One graph that averages the logits of several models.

    Shipped as one int8 file: one invoke, one card, and the Edge TPU maps the
    average (ADD, MUL) like the rest. With ``member_channel``, member ``i`` reads
    only channel ``member_channel[i]`` of a multi-channel input (members
    trained on different contrast steps; a STRIDED_SLICE each).
    """
    import keras

    members = [logit_model(fm) for fm in models]
    shapes = {fm.input_shape for fm in members}
    if len(shapes) != 1:
        raise ModelLoadError(f"ensemble members take different inputs: {sorted(shapes)}")
    if any(fm.output != "logit" or fm.keras_model is None for fm in members):
        raise ModelLoadError("an ensemble needs Keras models that end in a sigmoid (their logits are averaged)")
    shape = tuple(input_shape or members[0].input_shape)
    inp = keras.Input(shape=shape, name="image")
    outs = []
    for i, fm in enumerate(members):
        sub = fm.keras_model
        sub.name = f"member{i}"
        x = inp
        if member_channel is not None and shape[-1] > 1:
            j = member_channel[i]
            x = keras.layers.Lambda(lambda t, j=j: t[..., j : j + 1], name=f"view{i}")(inp)
        outs.append(sub(x))
    avg = keras.layers.Average(name="logit")(outs)
    m = keras.Model(inp, avg, name="ensemble")
    return FloatModel(path=members[0].path, kind="ensemble", input_shape=shape,
                      call=lambda x: m(x, training=False), keras_model=m,
                      summary=[f"average of the logits of {len(members)} members"] + members[0].summary,
                      parameters=int(m.count_params()), output="logit")


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
