"""The compact CNNs ``pneumoflag train --arch`` builds.

``reduced-node`` (the default) is the source work's model: Conv2D 50/40/35/32
(3x3, same, ReLU) each + 2x2 max-pool; Flatten; Dense 32/16/5 (ReLU, L2
0.005); Dense 1 sigmoid. Added here: batch norm after each conv (folded into
the conv weights by the int8 converter, so it costs nothing on the device) and
dropout before the dense head.

``rgb64`` and ``small-cnn`` are the source notebooks' other small CNNs: a
64x64 RGB network (three conv blocks 32/64/128, dense 128) and a plain
two-block network the notebooks ran at 50 and 128 px. They are here so the
study can compare them and so ``convert`` and the daemon are exercised with
3-channel and other-size models.

``vgg19``, ``inception-resnet-v2`` and ``resnet50v2`` are the source
notebooks' transfer models: the Keras applications (``include_top=False``),
global average pooling, dropout and the same ``logit`` / ``pneumonia`` end,
at 224 x 224 x 3. They are built with ``weights=None`` (ImageNet weights
cannot be fetched on this project's machines): 20-54 million parameters,
40-110 times the compact budget, so they train on a GPU; on a 2-core CPU they
serve to prove that ``convert``, ``score`` and the daemon take such a model,
and to deploy one a user trained elsewhere. Each application's own input
scaling is a ``Rescaling`` layer inside the model, so the device feeds them
uint8 pixels * 1/255 like every other model (see ``TRANSFER``).

Every model ends in a linear ``logit`` layer followed by a separate
``pneumonia`` sigmoid: ``convert`` cuts the graph at the logit, so the int8
model never quantizes a saturating output (see ``float_model.logit_model``).
Every layer of the compact models maps to an int8 TFLite builtin that the
Edge TPU runs; ``convert`` prints the op report of the transfer models too.
"""
from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger(__name__)

MAX_PARAMS = 500_000
CONV_FILTERS = (50, 40, 35, 32)
DENSE_UNITS = (32, 16, 5)
#: --arch name -> (default input size, default channels, one-line description)
ARCHITECTURES = {
    "reduced-node": (128, 1, "reduced-node CNN (conv 50/40/35/32 + BN, dense 32/16/5, sigmoid)"),
    "rgb64": (64, 3, "64x64 RGB CNN of the source notebooks (conv 32/64/128 + BN, pool, dense 128, sigmoid)"),
    "small-cnn": (128, 1, "the notebooks' plain CNN (conv 32/64 + BN, dense 64, sigmoid), run at 50 or 128 px"),
    "vgg19": (224, 3, "Keras VGG19 (no top, weights=None), global average pool, dropout, dense 1, sigmoid"),
    "inception-resnet-v2": (224, 3, "Keras InceptionResNetV2 (no top, weights=None), global average pool, "
                                    "dropout, dense 1, sigmoid"),
    "resnet50v2": (224, 3, "Keras ResNet50V2 (no top, weights=None), global average pool, dropout, dense 1, "
                           "sigmoid"),
}
#: The transfer architectures: --arch name -> (keras.applications constructor, smallest input side,
#: the application's own input scaling as (scale, offset) on the device's pixels * 1/255).
#: ``preprocess_input`` of VGG19 ("caffe") flips RGB to BGR and subtracts the ImageNet BGR means from
#: pixels in 0-255: 255 * x - mean. The flip is left out: the device's 3-channel input is grey with
#: R = G = B, where it changes nothing. ResNet50V2 and InceptionResNetV2 ("tf") take pixels / 127.5 - 1:
#: 2 * x - 1. MAX_PARAMS does not apply to them (see ``_checked``).
TRANSFER = {
    "vgg19": ("VGG19", 32, (255.0, (-103.939, -116.779, -123.68))),
    "inception-resnet-v2": ("InceptionResNetV2", 75, (2.0, -1.0)),
    "resnet50v2": ("ResNet50V2", 32, (2.0, -1.0)),
}


def _head(x, dense_units: Sequence[int], l2: float, dropout: float, pool: bool = False):
    import keras
    from keras import layers, regularizers

    x = layers.GlobalAveragePooling2D(name="avg_pool")(x) if pool else layers.Flatten(name="flatten")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    for i, u in enumerate(dense_units, 1):
        x = layers.Dense(
            u, activation="relu", kernel_regularizer=regularizers.l2(l2) if l2 else None, name=f"dense{i}"
        )(x)
    logit = layers.Dense(1, name="logit")(x)
    return logit, layers.Activation("sigmoid", name="pneumonia", dtype=keras.config.floatx())(logit)


def _conv_blocks(x, filters: Sequence[int], batch_norm: bool = True):
    from keras import layers

    for i, f in enumerate(filters, 1):
        x = layers.Conv2D(f, 3, padding="same", use_bias=not batch_norm, name=f"conv{i}")(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    return x


def build_reduced_node_cnn(
    input_shape: Sequence[int] = (128, 128, 1),
    l2: float = 0.005,
    dropout: float = 0.3,
    batch_norm: bool = True,
    conv_filters: Sequence[int] = CONV_FILTERS,
    dense_units: Sequence[int] = DENSE_UNITS,
):
    import keras

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv_blocks(inputs, conv_filters, batch_norm)
    _, outputs = _head(x, dense_units, l2, dropout)
    return _checked(keras.Model(inputs, outputs, name="reduced_node_cnn"))


def build_model(arch: str, input_shape: Sequence[int], dropout: float = 0.3):
    """The network named ``arch`` for ``input_shape`` (H, W, C)."""
    import keras

    if arch == "reduced-node":
        return build_reduced_node_cnn(input_shape, dropout=dropout)
    if arch in TRANSFER:
        return build_transfer(arch, input_shape, dropout)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    if arch == "rgb64":
        x = _conv_blocks(inputs, (32, 64, 128))
        x = keras.layers.MaxPooling2D(2, name="pool_head")(x)  # 4 x 4 x 128 into dense 128: within budget
        _, outputs = _head(x, (128,), 0.0, max(dropout, 0.5))
    elif arch == "small-cnn":
        x = _conv_blocks(inputs, (32, 64))
        # shrink the flatten so a 128 px input stays within the parameter budget
        x = keras.layers.MaxPooling2D(4 if min(input_shape[:2]) >= 96 else 2, name="pool_head")(x)
        _, outputs = _head(x, (64,), 0.0, max(dropout, 0.5))
    else:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    return _checked(keras.Model(inputs, outputs, name=arch.replace("-", "_")))


def build_transfer(arch: str, input_shape: Sequence[int], dropout: float = 0.3, weights=None):
    """A Keras application with the project's end, its own input scaling inside.

    ``weights`` goes to the application (None: randomly initialised; a weights file or "imagenet"
    where those can be had, not tried here: ``pneumoflag train`` always passes None). The application is built on the ``Rescaling`` tensor
    (``input_tensor``), so its layers are the model's own (not one nested layer): layer names in the
    op report and ``explain --layers`` are the application's (``block1_conv1`` ...).
    """
    import keras

    constructor, min_side, (scale, offset) = TRANSFER[arch]
    h, w, c = (int(v) for v in input_shape)
    if c != 3:
        raise ValueError(f"{arch} takes 3 channels (the ImageNet layout), not {c}")
    if min(h, w) < min_side:
        raise ValueError(f"{arch} needs an input of at least {min_side} x {min_side} px, not {h} x {w}")
    inputs = keras.Input(shape=(h, w, c), name="image")
    x = keras.layers.Rescaling(scale, offset=list(offset) if isinstance(offset, tuple) else offset,
                               name="input_scaling")(inputs)
    base = getattr(keras.applications, constructor)(include_top=False, weights=weights, input_tensor=x)
    _, outputs = _head(base.output, (), 0.0, dropout, pool=True)
    model = keras.Model(inputs, outputs, name=arch.replace("-", "_"))
    log.info("%s: %s parameters, %.0fx the compact models' budget of %s: train it on a GPU",
             arch, f"{model.count_params():,}", model.count_params() / MAX_PARAMS, f"{MAX_PARAMS:,}")
    return model


def _checked(model):
    """The compact models' parameter budget (an int8 file well under the appliance's 1 MB).

    Not applied to the transfer architectures, which are far over it by construction: they are
    there to take a model trained elsewhere through convert and the daemon, and their size and
    infer time are measured, not budgeted (models/EXPERIMENTS.md).
    """
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
