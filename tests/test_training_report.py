"""Test-set metrics of the model card: calibration (Brier score, ECE) next to accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from service.score.card import Metrics
from training.report import calibration, metrics


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
