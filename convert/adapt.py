"""``pneumoflag adapt``: fit the model to a site's labelled images under a protocol set before the run.

A hospital's labelled images may train weights only so that every figure on
them stays honest. The site's patients are dealt into ``k`` folds; for each
fold every ensemble member is fine-tuned on the other folds and scores the
held-out one, so each image gets an **out-of-fold** score from models that
never saw its patient. The operating points are set on those scores.

What ships is the average of the fold models' logits, nothing else: with
``--train head`` the fold models share the members' unchanged convolutional
layers, so the graph is the base's plus ``k`` small heads per member and stays
within the appliance's budget. Its scores on a new image are the mean of ``k``
models each of the kind that made the out-of-fold scores, which is why the
thresholds carry over (``models/EXPERIMENTS.md`` measures it on patients no
fold saw). A model refit on all the site's images would score more extreme
than its fold models and the thresholds would not hold.

The acceptance protocol (:func:`protocol`) is written to ``NAME.adapt.json`` beside ``NAME.tflite``
before anything trains and checked after; the adapted model and its card are
written only if every criterion holds, otherwise the base model stays the one
to use and the record says which criterion failed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from ..device.card import CardError, ModelCard, Thresholds, card_path_for, sha256_file
from ..device.drift_reference import build_reference
from ..device.scorer import Scorer, load_scorer
from .budget import MAX_INFER_MS, MAX_TFLITE_BYTES
from .dataset import (
    LABELS,
    LoadedSet,
    Sample,
    copy_groups,
    file_digest,
    input_digest,
    load_samples,
    patient_folds,
    patient_split,
    portable_path,
    score_all,
    scan_folder,
    split_fingerprint,
    stratified_subset,
)
from .finetune import TRAIN_MODES, FineTuneConfig, FineTuneError
from .metrics import (
    FLAG_MIN_SENSITIVITY,
    MIN_PER_CLASS,
    URGENT_MIN_SPECIFICITY,
    TierError,
    auroc,
    auroc_interval,
    choose_operating_points,
    evaluate_scores,
    format_points,
)
from .progress import Progress
from .quantize import ConvertConfig, ConvertError, _validation_samples, convert, data_record, training_data_root, write_card
from .train import check_writable, decode_all, sidecar_paths

log = logging.getLogger(__name__)

PROTOCOL_SCHEMA = "pneumoflag.adapt-protocol/1"
DEFAULT_LEARNING_RATE = {"head": 1e-3, "all": 1e-4}
#: the fine-tuning seeds (seed * 1000 + fold * 10 + member) must stay below 2**32
MAX_SEED = 999_999


class AdaptError(Exception):
    """Adaptation cannot start or go on; the message says why."""


class AdaptRefused(AdaptError):
    """The run finished but failed its protocol: nothing was written but the record (``record_path``)."""

    def __init__(self, message: str, record_path: Optional[Path] = None):
        super().__init__(message)
        self.record_path = record_path


class _Refused(Exception):
    """Inside a run: the failed criteria, in words (``adapt`` says where the record went)."""


@dataclass
class AdaptConfig:
    model: Path  # the base .tflite, its card and float members beside it
    data: Path  # the site's labelled images: NORMAL/ and PNEUMONIA/
    out: Path  # the adapted .tflite
    folds: int = 5
    seed: int = 42
    train: str = "head"
    epochs: int = 10
    learning_rate: Optional[float] = None  # default: DEFAULT_LEARNING_RATE[train]
    batch_size: int = 32
    augment: str = "geometric"
    flip: bool = False
    mix_train: float = 0.0  # training-split images added to each fold, as a share of its site images
    min_gain: float = 0.005
    max_forgetting: float = 0.01
    min_sensitivity: float = FLAG_MIN_SENSITIVITY
    urgent_min_specificity: float = URGENT_MIN_SPECIFICITY
    single_tier: bool = False
    prevalence: Optional[float] = None
    calibration: Optional[Path] = None  # default: the members' training folder
    validation: Optional[Path] = None  # default: the validation split the members' training recorded
    num_calibration: int = 200
    max_auroc_drop: float = 0.005
    max_bytes: int = MAX_TFLITE_BYTES
    max_infer_ms: float = MAX_INFER_MS
    version: Optional[str] = None  # default: the base's major version bumped
    edgetpu: bool = False
    plots: Optional[Path] = None  # ROC, confusion and misclassified of the out-of-fold scores, and their figures
    min_per_class: int = MIN_PER_CLASS
    workers: int = 2
    verbose: int = 2

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.train]

    def check(self) -> None:
        if self.out.suffix != ".tflite":
            raise AdaptError(f"output {self.out} must end in .tflite")
        if self.train not in TRAIN_MODES:
            raise AdaptError(f"--train must be one of {', '.join(TRAIN_MODES)}, not {self.train!r}")
        for name, v, lo, hi in (("--folds", self.folds, 2, 20), ("--epochs", self.epochs, 1, 1000),
                                ("--batch-size", self.batch_size, 1, 4096)):
            if not lo <= v <= hi:
                raise AdaptError(f"{name} must be between {lo} and {hi}, not {v}")
        if not 0.0 <= self.mix_train <= 10.0:
            raise AdaptError(f"--mix-train must be between 0 and 10 (a share of the site images), not {self.mix_train}")
        if not 0.0 < self.lr < 1.0:
            raise AdaptError(f"--learning-rate must be in (0, 1), not {self.lr}")
        if not 0 <= self.seed <= MAX_SEED:
            raise AdaptError(f"--seed must be between 0 and {MAX_SEED}, not {self.seed}")
        for name, v in (("--max-forgetting", self.max_forgetting), ("--max-auroc-drop", self.max_auroc_drop)):
            if not 0.0 <= v < 1.0:
                raise AdaptError(f"{name} must be in [0, 1), not {v}")
        if not 0.0 <= self.min_gain < 1.0:  # a negative gain would let a model that ranks the site worse ship
            raise AdaptError(f"--min-gain must be in [0, 1), not {self.min_gain}")
        if not 0.0 < self.max_infer_ms < 1e6:
            raise AdaptError(f"--max-infer-ms must be a positive number of milliseconds, not {self.max_infer_ms}")
        for name, v in (("--max-bytes", self.max_bytes), ("--num-calibration", self.num_calibration),
                        ("--min-per-class", self.min_per_class)):
            if v < 1:
                raise AdaptError(f"{name} must be at least 1, not {v}")
        if self.prevalence is not None and not 0.0 < self.prevalence < 1.0:
            raise AdaptError(f"--prevalence must be between 0 and 1, not {self.prevalence}")
        for name, v in (("--min-sensitivity", self.min_sensitivity),
                        ("--urgent-min-specificity", self.urgent_min_specificity)):
            if not 0.0 < v <= 1.0:
                raise AdaptError(f"{name} must be in (0, 1], not {v}")


def major_bump(version: str) -> str:
    """New weights: a major version step (2.1.0 -> 3.0.0)."""
    m = re.fullmatch(r"(\d+)(?:\.\d+){0,2}", version.strip())
    return f"{int(m.group(1)) + 1}.0.0" if m else f"{version}+adapted"


def record_path(out: Path) -> Path:
    """The audit record beside the output: the protocol (written first) and its outcome."""
    return out.with_name(out.stem + ".adapt.json")


def protocol(cfg: AdaptConfig, base: ModelCard, site: dict, validation: Optional[dict] = None) -> dict:
    """The acceptance criteria, fixed before anything trains (each checked in ``_run``).

    It names the data each criterion is measured on: the site's images (file list and bytes) and the
    validation set "nothing forgotten" is judged on.
    """
    return {
        "schema": PROTOCOL_SCHEMA,
        "base_model": {"name": base.name, "version": base.version, "sha256": base.tflite_sha256},
        "site_data": {k: site[k] for k in ("folder", "images", "files_sha256", "content_sha256") if k in site},
        **({"validation_data": validation} if validation else {}),
        "method": {
            "folds": cfg.folds, "seed": cfg.seed, "split": "by patient, classes dealt evenly",
            "train": cfg.train, "epochs": cfg.epochs, "learning_rate": cfg.lr, "batch_size": cfg.batch_size,
            "augment": cfg.augment, "flip": cfg.flip, "mix_train": cfg.mix_train,
            "shipped": "the average of the fold models' logits",
            "operating_points": {"flag_min_sensitivity": cfg.min_sensitivity,
                                 "urgent_min_specificity": cfg.urgent_min_specificity,
                                 "single_tier": cfg.single_tier, "set_on": "out-of-fold scores"},
        },
        "criteria": [
            {"name": "site gain", "rule": "out-of-fold AUROC on the site >= the base model's AUROC on the same "
             f"images + {cfg.min_gain}", "min_gain": cfg.min_gain},
            {"name": "nothing forgotten", "rule": "int8 AUROC on the validation split >= the base model's there - "
             f"{cfg.max_forgetting}", "max_drop": cfg.max_forgetting},
            {"name": "int8 check", "rule": "int8 AUROC at most "
             f"{cfg.max_auroc_drop} below float on the validation split and on the site (convert's checks)",
             "max_auroc_drop": cfg.max_auroc_drop},
            {"name": "distinct tiers", "rule": "urgent strictly above flag on the out-of-fold scores"
             + (" (single tier allowed: --single-tier)" if cfg.single_tier else "")},
            {"name": "size", "rule": f".tflite bytes in all <= {cfg.max_bytes}", "max_bytes": cfg.max_bytes},
            {"name": "Edge TPU ops", "rule": "every op mappable to the Edge TPU"},
            {"name": "latency", "rule": f"infer p50 <= {cfg.max_infer_ms} ms on this CPU", "max_ms": cfg.max_infer_ms},
        ],
    }


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class Member:
    """A base ensemble member: its float model, training record and preprocessing."""

    path: Path
    meta: dict
    keras_model: object = field(repr=False)

    @property
    def spec(self):
        from ..device.preprocess import PreprocessSpec

        return PreprocessSpec.from_dict(self.meta["preprocessing"])


def adapted_member_name(cfg: AdaptConfig, base_member: Path, index: int) -> str:
    """``OUT-adapted-full`` for the base member ``NAME-full.keras``: never a base member's own name."""
    suffix = base_member.stem.removeprefix(cfg.model.stem + "-")
    return f"{cfg.out.stem}-adapted-{suffix if suffix != base_member.stem else index}"


def _load_base(cfg: AdaptConfig) -> tuple[ModelCard, list[Member]]:
    try:
        card = ModelCard.load(card_path_for(cfg.model))
        card.verify_file(cfg.model)
    except CardError as exc:
        raise AdaptError(str(exc)) from None
    if card.raw.get("adaptation"):
        base = card.raw["adaptation"]["base_model"]
        raise AdaptError(f"{card.name} {card.version} is already adapted (from {base['name']} {base['version']}): "
                         "adapt its base model on all the site's labelled images together instead")
    if cfg.out.resolve() == cfg.model.resolve():
        raise AdaptError(f"--out {cfg.out} is the base model itself: write the adapted model under another name "
                         "(the base stays for sites without labelled images)")
    if cfg.out.stem.endswith("_edgetpu"):
        raise AdaptError(f"--out {cfg.out}: NAME_edgetpu.tflite is the name of a compiled Edge TPU model, whose "
                         f"card is NAME.json ({card_path_for(cfg.out).name}): choose another name")
    paths = card.source_model_paths(cfg.model)
    if not paths:
        raise AdaptError(f"the card {card.path} names no float model: adapt needs the .keras members beside the model")
    _refuse_overwriting_base(cfg, card, paths)
    import keras

    source = card.raw.get("source_model") or {}
    recorded = {m["file"]: m.get("sha256") for m in source.get("members") or [source] if m.get("file")}
    members = []
    for p in paths:
        sha = recorded.get(p.name)
        meta_path = sidecar_paths(p)["meta"]
        if not p.is_file() or not meta_path.is_file():
            raise AdaptError(f"float member {p} or its training record {meta_path.name} is missing "
                             "(adapt fine-tunes the float members the card names)")
        if sha and sha256_file(p) != sha:
            raise AdaptError(f"float member {p} does not match the card {card.path} (sha256 {sha256_file(p)[:12]}… "
                             f"but the card says {sha[:12]}…): {cfg.model.name} was not converted from it; restore "
                             "the member the card names")
        members.append(Member(p, json.loads(meta_path.read_text()), keras.models.load_model(p, compile=False)))
    return card, members


def _refuse_overwriting_base(cfg: AdaptConfig, card: ModelCard, members: list[Path]) -> None:
    """No file adapt writes may be one of the base model's: its .tflite, card, float members and their records."""
    base = {cfg.model, card_path_for(cfg.model), *members}
    if card.edgetpu_file:
        base.add(cfg.model.parent / card.edgetpu_file)
    for m in members:
        base.update(sidecar_paths(m).values())
    ours = [cfg.out, card_path_for(cfg.out), record_path(cfg.out), cfg.out.with_name(cfg.out.stem + "_edgetpu.tflite")]
    for i, m in enumerate(members):
        keras_path = cfg.out.parent / f"{adapted_member_name(cfg, m, i)}.keras"
        ours += [keras_path, sidecar_paths(keras_path)["meta"]]
    base_resolved = {p.resolve(): p for p in base}
    for p in ours:
        if p.resolve() in base_resolved:
            raise AdaptError(f"--out {cfg.out} would overwrite {base_resolved[p.resolve()]}, a file of the base model "
                             "(the base stays for sites without labelled images): choose another name")


def _infer_p50_ms(scorer: Scorer, x: np.ndarray, repeats: int = 40, rounds: int = 5) -> float:
    """The lowest of a few rounds' median invoke time: what the CPU does, not what a busy moment let it do.

    A shared machine (another training run, a test suite) moves one round by 2x or more; the budget is the
    model's cost, so the quietest round counts, as the benchmarks take the lower of their runs.
    """
    for _ in range(5):
        scorer.raw(x)
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            scorer.raw(x)
            times.append((time.perf_counter() - t0) * 1000)
        medians.append(statistics.median(times))
        time.sleep(0.05)
    return min(medians)


def _class_weight(y: np.ndarray) -> dict[int, float]:
    counts = np.bincount(y, minlength=2)
    return {i: float(len(y) / (2 * counts[i])) for i in range(2)}


def _mix_pool(member: Member) -> list[Sample]:
    """The training side of the members' own patient split (never its validation side)."""
    root = training_data_root(member.path, member.meta)
    split = member.meta.get("split") or {}
    samples = scan_folder(root, "training data folder (for --mix-train)")
    train_s, _ = patient_split(samples, split.get("val_fraction", 0.2), split.get("seed", 42))
    if split.get("train_fingerprint") and split_fingerprint(train_s) != split["train_fingerprint"]:
        raise AdaptError(f"the training folder {root} no longer holds the images the members were trained on "
                         "(the split's fingerprint differs): --mix-train cannot keep them apart from validation")
    return train_s


def adapt(cfg: AdaptConfig) -> dict:
    cfg.check()
    check_writable(cfg.out)
    base, members = _load_base(cfg)
    with _one_run_per_out(cfg.out):
        return _adapt(cfg, base, members)


@contextlib.contextmanager
def _one_run_per_out(out: Path):
    """Two runs into one --out would write one record over the other's: the second is refused.

    A lock (``.NAME.adapt.lock`` beside the model, removed at the end) held for the whole run; the kernel
    lets go of it when the process ends, however it ends (a killed run leaves the empty file, which does
    not block the next one).
    """
    import fcntl

    lock = out.with_name(f".{out.stem}.adapt.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise AdaptError(f"another pneumoflag adapt (pid {holder or '?'}) is writing to {out}: wait for it, "
                             "or choose another --out") from None
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if held:
            with contextlib.suppress(OSError):
                os.unlink(lock)
        os.close(fd)


def _adapt(cfg: AdaptConfig, base: ModelCard, members: list[Member]) -> dict:

    samples = scan_folder(cfg.data, "site data folder")
    counts = np.bincount([s.label for s in samples], minlength=2)
    if counts.min() < cfg.min_per_class:
        raise AdaptError(f"site data {cfg.data}: {', '.join(f'{LABELS[i]}={counts[i]}' for i in range(2))} images; "
                         f"adaptation needs at least {cfg.min_per_class} of each class (--min-per-class)")
    site = load_samples(samples, base.preprocessing, cfg.workers, Progress("site images", len(samples)))
    readable = np.bincount(site.y, minlength=2)
    if readable.min() < cfg.min_per_class:
        raise AdaptError(f"site data {cfg.data}: only {', '.join(f'{LABELS[i]}={readable[i]}' for i in range(2))} "
                         f"readable images ({len(site.skipped)} unreadable); adaptation needs at least "
                         f"{cfg.min_per_class} of each class (--min-per-class)")
    kept = {p: i for i, p in enumerate(site.paths)}
    samples = [s for s in samples if s.path in kept]
    digests = [file_digest(s.path) for s in samples]  # the bytes this run reads; checked again at the end
    joined = _joined_copies(samples, digests)
    val_samples, val_rec = _validation_samples(
        ConvertConfig(model=[m.path for m in members], calibration=Path(), out=cfg.out, validation=cfg.validation),
        members[0].meta)
    _refuse_base_data(members, val_samples, samples, digests)
    folds = np.asarray(patient_folds(samples, cfg.folds, cfg.seed, joined))
    for f in range(cfg.folds):
        if np.unique(site.y[folds == f]).size < 2:
            raise AdaptError(f"fold {f + 1} of {cfg.folds} holds images of one class only: use fewer --folds")
    site_rec = {"kind": "site data (pneumoflag adapt)", **data_record(samples, cfg.data),
                "content_sha256": hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]}

    # the protocol is on disk, with its digest and time, before anything trains
    proto = protocol(cfg, base, site_rec, val_rec)
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rec_path = record_path(cfg.out)
    installed = _keep_installed_record(cfg)
    record = {"protocol": proto, "protocol_sha256": _digest(proto), "protocol_written": written,
              "status": "running"}
    _write_record(rec_path, record)
    log.info("protocol written to %s (sha256 %s…) before training", rec_path, record["protocol_sha256"][:12])
    try:
        return _run(cfg, base, members, samples, site, folds, site_rec, proto, record, rec_path,
                    digests, joined, val_samples, val_rec)
    except BaseException as exc:  # the record says the run did not finish, and why
        if _installed_protocol(cfg.out, when=True) == (record["protocol_sha256"], written):
            raise  # this run's model is in place and its record says so (e.g. --plots could not be written)
        if not isinstance(exc, _Refused):
            record.update(status="error", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          error=f"{type(exc).__name__}: {exc}")
            _write_record(rec_path, record)
        kept_at, keep = rec_path, f"{cfg.model.name} ({base.name} {base.version})"
        if installed is not None:  # the model already at --out stays, and so does its record
            kept_at = _free_name(rec_path.with_name(f"{cfg.out.stem}.adapt.{_stamp(written)}.{record['status']}.json"))
            os.replace(rec_path, kept_at)
            os.replace(installed["backup"], rec_path)
            keep = f"{cfg.out.name} ({installed['name']}), already there, with its own record {rec_path.name}"
            log.warning("this run's record is %s; %s keeps its record %s", kept_at, cfg.out.name, rec_path.name)
        if isinstance(exc, _Refused):
            raise AdaptRefused(
                f"adaptation refused by its protocol; nothing was written but the record {kept_at}: {exc}. "
                f"Keep using {keep}", kept_at) from None
        raise


def _joined_copies(samples: list[Sample], digests: list[str]) -> dict[str, str]:
    """Refuse an image filed under both classes; keep the patients of an image filed twice in one fold."""
    label_of: dict[str, tuple[int, Sample]] = {}
    clash = []
    for s, d in zip(samples, digests, strict=True):
        other = label_of.setdefault(d, (s.label, s))
        if other[0] != s.label:
            clash.append((other[1], s))
    if clash:
        a, b = clash[0]
        raise AdaptError(f"{len(clash)} site images have the same bytes under NORMAL and under PNEUMONIA (e.g. "
                         f"{a.path.name} and {b.path.name}): fix the labels before adapting")
    joined = copy_groups(samples, digests)
    if joined:
        log.warning("%d patients share image files (the same bytes under another patient's name): each such group "
                    "is kept in one fold, so no fold model scores an image it was trained on", len(joined))
    return joined


def _refuse_base_data(members: list[Member], val_samples: list[Sample], samples: list[Sample],
                      digests: list[str]) -> None:
    """Site images the base members trained or were validated on would make the out-of-fold figures in-sample
    for the convolutional layers (and "nothing forgotten" in-sample): refuse them, by their bytes."""
    theirs = {file_digest(s.path) for s in val_samples if s.path.is_file()}
    root = training_data_root(members[0].path, members[0].meta)
    if root.is_dir():
        theirs.update(file_digest(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    seen = [s for s, d in zip(samples, digests, strict=True) if d in theirs]
    if seen:
        raise AdaptError(f"{len(seen)} site images (e.g. {seen[0].path.name}) are images the base model's members "
                         "were trained or validated on: adapt on the site's own labelled images")


def _stamp(iso: str) -> str:
    return re.sub(r"[^0-9T]", "", iso.split("+")[0]) + "Z"


def _installed_protocol(out: Path, when: bool = False):
    """The protocol digest of the adapted model at ``out`` (its card matching the file), else None; with
    ``when``, the digest and the time the protocol was written (the same protocol can be run twice)."""
    try:
        card = ModelCard.load(card_path_for(out))
        card.verify_file(out)
    except (OSError, CardError):
        return None
    a = card.raw.get("adaptation") or {}
    return (a.get("protocol_sha256"), a.get("protocol_written")) if when else a.get("protocol_sha256")


def _keep_installed_record(cfg: AdaptConfig) -> Optional[dict]:
    """An adapted model already at --out keeps its audit record: a copy, put back unless this run replaces it.

    Only when the record belongs to that model (its card's protocol digest) and the card to the model file.
    Any other record there (an earlier refused, failed or unfinished run, or one whose model is gone) is kept
    as ``NAME.adapt.TIME.STATUS.json``: every attempt into --out leaves its trace, so a run that passes after
    others were refused does not hide them.
    """
    rec = record_path(cfg.out)
    if not rec.is_file():
        return None
    sha = _installed_protocol(cfg.out)
    try:
        old = json.loads(rec.read_text())
    except (OSError, ValueError):
        old = {}
    stamp = _stamp(str(old.get("protocol_written", ""))) if isinstance(old, dict) else "unknown"
    if not isinstance(old, dict) or not sha or old.get("status") != "accepted" or old.get("protocol_sha256") != sha:
        status = re.sub(r"[^a-z]", "", str(old.get("status", "unknown")) if isinstance(old, dict) else "unknown")
        kept = _free_name(rec.with_name(f"{cfg.out.stem}.adapt.{stamp}.{status or 'unknown'}.json"))
        os.replace(rec, kept)
        log.warning("an earlier run's record %s is kept as %s", rec.name, kept.name)
        return None
    backup = rec.with_name(f"{cfg.out.stem}.adapt.{stamp}.json")
    if not backup.exists():
        shutil.copy2(rec, backup)
    card = ModelCard.load(card_path_for(cfg.out))
    return {"backup": backup, "name": f"{card.name} {card.version}"}


def _free_name(path: Path) -> Path:
    """``path``, or ``NAME-2.json``, ``NAME-3.json``... when it is taken."""
    i, candidate = 1, path
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
    return candidate


def _check_unchanged(paths: list[Path], digests: list[str]) -> None:
    """The site images must be the bytes the run started with: the card names the images that trained it."""
    changed = [p for p, d in zip(paths, digests, strict=True) if not p.is_file() or file_digest(p) != d]
    if changed:
        log.warning("changed while adapt ran: %s", ", ".join(str(p) for p in changed[:5]))
        raise AdaptError(f"{len(changed)} site images changed or went away while adapt ran (named in the log, not "
                         "here: this message goes into the record): the card could not say which images trained the "
                         "model; run again on a folder that stays as it is")


def _run(cfg: AdaptConfig, base: ModelCard, members: list[Member], samples: list[Sample], site: LoadedSet,
         folds: np.ndarray, site_rec: dict, proto: dict, record: dict, rec_path: Path, digests: list[str],
         joined: dict[str, str], val_samples: list[Sample], val_rec: dict) -> dict:
    written = record["protocol_written"]
    base_scorer, _ = load_scorer(cfg.model, "cpu", card=base)
    p_base_site = score_all(base_scorer, site, "base model on the site")
    val = load_samples(val_samples, base.preprocessing, cfg.workers, Progress("validation images", len(val_samples)))
    p_base_val = score_all(base_scorer, val, "base model on validation")

    t0 = time.monotonic()
    oof_logit, fold_models = _cross_fit(cfg, members, samples, site.y, folds)
    train_seconds = time.monotonic() - t0
    p_oof = 1.0 / (1.0 + np.exp(-oof_logit))
    prevalence = cfg.prevalence if cfg.prevalence is not None else float(site.y.mean())

    results: dict[str, dict] = {}
    auc_base, auc_oof = auroc(site.y, p_base_site), auroc(site.y, p_oof)
    results["site gain"] = {"value": auc_oof, "limit": auc_base + cfg.min_gain, "base": auc_base,
                            "passed": auc_oof >= auc_base + cfg.min_gain}
    try:
        ops = choose_operating_points(site.y, p_oof, cfg.min_sensitivity, cfg.urgent_min_specificity, cfg.single_tier)
        single = ops["urgent"]["threshold"] is None
        results["distinct tiers"] = {"value": "single tier (--single-tier)" if single else "urgent above flag",
                                     "passed": True}
    except TierError as exc:
        ops = None
        results["distinct tiers"] = {"value": str(exc), "passed": False}

    with tempfile.TemporaryDirectory(prefix=".adapt-", dir=cfg.out.parent) as tmp_name:
        tmp = Path(tmp_name)
        member_paths = _save_members(cfg, members, fold_models, tmp)
        tmp_out = tmp / cfg.out.name
        conv = None
        try:
            conv = convert(ConvertConfig(
                model=member_paths, calibration=cfg.calibration or training_data_root(members[0].path, members[0].meta),
                out=tmp_out, validation=cfg.validation, check_data=cfg.data, num_calibration=cfg.num_calibration,
                max_auroc_drop=cfg.max_auroc_drop, edgetpu=cfg.edgetpu, name=base.name,
                version=cfg.version or major_bump(base.version), single_tier=True, seed=0, workers=cfg.workers,
                min_sensitivity=cfg.min_sensitivity, min_specificity=cfg.urgent_min_specificity))
            ag = conv["card"]["quantization"]["agreement"]
            results["int8 check"] = {"value": {k: round(v["auroc_drop"], 5) for k, v in ag.items()},
                                     "limit": cfg.max_auroc_drop, "passed": True}
        except ConvertError as exc:
            results["int8 check"] = {"value": str(exc), "passed": False}
        if conv is not None:
            new_scorer, _ = load_scorer(tmp_out, "cpu", card=ModelCard.load(conv["card_path"]))
            p_new_val = score_all(new_scorer, val, "adapted model on validation")
            auc_bv, auc_nv = auroc(val.y, p_base_val), auroc(val.y, p_new_val)
            results["nothing forgotten"] = {"value": auc_nv, "limit": auc_bv - cfg.max_forgetting, "base": auc_bv,
                                            "passed": auc_nv >= auc_bv - cfg.max_forgetting}
            size = tmp_out.stat().st_size + sum(
                (tmp / f).stat().st_size for f in [(conv["card"].get("edgetpu") or {}).get("file")] if f)
            results["size"] = {"value": size, "limit": cfg.max_bytes, "passed": size <= cfg.max_bytes}
            compat = conv["card"]["edgetpu_compatibility"]
            results["Edge TPU ops"] = {"value": f"{compat['ops_mapped']} of {compat['ops_total']}",
                                       "passed": bool(compat["all_mapped"])}
            ms = _infer_p50_ms(new_scorer, site.x[0])
            results["latency"] = {"value": round(ms, 3), "limit": cfg.max_infer_ms, "passed": ms <= cfg.max_infer_ms}
        for c in proto["criteria"]:
            results.setdefault(c["name"], {"value": "not measured: the int8 model could not be made",
                                           "passed": False})
        criteria = [{"name": c["name"], "rule": c["rule"], **results[c["name"]]} for c in proto["criteria"]]
        failed = [c for c in criteria if not c["passed"]]

        oof = evaluate_scores(site.y, p_oof, {"flag": ops["flag"]["threshold"], "urgent": ops["urgent"]["threshold"]}
                              if ops else {}, intervals=True, prevalence=prevalence)
        oof["prevalence_source"] = "--prevalence" if cfg.prevalence is not None else "the site data's own"
        base_fig = {"auroc": auc_base, "auroc_ci95": auroc_interval(site.y, p_base_site),
                    "thresholds": base.thresholds.as_dict(),
                    **{k: v for k, v in evaluate_scores(site.y, p_base_site, base.thresholds.as_dict()).items()
                       if k in ("specificity_at_sensitivity", "operating_points")}}
        adaptation = {
            "base_model": {"name": base.name, "version": base.version, "revision": base.revision,
                           "file": cfg.model.name, "sha256": base.tflite_sha256,
                           "members": [{"file": m.path.name, "sha256": sha256_file(m.path)} for m in members]},
            "site_data": {**site_rec, "image_digests": sorted(digests),
                          "input_digests": sorted(input_digest(x) for x in site.x),
                          "image_digests_note": "sha256 of each image's bytes, and of its preprocessed model input "
                                                "(first 16 hex digits): `calibrate` refuses these images, whatever "
                                                "their names, and also after a lossless re-encode; a lossy "
                                                "re-encode, a crop or a rescale makes another input and is not found"},
            "folds": {"k": cfg.folds, "seed": cfg.seed, "by": "patient",
                      "patients_joined_by_identical_images": len(joined),
                      "images": [int((folds == f).sum()) for f in range(cfg.folds)],
                      "patients": [len({s.patient for s, g in zip(samples, folds, strict=True) if g == f})
                                   for f in range(cfg.folds)]},
            "training": {"train": cfg.train, "epochs": cfg.epochs, "learning_rate": cfg.lr,
                         "batch_size": cfg.batch_size, "augment": cfg.augment, "flip": cfg.flip,
                         "mix_train": cfg.mix_train, "class_weights": "inverse class frequency per fold",
                         "batch_norm": "frozen (statistics of the training split)",
                         "seconds": round(train_seconds, 1)},
            "shipped_model": f"the average of the logits of the {cfg.folds} fold models of each of the "
                             f"{len(members)} members"
                             + (" (only the dense heads were fine-tuned: one set of convolutional layers per member, "
                                f"{cfg.folds} heads)" if cfg.train == "head" else ""),
            "protocol": proto,
            "protocol_sha256": record["protocol_sha256"],
            "protocol_written": written,
            "criteria": criteria,
            "accepted": not failed,
            "out_of_fold": oof | {"note": "each image scored by the fold models that never saw its patient"},
            "base_on_site": base_fig,
        }
        record.update(status="accepted" if not failed else "refused", finished=datetime.now(timezone.utc)
                      .isoformat(timespec="seconds"), result=adaptation,
                      out_of_fold_scores=_scores_by_image(site, folds, p_oof, digests))
        if failed:
            _write_record(rec_path, record)
            raise _Refused("; ".join(f"{c['name']} failed ({_say(c)})" for c in failed))
        _check_unchanged(site.paths, digests)
        card = _adapted_card(conv["card"], adaptation, ops, oof, site_rec, val, p_new_val, val_rec)
        card["drift_reference"] = _drift_reference(Path(conv["card_path"]), site, p_oof, ops, prevalence, site_rec)
        write_card(card, Path(conv["card_path"]))
        ModelCard.load(conv["card_path"]).verify_file(tmp_out)
        written_files = _install(cfg, tmp, member_paths, conv, members)
    _write_record(rec_path, record)
    if cfg.plots:
        from .plots import write_plots

        cfg.plots.mkdir(parents=True, exist_ok=True)
        (cfg.plots / "evaluation.json").write_text(json.dumps(
            {"model": f"{card['name']} {card['version']}", "scores": "out-of-fold (pneumoflag adapt)",
             "data": site_rec, **oof}, indent=2) + "\n")
        written_files += [cfg.plots / "evaluation.json", *write_plots(
            cfg.plots, site, p_oof, oof, f"ROC: out-of-fold scores on {site_rec['folder']}")]
    return {"card": card, "card_path": card_path_for(cfg.out), "record_path": rec_path, "files": written_files,
            "criteria": criteria, "oof": oof}


def _drift_reference(card_path: Path, site: LoadedSet, p_oof: np.ndarray, ops: dict, prevalence: float,
                     site_rec: dict) -> dict:
    """The drift monitor's reference from the out-of-fold scores: they are what a model of the shipped kind gives
    images it never saw; the shipped model's own scores on the site images it was trained on are sharper than the
    ones it will give new images, and a monitor comparing with them would call the site's own images drift."""
    return build_reference(site.paths, p_oof, site.y, ModelCard.load(card_path),
                           Thresholds(ops["flag"]["threshold"], ops["urgent"]["threshold"]), prevalence,
                           "out-of-fold scores (each image scored by fold models that never saw its patient)",
                           site_rec, "pneumoflag adapt")


def _scores_by_image(site: LoadedSet, folds: np.ndarray, p: np.ndarray, digests: list[str]) -> dict:
    """Each site image's out-of-fold probability, keyed by its bytes' digest: the audit trail of the points.

    Kept in the record, not the card: a physicist can check or re-derive any operating point from it.
    """
    return {"columns": ["image_sha256_16", "label", "fold", "probability"],
            "rows": [[d, int(y), int(f) + 1, round(float(v), 6)] for d, y, f, v in zip(
                digests, site.y, folds, p, strict=True)]}


def _say(c: dict) -> str:
    """A criterion's measured value against its limit, in words."""
    v = c["value"]
    if isinstance(v, float) and "limit" in c:
        return f"{v:.4f} against {c['limit']:.4f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {x:+.4f}" for k, x in v.items()) + f" against {c['limit']}"
    if "limit" in c and not isinstance(v, str):
        return f"{v} against {c['limit']}"
    return str(v)


def _cross_fit(cfg: AdaptConfig, members: list[Member], samples: list[Sample], y: np.ndarray,
               folds: np.ndarray) -> tuple[np.ndarray, list[list]]:
    """Out-of-fold logits (the members' mean) and each member's ``k`` fold models."""
    from .finetune import fine_tune, logits, member_inputs
    from .train import _deterministic_backend

    _deterministic_backend()
    mix_pool = _mix_pool(members[0]) if cfg.mix_train > 0 else []
    oof = np.zeros(len(samples))
    fold_models: list[list] = [[] for _ in members]
    for mi, m in enumerate(members):
        spec = m.spec
        sources, ys, skipped = decode_all(samples, spec, cfg.workers, f"decode site ({m.path.name})")
        if skipped:
            raise AdaptError(f"{len(skipped)} site images could not be decoded for member {m.path.name}")
        decoded_mix: dict[Path, np.ndarray] = {}
        for f in range(cfg.folds):
            train_idx = np.flatnonzero(folds != f)
            src = [sources[i] for i in train_idx]
            yy = list(y[train_idx])
            n_mix = round(cfg.mix_train * len(train_idx))
            if n_mix:
                extra = stratified_subset(mix_pool, n_mix, cfg.seed * 1000 + f)
                todo = [s for s in extra if s.path not in decoded_mix]
                got, _, bad = decode_all(todo, spec, cfg.workers, "decode training-split images")
                for s, g in zip([s for s in todo if s.path not in {b[0] for b in bad}], got, strict=True):
                    decoded_mix[s.path] = g
                for s in extra:
                    if s.path in decoded_mix:
                        src.append(decoded_mix[s.path])
                        yy.append(s.label)
            yy_arr = np.asarray(yy, np.int64)
            log.info("fold %d/%d, member %d/%d (%s): fine-tuning the %s on %d site + %d training-split images, "
                     "%d epochs", f + 1, cfg.folds, mi + 1, len(members), m.path.name,
                     "dense head" if cfg.train == "head" else "whole model", len(train_idx), len(src) - len(train_idx),
                     cfg.epochs)
            ft = FineTuneConfig(mode=cfg.train, epochs=cfg.epochs, learning_rate=cfg.lr, batch_size=cfg.batch_size,
                                augment=cfg.augment, flip=cfg.flip, seed=cfg.seed * 1000 + f * 10 + mi,
                                workers=cfg.workers, verbose=cfg.verbose)
            try:
                model = fine_tune(m.keras_model, src, yy_arr, spec, ft, _class_weight(yy_arr))
            except FineTuneError as exc:
                raise AdaptError(str(exc)) from None
            held = np.flatnonzero(folds == f)
            oof[held] += logits(model, member_inputs([sources[i] for i in held], spec)) / len(members)
            fold_models[mi].append(model)
    return oof, fold_models


def _save_members(cfg: AdaptConfig, members: list[Member], fold_models: list[list], folder: Path) -> list[Path]:
    """Each member as the average of its fold models (.keras) with a training record ``convert`` reads."""
    from .finetune import fold_average

    paths = []
    for i, (m, fms) in enumerate(zip(members, fold_models, strict=True)):
        name = adapted_member_name(cfg, m.path, i)
        path = folder / f"{name}.keras"
        fold_average(m.keras_model, fms, cfg.train, name.replace("-", "_")).save(path)
        meta = dict(m.meta)
        meta.update(model=path.name, data=portable_path(training_data_root(m.path, m.meta), folder),
                    adapted={"from": m.path.name, "sha256": sha256_file(m.path), "folds": cfg.folds,
                             "train": cfg.train, "site_data": Path(cfg.data).name})
        sidecar_paths(path)["meta"].write_text(json.dumps(meta, indent=2))
        paths.append(path)
    return paths


def _adapted_card(card: dict, adaptation: dict, ops: dict, oof: dict, site_rec: dict, val: LoadedSet,
                  p_val: np.ndarray, val_rec: dict) -> dict:
    """convert's card, with the out-of-fold operating points and the adaptation record."""
    card = dict(card)
    th = {"flag": ops["flag"]["threshold"], "urgent": ops["urgent"]["threshold"]}
    ops = dict(ops, source={**site_rec, "kind": "out-of-fold scores on the site data (pneumoflag adapt)"})
    card["operating_points"] = ops
    card["validation"] = dict(card["validation"], int8=evaluate_scores(val.y, p_val, th, intervals=True),
                              source=val_rec)
    card["validation"].pop("float", None)
    card.pop("check_data", None)  # the shipped model has seen every site image: only out-of-fold figures count
    card["quantization"]["agreement"]["check"]["data"]["kind"] = (
        "the site data (float vs int8 agreement only: the shipped model was trained on these images)")
    card["site"] = oof | {"source": ops["source"]}
    card["architecture"] = dict(card["architecture"], description=card["architecture"]["description"]
                                + f"; adapted to {site_rec['folder']}: {adaptation['shipped_model']}")
    card["adaptation"] = adaptation
    return card


def _install(cfg: AdaptConfig, tmp: Path, member_paths: list[Path], conv: dict, members: list[Member]) -> list[Path]:
    """Move the accepted files into place: the members and their records first, the .tflite and card last."""
    dest = cfg.out.parent
    moved = []
    for p in member_paths:
        meta_path = sidecar_paths(p)["meta"]
        meta = json.loads(meta_path.read_text())
        meta["data"] = portable_path(tmp / meta["data"], dest)
        meta_path.write_text(json.dumps(meta, indent=2))
        for src in (p, meta_path):
            os.replace(src, dest / src.name)
            moved.append(dest / src.name)
    card_path = Path(conv["card_path"])
    extra = [(conv["card"].get("edgetpu") or {}).get(k) for k in ("file", "log")]
    for name in [e for e in extra if e]:
        shutil.move(str(tmp / name), dest / name)
        moved.append(dest / name)
    os.replace(tmp / cfg.out.name, cfg.out)
    os.replace(card_path, card_path_for(cfg.out))
    moved += [cfg.out, card_path_for(cfg.out)]
    return moved


def summary(res: dict) -> str:
    card, oof = res["card"], res["oof"]
    a = card["adaptation"]
    lines = [
        f"{card['name']} {card['version']}: {a['base_model']['name']} {a['base_model']['version']} adapted on "
        f"{a['site_data']['folder']} (NORMAL {a['site_data']['images']['NORMAL']}, PNEUMONIA "
        f"{a['site_data']['images']['PNEUMONIA']}; {a['folds']['k']} folds by patient, seed {a['folds']['seed']})",
        f"out-of-fold AUROC {oof['auroc']:.4f} [{oof['auroc_ci95'][0]:.4f}, {oof['auroc_ci95'][1]:.4f}] "
        f"(base model on the same images {a['base_on_site']['auroc']:.4f})",
        "operating points on out-of-fold scores (bootstrap 95% intervals; flagged share and PPV at the prevalence):",
        *format_points(oof),
        "protocol (written before training, sha256 " + a["protocol_sha256"][:12] + "…):",
        *(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['rule']} ({_say(c)})" for c in a["criteria"]),
        "wrote " + ", ".join(str(p) for p in res["files"]) + f" and the record {res['record_path']}",
    ]
    return "\n".join(lines)
