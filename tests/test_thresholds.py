"""``--threshold``: thresholds by target error rate, resolved on the shipped cards' real validation ROC
and used for every label the stream and the API make."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import numpy as np
import pytest

from api_support import good_request, make_client, real_scorers
from conftest import rubin_files, ztf_fits_files
from service import settings
from service.api.app import SERVE_OPTIONS, ApiSettings
from service.publish import records
from service.score.card import CARD_FILE, ModelCard, ModelError, is_real, label_for
from service.score.model import DEFAULT_MODELS_DIR, MODEL_FILE, Scorer
from service.score.thresholds import (ThresholdRule, apply_thresholds, parse_rule, parse_threshold,
                                      resolve_threshold)
from service.stream import consumer
from service.stream.consumer import CONSUME_OPTIONS
from service.stream.pipeline import ScoringPipeline, SourceMessage

ZTF_CARD = DEFAULT_MODELS_DIR / "ztf" / CARD_FILE


def _roc(card: ModelCard):
    roc = card.real_validation.roc
    return np.asarray(roc.fpr), np.asarray(roc.tpr), np.asarray(roc.thresholds)


# ---- parsing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, rule", [
    ("0.7", ThresholdRule(0.7)), ("0", ThresholdRule(0.0)), ("1", ThresholdRule(1.0)),
    ("fpr=0.01", ThresholdRule(0.01, "fpr")), (" TPR = 0.95 ", ThresholdRule(0.95, "tpr")),
])
def test_a_rule_is_a_number_or_a_target_rate(text, rule):
    assert parse_rule(text) == rule


def test_a_setting_has_a_rule_for_every_survey_and_rules_of_single_surveys():
    setting = parse_threshold("tpr=0.9,ztf:fpr=0.01")
    assert setting.rule_for("ztf") == ThresholdRule(0.01, "fpr")
    assert setting.rule_for("rubin") == ThresholdRule(0.9, "tpr")
    only_rubin = parse_threshold("rubin:0.7")
    assert only_rubin.rule_for("rubin") == ThresholdRule(0.7) and only_rubin.rule_for("ztf") is None
    assert str(parse_threshold("ztf:fpr=0.01,rubin:0.7")) == "ztf:fpr=0.01,rubin:0.7"
    assert parse_threshold(0.25).rule_for("ztf") == ThresholdRule(0.25)  # a TOML number


@pytest.mark.parametrize("text, message", [
    ("1.5", "not in [0, 1]"), ("-0.1", "not in [0, 1]"), ("nan", "not in [0, 1]"), ("high", "not a number"),
    ("fnr=0.05", "unknown rate 'fnr'"), ("fpr=", "not a number"), ("fpr=2", "not in [0, 1]"),
    ("hst:0.5", "unknown survey 'hst'"), ("ztf:0.5,ztf:0.6", "two thresholds for ztf"),
    ("0.5,0.6", "two thresholds for every survey"), ("ztf:0.5,", "empty entry"),
])
def test_bad_settings_are_refused_naming_the_problem(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_threshold(text)


@pytest.mark.parametrize("options", [CONSUME_OPTIONS, SERVE_OPTIONS], ids=["consume", "serve"])
def test_the_setting_comes_from_flag_environment_and_file(options, tmp_path):
    parser = argparse.ArgumentParser()
    settings.add_options(parser, options)
    required = ["--input-topic", "in", "--output-topic", "out", "--dlq-topic", "dlq"] if options is CONSUME_OPTIONS \
        else []
    config = tmp_path / "rbstream.toml"
    config.write_text("threshold = 0.6\n")
    from_file = settings.resolve(parser.parse_args(required + ["--config", str(config)]), options, {})
    assert from_file["threshold"].rule_for("rubin") == ThresholdRule(0.6)
    from_env = settings.resolve(parser.parse_args(required), options, {"RBSTREAM_THRESHOLD": "ztf:tpr=0.9"})
    assert from_env["threshold"].rule_for("ztf") == ThresholdRule(0.9, "tpr")
    from_flag = settings.resolve(parser.parse_args(required + ["--threshold", "fpr=0.02"]), options,
                                 {"RBSTREAM_THRESHOLD": "0.1"})
    assert from_flag["threshold"].rule_for("ztf") == ThresholdRule(0.02, "fpr")
    assert settings.resolve(parser.parse_args(required), options, {})["threshold"] is None  # the card's
    with pytest.raises(settings.SettingsError, match="threshold"):
        settings.resolve(parser.parse_args(required + ["--threshold", "fpr=5"]), options, {})


# ---- resolution on the shipped card's real ROC ----------------------------------------------------

@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_an_fpr_target_gives_the_lowest_threshold_within_it(target):
    card = ModelCard.read(ZTF_CARD)
    fpr, _, thresholds = _roc(card)
    chosen = resolve_threshold(card, ThresholdRule(target, "fpr"))
    assert chosen != card.threshold
    # The curve's point at the chosen threshold keeps within the target; every lower one exceeds it.
    assert fpr[thresholds == chosen].max() <= target
    assert np.all(fpr[thresholds < chosen] > target)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_a_tpr_target_gives_the_highest_threshold_that_reaches_it(target):
    card = ModelCard.read(ZTF_CARD)
    _, tpr, thresholds = _roc(card)
    chosen = resolve_threshold(card, ThresholdRule(target, "tpr"))
    assert chosen != card.threshold
    assert tpr[thresholds == chosen].min() >= target
    assert np.all(tpr[thresholds > chosen] < target)


def test_a_number_or_no_rule_needs_no_curve():
    card = ModelCard.read(ZTF_CARD)
    assert resolve_threshold(card, ThresholdRule(0.3)) == 0.3
    assert resolve_threshold(card, None) == card.threshold


@pytest.fixture(scope="module")
def model_without_validation(tmp_path_factory):
    """A copy of the ZTF model whose card has no ``real_validation`` section."""
    folder = tmp_path_factory.mktemp("no-validation")
    shutil.copy(DEFAULT_MODELS_DIR / "ztf" / MODEL_FILE, folder / MODEL_FILE)
    card = json.loads(ZTF_CARD.read_text())
    del card["real_validation"]
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


def test_a_rate_is_refused_for_a_card_without_a_validation_roc(model_without_validation):
    scorer = Scorer(model_without_validation, device="cpu")
    with pytest.raises(ModelError, match=rf"threshold fpr=0.01: model {scorer.card.name} .*no real validation ROC"):
        apply_thresholds({"ztf": scorer}, "fpr=0.01")
    # A number still applies to it.
    assert apply_thresholds({"ztf": scorer}, "0.4")["ztf"].threshold == 0.4


def test_consume_refuses_at_start_up_with_exit_2(model_without_validation, caplog):
    parser = argparse.ArgumentParser()
    consumer.add_arguments(parser)
    args = parser.parse_args(["--input-topic", "in", "--output-topic", "out", "--dlq-topic", "dlq",
                              "--survey", "ztf", "--device", "cpu", "--model", str(model_without_validation),
                              "--threshold", "ztf:fpr=0.01"])
    with caplog.at_level(logging.ERROR):
        assert consumer.main(args) == 2
    assert "no real validation ROC" in caplog.text and "threshold fpr=0.01" in caplog.text


def test_serve_refuses_at_start_up_with_exit_2(model_without_validation, caplog):
    from service.api import app

    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--model-ztf", str(model_without_validation),
                              "--model-rubin", str(DEFAULT_MODELS_DIR / "rubin"), "--threshold", "ztf:tpr=0.9"])
    with caplog.at_level(logging.ERROR):
        assert app.main(args) == 2
    assert "no real validation ROC" in caplog.text and "threshold tpr=0.9" in caplog.text


# ---- the labels made with it ----------------------------------------------------------------------

def test_scorers_with_a_rule_are_copies_the_shared_ones_keep_the_card_threshold():
    shared = real_scorers()
    applied = apply_thresholds(shared, "ztf:fpr=0.01")
    assert applied["ztf"] is not shared["ztf"] and applied["ztf"].session is shared["ztf"].session
    assert applied["ztf"].threshold == resolve_threshold(shared["ztf"].card, ThresholdRule(0.01, "fpr"))
    assert applied["ztf"].threshold_rule == "fpr=0.01"
    assert shared["ztf"].threshold == shared["ztf"].card.threshold and shared["ztf"].threshold_rule == "card"
    assert applied["rubin"] is shared["rubin"]


def test_stream_records_carry_the_resolved_threshold_and_its_labels():
    scorers = apply_thresholds(real_scorers(), "ztf:fpr=0.01,rubin:0.3")
    paths = ztf_fits_files() + rubin_files()
    messages = [SourceMessage(p.read_bytes(), "alerts", 0, i, 1_700_000_000_000) for i, p in enumerate(paths)]
    outcome = ScoringPipeline(scorers, records.RecordEncoder("scores")).execute(messages)
    assert len(outcome.scores) == len(paths)
    expected = {"ztf": resolve_threshold(scorers["ztf"].card, ThresholdRule(0.01, "fpr")), "rubin": 0.3}
    for out in outcome.scores:
        (record,) = records.decode_records(out.value)
        assert record["threshold"] == expected[record["survey"]] != scorers[record["survey"]].card.threshold
        assert record["label"] == label_for(record["score"], record["threshold"])
    assert {r.record["survey"] for r in outcome.scores} == {"ztf", "rubin"}


def test_classify_and_model_use_the_resolved_threshold():
    with make_client(threshold="ztf:fpr=0.01") as client:
        ztf = real_scorers()["ztf"]
        resolved = resolve_threshold(ztf.card, ThresholdRule(0.01, "fpr"))
        (result,) = client.post("/classify", json=good_request("ztf")).json()["results"]
        assert result["threshold"] == resolved != ztf.card.threshold
        assert result["label"] == ("real" if is_real(result["score"], resolved) else "bogus")
        (rubin,) = client.post("/classify", json=good_request("rubin")).json()["results"]
        assert rubin["threshold"] == real_scorers()["rubin"].card.threshold
        model = client.get("/model").json()
        assert model["thresholds"]["ztf"] == {"threshold": resolved, "threshold_rule": "fpr=0.01"}
        assert model["thresholds"]["rubin"] == {"threshold": real_scorers()["rubin"].card.threshold,
                                                "threshold_rule": "card"}
        assert model["models"]["ztf"]["threshold"] == ztf.card.threshold  # the card stays the card's
    # The shared scorers the app was given keep their own threshold.
    assert ztf.threshold == ztf.card.threshold


def test_api_settings_take_the_setting_from_serve_options():
    assert ApiSettings.from_settings({"threshold": parse_threshold("rubin:0.7")}).threshold.rule_for("rubin") == \
        ThresholdRule(0.7)
