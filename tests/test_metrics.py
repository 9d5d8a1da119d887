import math

import numpy as np
import pytest

from pneumoflag.convert.metrics import (
    Confusion, TierError, at_prevalence, auroc, bootstrap_intervals, choose_operating_points, evaluate_scores,
    flag_threshold, roc_curve, urgent_threshold,
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


def test_tiers_that_collapse_stop_unless_single_tier():
    y = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.1, 0.1, 0.1])
    with pytest.raises(TierError, match="cannot support distinct tiers.*--single-tier"):
        choose_operating_points(y, p, 0.97, 0.95)
    ops = choose_operating_points(y, p, 0.97, 0.95, single_tier=True)
    assert ops["urgent"]["threshold"] is None and "single tier" in ops["urgent"]["note"]
    res = evaluate_scores(y, p, {"flag": ops["flag"]["threshold"], "urgent": None})
    assert res["operating_points"]["flag"]["sensitivity"] == 1.0 and "urgent" not in res["operating_points"]
    assert res["n"] == 6 and res["auroc"] == 1.0


def test_distinct_tiers_when_the_data_overlap():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(300, int), np.zeros(300, int)]
    p = np.r_[rng.normal(1.5, 1, 300), rng.normal(0, 1, 300)]
    ops = choose_operating_points(y, p, 0.97, 0.95)
    assert ops["urgent"]["threshold"] > ops["flag"]["threshold"]
    res = evaluate_scores(y, p, {k: ops[k]["threshold"] for k in ("flag", "urgent")}, intervals=True)
    flag, urgent = res["operating_points"]["flag"], res["operating_points"]["urgent"]
    assert flag["sensitivity"] >= 0.97 and urgent["specificity"] >= 0.95
    for m in (flag, urgent):  # each interval holds its point estimate and is a real interval
        for k in ("sensitivity", "specificity"):
            lo, hi = m[f"{k}_ci95"]
            assert lo <= m[k] <= hi and hi - lo > 0.005
    lo, hi = res["auroc_ci95"]
    assert lo < res["auroc"] < hi


def test_bootstrap_interval_matches_the_binomial_width():
    # 200 positives at sensitivity 0.9: the normal-approximation 95% half-width is 1.96*sqrt(.9*.1/200) = 0.042
    y = np.r_[np.ones(200, int), np.zeros(200, int)]
    p = np.r_[np.repeat([1.0, 0.0], [180, 20]), np.zeros(200)]
    ci = bootstrap_intervals(y, p, 0.5, n_boot=4000)["sensitivity"]
    assert ci[0] == pytest.approx(0.9 - 0.042, abs=0.012) and ci[1] == pytest.approx(0.9 + 0.042, abs=0.012)


def test_prevalence_arithmetic():
    r = at_prevalence(0.9, 0.8, 0.1)
    assert r["share_flagged"] == pytest.approx(0.1 * 0.9 + 0.9 * 0.2)
    assert r["ppv"] == pytest.approx(0.09 / 0.27)
    assert r["npv"] == pytest.approx(0.72 / 0.73)


def test_roc_curve_is_monotone():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    fpr, tpr, thr = roc_curve(y, rng.random(200))
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0
