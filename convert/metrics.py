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


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and scores ({p.size}) differ in length")
    if not set(np.unique(y)).issubset({0, 1}):
        raise ValueError("labels must be 0/1")
    return y, p


def auroc(y, p) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half)."""
    y, p = _check(y, p)
    npos, nneg = int(y.sum()), int((1 - y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), np.float64)
    sp = p[order]
    i = 0
    while i < len(sp):  # average ranks over ties
        j = i
        while j + 1 < len(sp) and sp[j + 1] == sp[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - npos * (npos + 1) / 2.0
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


def choose_operating_points(
    y,
    p,
    min_sensitivity: float = FLAG_MIN_SENSITIVITY,
    min_specificity: float = URGENT_MIN_SPECIFICITY,
) -> dict:
    """``flag`` and ``urgent`` thresholds with how they were chosen (for the model card)."""
    flag = flag_threshold(y, p, min_sensitivity)
    urgent = urgent_threshold(y, p, min_specificity)
    note = None
    if urgent < flag:
        note = (
            f"the specificity target was already met below the flag threshold "
            f"({urgent:.4f} < {flag:.4f}); urgent raised to the flag threshold"
        )
        urgent = flag
    out = {
        "flag": {"threshold": flag, "rule": f"highest threshold with sensitivity >= {min_sensitivity}"},
        "urgent": {"threshold": urgent, "rule": f"lowest threshold with specificity >= {min_specificity}"},
        "rule": "probability >= urgent: urgent; >= flag: flag; below flag: routine",
    }
    if note:
        out["urgent"]["note"] = note
    return out


def evaluate_scores(y, p, thresholds: dict[str, float]) -> dict:
    """The evaluate JSON body: n, auroc and each operating point's figures."""
    y, p = _check(y, p)
    return {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((1 - y).sum()),
        "auroc": auroc(y, p),
        "operating_points": {k: Confusion.at(y, p, t).report() for k, t in thresholds.items()},
    }
