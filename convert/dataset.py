"""Labelled image folders (``NORMAL/``, ``PNEUMONIA/``), patient-level splits, in-memory cache.

No TensorFlow here: `evaluate` on a .tflite model runs with the device install.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ..device.preprocess import ImageDecodeError, PreprocessSpec, preprocess

log = logging.getLogger(__name__)

LABELS = ("NORMAL", "PNEUMONIA")  # index = class id; PNEUMONIA is the positive class


class DataError(Exception):
    """A data folder that cannot be used; the message says why."""


@dataclass
class Sample:
    path: Path
    label: int

    @property
    def patient(self) -> str:
        return patient_id(self.path.name)


@dataclass
class LoadedSet:
    """Decoded, preprocessed images held in memory."""

    x: np.ndarray  # (n, H, W, C) uint8
    y: np.ndarray  # (n,) int
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)


_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    # IM-0115-0001 and NORMAL2-IM-0115-0001 share the number; grouping them
    # together can only make the split stricter, never leak a patient.
    re.compile(r"^(?:NORMAL2-)?(IM-\d+)-", re.IGNORECASE),
)


def patient_id(filename: str) -> str:
    """Patient id from a Kermany-style file name; the whole stem when there is none."""
    for pat in _PATIENT_PATTERNS:
        m = pat.match(filename)
        if m:
            return m.group(1).lower()
    return Path(filename).stem.lower()


def scan_folder(root: Path | str, what: str = "data folder") -> list[Sample]:
    """List the images under ``root/NORMAL`` and ``root/PNEUMONIA`` (sorted, deterministic)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder")
    present = {p.name.upper(): p for p in root.iterdir() if p.is_dir()}
    missing = [lab for lab in LABELS if lab not in present]
    if missing:
        raise DataError(
            f"{what} {root} must hold the subfolders {', '.join(LABELS)} "
            f"(missing: {', '.join(missing)})"
        )
    samples: list[Sample] = []
    for label, name in enumerate(LABELS):
        for p in sorted(present[name].rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                samples.append(Sample(p, label))
    if not samples:
        raise DataError(f"{what} {root} holds no files under {'/ and '.join(LABELS)}/")
    return samples


def patient_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded split by patient, stratified by class: no patient is on both sides."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
    rng = random.Random(seed)
    val_patients: set[tuple[int, str]] = set()
    for label in range(len(LABELS)):
        patients = sorted({s.patient for s in samples if s.label == label})
        rng.shuffle(patients)
        k = max(1, round(len(patients) * val_fraction)) if len(patients) > 1 else 0
        val_patients.update((label, p) for p in patients[:k])
    # A patient with images in both classes goes wholly to validation.
    val_ids = {p for _, p in val_patients}
    train = [s for s in samples if s.patient not in val_ids]
    val = [s for s in samples if s.patient in val_ids]
    return train, val


def stratified_subset(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """``n`` samples keeping the class ratio (seeded), for calibration."""
    if n >= len(samples):
        return list(samples)
    rng = random.Random(seed)
    out: list[Sample] = []
    for label in range(len(LABELS)):
        group = [s for s in samples if s.label == label]
        k = round(n * len(group) / len(samples))
        out.extend(rng.sample(group, min(k, len(group))))
    return sorted(out, key=lambda s: str(s.path))


def load_samples(
    samples: Sequence[Sample],
    spec: PreprocessSpec,
    workers: int = 4,
    progress: Optional[Callable[[int, int], None]] = None,
) -> LoadedSet:
    """Decode and preprocess every sample; corrupt files are skipped, counted and logged."""

    def one(s: Sample) -> tuple[Sample, Optional[np.ndarray], str]:
        try:
            return s, preprocess(s.path, spec), ""
        except ImageDecodeError as exc:
            return s, None, str(exc)

    xs: list[np.ndarray] = []
    ys: list[int] = []
    paths: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, (s, x, err) in enumerate(pool.map(one, samples), 1):
            if x is None:
                log.warning("skipped %s: %s", s.path, err)
                skipped.append((s.path, err))
            else:
                xs.append(x)
                ys.append(s.label)
                paths.append(s.path)
            if progress:
                progress(i, len(samples))
    if skipped:
        log.warning("%d of %d files skipped as unreadable", len(skipped), len(samples))
    x = np.stack(xs) if xs else np.zeros((0, *spec.shape), np.uint8)
    return LoadedSet(x, np.asarray(ys, np.int64), paths, skipped)


def score_all(scorer, data: LoadedSet, label: str = "scoring") -> np.ndarray:
    """Probabilities of a device scorer (``device.scorer.Scorer``) for every image of a loaded set, with progress."""
    from .progress import Progress

    prog = Progress(label, len(data))
    p = np.empty(len(data))
    for i, x in enumerate(data.x):
        p[i] = scorer.score(x)
        prog(i + 1)
    return p


def require_both_classes(y: np.ndarray, what: str, skipped: int = 0) -> None:
    counts = np.bincount(y, minlength=2)
    if len(y) == 0:
        raise DataError(f"{what}: no readable images ({skipped} skipped as unreadable)")
    if counts.min() == 0:
        raise DataError(
            f"{what}: needs images of both classes, found "
            + ", ".join(f"{LABELS[i]}={counts[i]}" for i in range(2))
        )


def portable_path(path: Path | str, base: Path | str | None = None) -> str:
    """``path`` relative to ``base`` (default: the current folder), for records that travel.

    Model cards and training records never name a folder of the build machine.
    """
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base or os.curdir))


def split_fingerprint(samples: Iterable[Sample]) -> str:
    """Short hash of a file list, to record exactly which images a split held."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: str(s.path)):
        h.update(f"{s.path.parent.name}/{s.path.name}\n".encode())
    return h.hexdigest()[:16]


def patient_folds(samples: Sequence[Sample], k: int, seed: int,
                  joined: Optional[dict[str, str]] = None) -> list[int]:
    """A fold number (0..k-1) for each sample: seeded, by patient, the classes dealt evenly.

    Every image of a patient lands in one fold, so a model never scores a
    patient it was trained on. Patients of each class are shuffled and dealt
    round-robin, starting where the previous class left off, so fold sizes
    differ by at most a patient or two per class. ``joined`` maps a patient to
    the patient it must share a fold with (:func:`copy_groups`: the same image
    filed under two patients' names); patients it does not name deal as before.
    """
    if k < 2:
        raise ValueError(f"folds must be at least 2, not {k}")
    if joined:
        samples = [_AsPatient(s.path, s.label, joined.get(s.patient, s.patient)) for s in samples]
    patients = sorted({s.patient for s in samples})
    if len(patients) < k:
        raise DataError(f"{len(patients)} patients cannot make {k} folds: every fold needs a patient of its own")
    # a patient's class: the first label of its images (one with both classes stays in one fold all the same)
    label_of: dict[str, int] = {}
    for s in samples:
        label_of.setdefault(s.patient, s.label)
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    start = 0
    for label in range(len(LABELS)):
        group = sorted(p for p in patients if label_of[p] == label)
        rng.shuffle(group)
        for i, p in enumerate(group):
            fold_of[p] = (start + i) % k
        start = (start + len(group)) % k
    return [fold_of[s.patient] for s in samples]


@dataclass
class _AsPatient(Sample):
    """A sample dealt under another patient id (:func:`patient_folds` with ``joined``)."""

    as_patient: str = ""

    @property
    def patient(self) -> str:
        return self.as_patient


def copy_groups(samples: Sequence[Sample], digests: Sequence[str]) -> dict[str, str]:
    """Patients that share an image's bytes, joined: each such patient -> its group's first patient id.

    The same file under two names would otherwise count as two patients and
    could sit in two folds, so a fold model would score an image it trained on.
    Patients without a copy elsewhere are not in the map.
    """
    parent: dict[str, str] = {}

    def root(p: str) -> str:
        while parent.get(p, p) != p:
            p = parent[p]
        return p

    first: dict[str, str] = {}
    for s, d in zip(samples, digests, strict=True):
        other = first.setdefault(d, s.patient)
        a, b = root(other), root(s.patient)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups = {p: root(p) for p in {s.patient for s in samples}}
    members: dict[str, int] = {}
    for g in groups.values():
        members[g] = members.get(g, 0) + 1
    return {p: g for p, g in groups.items() if members[g] > 1}


def input_digest(x: np.ndarray) -> str:
    """Short sha256 of a preprocessed model input (uint8 tensor): an image's identity whatever its file's bytes.

    Finds an image again after a lossless re-encode (JPEG to PNG of the same
    pixels), a stripped or added header, or bytes appended to the file.
    """
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Short sha256 of a file's bytes (16 hex digits): an image's identity without its name.

    Names can carry patient ids; the bytes' digest identifies an image without
    revealing anything about it, and finds it again under another name.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
