"""The compact "reduced-node" CNN of the source work, with the changes that make it generalise.

Source: Conv2D 50/40/35/32 (3x3, same, ReLU) each + 2x2 max-pool; Flatten;
Dense 32/16/5 (ReLU, L2 0.005); Dense 1 sigmoid. Added here: batch norm after
each conv (folded into the conv weights by the int8 converter, so it costs
nothing on the device) and dropout before the dense head. Every layer maps to
an int8 TFLite builtin that the Edge TPU runs.
"""
from __future__ import annotations

from typing import Sequence

MAX_PARAMS = 500_000
CONV_FILTERS = (50, 40, 35, 32)
DENSE_UNITS = (32, 16, 5)


def build_reduced_node_cnn(
    input_shape: Sequence[int] = (128, 128, 1),
    l2: float = 0.005,
    dropout: float = 0.3,
    batch_norm: bool = True,
    conv_filters: Sequence[int] = CONV_FILTERS,
    dense_units: Sequence[int] = DENSE_UNITS,
):
    import keras
    from keras import layers, regularizers

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    for i, f in enumerate(conv_filters, 1):
        x = layers.Conv2D(f, 3, padding="same", use_bias=not batch_norm, name=f"conv{i}")(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    for i, u in enumerate(dense_units, 1):
        x = layers.Dense(
            u, activation="relu", kernel_regularizer=regularizers.l2(l2), name=f"dense{i}"
        )(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    model = keras.Model(inputs, outputs, name="reduced_node_cnn")
    if model.count_params() > MAX_PARAMS:
        raise ValueError(
            f"model has {model.count_params():,} parameters, over the {MAX_PARAMS:,} budget"
        )
    return model


def architecture_summary(model) -> list[str]:
    """One line per layer: name, type, output shape, params (for the model card)."""
    lines = []
    for layer in model.layers:
        try:
            shape = tuple(layer.output.shape)
        except Exception:  # noqa: BLE001 - some layers have no single output
            shape = ()
        lines.append(f"{layer.name}: {type(layer).__name__} {shape} params={layer.count_params()}")
    return lines
