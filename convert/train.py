"""``pneumoflag train``: the reduced-node CNN on a patient-level split of a labelled folder."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..device.preprocess import ImageDecodeError, PreprocessSpec, decode, prepare, to_float_input
from .dataset import (
    LABELS,
    DataError,
    patient_split,
    portable_path,
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
    arch: str = "reduced-node"
    size: Optional[int] = None  # None: the architecture's default
    channels: Optional[int] = None
    contrast: str = "equalize"
    crop: float = 0.0
    #: Maximum epochs. 0 writes the initialised model with its ``.train.json`` record (split,
    #: preprocessing, architecture) and no history: the record is what ``convert`` reads, so an
    #: untrained model takes exactly the path a trained one does. It is the way to prove that path
    #: for the transfer architectures on a small CPU: one epoch of InceptionResNetV2 on the 22
    #: training images of tests/data/mini took 111 s on 2 cores and wrote two 655 MB files (model
    #: and checkpoint, with optimizer state), too slow for a test; the untrained model's scores
    #: mean nothing.
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    val_fraction: float = 0.2
    patience: int = 6
    augment: str = "geometric"
    flip: bool = False
    label_smoothing: float = 0.0
    dropout: float = 0.3
    class_weights: bool = True
    seed: int = 42  # initialisation, shuffling, augmentation
    split_seed: int = 42  # the patient-level split: keep it to train ensemble members on the same split
    workers: int = 4

    def spec(self) -> PreprocessSpec:
        from .model import ARCHITECTURES, TRANSFER

        if self.arch not in ARCHITECTURES:
            raise DataError(f"unknown architecture {self.arch!r} (known: {', '.join(ARCHITECTURES)})")
        size, channels, _ = ARCHITECTURES[self.arch]
        if self.arch in TRANSFER:
            min_side = TRANSFER[self.arch][1]
            if self.channels not in (None, 3):
                raise DataError(f"--arch {self.arch} takes 3 channels (the ImageNet layout), not {self.channels}")
            if self.size is not None and self.size < min_side:
                raise DataError(f"--arch {self.arch} needs --size {min_side} or more, not {self.size}")
        return PreprocessSpec(self.size or size, self.size or size, self.channels or channels,
                              contrast=self.contrast, crop=self.crop)


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


class _Batches:
    """Augmented, preprocessed training batches, built on worker threads while the model trains."""

    def __init__(self, sources: list[np.ndarray], y: np.ndarray, spec: PreprocessSpec, cfg: TrainConfig):
        import keras

        from .augment import make_augmenter

        self.sources, self.y, self.spec, self.cfg = sources, y.astype(np.float32), spec, cfg
        self.augment = make_augmenter(cfg.augment, min(spec.height, spec.width), cfg.flip)
        self.epoch = 0
        self.order = self._order()
        outer = self

        class Seq(keras.utils.PyDataset):
            def __init__(self):
                super().__init__(workers=max(1, cfg.workers), use_multiprocessing=False, max_queue_size=8)

            def __len__(self):
                return math.ceil(len(outer.y) / cfg.batch_size)

            def __getitem__(self, i):
                return outer.batch(i)

            def on_epoch_end(self):
                outer.epoch += 1
                outer.order = outer._order()

        self.dataset = Seq()

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, self.epoch]).permutation(len(self.y))

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.order[i * self.cfg.batch_size : (i + 1) * self.cfg.batch_size]
        rng = np.random.default_rng([self.cfg.seed, self.epoch, i])
        x = np.stack([prepare(self.augment(self.sources[j], rng), self.spec) for j in idx])
        return to_float_input(x, self.spec), self.y[idx]


def decode_all(samples, spec: PreprocessSpec, workers: int, label: str) -> tuple[list, np.ndarray, list]:
    """Decoded grayscale sources held in memory (augmentation starts from these), labels, skipped."""

    def one(s):
        try:
            return decode(s.path, spec), ""
        except ImageDecodeError as exc:
            return None, str(exc)

    sources, ys, skipped = [], [], []
    prog = Progress(label, len(samples))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, (s, (g, err)) in enumerate(zip(samples, pool.map(one, samples), strict=False), 1):
            if g is None:
                log.warning("skipped %s: %s", s.path, err)
                skipped.append((s.path, err))
            else:
                sources.append(g)
                ys.append(s.label)
            prog(i)
    return sources, np.asarray(ys, np.int64), skipped


def train(cfg: TrainConfig) -> dict:
    check_writable(cfg.out)
    if cfg.out.suffix != ".keras":
        raise DataError(f"output {cfg.out} must end in .keras")
    if cfg.epochs < 0:
        raise DataError(f"--epochs must be 0 or more, not {cfg.epochs}")
    spec = cfg.spec()
    samples = scan_folder(cfg.data, "training data folder")
    train_s, val_s = patient_split(samples, cfg.val_fraction, cfg.split_seed)
    log.info(
        "patient-level split (seed %d): %d train images, %d validation images",
        cfg.split_seed, len(train_s), len(val_s),
    )
    t0 = time.monotonic()
    src_tr, y_tr, skip_tr = decode_all(train_s, spec, cfg.workers, "decode train")
    src_va, y_va, skip_va = decode_all(val_s, spec, cfg.workers, "decode val")
    require_both_classes(y_tr, "training split", len(skip_tr))
    require_both_classes(y_va, "validation split", len(skip_va))
    log.info("decoded %d images in %.1f s", len(y_tr) + len(y_va), time.monotonic() - t0)

    import keras

    from .model import ARCHITECTURES, TRANSFER, architecture_summary, build_model

    keras.utils.set_random_seed(cfg.seed)
    backend = _deterministic_backend()

    model = build_model(cfg.arch, spec.shape, cfg.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )
    batches = _Batches(src_tr, y_tr, spec, cfg)
    x_va = to_float_input(np.stack([prepare(g, spec) for g in src_va]), spec)

    class_weight = None
    if cfg.class_weights:
        counts = np.bincount(y_tr, minlength=2)
        class_weight = {i: float(len(y_tr) / (2 * counts[i])) for i in range(2)}
        log.info("class weights %s", class_weight)

    # the transfer models are evaluated in batches of the training size, not 256: their activations at
    # 224 px are far larger than the compact models'
    eval_batch = cfg.batch_size if cfg.arch in TRANSFER else 256
    paths = sidecar_paths(cfg.out)
    t1 = time.monotonic()
    if cfg.epochs:
        callbacks = [
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=cfg.patience, restore_best_weights=True
            ),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-5),
            keras.callbacks.CSVLogger(str(paths["history"])),
            keras.callbacks.ModelCheckpoint(str(paths["checkpoint"]), monitor="val_loss", save_best_only=True),
        ]
        history = model.fit(
            batches.dataset,
            validation_data=(x_va, y_va.astype(np.float32)),
            validation_batch_size=eval_batch,
            epochs=cfg.epochs,
            class_weight=class_weight,
            callbacks=callbacks,
            verbose=2,
        ).history
    else:  # the initialised model, written as trained ones are (see ``TrainConfig.epochs``)
        history = {}
        log.info("--epochs 0: writing the initialised, untrained %s model", cfg.arch)
    train_s_elapsed = time.monotonic() - t1
    p_va = model.predict(x_va, batch_size=eval_batch, verbose=0).ravel()
    val_auroc = auroc(y_va, p_va)
    log.info("validation AUROC (float) %.4f%s", val_auroc, "" if cfg.epochs else " (untrained)")

    tmp = cfg.out.with_name(f".{cfg.out.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, cfg.out)
    if history:
        _plot_history(history, paths["plot"])

    meta = {
        "model": cfg.out.name,
        "arch": cfg.arch,
        "architecture": ARCHITECTURES[cfg.arch][2],
        "architecture_summary": architecture_summary(model),
        "parameters": int(model.count_params()),
        "labels": list(LABELS),
        "preprocessing": spec.to_dict(),
        # relative to the repository (or the current folder), never an absolute path of the build machine
        "data": portable_path(cfg.data, cfg.out.parent),
        "split": {
            "kind": "patient-level, stratified by class",
            "seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction,
            "train_images": len(y_tr),
            "val_images": len(y_va),
            "train_fingerprint": split_fingerprint(train_s),
            "val_fingerprint": split_fingerprint(val_s),
            "val_files": [f"{LABELS[s.label]}/{s.path.name}" for s in val_s],
        },
        "training": {
            "epochs_run": len(history.get("loss", [])),
            "best_val_loss": float(min(history["val_loss"])) if history.get("val_loss") else None,
            "untrained": not history,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "augment": cfg.augment,
            "flip": cfg.flip,
            "label_smoothing": cfg.label_smoothing,
            "dropout": cfg.dropout,
            "class_weights": class_weight,
            "seconds": round(train_s_elapsed, 1),
            "backend": backend,
            "keras": keras.__version__,
        },
        "validation": {"auroc_float": val_auroc},
        "skipped_files": [[portable_path(p, cfg.data), r] for p, r in skip_tr + skip_va],
    }
    tmp_meta = paths["meta"].with_name("." + paths["meta"].name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, paths["meta"])
    return meta


def _deterministic_backend() -> str:
    """Name and version of the Keras backend that trains, made deterministic where it can be.

    TensorFlow (the toolchain's own) trains bit-reproducibly on the CPU. Any other Keras 3 backend
    (``KERAS_BACKEND=torch`` on a GPU machine with no TensorFlow) trains the same architecture into a
    ``.keras`` file that ``convert`` reads, with other weights from run to run.
    """
    import keras

    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        return f"tensorflow {tf.__version__}"
    if name == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return f"torch {torch.__version__} ({device})"
    return name


def _plot_history(history: dict, out: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no training plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=False):
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
