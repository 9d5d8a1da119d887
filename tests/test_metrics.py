import math

import numpy as np
import pytest

from pneumoflag.convert.metrics import (
    Confusion, auroc, choose_operating_points, evaluate_scores, flag_threshold, roc_curve, urgent_threshold,
)


def test_auroc_known_values():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # pairs (pos, neg): (.5,.1) win, (.5,.5) tie, (.3,.1) win, (.3,.5) loss -> 2.5 / 4
    assert auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.3]) == pytest.approx(0.625)
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 20) / 20  # many ties
    pos, neg = p[y == 1], p[y == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auroc(y, p) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_confusion_arithmetic():
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.6]
    c = Confusion.at(y, p, 0.6).report()
    assert (c["tp"], c["fn"], c["fp"], c["tn"]) == (2, 1, 2, 2)
    assert c["sensitivity"] == pytest.approx(2 / 3)
    assert c["specificity"] == pytest.approx(2 / 4)
    assert c["ppv"] == pytest.approx(2 / 4)
    assert c["npv"] == pytest.approx(2 / 3)
    assert c["accuracy"] == pytest.approx(4 / 7)


def test_flag_threshold_is_highest_with_required_sensitivity():
    y = np.array([1] * 100 + [0] * 50)
    p = np.r_[np.linspace(0.01, 1.0, 100), np.linspace(0.0, 0.5, 50)]
    t = flag_threshold(y, p, 0.97)
    sens = lambda th: (p[y == 1] >= th).mean()  # noqa: E731
    assert sens(t) >= 0.97
    higher = np.unique(p[p > t])
    assert higher.size == 0 or sens(higher.min()) < 0.97


def test_urgent_threshold_is_lowest_with_required_specificity():
    y = np.array([1] * 40 + [0] * 100)
    p = np.r_[np.linspace(0.5, 1.0, 40), np.linspace(0.0, 0.8, 100)]
    t = urgent_threshold(y, p, 0.95)
    spec = lambda th: (p[y == 0] < th).mean()  # noqa: E731
    assert spec(t) >= 0.95
    lower = np.unique(p[p < t])
    assert lower.size == 0 or spec(lower.max()) < 0.95


def test_operating_points_keep_urgent_at_or_above_flag():
    y = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.1, 0.1, 0.1])
    ops = choose_operating_points(y, p, 0.97, 0.95)
    assert ops["urgent"]["threshold"] >= ops["flag"]["threshold"]
    res = evaluate_scores(y, p, {"flag": ops["flag"]["threshold"], "urgent": ops["urgent"]["threshold"]})
    assert res["operating_points"]["flag"]["sensitivity"] == 1.0
    assert res["n"] == 6 and res["auroc"] == 1.0


def test_roc_curve_is_monotone():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    fpr, tpr, thr = roc_curve(y, rng.random(200))
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0
