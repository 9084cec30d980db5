"""The model card's one definition (`service.score.card`): the shipped cards read and write back
byte for byte, and a card that lacks or mistypes a field is refused naming it."""

from __future__ import annotations

import json

import pytest

from conftest import MODELS_DIR
from service.score.card import ModelCard, ModelError, label_for

SHIPPED = sorted(MODELS_DIR.glob("*/model_card.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_a_shipped_card_is_written_back_byte_for_byte(path, tmp_path):
    card = ModelCard.read(path)
    assert card.write(tmp_path / "model_card.json").read_bytes() == path.read_bytes()
    assert ModelCard.from_dict(json.loads(path.read_text())) == card


def test_a_minimal_card_keeps_only_its_keys(tmp_path):
    raw = {"name": "t", "version": "0", "survey": "ztf", "threshold": 0.5,
           "input": {"channels": ["template", "science"], "size": 16}}
    card = ModelCard.from_dict(raw)
    assert card.calibration is None and card.holdout is None
    assert set(card.to_dict()) == set(raw)
    assert card.to_dict()["input"]["raw_inputs"] == ["template", "science"]


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("threshold"), "threshold: Field required"),
    (lambda c: c["test_metrics"].update(roc_auc="high"), "test_metrics.roc_auc: Input should be a valid number"),
    (lambda c: c["training"].update(stopped_early=1), "training.stopped_early: Input should be a valid boolean"),
    (lambda c: c["input"].pop("channels"), "input: Value error, missing 'channels'"),
    (lambda c: c["input"].update(raw_inputs=["science"]), "raw_inputs is ['science'], but the contract gives"),
    (lambda c: c["real_test"]["adapted"].pop("n_labelled"), "real_test.adapted.n_labelled: Field required"),
    (lambda c: c.update(thresold=0.4), "thresold: Extra inputs are not permitted"),
])
def test_a_bad_card_is_refused_naming_the_field(tmp_path, change, message):
    raw = json.loads((MODELS_DIR / "ztf" / "model_card.json").read_text())
    change(raw)
    path = tmp_path / "model_card.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="model card .*" + message.replace("[", r"\[").replace("(", r"\(")):
        ModelCard.read(path)


def test_a_card_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "model_card.json").write_text("{not json")
    with pytest.raises(ModelError, match="not JSON"):
        ModelCard.read(tmp_path / "model_card.json")
    with pytest.raises(ModelError, match="No such file"):
        ModelCard.read(tmp_path / "missing.json")


def test_the_threshold_itself_is_real():
    assert [label_for(s, 0.5) for s in (0.4999, 0.5, 0.9)] == ["bogus", "real", "real"]
