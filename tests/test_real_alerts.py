"""Every real alert of ``../shared/real`` decodes and scores; broker re-writes of alerts decode too;
the survey's own score (ZTF drb/rb, Rubin reliability) travels with ours.

The real alerts are as community brokers wrote them: ZTF's own ``ztf.alert`` records and
Spark-written ``topLevelRecord`` / ``topLevelRecord.value`` records of both surveys, some
with ``ssSource`` or ``diaObject`` written as a record of nulls.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
from pathlib import Path

import fastavro
import numpy as np
import pytest

from real_support import labels, real_data, real_files, survey_score_of  # noqa: F401  (real_data: fixture)
from service.publish import records
from service.tools import replay
from service.decode import framing, schemas
from service.decode.alerts import DecodeError, decode_message
from service.decode.stamps import decode_stamps
from service.tools.run import score_line
from streaming import default_models, scorers  # noqa: F401  (fixtures)

#: Files decoded per `decode_stamps` call: the consumer's batches are of this order.
CHUNK = 256


def read_container(data: bytes) -> tuple[dict, list[dict]]:
    reader = fastavro.reader(io.BytesIO(data))
    return reader.writer_schema, list(reader)


def write_container(schema: dict, alerts: list[dict]) -> bytes:
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(schema), alerts)
    return buffer.getvalue()


def first_file(real_data: Path, survey: str, schema_name: str) -> Path:
    """The first real alert of ``survey`` whose writer schema is named ``schema_name``."""
    for path in sorted((real_data / survey).glob("*.avro")):
        with open(path, "rb") as handle:
            if fastavro.reader(handle).writer_schema.get("name") == schema_name:
                return path
    raise AssertionError(f"no {survey} alert with a {schema_name} schema under {real_data}")


# --------------------------------------------------------------------------- every shared file


def test_every_real_alert_decodes_and_scores_with_its_surveys_default_model(real_data, scorers):
    files, rows = real_files(), labels()
    assert len(files) == len(rows) > 0
    contracts = {name: scorer.contract for name, scorer in scorers.items()}
    problems: list[str] = []
    scored = {"ztf": 0, "rubin": 0}
    for start in range(0, len(files), CHUNK):
        chunk = files[start : start + CHUNK]
        batches, failures = decode_stamps([p.read_bytes() for p in chunk], contracts)
        problems += [f"{chunk[f.index].relative_to(real_data)}: [{f.kind}] {f.reason}" for f in failures]
        for survey, batch in batches.items():
            scores = scorers[survey].score(batch.stamps)
            for alert, index, score in zip(batch.alerts, batch.indices, scores):
                name = str(chunk[index].relative_to(real_data))
                row = rows[name]
                expected_name, expected_score = survey_score_of(row)
                if survey != row["survey"]:
                    problems.append(f"{name}: recognised as {survey}, is {row['survey']}")
                elif alert.candidate_id != int(row["id"]):
                    problems.append(f"{name}: candidate id {alert.candidate_id}, labels.csv says {row['id']}")
                elif not (np.isfinite(score) and 0.0 <= score <= 1.0):
                    problems.append(f"{name}: score {score}")
                elif alert.survey_score_name != expected_name or (expected_score is not None and not math.isclose(
                        alert.survey_score, expected_score, rel_tol=1e-6)) or (expected_score is None) != (
                        alert.survey_score is None):
                    problems.append(f"{name}: survey score {alert.survey_score_name} {alert.survey_score}, "
                                    f"labels.csv {expected_name} {expected_score}")
                else:
                    scored[survey] += 1
    assert not problems, f"{len(problems)} real alerts not scored right:\n" + "\n".join(problems)
    assert scored == {survey: sum(row["survey"] == survey for row in rows.values()) for survey in scored}


def test_every_real_alert_frames_for_replay_in_both_framings(real_data, caplog):
    """The wire format holds every real Rubin alert, including those with an all-null ssSource or diaObject."""
    files = real_files()
    with caplog.at_level(logging.WARNING, logger="service.tools.replay"):
        containers = replay.load_messages([real_data])
        wire = replay.load_messages([real_data], wire_format=True)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert len(containers) == len(wire) == len(files)
    for path, container, framed in zip(files, containers, wire):
        assert container.value == path.read_bytes()
        if framed.survey == "rubin":
            assert framed.value[0] == framing.WIRE_MAGIC
            (original,), (again,) = decode_message(container.value), decode_message(framed.value)
            assert (again.candidate_id, again.object_id, again.survey_score) == (
                original.candidate_id, original.object_id, original.survey_score)
            for name, image in original.images.items():
                np.testing.assert_array_equal(again.images[name], image)
        else:
            assert framed.value == container.value


def test_some_real_rubin_alerts_carry_absent_records_as_records_of_nulls(real_data):
    """What the wire-format conversion must turn into nulls (so the test above covers it)."""
    all_null = 0
    for path in sorted((real_data / "rubin").glob("*.avro")):
        _, (alert,) = read_container(path.read_bytes())
        for name in ("ssSource", "diaObject"):
            value = alert.get(name)
            if isinstance(value, dict) and schemas.is_all_null(value):
                all_null += 1
    assert all_null > 0


# --------------------------------------------------------------------------- re-written records


def without_top_level_candid(schema: dict, alert: dict) -> tuple[dict, dict]:
    """A Spark-style re-write of a ZTF alert: ``topLevelRecord``, candid only inside candidate."""
    schema = copy.deepcopy(schema)
    schema["name"] = "topLevelRecord"
    schema.pop("namespace", None)
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "candid"]
    alert = {k: v for k, v in alert.items() if k != "candid"}
    return schema, alert


@pytest.mark.parametrize("schema_name", ["ztf.alert", "topLevelRecord", "topLevelRecord.value"])
def test_ztf_alert_with_candid_only_inside_candidate_decodes(real_data, schema_name, tmp_path):
    # ztf.alert files end with the cutouts (the decoder's fast path); Fink's have fields after them.
    path = first_file(real_data, "ztf", schema_name)
    schema, (alert,) = read_container(path.read_bytes())
    (expected,) = decode_message(path.read_bytes())
    rewritten_schema, rewritten = without_top_level_candid(schema, alert)
    message = write_container(rewritten_schema, [rewritten])
    writer = schemas.parse_writer_schema(json.dumps(rewritten_schema))
    assert writer.survey == "ztf"
    assert (writer.tail is not None) == (schema_name == "ztf.alert")
    for survey in ("auto", "ztf"):
        (got,) = decode_message(message, survey=survey)
        assert got.survey == "ztf"
        assert got.candidate_id == alert["candidate"]["candid"] == expected.candidate_id
        assert (got.object_id, got.observation_mjd, got.survey_score) == (
            expected.object_id, expected.observation_mjd, expected.survey_score)
        for name, image in expected.images.items():
            np.testing.assert_array_equal(got.images[name], image)
    with pytest.raises(DecodeError, match="expected a rubin alert, got a ztf alert") as caught:
        decode_message(message, survey="rubin")
    assert caught.value.kind == "schema"
    (tmp_path / "rewritten.avro").write_bytes(message)
    (sent,) = replay.messages_of_file(tmp_path / "rewritten.avro", wire_format=True)
    assert sent.survey == "ztf" and sent.value == message


def test_ztf_alert_without_any_candid_is_named(real_data):
    path = first_file(real_data, "ztf", "topLevelRecord")
    schema, (alert,) = read_container(path.read_bytes())
    schema, alert = without_top_level_candid(schema, alert)
    alert["candidate"]["candid"] = None
    for field in schema["fields"]:
        if field["name"] == "candidate":
            inner = field["type"] if isinstance(field["type"], dict) else next(
                b for b in field["type"] if isinstance(b, dict))
            for sub in inner["fields"]:
                if sub["name"] == "candid":
                    sub["type"] = ["null", "long"]
    with pytest.raises(DecodeError, match=f"without a candid.*objectId {alert['objectId']}") as caught:
        decode_message(write_container(schema, [alert]))
    assert caught.value.kind == "decode"


@pytest.mark.parametrize("survey", ["ztf", "rubin"])
def test_alert_wrapped_in_an_envelope_record_decodes_as_the_alert(real_data, survey):
    path = sorted((real_data / survey).glob("*.avro"))[0]
    schema, (alert,) = read_container(path.read_bytes())
    (expected,) = decode_message(path.read_bytes())
    inner = copy.deepcopy(schema)
    inner["name"] = "value"
    inner["namespace"] = "topLevelRecord"
    envelope = {"type": "record", "name": "topLevelRecord", "fields": [
        {"name": "key", "type": ["null", "bytes"]},
        {"name": "topic", "type": "string"},
        {"name": "value", "type": inner},
    ]}
    (got,) = decode_message(write_container(envelope, [{"key": None, "topic": "alerts", "value": alert}]))
    assert (got.survey, got.candidate_id, got.object_id, got.survey_score) == (
        expected.survey, expected.candidate_id, expected.object_id, expected.survey_score)
    np.testing.assert_array_equal(got.images["difference"], expected.images["difference"])


def test_record_that_is_no_alert_and_wraps_none_is_a_named_schema_error():
    schema = {"type": "record", "name": "topLevelRecord", "fields": [
        {"name": "topic", "type": "string"},
        {"name": "value", "type": {"type": "record", "name": "inner", "fields": [{"name": "x", "type": "int"}]}}]}
    with pytest.raises(DecodeError, match="neither a ZTF alert.*nor a record wrapping one; its fields: topic, value"):
        decode_message(write_container(schema, [{"topic": "t", "value": {"x": 1}}]))


def rubin_alert(real_data: Path) -> tuple[dict, dict]:
    path = first_file(real_data, "rubin", "topLevelRecord")
    schema, (alert,) = read_container(path.read_bytes())
    return schema, alert


def test_wire_format_turns_records_of_nulls_into_null(real_data):
    _, alert = rubin_alert(real_data)
    alert = copy.deepcopy(alert)
    alert["ssSource"] = {key: None for key in (alert.get("ssSource") or {"diaSourceId": None, "ssObjectId": None})}
    alert["diaObject"] = {key: None for key in (alert.get("diaObject") or {"diaObjectId": None})}
    body = schemas.to_wire_format(alert)
    (decoded,) = decode_message(body)
    assert decoded.candidate_id == alert["diaSource"]["diaSourceId"]
    assert decoded.record["ssSource"] is None and decoded.record["diaObject"] is None
    # the object id then comes from the source, as for any alert without a diaObject
    assert decoded.object_id == str(alert["diaSource"]["diaObjectId"] or "")


def test_wire_format_names_the_field_the_official_schema_refuses(real_data):
    _, alert = rubin_alert(real_data)
    alert = copy.deepcopy(alert)
    alert["diaSource"]["ra"] = None
    with pytest.raises(ValueError, match=r"does not fit Rubin schema \d+\.\d+: Field\(.*diaSource\.ra\) is None"):
        schemas.to_wire_format(alert)


def test_replay_sends_an_alert_the_wire_format_cannot_hold_as_its_container(real_data, tmp_path, caplog):
    schema, alert = rubin_alert(real_data)
    alert["diaSource"]["ra"] = None
    path = tmp_path / "no-ra.avro"
    path.write_bytes(write_container(schema, [alert]))
    with caplog.at_level(logging.WARNING, logger="service.tools.replay"):
        (message,) = replay.messages_of_file(path, wire_format=True)
    assert message.value == path.read_bytes()
    assert "cannot be framed in the wire format" in caplog.text and "diaSource.ra" in caplog.text
    (decoded,) = decode_message(message.value)
    assert decoded.candidate_id == alert["diaSource"]["diaSourceId"]


# --------------------------------------------------------------------------- the survey's own score


def ztf_alert_with(real_data: Path, **candidate) -> bytes:
    path = first_file(real_data, "ztf", "ztf.alert")
    schema, (alert,) = read_container(path.read_bytes())
    alert["candidate"].update(candidate)
    return write_container(schema, [alert])


def test_ztf_survey_score_is_drb_when_present_else_rb(real_data):
    (alert,) = decode_message(ztf_alert_with(real_data, drb=0.875, rb=0.25))
    assert (alert.survey_score_name, alert.survey_score) == ("drb", 0.875)
    (alert,) = decode_message(ztf_alert_with(real_data, drb=None, rb=0.25))
    assert (alert.survey_score_name, alert.survey_score) == ("rb", 0.25)
    (alert,) = decode_message(ztf_alert_with(real_data, drb=float("nan"), rb=None))
    assert (alert.survey_score_name, alert.survey_score) == (None, None)


def test_rubin_survey_score_is_reliability(real_data):
    schema, alert = rubin_alert(real_data)
    alert["diaSource"]["reliability"] = 0.125
    (decoded,) = decode_message(write_container(schema, [alert]))
    assert (decoded.survey_score_name, decoded.survey_score) == ("reliability", 0.125)
    alert["diaSource"]["reliability"] = None
    (decoded,) = decode_message(schemas.to_wire_format(alert))
    assert (decoded.survey_score_name, decoded.survey_score) == (None, None)


def score_record(**extra) -> dict:
    return records.score_record(survey="ztf", candidate_id=1, object_id="ZTF18a", score=0.75, threshold=0.5,
                                model_name="m", model_version="1", observation_mjd=60000.0, **extra)


def test_score_record_carries_the_survey_score_and_reads_back():
    record = score_record(survey_score=0.5, survey_score_name="drb")
    (back,) = records.decode_records(records.RecordEncoder("t").encode(record))
    assert (back["survey_score"], back["survey_score_name"]) == (0.5, "drb")
    (back,) = records.decode_records(records.RecordEncoder("t").encode(score_record()))
    assert (back["survey_score"], back["survey_score_name"]) == (None, None)


def test_score_record_schema_stays_compatible_with_the_previous_one():
    new = records.score_schema()
    added = {"survey_score", "survey_score_name"}
    old = dict(new, fields=[f for f in new["fields"] if f["name"] not in added])
    for field in new["fields"]:
        if field["name"] in added:
            assert field["default"] is None and field["type"][0] == "null" and field["doc"]
    # old records, read with the new schema: the new fields are null
    old_bytes = io.BytesIO()
    fastavro.schemaless_writer(old_bytes, fastavro.parse_schema(old),
                               {k: v for k, v in score_record().items() if k not in added})
    back = fastavro.schemaless_reader(io.BytesIO(old_bytes.getvalue()), fastavro.parse_schema(old),
                                      fastavro.parse_schema(new))
    assert back["survey_score"] is None and back["survey_score_name"] is None
    # new records, read by a reader that knows only the old schema
    new_bytes = io.BytesIO()
    fastavro.schemaless_writer(new_bytes, fastavro.parse_schema(new), score_record(survey_score=0.9,
                                                                                   survey_score_name="rb"))
    back = fastavro.schemaless_reader(io.BytesIO(new_bytes.getvalue()), fastavro.parse_schema(new),
                                      fastavro.parse_schema(old))
    assert back["score"] == 0.75 and "survey_score" not in back


def test_run_prints_the_survey_score_beside_ours():
    line = score_line(score_record(survey_score=0.98765, survey_score_name="drb"))
    assert "score 0.750" in line and line.endswith("  survey drb 0.988")
    assert "drb" not in score_line(score_record()) and score_line(score_record()).endswith("m 1")


def test_classify_gives_the_survey_score_of_raw_alerts_beside_ours(real_data):
    from api_support import make_client

    rows = labels()
    paths = [first_file(real_data, "ztf", "ztf.alert"), first_file(real_data, "ztf", "topLevelRecord"),
             first_file(real_data, "rubin", "topLevelRecord")]
    bodies = [p.read_bytes() for p in paths] + [schemas.to_wire_format(paths[-1].read_bytes())]
    with make_client() as client:
        for path, body in zip(paths + paths[-1:], bodies):
            response = client.post("/classify", content=body, headers={"content-type": "application/avro"})
            assert response.status_code == 200, response.text
            (result,) = response.json()["results"]
            name, value = survey_score_of(rows[str(path.relative_to(real_data))])
            assert result["survey_score_name"] == name and result["survey_score"] == pytest.approx(value, rel=1e-6)
            assert 0.0 <= result["score"] <= 1.0
        # stamps sent as JSON carry no survey score
        (alert,) = decode_message(paths[0].read_bytes())
        from api_support import candidate_json

        response = client.post("/classify", json={"survey": "ztf", "candidates": [candidate_json(alert, "fits")]})
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        assert result["survey_score"] is None and result["survey_score_name"] is None


# --------------------------------------------------------------------------- failures are named


def nan_fits() -> bytes:
    from astropy.io import fits as afits

    buffer = io.BytesIO()
    afits.PrimaryHDU(np.full((63, 63), np.nan, dtype=np.float32)).writeto(buffer)
    return buffer.getvalue()


def unscorable(real_data: Path) -> dict[str, tuple[bytes, str, str]]:
    """Real alerts broken as real streams break them: (message, kind, words the reason must hold)."""
    ztf = first_file(real_data, "ztf", "ztf.alert")
    schema, (alert,) = read_container(ztf.read_bytes())
    no_candidate = dict(alert, candidate=None)
    for field in schema["fields"]:
        if field["name"] == "candidate":
            field["type"] = ["null", field["type"]]
    rubin_schema, rubin = rubin_alert(real_data)
    blank = dict(rubin, cutoutTemplate=nan_fits())
    source_id = rubin["diaSource"]["diaSourceId"]
    return {
        "no candidate": (write_container(schema, [no_candidate]), "decode",
                         f"candidate is null (objectId {alert['objectId']})"),
        "blank template": (write_container(rubin_schema, [blank]), "cutout",
                           f"'template' has no finite pixel near the source (all masked) (rubin diaSourceId {source_id})"),
        "cut short": (ztf.read_bytes()[:5000], "decode", "truncated or corrupt"),
    }


def test_an_alert_that_cannot_be_scored_is_dead_lettered_with_a_named_reason(real_data, scorers):
    from service.stream.pipeline import HEADER_REASON, HEADER_REASON_KIND, ScoringPipeline, SourceMessage, headers_to_text

    cases = unscorable(real_data)
    pipeline = ScoringPipeline(scorers, records.RecordEncoder("scores"))
    outcome = pipeline.execute([SourceMessage(message, "alerts", 0, i) for i, (message, _, _) in
                                 enumerate(cases.values())])
    assert not outcome.scores
    assert len(outcome.dead_letters) == len(cases)
    for letter, (name, (message, kind, words)) in zip(outcome.dead_letters, cases.items()):
        headers = headers_to_text(letter.headers)
        assert letter.value == message, name
        assert headers[HEADER_REASON_KIND] == kind and words in headers[HEADER_REASON], (name, headers)


def test_classify_refuses_an_alert_that_cannot_be_scored_with_the_same_reason(real_data):
    from api_support import make_client

    with make_client() as client:
        for name, (message, kind, words) in unscorable(real_data).items():
            response = client.post("/classify", content=message, headers={"content-type": "application/avro"})
            assert response.status_code == 422, (name, response.text)
            assert f"({kind})" in response.json()["detail"] and words in response.json()["detail"], name
