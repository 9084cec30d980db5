"""Score-drift monitoring (`service.stream.drift`) without a broker: the statistics against
independent computations, and the monitor fed with what the real pipeline makes of real alerts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from prometheus_client import REGISTRY
from scipy import special, stats

from conftest import MODELS_DIR, ztf_fits_files, ztf_jpeg_files
from drift_support import model_without_reference
from nodiff_support import ztf_without_difference
from service.publish import records
from service.score.card import ModelCard, is_real
from service.score.model import Scorer
from service.stream import drift
from service.stream.pipeline import UNKNOWN_SURVEY, ScoringPipeline, SourceMessage
from service.stream.window import WindowSize
from streaming import default_models, scorers  # noqa: F401  (fixtures)

ZTF_CARD = ModelCard.read(MODELS_DIR / "ztf" / "model_card.json")
GARBAGE = b"this is not an alert"


def gauge(name: str, survey: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"survey": survey})


def execute(scorers, values, fallbacks=None):
    messages = [SourceMessage(value, "alerts", 0, i) for i, value in enumerate(values)]
    return ScoringPipeline(scorers, records.RecordEncoder("scores"), fallbacks=fallbacks).execute(messages)


# -- the statistics ----------------------------------------------------------------------------

def test_psi_of_a_hand_computed_case():
    # (0.5 - 0.25) ln(0.5 / 0.25) + (0.5 - 0.75) ln(0.5 / 0.75) = 0.25 ln 2 + 0.25 ln 1.5 = 0.25 ln 3
    assert drift.population_stability_index([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * np.log(3), rel=1e-12)
    assert drift.population_stability_index([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0


def test_psi_is_the_symmetric_kullback_leibler_divergence():
    """PSI = KL(w || r) + KL(r || w), by scipy's relative entropy, on histograms without empty bins."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        w, r = rng.dirichlet(np.ones(20)), rng.dirichlet(np.ones(20))
        w, r = np.maximum(w, drift.PSI_EPSILON), np.maximum(r, drift.PSI_EPSILON)
        expected = special.rel_entr(w, r).sum() + special.rel_entr(r, w).sum()
        assert drift.population_stability_index(w, r) == pytest.approx(expected, rel=1e-9)


def test_psi_floors_an_empty_bin_at_epsilon_instead_of_going_infinite():
    e = drift.PSI_EPSILON
    expected = (1 - 0.5) * np.log(1 / 0.5) + (e - 0.5) * np.log(e / 0.5)
    assert drift.population_stability_index([1.0, 0.0], [0.5, 0.5]) == pytest.approx(expected, rel=1e-12)
    assert np.isfinite(drift.population_stability_index([0.0, 1.0], [1.0, 0.0]))


def test_ks_at_the_edges_is_scipys_two_sample_ks_on_binned_samples():
    """With both samples put at their bins' centres, ks_2samp's statistic is the largest CDF
    difference at the bin edges: exactly what the binned reference allows."""
    reference = drift.Reference.from_card(ZTF_CARD)
    edges = reference.edges
    centres = (edges[:-1] + edges[1:]) / 2
    reference_sample = np.repeat(centres, ZTF_CARD.real_validation.score_histogram.counts)
    rng = np.random.default_rng(3)
    for a, b, n in ((5, 1, 200), (1, 1, 50), (0.3, 0.3, 1000), (1, 6, 40)):
        scores = rng.beta(a, b, n)
        binned = centres[np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(centres) - 1)]
        expected = stats.ks_2samp(binned, reference_sample).statistic
        got = drift.ks_at_edges(drift.binned_shares(scores, edges), reference.shares)
        assert got == pytest.approx(expected, abs=1e-12)
        # Binning can only hide differences: never more than the unbinned statistic against the same reference.
        assert got <= stats.ks_2samp(scores, reference_sample).statistic + 1e-12


def test_scores_are_binned_like_the_reference_histogram():
    edges = np.linspace(0, 1, 5)
    shares = drift.binned_shares(np.array([0.0, 0.25, 0.5, 0.999, 1.0, 1.0 + 1e-9, -1e-9]), edges)
    # np.histogram's bins: [0, .25) [.25, .5) [.5, .75) [.75, 1]; the two out of range fall in the end bins.
    assert shares.tolist() == pytest.approx([2 / 7, 1 / 7, 1 / 7, 3 / 7])


def test_reference_of_the_shipped_card_and_its_share_real():
    reference = drift.Reference.from_card(ZTF_CARD)
    counts = np.array(ZTF_CARD.real_validation.score_histogram.counts)
    assert reference.n == counts.sum() == ZTF_CARD.real_validation.n
    assert reference.shares.sum() == pytest.approx(1.0)
    # 0.5 is a bin edge: exact. Half-way into the bin that starts there, half of that bin is above.
    edges = np.array(ZTF_CARD.real_validation.score_histogram.edges)
    (at,) = np.flatnonzero(np.isclose(edges, 0.5))
    assert reference.share_at_or_above(0.5) == pytest.approx(counts[at:].sum() / counts.sum())
    half_way = (edges[at] + edges[at + 1]) / 2
    assert reference.share_at_or_above(half_way) == pytest.approx((counts[at] / 2 + counts[at + 1:].sum()) / counts.sum())


# -- the monitor on the real pipeline's outcomes -----------------------------------------------

def test_monitor_counts_real_outcomes_by_survey(scorers):
    """Scores, cutout refusals (JPEG stamps) and a message that is no alert, as the real pipeline
    makes them; the unknown-survey dead letter counts in both surveys' windows."""
    values = [p.read_bytes() for p in ztf_fits_files() + ztf_jpeg_files()] + [GARBAGE]
    outcome = execute(scorers, values)
    assert {d.kind for d in outcome.dead_letters} >= {"cutout", "decode"}
    assert any(d.survey == UNKNOWN_SURVEY for d in outcome.dead_letters)
    monitor = drift.DriftMonitor(scorers, WindowSize(alerts=1000))
    readings = monitor.observe(outcome.messages)

    ztf, rubin = readings["ztf"], readings["rubin"]
    ztf_scores = np.array([o.record["score"] for o in outcome.scores])
    assert ztf.alerts == len(ztf_fits_files()) + len(ztf_jpeg_files()) + 1 and ztf.scores == len(ztf_fits_files())
    assert ztf.share_real == pytest.approx(np.mean(is_real(ztf_scores, scorers["ztf"].threshold)))
    assert ztf.share_undecodable == pytest.approx((len(ztf_jpeg_files()) + 1) / ztf.alerts)
    reference = drift.Reference.from_card(scorers["ztf"].card)
    window = drift.binned_shares(ztf_scores, reference.edges)
    assert ztf.psi == pytest.approx(drift.population_stability_index(window, reference.shares))
    assert ztf.ks == pytest.approx(drift.ks_at_edges(window, reference.shares))
    # Rubin saw nothing but the message nobody could place.
    assert (rubin.alerts, rubin.scores, rubin.share_undecodable) == (1, 0, 1.0)
    assert np.isnan(rubin.share_real) and np.isnan(rubin.psi) and np.isnan(rubin.ks)

    assert gauge("rbstream_score_psi", "ztf") == pytest.approx(ztf.psi)
    assert gauge("rbstream_score_ks", "ztf") == pytest.approx(ztf.ks)
    assert gauge("rbstream_share_real", "ztf") == pytest.approx(ztf.share_real)
    assert gauge("rbstream_share_undecodable", "ztf") == pytest.approx(ztf.share_undecodable)
    assert gauge("rbstream_monitor_window_alerts", "ztf") == ztf.alerts
    assert gauge("rbstream_monitor_window_scores", "ztf") == ztf.scores
    assert gauge("rbstream_reference_share_real", "ztf") == pytest.approx(reference.share_at_or_above(0.5))


def test_fallback_scores_count_as_real_or_not_but_not_in_the_drift_statistics(scorers):
    """An alert without a difference is scored by the survey's fallback model (the shipped
    ztf-nodiff): its label counts in share-real, its score not in PSI/KS (the reference is
    the main model's)."""
    fallback = Scorer(MODELS_DIR / "ztf-nodiff", device="cpu")
    outcome = execute(scorers, [ztf_fits_files()[0].read_bytes(), ztf_without_difference("null")],
                      fallbacks={"ztf": fallback})
    assert [o.record["model_name"] for o in outcome.scores] == [scorers["ztf"].card.name, fallback.card.name]
    reading = drift.DriftMonitor(scorers, WindowSize(alerts=10)).observe(outcome.messages)["ztf"]
    assert (reading.alerts, reading.scores) == (2, 1)
    assert reading.share_real == pytest.approx(np.mean([o.record["label"] == "real" for o in outcome.scores]))


def test_window_by_alerts_keeps_the_latest(scorers):
    monitor = drift.DriftMonitor(scorers, WindowSize(alerts=5))
    monitor.observe(execute(scorers, [GARBAGE] * 5).messages)
    assert monitor.surveys["ztf"].reading().share_undecodable == 1.0
    readings = monitor.observe(execute(scorers, [p.read_bytes() for p in ztf_fits_files()[:4]]).messages)
    assert (readings["ztf"].alerts, readings["ztf"].scores, readings["ztf"].share_undecodable) == (5, 4, 0.2)


def test_window_by_minutes_forgets_old_batches(scorers):
    now = [0.0]
    monitor = drift.DriftMonitor(scorers, WindowSize(minutes=1), clock=lambda: now[0])
    monitor.observe(execute(scorers, [GARBAGE] * 3).messages)
    now[0] = 45.0
    readings = monitor.observe(execute(scorers, [p.read_bytes() for p in ztf_fits_files()[:2]]).messages)
    assert (readings["ztf"].alerts, readings["ztf"].share_undecodable) == (5, pytest.approx(0.6))
    now[0] = 75.0  # the garbage is 75 s old, the alerts 30 s
    readings = monitor.observe([])
    assert (readings["ztf"].alerts, readings["ztf"].scores, readings["ztf"].share_undecodable) == (2, 2, 0.0)


def test_a_card_without_reference_logs_once_and_exports_shares_only(scorers, tmp_path, caplog):
    folder = model_without_reference(MODELS_DIR / "ztf", tmp_path)
    bare = {"ztf": Scorer(folder, device="cpu"), "rubin": scorers["rubin"]}
    assert bare["ztf"].card.real_validation is None
    one_alert = execute(scorers, [ztf_fits_files()[0].read_bytes()]).messages
    drift.DriftMonitor(scorers, WindowSize(alerts=10)).observe(one_alert)
    assert gauge("rbstream_score_psi", "ztf") is not None, "a series left by the previous model"
    with caplog.at_level(logging.INFO, logger="service.stream.drift"):
        monitor = drift.DriftMonitor(bare, WindowSize(alerts=10))
        for _ in range(2):
            monitor.observe(execute(bare, [p.read_bytes() for p in ztf_fits_files()[:3]] + [GARBAGE]).messages)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert message.startswith("score drift of ztf is not measured")
    assert "--write-reference" in message and f"--model ztf={folder}" in message and "real_validation" in message
    for name in ("rbstream_score_psi", "rbstream_score_ks", "rbstream_reference_share_real"):
        assert gauge(name, "ztf") is None, name
    assert gauge("rbstream_score_psi", "rubin") is not None
    assert gauge("rbstream_monitor_window_alerts", "ztf") == 8
    assert gauge("rbstream_share_undecodable", "ztf") == pytest.approx(2 / 8)
    assert 0.0 <= gauge("rbstream_share_real", "ztf") <= 1.0


def test_a_reloaded_model_is_measured_in_a_fresh_window_against_its_own_reference(scorers, tmp_path):
    """After a reload (`DriftMonitor.use_model`), the new version's scores are its own (counted in
    PSI/KS), the old version's leave the window, and a new card without a reference removes the
    old reference's series."""
    import json
    import shutil

    from service.score.card import CARD_FILE

    monitor = drift.DriftMonitor(scorers, WindowSize(alerts=100))
    alerts = [p.read_bytes() for p in ztf_fits_files()[:4]]
    assert monitor.observe(execute(scorers, alerts).messages)["ztf"].scores == 4
    newer = tmp_path / "ztf-newer"
    shutil.copytree(MODELS_DIR / "ztf", newer)
    card = json.loads((newer / CARD_FILE).read_text())
    card["version"] += "-newer"
    (newer / CARD_FILE).write_text(json.dumps(card))
    reloaded = {**scorers, "ztf": Scorer(newer, device="cpu")}
    monitor.use_model("ztf", reloaded["ztf"])
    reading = monitor.observe(execute(reloaded, alerts[:3]).messages)["ztf"]
    assert (reading.alerts, reading.scores) == (3, 3)
    assert gauge("rbstream_score_psi", "ztf") == pytest.approx(reading.psi)

    monitor.use_model("ztf", Scorer(model_without_reference(MODELS_DIR / "ztf", tmp_path), device="cpu"))
    for name in ("rbstream_score_psi", "rbstream_score_ks", "rbstream_reference_share_real"):
        assert gauge(name, "ztf") is None, name
