"""Serving a model without the difference image: as the main model, and as the fallback for
alerts whose difference cutout is missing, empty or all masked (real alerts, real ONNX models)."""

from __future__ import annotations

import io

import fastavro
import pytest

pytest.importorskip("torch")

from conftest import ztf_fits_files  # noqa: E402
from nodiff_support import WAYS, all_nan_fits_gz, nodiff_model, ztf_without_difference  # noqa: E402
from service.publish import records  # noqa: E402
from service.score.model import ModelError, Scorer, load_fallbacks  # noqa: E402
from service.stream.pipeline import ScoringPipeline, SourceMessage  # noqa: E402
from streaming import default_models, scorers  # noqa: E402,F401  (fixtures)

TRIPLET = ["template", "science", "difference"]


@pytest.fixture(scope="module")
def nodiff(tmp_path_factory):
    return Scorer(nodiff_model(tmp_path_factory.mktemp("nodiff") / "ztf-nodiff"), device="cpu")


def _process(scorers, values, fallbacks=None):
    messages = [SourceMessage(value, "alerts", 0, i) for i, value in enumerate(values)]
    return ScoringPipeline(scorers, records.RecordEncoder("scores"), fallbacks=fallbacks).execute(messages)


def test_a_nodiff_model_takes_no_difference(nodiff):
    """The exported graph's input holds the two images the card's contract names, and no more."""
    (graph_input,) = nodiff.session.get_inputs()
    assert graph_input.shape[1:] == [2, 16, 16] == list(nodiff.contract.input_shape)
    assert nodiff.contract.raw_inputs == ("template", "science")


def test_a_nodiff_main_model_scores_real_alerts_with_or_without_a_difference(nodiff):
    values = [p.read_bytes() for p in ztf_fits_files()] + [ztf_without_difference(how) for how in WAYS]
    outcome = _process({"ztf": nodiff}, values)
    assert not outcome.dead_letters
    assert len(outcome.scores) == len(values)
    for out in outcome.scores:
        (record,) = records.decode_records(out.value)
        assert record["model_name"] == "nodiff-test" and record["model_inputs"] == ["template", "science"]
        assert 0.0 <= record["score"] <= 1.0


@pytest.mark.parametrize("how", WAYS)
def test_without_a_fallback_an_alert_without_a_difference_is_refused_as_before(scorers, how):
    outcome = _process(scorers, [ztf_without_difference(how)])
    assert not outcome.scores
    (letter,) = outcome.dead_letters
    assert letter.kind == "cutout"
    expected = {"null": "cutoutDifference is missing (null) (ztf candid ",
                "empty": "cutoutDifference.stampData is empty (ztf candid ",
                "masked": "cutout 'difference' has no finite pixel near the source (all masked) (ztf candid "}[how]
    assert letter.reason.startswith(expected), letter.reason


@pytest.mark.parametrize("how", WAYS)
def test_the_fallback_scores_an_alert_without_a_usable_difference(scorers, nodiff, how):
    whole = ztf_fits_files()[0].read_bytes()
    outcome = _process(scorers, [whole, ztf_without_difference(how)], fallbacks={"ztf": nodiff})
    assert not outcome.dead_letters
    first, second = (records.decode_records(out.value)[0] for out in outcome.scores)
    assert first["candidate_id"] == second["candidate_id"], "the same alert, twice"
    assert first["model_name"] == scorers["ztf"].card.name and first["model_inputs"] == TRIPLET
    assert second["model_name"] == "nodiff-test" and second["model_inputs"] == ["template", "science"]
    assert second["threshold"] == nodiff.threshold
    assert second["score"] == pytest.approx(float(nodiff.score(_nodiff_stamp(nodiff, whole))[0]), abs=1e-6)


def _nodiff_stamp(scorer, value):
    """The model input of the alert's template and science, assembled as the service does."""
    from service.decode.alerts import decode_message
    from service.contract import assemble

    (alert,) = decode_message(value)
    return assemble(alert.images, scorer.contract, alert.centre)[None]


def test_an_alert_whose_science_is_masked_is_refused_even_with_a_fallback(scorers, nodiff):
    reader = fastavro.reader(io.BytesIO(ztf_fits_files()[0].read_bytes()))
    schema, (record,) = reader.writer_schema, list(reader)
    record["cutoutScience"]["stampData"] = all_nan_fits_gz()
    out = io.BytesIO()
    fastavro.writer(out, schema, [record])
    outcome = _process(scorers, [out.getvalue()], fallbacks={"ztf": nodiff})
    (letter,) = outcome.dead_letters
    assert letter.kind == "cutout" and "'science'" in letter.reason


def test_a_fallback_that_takes_the_difference_or_serves_another_survey_is_refused(default_models, nodiff):
    with pytest.raises(ModelError, match="takes the difference image"):
        load_fallbacks({"ztf": default_models / "ztf"}, device="cpu")
    with pytest.raises(ModelError, match="is a ztf model"):
        load_fallbacks({"rubin": nodiff.path.parent}, device="cpu")


def test_score_records_without_model_inputs_still_read_with_the_new_schema():
    old = records.score_schema()
    old = dict(old, fields=[f for f in old["fields"] if f["name"] != "model_inputs"])
    record = records.score_record(survey="ztf", candidate_id=1, object_id="ZTF1", score=0.5, threshold=0.5,
                                  model_name="m", model_version="1", observation_mjd=None)
    del record["model_inputs"]
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(old), [record])
    buffer.seek(0)
    (read,) = fastavro.reader(buffer, reader_schema=fastavro.parse_schema(records.score_schema()))
    assert read["model_inputs"] is None
