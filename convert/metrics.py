"""AUROC, confusion matrices and operating points (numpy only).

A case is called positive when ``p >= threshold``; the device uses the same rule.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

FLAG_MIN_SENSITIVITY = 0.97
URGENT_MIN_SPECIFICITY = 0.95
#: Fewer site images of a class than this cannot set a threshold worth trusting:
#: at 50 normals one false positive moves specificity by 2 points.
MIN_PER_CLASS = 50


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and scores ({p.size}) differ in length")
    if not set(np.unique(y)).issubset({0, 1}):
        raise ValueError("labels must be 0/1")
    return y, p


def _ranks(p: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def auroc(y, p) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half)."""
    y, p = _check(y, p)
    npos, nneg = int(y.sum()), int((1 - y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    u = _ranks(p)[y == 1].sum() - npos * (npos + 1) / 2.0
    return float(u / (npos * nneg))


def roc_curve(y, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending, starting at +inf."""
    y, p = _check(y, p)
    thr = np.unique(p)[::-1]
    npos, nneg = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    tpr = np.array([((p >= t) & (y == 1)).sum() / npos for t in thr])
    fpr = np.array([((p >= t) & (y == 0)).sum() / nneg for t in thr])
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thr]


@dataclass
class Confusion:
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @staticmethod
    def at(y, p, threshold: float) -> "Confusion":
        y, p = _check(y, p)
        pred = p >= threshold
        return Confusion(
            float(threshold),
            int((pred & (y == 1)).sum()),
            int((pred & (y == 0)).sum()),
            int((~pred & (y == 0)).sum()),
            int((~pred & (y == 1)).sum()),
        )

    @staticmethod
    def _ratio(a: int, b: int) -> Optional[float]:
        return a / b if b else None

    def report(self) -> dict:
        n = self.tp + self.fp + self.tn + self.fn
        d = {
            "threshold": self.threshold,
            "sensitivity": self._ratio(self.tp, self.tp + self.fn),
            "specificity": self._ratio(self.tn, self.tn + self.fp),
            "ppv": self._ratio(self.tp, self.tp + self.fp),
            "npv": self._ratio(self.tn, self.tn + self.fn),
            "accuracy": self._ratio(self.tp + self.tn, n),
        }
        d.update({k: v for k, v in asdict(self).items() if k != "threshold"})
        return d


def flag_threshold(y, p, min_sensitivity: float = FLAG_MIN_SENSITIVITY) -> float:
    """The highest threshold whose sensitivity is still >= ``min_sensitivity``."""
    y, p = _check(y, p)
    pos = np.sort(p[y == 1])[::-1]
    if pos.size == 0:
        raise ValueError("no positive cases to set the flag threshold on")
    k = math.ceil(min_sensitivity * pos.size - 1e-9)
    return float(pos[max(k, 1) - 1])


def urgent_threshold(y, p, min_specificity: float = URGENT_MIN_SPECIFICITY) -> float:
    """The lowest observed score whose specificity is >= ``min_specificity``."""
    y, p = _check(y, p)
    neg = np.sort(p[y == 0])
    if neg.size == 0:
        raise ValueError("no negative cases to set the urgent threshold on")
    m = math.ceil(min_specificity * neg.size - 1e-9)
    if m <= 0:
        return float(p.min())
    cut = neg[m - 1]
    above = p[p > cut]
    return float(above.min()) if above.size else float(np.nextafter(cut, np.inf))


class TierError(ValueError):
    """The data cannot set an urgent point strictly above the flag point."""


def choose_operating_points(
    y,
    p,
    min_sensitivity: float = FLAG_MIN_SENSITIVITY,
    min_specificity: float = URGENT_MIN_SPECIFICITY,
    single_tier: bool = False,
) -> dict:
    """``flag`` and ``urgent`` thresholds with how they were chosen (for the model card).

    ``urgent`` must lie strictly above ``flag``, or the tiers mean nothing. When
    the data put the specificity target at or below the flag point, this raises
    :class:`TierError`, unless ``single_tier``: then the card has no urgent point.
    """
    flag = flag_threshold(y, p, min_sensitivity)
    urgent: Optional[float] = urgent_threshold(y, p, min_specificity)
    out = {
        "flag": {"threshold": flag, "rule": f"highest threshold with sensitivity >= {min_sensitivity}",
                 "min_sensitivity": min_sensitivity},
        "urgent": {"threshold": urgent, "rule": f"lowest threshold with specificity >= {min_specificity}",
                   "min_specificity": min_specificity},
        "rule": "probability >= urgent: urgent; >= flag: flag; below flag: routine",
    }
    assert urgent is not None
    if urgent <= flag:
        why = (
            f"the data cannot support distinct tiers: specificity >= {min_specificity} is already reached at "
            f"p >= {urgent:.4f}, not above the flag point p >= {flag:.4f} (sensitivity >= {min_sensitivity})"
        )
        if not single_tier:
            raise TierError(why + "; use data nearer the site's (calibrate on site images), other targets, "
                            "or --single-tier to flag without an urgent tier")
        out["urgent"].update(threshold=None, note=why + "; single tier: nothing is urgent")
        out["rule"] = "probability >= flag: flag; below: routine (single tier)"
    return out


def specificity_at_sensitivity(y, p, min_sensitivity: float) -> float:
    """Specificity at the highest threshold that keeps sensitivity >= ``min_sensitivity``."""
    y, p = _check(y, p)
    t = flag_threshold(y, p, min_sensitivity)
    neg = p[y == 0]
    return float((neg < t).mean()) if neg.size else float("nan")


def bootstrap_intervals(y, p, threshold: float, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of sensitivity and specificity at a fixed threshold.

    Positives and negatives are resampled separately (stratified), so every
    resample has the data's own class counts. The threshold is held fixed:
    the interval is for the point as set, not for setting it again.
    """
    y, p = _check(y, p)
    rng = np.random.default_rng(seed)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out: dict[str, list[float]] = {}
    for name, cls, hit in (("sensitivity", 1, lambda v: v >= threshold), ("specificity", 0, lambda v: v < threshold)):
        v = hit(p[y == cls]).astype(np.float64)
        if v.size == 0:
            out[name] = [float("nan"), float("nan")]
            continue
        means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
        out[name] = [float(np.percentile(means, lo)), float(np.percentile(means, hi))]
    return out


def auroc_interval(y, p, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the AUROC (stratified resampling)."""
    y, p = _check(y, p)
    rng = np.random.default_rng(seed)
    pos, neg = p[y == 1], p[y == 0]
    if pos.size == 0 or neg.size == 0:
        return [float("nan"), float("nan")]
    yy = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    vals = [auroc(yy, np.r_[pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)]])
            for _ in range(n_boot)]
    return [float(np.percentile(vals, (1 - level) / 2 * 100)), float(np.percentile(vals, (1 + level) / 2 * 100))]


def at_prevalence(sensitivity: float, specificity: float, prevalence: float) -> dict[str, Optional[float]]:
    """Share of images flagged and PPV/NPV at a site's prevalence (Bayes)."""
    flagged = prevalence * sensitivity + (1 - prevalence) * (1 - specificity)
    negative = 1 - flagged
    return {
        "prevalence": prevalence,
        "share_flagged": flagged,
        "ppv": prevalence * sensitivity / flagged if flagged > 0 else None,
        "npv": (1 - prevalence) * specificity / negative if negative > 0 else None,
    }


def evaluate_scores(y, p, thresholds: dict[str, Optional[float]], intervals: bool = False,
                    prevalence: Optional[float] = None) -> dict:
    """The evaluate JSON body: n, auroc and each operating point's figures.

    With ``intervals``, bootstrap 95% intervals of AUROC, sensitivity and
    specificity; with ``prevalence``, the share flagged and PPV/NPV there.
    """
    y, p = _check(y, p)
    out: dict = {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((1 - y).sum()),
        "auroc": auroc(y, p),
        "specificity_at_sensitivity": {
            f"{s:.2f}": specificity_at_sensitivity(y, p, s) for s in (0.95, 0.97) if y.sum()
        },
        "operating_points": {},
    }
    if intervals:
        out["auroc_ci95"] = auroc_interval(y, p)
    for k, t in thresholds.items():
        if t is None:  # a single-tier card has no urgent point
            continue
        r = Confusion.at(y, p, t).report()
        if intervals:
            ci = bootstrap_intervals(y, p, t)
            r["sensitivity_ci95"], r["specificity_ci95"] = ci["sensitivity"], ci["specificity"]
        if prevalence is not None and r["sensitivity"] is not None and r["specificity"] is not None:
            r["at_prevalence"] = at_prevalence(r["sensitivity"], r["specificity"], prevalence)
        out["operating_points"][k] = r
    return out


def _fmt_ci(v: Optional[float], ci: Optional[list]) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def format_points(figures: dict) -> list[str]:
    """One line per operating point: threshold, sensitivity and specificity with their intervals."""
    lines = []
    for name, m in figures["operating_points"].items():
        line = (f"  {name:<7} p >= {m['threshold']:.4f}  sensitivity {_fmt_ci(m['sensitivity'], m.get('sensitivity_ci95'))}"
                f"  specificity {_fmt_ci(m['specificity'], m.get('specificity_ci95'))}")
        prev = m.get("at_prevalence")
        if prev:
            line += (f"  flagged {prev['share_flagged']:.1%}, PPV {_fmt_ci(prev['ppv'], None)} "
                     f"at prevalence {prev['prevalence']:.1%}")
        lines.append(line)
    return lines
