"""Fine-tune one ensemble member on a site's images, and join a member's fold models into one graph.

Keras only (the toolchain); ``adapt`` runs the folds. Two modes:

- ``head``: the convolutional layers (and their batch norms) stay as trained on
  the training split; only the dense head after them learns the site. Every
  fold model of a member then shares the same convolutional layers, so the
  member shipped as the average of its ``k`` fold models runs those layers once
  and ``k`` small heads: the shipped graph is exactly the average of the fold
  models, at little more size and time than the base.
- ``all``: every weight learns (batch norms stay frozen: their statistics from
  the training split are better estimates than a few hundred site images
  give). The shipped member then holds ``k`` full copies.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..device.preprocess import PreprocessSpec, prepare, to_float_input

log = logging.getLogger(__name__)

#: --train choices: what the site's images may change
TRAIN_MODES = ("head", "all")
#: layers that belong to a dense head (everything after the last other layer)
_HEAD_KINDS = ("Dense", "Dropout", "Activation")


class FineTuneError(Exception):
    """A model that cannot be fine-tuned this way; the message says why."""


@dataclass
class FineTuneConfig:
    mode: str = "head"
    epochs: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 32
    augment: str = "geometric"
    flip: bool = False
    seed: int = 42
    workers: int = 2
    verbose: int = 2  # Keras fit: one line per epoch, as ``train`` shows it


def trunk_end(model) -> str:
    """Name of the last layer before the dense head (a Flatten or a global pooling)."""
    layers = model.layers
    i = len(layers)
    while i > 0 and type(layers[i - 1]).__name__ in _HEAD_KINDS:
        i -= 1
    if i == 0 or i == len(layers):
        raise FineTuneError(f"model {model.name!r} has no dense head after its other layers: use --train all")
    return layers[i - 1].name


def _head_layers(model, end: str) -> list:
    names = [layer.name for layer in model.layers]
    head = model.layers[names.index(end) + 1:]
    if type(head[-1]).__name__ == "Activation":  # the final sigmoid: the graph is averaged at the logit
        head = head[:-1]
    return head


def _freeze(model, mode: str) -> None:
    end = trunk_end(model)
    in_trunk = True
    for layer in model.layers:
        if mode == "head":
            layer.trainable = not in_trunk
        else:
            layer.trainable = type(layer).__name__ != "BatchNormalization"
        if layer.name == end:
            in_trunk = False


def fine_tune(base, sources: Sequence[np.ndarray], y: np.ndarray, spec: PreprocessSpec, cfg: FineTuneConfig,
              class_weight: Optional[dict[int, float]] = None):
    """A copy of ``base`` fine-tuned on these decoded images (augmented, preprocessed per batch as ``train`` does)."""
    import keras

    from .train import TrainConfig, _Batches

    if cfg.mode not in TRAIN_MODES:
        raise FineTuneError(f"--train must be one of {', '.join(TRAIN_MODES)}, not {cfg.mode!r}")
    keras.utils.set_random_seed(cfg.seed)
    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    _freeze(model, cfg.mode)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=keras.losses.BinaryCrossentropy())
    batches = _Batches(list(sources), np.asarray(y), spec,
                       TrainConfig(data=Path(), out=Path(), batch_size=cfg.batch_size, augment=cfg.augment,
                                   flip=cfg.flip, seed=cfg.seed, workers=cfg.workers))
    model.fit(batches.dataset, epochs=cfg.epochs, class_weight=class_weight, verbose=cfg.verbose)
    return model


def logits(model, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The model's logit (before its final sigmoid) for float inputs."""
    import keras

    from .float_model import _logit_tensor

    t = _logit_tensor(model)
    if t is None:
        raise FineTuneError(f"model {model.name!r} does not end in a sigmoid whose logit can be read")
    cut = keras.Model(model.inputs[0], t)
    return np.asarray(cut.predict(x, batch_size=batch_size, verbose=0), np.float64).reshape(-1)


def member_inputs(sources: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Decoded images as the member's float input, without augmentation (for scoring)."""
    return to_float_input(np.stack([prepare(g, spec) for g in sources]), spec)


def fold_average(base, fold_models: Sequence[Any], mode: str, name: str):
    """One Keras model: the average of the fold models' logits, then the sigmoid (what ``convert`` cuts at).

    In ``head`` mode the fold models' convolutional layers are the base's,
    unchanged (checked here), so the graph runs them once and feeds every fold's head.
    """
    import keras

    from .float_model import _logit_tensor

    inp = keras.Input(shape=tuple(base.inputs[0].shape[1:]), name="image")
    outs = []
    if mode == "head":
        end = trunk_end(base)
        for fm in fold_models:
            for a, b in zip(fm.layers, base.layers, strict=True):
                if a.name == end:
                    break
                if any(not np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(), strict=True)):
                    raise FineTuneError(f"layer {a.name!r} changed in head-only fine-tuning")
        trunk = keras.Model(base.inputs[0], base.get_layer(end).output, name="trunk")
        feats = trunk(inp)
        for i, fm in enumerate(fold_models):
            h_in = keras.Input(shape=tuple(fm.get_layer(end).output.shape[1:]), name=f"features{i}")
            x = h_in
            for layer in _head_layers(fm, end):
                x = layer(x)
            outs.append(keras.Model(h_in, x, name=f"fold{i}_head")(feats))
    else:
        for i, fm in enumerate(fold_models):
            outs.append(keras.Model(fm.inputs[0], _logit_tensor(fm), name=f"fold{i}")(inp))
    avg = keras.layers.Average(name="fold_average")(outs)
    out = keras.layers.Activation("sigmoid", name="pneumonia")(avg)
    return keras.Model(inp, out, name=name)
