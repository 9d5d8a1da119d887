"""``pneumoflag train``: the reduced-node CNN on a patient-level split of a labelled folder."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..device.preprocess import PreprocessSpec, to_float_input
from .dataset import (
    LABELS,
    DataError,
    load_samples,
    patient_split,
    require_both_classes,
    scan_folder,
    split_fingerprint,
)
from .metrics import auroc
from .progress import Progress

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: Path
    out: Path
    size: int = 128
    channels: int = 1
    equalize: bool = True
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    val_fraction: float = 0.2
    patience: int = 6
    augment: bool = True
    class_weights: bool = True
    seed: int = 42
    workers: int = 4


def sidecar_paths(model_path: Path) -> dict[str, Path]:
    """Files written next to the trained model."""
    stem = model_path.with_suffix("")
    return {
        "meta": stem.with_name(stem.name + ".train.json"),
        "history": stem.with_name(stem.name + ".history.csv"),
        "plot": stem.with_name(stem.name + ".history.png"),
        "checkpoint": stem.with_name(stem.name + ".best.keras"),
    }


def check_writable(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.exists():
        raise DataError(f"output folder {parent} does not exist")
    if not parent.is_dir():
        raise DataError(f"output folder {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise DataError(f"output folder {parent} is not writable")


def make_augmenter(seed: int):
    """Small geometric jitter: positioning varies between scanners and radiographers."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomRotation(0.03, fill_mode="constant", seed=seed),
            layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 1),
            layers.RandomZoom((-0.1, 0.1), fill_mode="constant", seed=seed + 2),
            layers.RandomContrast(0.15, seed=seed + 3),
        ],
        name="augment",
    )


def train(cfg: TrainConfig) -> dict:
    check_writable(cfg.out)
    if cfg.out.suffix != ".keras":
        raise DataError(f"output {cfg.out} must end in .keras")
    spec = PreprocessSpec(cfg.size, cfg.size, cfg.channels, cfg.equalize)
    samples = scan_folder(cfg.data, "training data folder")
    train_s, val_s = patient_split(samples, cfg.val_fraction, cfg.seed)
    log.info(
        "patient-level split (seed %d): %d train images, %d validation images",
        cfg.seed, len(train_s), len(val_s),
    )
    t0 = time.monotonic()
    tr = load_samples(train_s, spec, cfg.workers, Progress("decode train", len(train_s)))
    va = load_samples(val_s, spec, cfg.workers, Progress("decode val", len(val_s)))
    require_both_classes(tr, "training split")
    require_both_classes(va, "validation split")
    log.info("decoded %d images in %.1f s", len(tr) + len(va), time.monotonic() - t0)

    import keras
    import tensorflow as tf

    from .model import architecture_summary, build_reduced_node_cnn

    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()

    model = build_reduced_node_cnn(spec.shape)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )
    x_tr, y_tr = to_float_input(tr.x, spec), tr.y.astype(np.float32)
    x_va, y_va = to_float_input(va.x, spec), va.y.astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x_tr, y_tr))
    ds = ds.shuffle(len(x_tr), seed=cfg.seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
    if cfg.augment:
        aug = make_augmenter(cfg.seed)
        ds = ds.map(lambda x, y: (aug(x, training=True), y))
    ds = ds.prefetch(2)
    val_ds = tf.data.Dataset.from_tensor_slices((x_va, y_va)).batch(256)

    class_weight = None
    if cfg.class_weights:
        counts = np.bincount(tr.y, minlength=2)
        class_weight = {i: float(len(tr.y) / (2 * counts[i])) for i in range(2)}
        log.info("class weights %s", class_weight)

    paths = sidecar_paths(cfg.out)
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-5),
        keras.callbacks.CSVLogger(str(paths["history"])),
        keras.callbacks.ModelCheckpoint(str(paths["checkpoint"]), monitor="val_loss", save_best_only=True),
    ]
    t1 = time.monotonic()
    hist = model.fit(
        ds,
        validation_data=val_ds,
        epochs=cfg.epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=2,
    )
    train_s_elapsed = time.monotonic() - t1
    p_va = model.predict(x_va, batch_size=256, verbose=0).ravel()
    val_auroc = auroc(va.y, p_va)
    log.info("validation AUROC (float) %.4f", val_auroc)

    tmp = cfg.out.with_name(f".{cfg.out.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, cfg.out)
    _plot_history(hist.history, paths["plot"])

    meta = {
        "model": cfg.out.name,
        "architecture": "reduced-node CNN (conv 50/40/35/32 + BN, dense 32/16/5, sigmoid)",
        "architecture_summary": architecture_summary(model),
        "parameters": int(model.count_params()),
        "labels": list(LABELS),
        "preprocessing": spec.to_dict(),
        "data": str(Path(cfg.data).resolve()),
        "split": {
            "kind": "patient-level, stratified by class",
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
            "train_images": len(tr),
            "val_images": len(va),
            "train_fingerprint": split_fingerprint(train_s),
            "val_fingerprint": split_fingerprint(val_s),
            "val_files": [f"{LABELS[s.label]}/{s.path.name}" for s in val_s],
        },
        "training": {
            "epochs_run": len(hist.history.get("loss", [])),
            "best_val_loss": float(min(hist.history["val_loss"])),
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "augment": cfg.augment,
            "class_weights": class_weight,
            "seconds": round(train_s_elapsed, 1),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "validation": {"auroc_float": val_auroc},
        "skipped_files": [[str(p), r] for p, r in tr.skipped + va.skipped],
    }
    tmp_meta = paths["meta"].with_name("." + paths["meta"].name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, paths["meta"])
    return meta


def _plot_history(history: dict, out: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no training plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(history.get(key, []), label=f"train {key}")
        ax.plot(history.get(f"val_{key}", []), label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
