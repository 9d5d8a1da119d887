"""The adaptation study's commands: do ``adapt``'s thresholds hold on patients it never saw, and how many
site images does it need?

    python -m pneumoflag.convert.adapt_study nested --model BASE.tflite --data SITE --work runs/nested
    python -m pneumoflag.convert.adapt_study nested ... --site-images 100 --min-per-class 10   # learning curve
    python -m pneumoflag.convert.adapt_study row runs/X.adapt.json
    python -m pneumoflag.convert.adapt_study summarise runs/nested.json

``nested`` deals the site's patients into outer folds; for each it runs the
whole of ``adapt`` (its own inner folds, out-of-fold thresholds, the shipped
average, the int8 conversion) on the other outer folds and scores the held-out
patients with the model it ships, at the thresholds it set. The pooled held-out
figures are what a site would see after go-live, against what adapt intended
(an outer fold whose adaptation is refused keeps the base model, as the site
would). With ``--site-images N`` each outer adaptation sees only N images of
its pool: the learning curve, judged on the same held-out patients. ``row``
prints a study table row from an adapt record (also a refused one).
Images are linked, never copied; the work folder holds the runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .adapt import AdaptConfig, AdaptError, AdaptRefused, adapt, record_path
from .dataset import LABELS, Sample, load_samples, patient_folds, scan_folder, score_all
from .metrics import Confusion, TierError, auroc, auroc_interval, choose_operating_points, specificity_at_sensitivity

log = logging.getLogger(__name__)


def link_set(samples: list[Sample], dest: Path) -> Path:
    """A labelled folder of links to these images (NORMAL/, PNEUMONIA/), and nothing else.

    A folder left by an earlier run (``--work`` used again, another ``--site-images``) loses the links this set
    does not hold; a file that is not a link is never deleted: it is refused.
    """
    wanted = {dest / LABELS[s.label] / s.path.name: s.path.resolve() for s in samples}
    for lab in LABELS:
        (dest / lab).mkdir(parents=True, exist_ok=True)
        for p in (dest / lab).iterdir():
            if p.is_symlink() and (p not in wanted or p.resolve() != wanted[p]):
                p.unlink()
            elif not p.is_symlink():
                raise ValueError(f"{p} is not a link: {dest} must hold only the links of this study")
    for link, target in wanted.items():
        if not link.is_symlink():
            link.symlink_to(target)
    return dest


def shuffled_labels(samples: list[Sample], seed: int) -> list[Sample]:
    """The same images with their patients' labels permuted: a site whose labels carry no signal."""
    patients = sorted({s.patient for s in samples})
    labels = [next(s.label for s in samples if s.patient == p) for p in patients]
    random.Random(seed).shuffle(labels)
    new = dict(zip(patients, labels, strict=True))
    return [Sample(s.path, new[s.patient]) for s in samples]


def score_folder(model: Path, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The int8 model's probabilities on these images, their labels and the card's thresholds."""
    from ..device.scorer import load_scorer

    scorer, card = load_scorer(model, "cpu")
    ds = load_samples(samples, card.preprocessing, workers=2)
    p = score_all(scorer, ds, "scoring")
    return ds.y, p, card.thresholds.as_dict()


def _wilson(k: int, n: int) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    z, ph = 1.96, k / n
    d = 1 + z * z / n
    c = ph + z * z / (2 * n)
    r = z * np.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
    return [float((c - r) / d), float((c + r) / d)]


def _adapt_cfg(args, data: Path, out: Path) -> AdaptConfig:
    return AdaptConfig(model=args.model, data=data, out=out, folds=args.folds, train=args.train, epochs=args.epochs,
                       mix_train=args.mix_train, urgent_min_specificity=args.urgent_min_specificity,
                       min_per_class=args.min_per_class, verbose=0)


def _run(cfg: AdaptConfig, reuse: bool = False) -> tuple[Optional[dict], Path]:
    """adapt's result (None when its protocol refused it) and where this run's record is.

    ``reuse``: a finished run in the work folder counts as it is (rescoring only).
    """
    rec_path = record_path(cfg.out)
    if reuse and rec_path.is_file():
        rec = json.loads(rec_path.read_text())
        if rec.get("status") == "refused":
            return None, rec_path
        if rec.get("status") == "accepted" and cfg.out.is_file():
            card = json.loads(cfg.out.with_suffix(".json").read_text())
            return {"card": card, "oof": card["adaptation"]["out_of_fold"]}, rec_path
    try:
        res = adapt(cfg)
        return res, res["record_path"]
    except AdaptRefused as exc:
        log.warning("%s", exc)
        return None, exc.record_path or record_path(cfg.out)


def _base_points_on(args, inner: list[Sample]) -> dict:
    """Where a site whose adaptation was refused sets the base's points: on its own images, calibrate's rules.

    (The base card's own points were set on all of site_dev, the held-out patients among them.)
    """
    y, p, _ = score_folder(args.model, inner)
    try:
        ops = choose_operating_points(y, p, 0.97, args.urgent_min_specificity)
    except TierError:
        ops = choose_operating_points(y, p, 0.97, args.urgent_min_specificity, single_tier=True)
    return {"flag": ops["flag"]["threshold"], "urgent": ops["urgent"]["threshold"]}


def nested(args) -> dict:
    """Adapt on all but one outer fold (or on ``--site-images`` of them), judge on the held-out fold; pool."""
    samples = scan_folder(args.data, "site data folder")
    outer = np.asarray(patient_folds(samples, args.outer, args.seed))
    pooled = {"flag": [], "urgent": []}
    rows = []
    held_y, held_p, held_base = [], [], []
    for o in range(args.outer):
        inner = [s for s, g in zip(samples, outer, strict=True) if g != o]
        if args.site_images:
            inner = _nested_subsets(inner, [args.site_images], args.seed + o)[args.site_images]
        held = [s for s, g in zip(samples, outer, strict=True) if g == o]
        work = args.work / f"outer{o}"
        res, rec_file = _run(_adapt_cfg(args, link_set(inner, work / "site"), work / "adapted.tflite"), args.reuse)
        y, p_base, _ = score_folder(args.model, held)
        row = {"outer": o, "site_images": len(inner), "held_out_images": len(held),
               "auroc_base_held_out": auroc(y, p_base)}
        rec = json.loads(rec_file.read_text()).get("result") or {}
        row["out_of_fold_auroc"] = (rec.get("out_of_fold") or {}).get("auroc")
        row["failed"] = [c["name"] for c in rec.get("criteria", []) if not c["passed"]]
        if res is None:  # refused: the site keeps the base model, with points set on its own images
            p, th = p_base, _base_points_on(args, inner)
        else:
            _, p, th = score_folder(work / "adapted.tflite", held)
            row["intended_out_of_fold"] = {k: {"sensitivity": v["sensitivity"], "specificity": v["specificity"]}
                                           for k, v in res["oof"]["operating_points"].items()}
        row.update(accepted=res is not None, auroc_held_out=auroc(y, p), thresholds=th,
                   scores={"label": [int(v) for v in y], "p": [round(float(v), 6) for v in p],
                           "p_base": [round(float(v), 6) for v in p_base]})
        held_y.append(y)
        held_p.append(p)
        held_base.append(p_base)
        for tier, t in th.items():
            if t is None:
                continue
            c = Confusion.at(y, p, t)
            pooled[tier].append(c)
            row[tier] = c.report()
        rows.append(row)
    y_all, p_all, b_all = np.concatenate(held_y), np.concatenate(held_p), np.concatenate(held_base)
    summary = {"outer_folds": args.outer, "seed": args.seed, "site_images": args.site_images or "all",
               "accepted": sum(r["accepted"] for r in rows), "rows": rows,
               # the AUROC of each held-out fold is within one model; pooling scores of different models
               # (an adapted one and a base one) would rank across scales that were never meant to meet
               "mean_held_out_auroc": float(np.mean([r["auroc_held_out"] for r in rows])),
               "base_mean_held_out_auroc": float(np.mean([r["auroc_base_held_out"] for r in rows])),
               "pooled_auroc": auroc(y_all, p_all), "pooled_auroc_ci95": auroc_interval(y_all, p_all),
               "pooled_spec_at_sens_0.95": specificity_at_sensitivity(y_all, p_all, 0.95),
               "pooled_spec_at_sens_0.97": specificity_at_sensitivity(y_all, p_all, 0.97),
               "base_pooled_auroc": auroc(y_all, b_all),
               "base_spec_at_sens_0.95": specificity_at_sensitivity(y_all, b_all, 0.95), "pooled": {}}
    for tier, cs in pooled.items():
        if not cs:
            continue
        tp, fn = sum(c.tp for c in cs), sum(c.fn for c in cs)
        tn, fp = sum(c.tn for c in cs), sum(c.fp for c in cs)
        summary["pooled"][tier] = {"sensitivity": tp / (tp + fn), "sensitivity_ci95": _wilson(tp, tp + fn),
                                   "specificity": tn / (tn + fp), "specificity_ci95": _wilson(tn, tn + fp),
                                   "tp": tp, "fn": fn, "tn": tn, "fp": fp}
    return summary


def _nested_subsets(pool: list[Sample], sizes: list[int], seed: int) -> dict[int, list[Sample]]:
    """Subsets of whole patients, each inside the next, keeping the pool's class ratio."""
    rng = random.Random(seed)
    by_class = []
    for lab in range(len(LABELS)):
        patients = sorted({s.patient for s in pool if s.label == lab})
        rng.shuffle(patients)
        by_class.append([s for p in patients for s in pool if s.patient == p and s.label == lab])
    out = {}
    for n in sizes:
        chosen = []
        for group in by_class:
            k = round(n * len(group) / len(pool))
            chosen += group[:k]
        out[n] = chosen
    return out


def row(args) -> str:
    rec = json.loads(Path(args.record).read_text())
    r = rec["result"]
    oof, m = r["out_of_fold"], r["protocol"]["method"]
    pts = oof["operating_points"]
    cells = [args.name or Path(args.record).name.removesuffix(".adapt.json"),
             f"{m['train']}, {m['epochs']} ep, lr {m['learning_rate']:g}, {m['folds']} folds, mix {m['mix_train']:g}"
             + (f", augment {m['augment']}" if m["augment"] != "geometric" else ""),
             f"{oof['auroc']:.4f} [{oof['auroc_ci95'][0]:.3f}, {oof['auroc_ci95'][1]:.3f}]",
             f"{oof['specificity_at_sensitivity']['0.95']:.3f}"]
    val = next((c["value"] for c in r["criteria"] if c["name"] == "nothing forgotten"), None)
    for tier in ("flag", "urgent"):
        v = pts.get(tier)
        cells.append(f"{v['sensitivity']:.3f} / {v['specificity']:.3f}" if v else "n/a")
    failed = [c["name"] for c in r["criteria"] if not c["passed"]]
    size = next((c["value"] for c in r["criteria"] if c["name"] == "size"), None)
    ms = next((c["value"] for c in r["criteria"] if c["name"] == "latency"), None)
    cells += [f"{val:.4f}" if isinstance(val, float) else "n/a",
              f"{size:,}" if isinstance(size, int) else "n/a", f"{ms}" if isinstance(ms, float) else "n/a",
              "accepted" if not failed else "refused: " + ", ".join(failed)]
    return "| " + " | ".join(cells) + " |"


def _pair(c: Optional[dict], ci: bool = False) -> str:
    if not c:
        return "n/a"
    if ci:
        return (f"{c['sensitivity']:.3f} [{c['sensitivity_ci95'][0]:.3f}, {c['sensitivity_ci95'][1]:.3f}] / "
                f"{c['specificity']:.3f} [{c['specificity_ci95'][0]:.3f}, {c['specificity_ci95'][1]:.3f}]")
    return f"{c['sensitivity']:.3f} / {c['specificity']:.3f}"


def summarise(path: Path) -> str:
    """Markdown rows of a ``nested`` run: one per outer fold, then the pooled figures."""
    d = json.loads(Path(path).read_text())
    lines = []
    for r in d["rows"]:
        intended = r.get("intended_out_of_fold") or {}
        lines.append("| " + " | ".join([
            str(r["outer"] + 1), str(r["site_images"]), str(r["held_out_images"]),
            "accepted" if r["accepted"] else "refused: " + ", ".join(r["failed"]),
            f"{r['auroc_held_out']:.3f} ({r['auroc_base_held_out']:.3f})",
            f"{_pair(r.get('flag'))} ({_pair(intended.get('flag'))})",
            f"{_pair(r.get('urgent'))} ({_pair(intended.get('urgent'))})"]) + " |")
    oof = [r["out_of_fold_auroc"] for r in d["rows"] if r.get("out_of_fold_auroc") is not None]
    held = [r["auroc_held_out"] for r in d["rows"]]
    lines.append("| " + " | ".join([
        "all (245-256)" if d["site_images"] == "all" else str(d["site_images"]), f"{d['accepted']}",
        f"{np.mean(oof):.3f}" if oof else "n/a",
        f"{d['mean_held_out_auroc']:.3f} ({min(held):.3f}-{max(held):.3f}; base {d['base_mean_held_out_auroc']:.3f})",
        _pair(d["pooled"].get("flag"), True), _pair(d["pooled"].get("urgent"), True)]) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m pneumoflag.convert.adapt_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("nested", help="adapt on the other outer folds, judge on the held-out one")
    p.add_argument("--model", required=True, type=Path, help="the base .tflite")
    p.add_argument("--data", required=True, type=Path, help="the site's labelled images")
    p.add_argument("--work", required=True, type=Path, help="a folder for the runs (links, models, records)")
    p.add_argument("--seed", type=int, default=7, help="seed of the outer split (other than adapt's own 42)")
    p.add_argument("--outer", type=int, default=5, help="outer folds (default 5)")
    p.add_argument("--site-images", type=int, default=0,
                   help="adapt on only this many of the other folds' images (whole patients, their class "
                   "ratio): the learning curve (default: all)")
    p.add_argument("--folds", type=int, default=5, help="adapt's inner folds")
    p.add_argument("--train", default="head")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--mix-train", type=float, default=0.0)
    p.add_argument("--urgent-min-specificity", type=float, default=0.95)
    p.add_argument("--min-per-class", type=int, default=50)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--reuse", action="store_true", help="take the finished runs in --work as they are (rescore only)")
    p = sub.add_parser("shuffle", help="link a copy of a labelled folder with its patients' labels permuted")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("row", help="a study table row from an adapt record")
    p.add_argument("record", type=Path)
    p.add_argument("--name")
    p = sub.add_parser("summarise", help="table rows of a nested run's JSON (per outer fold, then pooled)")
    p.add_argument("nested_json", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "row":
        print(row(args))
        return 0
    if args.cmd == "summarise":
        print(summarise(args.nested_json))
        return 0
    if args.cmd == "shuffle":
        print(link_set(shuffled_labels(scan_folder(args.data), args.seed), args.out))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        out = nested(args)
    except AdaptError as exc:
        print(f"adapt_study: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
