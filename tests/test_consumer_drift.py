"""Drift gauges of the consumer against a real broker, the real ZTF model and real alerts.

One stream, replayed in three phases to one consumer (in this process, so its gauges are
read from the process's registry after each batch):

1. ``before``: the real ZTF alerts of the test split (objects held out of training and of the
   validation split the card's reference was taken from): the stream the model is meant for;
2. ``artifacts``: real ZTF alerts the survey's own models call bogus (drb < 0.1 or rb < 0.3);
3. ``garbage``: training-split alerts with a message that is no alert after every two.

The window (200 alerts) is judged against the alert rules' own thresholds
(helm/rbstream/files/alert-rules.yaml).
"""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from conftest import MODELS_DIR
from drift_support import model_without_reference, rule_thresholds, ztf_artifacts, ztf_split
from service.score.model import Scorer
from service.tools import replay
from streaming import consumer_settings, create_topic, default_models, running_consumer, scorers, wait_for  # noqa: F401

pytestmark = pytest.mark.kafka

WINDOW = 200
BATCH_SIZE = 32
GAUGES = ("rbstream_score_psi", "rbstream_score_ks", "rbstream_share_real", "rbstream_share_undecodable",
          "rbstream_monitor_window_alerts", "rbstream_monitor_window_scores", "rbstream_reference_share_real")


def garbage(i: int) -> replay.AlertMessage:
    return replay.AlertMessage(f"not an alert #{i}".encode(), f"garbage-{i}", None)


def gauges(survey: str) -> dict[str, float | None]:
    return {name.removeprefix("rbstream_"): REGISTRY.get_sample_value(name, {"survey": survey}) for name in GAUGES}


def replay_in_phases(broker, settings, scorers, phases: dict[str, list]) -> list[tuple[str, dict, dict]]:
    """Replay each phase once the consumer delivered the one before; ``(phase, ztf gauges,
    rubin gauges)`` after every batch."""
    create_topic(broker.bootstrap_servers, settings["input_topic"], partitions=1)  # offsets = replay order
    readings: list[tuple[str, dict, dict]] = []
    current = [""]
    last_offset = [-1]

    def on_batch(delivered):  # the consumer's thread, after the batch's gauges were set and it was committed
        readings.append((current[0], gauges("ztf"), gauges("rubin")))
        last_offset[0] = max([last_offset[0]] + [out.source.offset for out in delivered])

    total = 0
    with running_consumer(settings, scorers, on_batch=on_batch):
        for name, messages in phases.items():
            current[0] = name
            sent = replay.replay(settings, settings["input_topic"], messages, progress=False)
            assert sent.sent == len(messages) and sent.failed == 0
            total += len(messages)
            wait_for(lambda: last_offset[0] >= total - 1, timeout=60, what=f"the {name} phase delivered")
    return readings


@pytest.fixture(scope="module")
def stream(broker, scorers):
    holdout = scorers["ztf"].card.holdout
    mixed = []
    for i, message in enumerate(replay.load_messages(ztf_split("train", holdout)[:80])):
        mixed.append(message)
        if i % 2 == 1:
            mixed.append(garbage(i))
    phases = {"before": replay.load_messages(ztf_split("test", holdout)),
              "artifacts": replay.load_messages(ztf_artifacts()),
              "garbage": mixed}
    assert len(phases["before"]) > WINDOW and len(phases["artifacts"]) >= 60
    settings = consumer_settings(broker.bootstrap_servers, batch_size=BATCH_SIZE, monitor_window=WINDOW)
    readings = replay_in_phases(broker, settings, scorers, phases)
    by_phase: dict[str, list[tuple[dict, dict]]] = {}
    for phase, ztf, rubin in readings:
        by_phase.setdefault(phase, []).append((ztf, rubin))
    return by_phase


def full_windows(readings):
    return [ztf for ztf, _ in readings if ztf["monitor_window_alerts"] == WINDOW]


def test_drift_gauges_stay_below_the_rule_thresholds_on_the_stream_the_model_is_for(stream):
    limits = rule_thresholds()
    before = full_windows(stream["before"])
    assert len(before) >= 2, "several batches judged on a full window"
    for ztf in before:
        assert ztf["monitor_window_scores"] == WINDOW
        assert ztf["score_psi"] < limits["drift_psi"], ztf
        assert ztf["score_ks"] < limits["drift_ks"], ztf
        assert abs(ztf["share_real"] - ztf["reference_share_real"]) < limits["share_real_change"], ztf
        assert ztf["share_undecodable"] == 0.0


def test_drift_gauges_rise_above_the_rule_thresholds_once_artifacts_come(stream):
    limits = rule_thresholds()
    last_before = stream["before"][-1][0]
    after = stream["artifacts"][-1][0]
    assert after["monitor_window_alerts"] == after["monitor_window_scores"] == WINDOW
    assert after["score_psi"] > limits["drift_psi"] and after["score_ks"] > limits["drift_ks"], after
    assert after["score_psi"] > 3 * last_before["score_psi"] and after["score_ks"] > 2 * last_before["score_ks"]
    assert after["share_real"] < last_before["share_real"]
    assert abs(after["share_real"] - after["reference_share_real"]) > limits["share_real_change"], after
    assert after["share_undecodable"] == 0.0


def test_share_undecodable_rises_when_garbage_is_mixed_in(stream):
    limits = rule_thresholds()
    assert stream["artifacts"][-1][0]["share_undecodable"] == 0.0
    ztf, rubin = stream["garbage"][-1]
    # 80 alerts and 40 messages that are no alert are the window's last 120 entries.
    assert ztf["share_undecodable"] == pytest.approx(40 / WINDOW)
    assert ztf["share_undecodable"] > limits["undecodable_share"]
    # Whose they were nobody can tell: counted for every survey this consumer scores.
    assert (rubin["monitor_window_alerts"], rubin["monitor_window_scores"], rubin["share_undecodable"]) == (40, 0, 1.0)


def test_a_model_without_reference_is_said_once_and_keeps_its_share_gauges(broker, scorers, tmp_path, caplog):
    bare = Scorer(model_without_reference(MODELS_DIR / "ztf", tmp_path), device="cpu")
    settings = consumer_settings(broker.bootstrap_servers, batch_size=8, monitor_window=WINDOW, survey="ztf")
    alerts = replay.load_messages(ztf_split("test", scorers["ztf"].card.holdout)[:20])
    messages = alerts + [garbage(i) for i in range(5)]
    with caplog.at_level(logging.INFO):
        readings = replay_in_phases(broker, settings, {"ztf": bare}, {"all": messages})
    said = [r.getMessage() for r in caplog.records if "score drift of ztf is not measured" in r.getMessage()]
    assert len(said) == 1, said
    assert "--write-reference" in said[0] and "real_validation" in said[0]
    assert len(readings) >= 3, "several batches, one message"
    _, ztf, _ = readings[-1]
    assert ztf["score_psi"] is None and ztf["score_ks"] is None and ztf["reference_share_real"] is None
    assert (ztf["monitor_window_alerts"], ztf["monitor_window_scores"]) == (25, 20)
    assert ztf["share_undecodable"] == pytest.approx(5 / 25)
    assert 0.0 < ztf["share_real"] <= 1.0
