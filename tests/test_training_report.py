"""Test-set metrics of the model card: calibration (Brier score, ECE) next to accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from service.score.card import Metrics
from training.report import calibration, ece_interval, metrics, roc_auc, roc_auc_interval


def test_a_perfect_and_certain_model_is_perfectly_calibrated():
    labels = np.array([0, 1, 1, 0, 1])
    c = calibration(labels, labels.astype(float))
    assert c["brier"] == 0.0 and c["ece"] == 0.0


def test_an_honest_coin_is_calibrated_but_not_sharp():
    labels = np.array([0, 1] * 50)
    c = calibration(labels, np.full(100, 0.5))
    assert c["brier"] == pytest.approx(0.25) and c["ece"] == pytest.approx(0.0)


def test_an_over_confident_model_has_a_large_calibration_error():
    """Certain (0 or 1) and right only 70% of the time: ECE 0.3, Brier 0.3."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000)
    wrong = np.arange(1000) < 300
    scores = np.where(wrong, 1 - labels, labels).astype(float)
    c = calibration(labels, scores)
    assert c["ece"] == pytest.approx(0.3) and c["brier"] == pytest.approx(0.3)


def test_card_metrics_carry_calibration():
    labels = np.array([0, 0, 1, 1])
    m = metrics(labels, np.array([0.1, 0.4, 0.6, 0.9]), 0.5, np.array(["noise", "blob", "point_source"] * 1 + ["x"]))
    assert m["accuracy"] == 1.0 and m["brier"] == pytest.approx(np.mean([0.01, 0.16, 0.16, 0.01]))
    assert Metrics.model_validate(m).ece_bins == 10, "what training measures is what the card holds"


def test_fpr_at_fnr_5pct_is_the_roc_point_that_keeps_95_percent_of_the_reals():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    labels = rng.random(2000) < 0.5
    scores = 1 / (1 + np.exp(-rng.normal(labels * 1.5, 1)))
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    first = np.flatnonzero(1 - tpr <= 0.05)[0]
    assert metrics(labels, scores, 0.5)["fpr_at_fnr_5pct"] == pytest.approx(fpr[first])


def _scores_with_ties(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.88  # broker-filtered alerts: mostly real
    return labels, np.round(np.where(labels, rng.beta(5, 2, n), rng.beta(2, 3, n)), 2)  # rounded: ties


def test_the_auc_interval_is_scipys_bootstrap_of_mann_whitney_on_the_same_resamples():
    """Stratified percentile bootstrap: scipy's own, with mannwhitneyu as the statistic, drawing the
    same resamples (same seed, the bogus in sorted order) gives the same interval."""
    from scipy.stats import bootstrap, mannwhitneyu

    labels, scores = _scores_with_ties(273)

    def auc(real, bogus, axis=-1):
        return mannwhitneyu(real, bogus, axis=axis).statistic / (real.shape[axis] * bogus.shape[axis])

    reference = bootstrap((scores[labels], np.sort(scores[~labels])), auc, n_resamples=2000, method="percentile",
                          vectorized=True, rng=np.random.default_rng(0)).confidence_interval
    low, high = roc_auc_interval(labels, scores)
    assert (low, high) == pytest.approx((reference.low, reference.high), abs=1e-12)
    assert low < roc_auc(labels, scores) < high


def test_the_ece_interval_is_scipys_bootstrap_of_calibration_on_the_same_resamples():
    """The same stratified percentile bootstrap, with `calibration` itself as scipy's statistic
    (one resample at a time), gives the same interval as the one-bincount path."""
    from scipy.stats import bootstrap

    labels, scores = _scores_with_ties(273)

    def ece(real, bogus):
        return calibration(np.r_[np.ones(len(real)), np.zeros(len(bogus))], np.r_[real, bogus])["ece"]

    reference = bootstrap((scores[labels], scores[~labels]), ece, n_resamples=2000, method="percentile",
                          vectorized=False, rng=np.random.default_rng(0)).confidence_interval
    low, high = ece_interval(labels, scores)
    assert (low, high) == pytest.approx((reference.low, reference.high), abs=1e-12)
    assert low < calibration(labels, scores)["ece"] < high
    m = metrics(labels, scores, 0.5, interval=True)
    assert m["ece_interval"] == [low, high] and Metrics.model_validate(m).ece_interval == [low, high]


def test_the_ece_interval_needs_two_of_each_class_and_is_zero_for_perfect_scores():
    assert ece_interval(np.array([1, 1, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) is None
    assert ece_interval(np.array([1, 1, 0, 0]), np.array([1.0, 1.0, 0.0, 0.0])) == [0.0, 0.0]
    assert "ece_interval" not in metrics(np.array([0, 1]), np.array([0.2, 0.8]), 0.5)


def test_the_auc_interval_narrows_with_more_alerts_and_is_reproducible():
    small, large = (roc_auc_interval(*_scores_with_ties(n)) for n in (200, 5000))
    assert large[1] - large[0] < (small[1] - small[0]) / 3
    assert roc_auc_interval(*_scores_with_ties(200)) == small


def test_the_auc_interval_needs_two_of_each_class():
    assert roc_auc_interval(np.array([1, 1, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) is None
    assert roc_auc_interval(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == [1.0, 1.0]
    assert "roc_auc_interval" not in metrics(np.array([0, 1]), np.array([0.2, 0.8]), 0.5)
    m = metrics(np.array([0, 0, 1, 1]), np.array([0.2, 0.6, 0.4, 0.8]), 0.5, interval=True)
    assert Metrics.model_validate(m).roc_auc_interval == m["roc_auc_interval"]
