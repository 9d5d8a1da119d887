"""The drift monitor's reference for an existing model, and the study that measures the monitor.

``python -m pneumoflag.convert.drift_study reference --model M --data SITE [--out CARD]`` writes the
``drift_reference`` section into a model's card and changes nothing else (the model, the operating points and
the rest of the card stay as they are). For a model adapted on these very images it takes each image's
out-of-fold score from the adaptation's record (``NAME.adapt.json``, keyed by the image's bytes), as ``adapt``
itself does; otherwise the model's own scores (``calibrate``'s rule: an unadapted model's scores on the site
images are the ones it gives them).

``python -m pneumoflag.convert.drift_study measure --data SITE [--model M]`` measures the monitor on real
images through the real decoder and the real int8 model: each image, and each simulated change of it (inverted
grey as a misconfigured MONOCHROME1, a strong gamma, a contrast compression, heavy blur, a downscale to a
quarter and back, another Manufacturer in the DICOM header), is decoded and scored once; then windows are
simulated. The site's patients are dealt into two halves (seeded, repeated, each class's patients halved): the reference is made from one
half by the same function ``calibrate`` uses, the streams are drawn (with replacement) from the other half, so
no image judged is one the reference was made from (and, since the streams are drawn from a half as small as
the reference, the monitor is given their combined size: see ``measure``). Printed: the share of site-like streams of ``--stream``
images that ever reached ``watch`` / ``alarm`` (false alarms), and for each change the number of changed images
after a full window of site-like ones until ``alarm`` (median, 90th percentile, and the share that never did
within ``--max-images``). The default model is the base (2.1.0), whose weights never saw ``site_dev``: the
shipped 3.0.0 was trained on those images, and its scores on them are sharper than on new ones.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageFilter

from ..device.card import ModelCard, card_path_for
from ..device.config import DriftConfig
from ..device.decoder import decode_bytes
from ..device.drift import DriftMonitor, Observation
from ..device.drift_inputs import InputSignature, logit
from ..device.drift_reference import build_reference, reference_from, reference_settings
from ..device.preprocess import ImageDecodeError
from ..device.scorer import load_scorer
from ..device.vocab import Reason
from .dataset import file_digest, scan_folder
from .quantize import data_record, write_card

log = logging.getLogger(__name__)

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
SITE_EQUIPMENT, NEW_EQUIPMENT = ("SiteCo", "CR-1"), ("ACME", "DR-9")


def _grey(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def _png(a: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def _gamma(a: np.ndarray, g: float) -> np.ndarray:
    return 255.0 * (a / 255.0) ** g


def _downscale(a: np.ndarray) -> np.ndarray:
    img = Image.fromarray(a, "L")
    return np.asarray(img.resize((max(1, a.shape[1] // 4), max(1, a.shape[0] // 4)), Image.Resampling.BILINEAR)
                      .resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR))


#: the simulated changes: name -> the new export of the image's grey levels (None: the header's equipment only)
CHANGES: dict[str, Optional[Callable[[np.ndarray], np.ndarray]]] = {
    "inverted grey (MONOCHROME1 shown as MONOCHROME2)": lambda a: 255 - a.astype(np.int16),
    "strong gamma (2.2, darker)": lambda a: _gamma(a.astype(np.float64), 2.2),
    "contrast halved around mid-grey": lambda a: 128 + (a.astype(np.float64) - 128) * 0.5,
    "heavy blur (Gaussian, radius 3 px at 224 px)":
        lambda a: np.asarray(Image.fromarray(a, "L").filter(ImageFilter.GaussianBlur(3))),
    "downscaled to a quarter and back": _downscale,
    f"another Manufacturer in the DICOM header ({' '.join(NEW_EQUIPMENT)})": None,
}


@dataclass
class Result:
    """One image (or one changed copy) through the device's decoder and the int8 model, once."""

    p: Optional[float]  # None: refused by the gate
    sig: Optional[InputSignature]


def _run_one(data: bytes, name: str, settings, scorer) -> Result:
    try:
        d = decode_bytes(data, name, settings)
    except ImageDecodeError as exc:
        if exc.reason == Reason.NOT_A_RADIOGRAPH:
            return Result(None, None)
        raise
    return Result(float(scorer.score(d.pixels)), d.inputs)


def _with_equipment(sig: Optional[InputSignature], equipment: tuple[str, str]) -> Optional[InputSignature]:
    """The image as a DICOM export whose header names ``equipment`` (the pixels, and so every figure, unchanged)."""
    if sig is None:
        return None
    return InputSignature(**{**sig.to_dict(), "manufacturer": equipment[0], "model_name": equipment[1]})


def score_everything(model: Path, data: Path) -> tuple[ModelCard, list, dict[str, list[Result]]]:
    scorer, card = load_scorer(model, "cpu")
    settings = reference_settings(card)
    samples = scan_folder(data, "site data folder")
    out: dict[str, list[Result]] = {"site": []}
    for name in CHANGES:
        out[name] = []
    for i, s in enumerate(samples):
        raw = s.path.read_bytes()
        site = _run_one(raw, s.path.name, settings, scorer)
        out["site"].append(Result(site.p, _with_equipment(site.sig, SITE_EQUIPMENT)))
        grey = _grey(raw)
        for name, change in CHANGES.items():
            if change is None:
                out[name].append(Result(site.p, _with_equipment(site.sig, NEW_EQUIPMENT)))
            else:
                r = _run_one(_png(change(grey)), s.path.name, settings, scorer)
                out[name].append(Result(r.p, _with_equipment(r.sig, SITE_EQUIPMENT)))
        if (i + 1) % 50 == 0:
            log.info("scored %d of %d images and their changed copies", i + 1, len(samples))
    return card, samples, out


def _observation(r: Result, t: float, flag: float) -> Observation:
    if r.p is None:
        return Observation(t, None)
    return Observation(t, logit(r.p), r.p >= flag, list(r.sig.figures().values()), r.sig.equipment)


class _Clock:
    def __init__(self) -> None:
        self.t = 1.0e9

    def __call__(self) -> float:
        return self.t


def _monitor(cfg: DriftConfig, reference: dict, clock: _Clock) -> DriftMonitor:
    return DriftMonitor(cfg, reference, "study", "study", None, clock)


def _feed(m: DriftMonitor, clock: _Clock, obs: Observation) -> str:
    clock.t += 60.0
    obs.at = clock.t
    m.window.append(obs)
    m.current = m.evaluate()
    return m.current.state


def measure(model: Path, data: Path, splits: int, streams: int, stream: int, max_images: int, seed: int,
            cfg: DriftConfig, trials: int = 10) -> dict:
    card, samples, results = score_everything(model, data)
    flag = card.thresholds.flag
    by_class = [sorted({s.patient for s in samples if s.label == c}) for c in (0, 1)]
    rng = np.random.default_rng(seed)
    y = np.array([s.label for s in samples])
    false_watch = false_alarm = total_streams = 0
    to_alarm: dict[str, list[int]] = {name: [] for name in CHANGES}
    for _ in range(splits):
        # each class's patients dealt in two (the same prevalence in both halves: a site-like stream)
        half = {p for group in by_class for p in rng.permutation(group)[: len(group) // 2]}
        ref_i = [i for i, s in enumerate(samples) if s.patient in half]
        new_i = [i for i, s in enumerate(samples) if s.patient not in half]
        site = results["site"]
        ok = [i for i in ref_i if site[i].p is not None]
        refused = Counter({"refused": sum(site[i].p is None for i in ref_i)}) if any(site[i].p is None for i in ref_i) \
            else Counter()
        reference = reference_from([site[i].sig for i in ok], refused, [site[i].p for i in ok], y[ok], card.thresholds,
                                   float(y[ok].mean()), "study", {}, "drift_study")
        # the streams are drawn from the other half's images, whose own sampling error is as large as the
        # reference's: the monitor is told the combined size (1/n = 1/n_reference + 1/n_stream), so that it is
        # judged as a reference of one half against an unlimited stream of new images
        reference["n"] = int(1.0 / (1.0 / len(ok) + 1.0 / len(new_i)))
        for _ in range(streams):
            clock = _Clock()
            m = _monitor(cfg, reference, clock)
            states = {_feed(m, clock, _observation(site[i], 0, flag)) for i in rng.choice(new_i, stream)}
            total_streams += 1
            false_alarm += "alarm" in states
            false_watch += bool(states & {"watch", "alarm"})
        for name in CHANGES:
            for _ in range(trials):
                to_alarm[name].append(_images_to_alarm(cfg, reference, site, results[name], new_i, flag,
                                                       max_images, rng))
    return {"model": f"{card.name} {card.version}", "images": len(samples), "splits": splits,
            "window": cfg.window, "min_images": cfg.min_images, "stream": stream, "streams": total_streams,
            "false_watch": false_watch / total_streams, "false_alarm": false_alarm / total_streams,
            "refused_by_gate": {name: sum(r.p is None for r in results[name]) for name in ["site", *CHANGES]},
            "to_alarm": {name: _summary(v, max_images) for name, v in to_alarm.items()}}


def _images_to_alarm(cfg: DriftConfig, reference: dict, site: list[Result], changed: list[Result], new_i: list[int],
                     flag: float, max_images: int, rng: np.random.Generator) -> int:
    """A full window of site-like images, then changed ones until alarm: how many (-1: not within max_images)."""
    clock = _Clock()
    m = _monitor(cfg, reference, clock)
    for i in rng.choice(new_i, cfg.window):
        clock.t += 60.0
        m.window.append(_observation(site[i], clock.t, flag))
    for n in range(1, max_images + 1):
        if _feed(m, clock, _observation(changed[int(rng.choice(new_i))], 0, flag)) == "alarm":
            return n
    return -1


def _summary(v: list[int], cap: int) -> dict:
    hit = [n for n in v if n > 0]
    return {"trials": len(v), "never": sum(n < 0 for n in v),
            "median": float(np.median(hit)) if hit else None, "p90": float(np.percentile(hit, 90)) if hit else None,
            "max": max(hit) if hit else None, "cap": cap}


def format_measure(r: dict) -> str:
    lines = [f"drift monitor on {r['images']} images ({r['model']}), window {r['window']}, min_images "
             f"{r['min_images']}; {r['splits']} patient-level halves: reference from one, images from the other",
             f"site-like streams of {r['stream']} images: {r['false_watch']:.1%} ever reached watch, "
             f"{r['false_alarm']:.1%} ever reached alarm ({r['streams']} streams)",
             "images to alarm after a full window of site-like images (median / 90th percentile / max; never "
             f"within {next(iter(r['to_alarm'].values()))['cap']}):"]
    for name, s in r["to_alarm"].items():
        fig = "never" if s["median"] is None else f"{s['median']:.0f} / {s['p90']:.0f} / {s['max']}"
        lines.append(f"  {name:<52} {fig:>16}   never {s['never']} of {s['trials']}; gate refused "
                     f"{r['refused_by_gate'][name]} of {r['images']}")
    return "\n".join(lines)


def write_reference(model: Path, data: Path, out: Optional[Path] = None, prevalence: Optional[float] = None) -> dict:
    """Only the card's ``drift_reference`` changes; see the module's docstring for which scores."""
    card_path = card_path_for(model)
    card = ModelCard.load(card_path)
    card.verify_file(model)
    samples = scan_folder(data, "site data folder")
    paths, y = [s.path for s in samples], np.array([s.label for s in samples])
    oof = _out_of_fold(card, model, paths)
    if oof is not None:
        p, scores = oof, "out-of-fold scores of the adaptation (its record), as adapt stores them"
    else:
        scorer, _ = load_scorer(model, "cpu", card=card)
        settings = reference_settings(card)
        runs = [_run_one(path.read_bytes(), path.name, settings, scorer) for path in paths]
        p = np.array([r.p if r.p is not None else 0.5 for r in runs])  # a refused image is left out below
        scores = "this model's scores on the site data"
    prev = prevalence if prevalence is not None else float(y.mean())
    ref = build_reference(paths, p, y, card, card.thresholds, prev, scores, data_record(samples, data),
                          "python -m pneumoflag.convert.drift_study reference")
    new = dict(card.raw, drift_reference=ref)
    write_card(new, out or card_path)
    return ref


def _out_of_fold(card: ModelCard, model: Path, paths: list[Path]) -> Optional[np.ndarray]:
    """The adaptation record's out-of-fold probabilities for these images, when the card is adapted on them all."""
    if not card.raw.get("adaptation"):
        return None
    record = json.loads(model.with_name(model.stem + ".adapt.json").read_text())
    rows = {r[0]: r[3] for r in record["out_of_fold_scores"]["rows"]}
    digests = [file_digest(p) for p in paths]
    found = sum(d in rows for d in digests)
    if found == 0:
        return None
    if found < len(paths):
        raise SystemExit(f"{found} of {len(paths)} images trained this adapted model: give only its site images "
                         "(out-of-fold scores) or only images it never saw")
    return np.array([rows[d] for d in digests])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pneumoflag.convert.drift_study", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference", help="write a model card's drift_reference from labelled site images")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--out", type=Path, help="write the card here (default: the card itself)")
    r.add_argument("--prevalence", type=float)
    m = sub.add_parser("measure", help="false alarms and images to alarm, on real images")
    m.add_argument("--data", type=Path, required=True)
    m.add_argument("--model", type=Path, default=REPO_MODELS / "base" / "pneumoflag-rn128.tflite")
    m.add_argument("--splits", type=int, default=10)
    m.add_argument("--streams", type=int, default=20, help="site-like streams per split")
    m.add_argument("--stream", type=int, default=1000, help="images in a site-like stream")
    m.add_argument("--trials", type=int, default=10, help="trials of each change per split")
    m.add_argument("--max-images", type=int, default=400)
    m.add_argument("--window", type=int, default=DriftConfig().window)
    m.add_argument("--min-images", type=int, default=DriftConfig().min_images)
    m.add_argument("--seed", type=int, default=42)
    m.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "reference":
        ref = write_reference(args.model, args.data, args.out, args.prevalence)
        print(f"drift_reference from {ref['n']} images ({ref['scores']}); expected flagged "
              f"{ref['tiers']['expected_share']['flagged']:.1%}; gate refused {ref['gate']['refused']} of "
              f"{ref['gate']['checked']}; written to {args.out or card_path_for(args.model)}")
        return 0
    cfg = DriftConfig(window=args.window, min_images=args.min_images)
    res = measure(args.model, args.data, args.splits, args.streams, args.stream, args.max_images, args.seed, cfg,
                  args.trials)
    print(format_measure(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
