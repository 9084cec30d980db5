"""``rbstream replay`` and ``rbstream tail`` against a real local broker, with the real sample alerts."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import fastavro
import pytest

from conftest import ZTF_DIR, rubin_files, ztf_files
from service import cli
from service.stream import pipeline
from service.publish import records
from service.decode.alerts import decode_message
from service.stream.pipeline import SourceMessage
from streaming import create_topic, read_topic, unique

pytestmark = pytest.mark.kafka

SAME_SCHEMA = ["396522680015040000.avro", "396522680015040001.avro", "396522680015040002.avro"]


def test_replay_sends_each_alert_file_byte_for_byte(broker, capsys):
    topic = unique("replay")
    assert cli.main(["replay", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--quiet",
                     str(ZTF_DIR)]) == 0
    assert f"{len(ztf_files())} alert messages sent to {topic}" in capsys.readouterr().err
    got = read_topic(broker.bootstrap_servers, topic, count=len(ztf_files()))
    assert len(got) == len(ztf_files())
    by_file = {r.headers[pipeline.HEADER_SOURCE_FILE]: r.value for r in got}
    assert by_file == {str(p): p.read_bytes() for p in ztf_files()}


def test_replay_splits_a_multi_alert_container_into_one_message_per_alert(broker, tmp_path):
    first = fastavro.reader(io.BytesIO((ZTF_DIR / SAME_SCHEMA[0]).read_bytes()))
    alerts = [next(iter(fastavro.reader(io.BytesIO((ZTF_DIR / n).read_bytes())))) for n in SAME_SCHEMA]
    bundle = tmp_path / "three.avro"
    with open(bundle, "wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(first.writer_schema), alerts)
    topic = unique("replay-split")
    assert cli.main(["replay", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--quiet",
                     str(bundle)]) == 0
    got = sorted(read_topic(broker.bootstrap_servers, topic, count=3), key=lambda r: r.headers[pipeline.HEADER_SOURCE_FILE])
    assert [r.headers[pipeline.HEADER_SOURCE_FILE] for r in got] == [f"{bundle}#{i}" for i in range(3)]
    for read, alert in zip(got, alerts):
        (decoded,) = decode_message(read.value)
        assert decoded.candidate_id == alert["candid"] and decoded.object_id == alert["objectId"]


def test_replay_wire_format_frames_rubin_alerts_like_the_live_stream(broker):
    topic = unique("replay-wire")
    create_topic(broker.bootstrap_servers, topic)
    paths = rubin_files() + ztf_files()[:1]
    assert cli.main(["replay", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--quiet",
                     "--wire-format", *map(str, paths)]) == 0
    got = read_topic(broker.bootstrap_servers, topic, count=len(paths))
    assert len(got) == len(paths)
    for read, path in zip(sorted(got, key=lambda r: r.offset), paths):
        if path in rubin_files():
            assert read.value[0] == 0, "Confluent magic byte"
            version = path.name.split("_")[0].lstrip("v")              # v7.4_... -> 7.4
            major, minor = map(int, version.split("."))
            assert int.from_bytes(read.value[1:5], "big") == major * 100 + minor
            (wire,) = decode_message(read.value)
            (container,) = decode_message(path.read_bytes())
            assert (wire.candidate_id, wire.object_id) == (container.candidate_id, container.object_id)
        else:
            assert read.value == path.read_bytes(), "ZTF keeps its own framing"


def test_replay_refuses_missing_paths_and_sends_non_alert_files_as_they_are(broker, tmp_path, caplog):
    assert cli.main(["replay", "--bootstrap-servers", broker.bootstrap_servers, "--topic", "x", "--quiet",
                     str(tmp_path / "nowhere.avro")]) == 2
    assert "does not exist" in caplog.text
    junk = tmp_path / "junk.avro"
    junk.write_bytes(b"\x89PNG not an alert")
    topic = unique("replay-junk")
    assert cli.main(["replay", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--quiet",
                     "--repeat", "2", str(junk)]) == 0
    assert [r.value for r in read_topic(broker.bootstrap_servers, topic, count=2)] == [junk.read_bytes()] * 2


def _produce(bootstrap_servers, topic, messages):
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap_servers})
    for key, value, headers in messages:
        producer.produce(topic, value=value, key=key, headers=headers)
    assert producer.flush(10) == 0


def test_tail_prints_score_records_and_dead_letters_as_json_lines(broker, capsys):
    topic = unique("tail")
    create_topic(broker.bootstrap_servers, topic)  # one partition: printed in produce order
    record = records.score_record(survey="ztf", candidate_id=472263571115095000, object_id="ZTF17aaajnnn",
                                  score=0.9, threshold=0.5, model_name="m", model_version="1.0",
                                  observation_mjd=58252.26, scored_at=datetime(2026, 11, 25, tzinfo=timezone.utc))
    jpeg = ztf_files()[1]
    source = SourceMessage(jpeg.read_bytes(), "alerts", 3, 41, headers=((pipeline.HEADER_SOURCE_FILE, b"x.avro"),))
    letter = pipeline.dead_letter(source, "cutout", "cutoutScience is a JPEG image, not FITS", "ztf")
    _produce(broker.bootstrap_servers, topic, [(b"ZTF17aaajnnn", records.RecordEncoder(topic).encode(record), []),
                                                (letter.key, letter.value, letter.headers)])
    assert cli.main(["tail", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--from-beginning",
                     "--max-messages", "2", "--metadata"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    printed_record, printed_letter = lines
    assert printed_record["candidate_id"] == 472263571115095000 and printed_record["label"] == "real"
    assert printed_record["scored_at"] == "2026-11-25T00:00:00+00:00"
    assert printed_record["kafka"]["key"] == "ZTF17aaajnnn"
    assert printed_letter["dead_letter"] is True and printed_letter["reason_kind"] == "cutout"
    assert printed_letter["reason"] == "cutoutScience is a JPEG image, not FITS"
    assert printed_letter["source"] == {"topic": "alerts", "partition": 3, "offset": 41, "file": "x.avro"}
    assert printed_letter["bytes"] == len(jpeg.read_bytes())


def test_tail_from_the_end_prints_only_new_messages_and_stops_when_idle(broker, capsys):
    topic = unique("tail-idle")
    create_topic(broker.bootstrap_servers, topic)
    _produce(broker.bootstrap_servers, topic, [(None, b"old", [])])
    assert cli.main(["tail", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
                     "--idle-timeout", "1"]) == 0
    assert capsys.readouterr().out == "", "only messages newer than the start are printed"
