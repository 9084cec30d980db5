"""The consumer's parts without a broker: settings, record framing, the batch pipeline.

Real sample alerts and the real default models; Kafka clients are only constructed
(librdkafka validates their configuration) where the settings' pass-through is checked.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import fastavro
import numpy as np
import pytest

from conftest import rubin_files, ztf_fits_files, ztf_jpeg_files
from streaming import default_models, scorers  # noqa: F401  (fixtures)
from service.stream import pipeline
from service.publish import records
from service import settings
from service.stream.consumer import CONSUME_OPTIONS, consumer_config, model_paths, producer_config
from service.stream.pipeline import ScoringPipeline, SourceMessage


def parse(argv, options=CONSUME_OPTIONS):
    parser = argparse.ArgumentParser()
    settings.add_options(parser, options)
    return parser.parse_args(argv)


REQUIRED = ["--input-topic", "in", "--output-topic", "out", "--dlq-topic", "dlq"]


# --- settings ------------------------------------------------------------------------------------

def test_settings_precedence_command_line_over_env_over_file(tmp_path):
    config = tmp_path / "rbstream.toml"
    config.write_text('batch-size = 32\nmax_wait_ms = 700\ngroup_id = "from-file"\nsurvey = "rubin"\n'
                      'input_topic = "in"\noutput_topic = "out"\ndlq_topic = "dlq"\n')
    env = {"RBSTREAM_MAX_WAIT_MS": "250", "RBSTREAM_GROUP_ID": "from-env"}
    values = settings.resolve(parse(["--config", str(config), "--group-id", "from-cli"]), CONSUME_OPTIONS, env)
    assert values["batch_size"] == 32            # file
    assert values["max_wait_ms"] == 250          # env beats file
    assert values["group_id"] == "from-cli"      # command line beats env
    assert values["survey"] == "rubin"
    assert values["from_beginning"] is False     # default


def test_settings_flags_from_env_and_command_line():
    env = {"RBSTREAM_FROM_BEGINNING": "true", "RBSTREAM_REPUBLISH_ALERT": "yes"}
    values = settings.resolve(parse(REQUIRED + ["--no-republish-alert"]), CONSUME_OPTIONS, env)
    assert values["from_beginning"] is True and values["republish_alert"] is False


@pytest.mark.parametrize("argv, env, message", [
    ([], {}, "input_topic is required"),
    (REQUIRED + ["--batch-size", "0"], {}, "batch_size"),
    (REQUIRED + ["--survey", "hst"], {}, "survey"),
    (REQUIRED, {"RBSTREAM_FROM_BEGINNING": "perhaps"}, "RBSTREAM_FROM_BEGINNING"),
    (REQUIRED + ["--kafka-option", "no-equals-sign"], {}, "KEY=VALUE"),
])
def test_settings_errors_name_the_problem(argv, env, message):
    with pytest.raises(settings.SettingsError, match=message):
        settings.resolve(parse(argv), CONSUME_OPTIONS, env)


def test_config_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_sise = 3\n")
    with pytest.raises(settings.SettingsError, match="batch_sise"):
        settings.resolve(parse(REQUIRED + ["--config", str(bad)]), CONSUME_OPTIONS, {})
    broken = tmp_path / "broken.toml"
    broken.write_text("batch_size = \n")
    with pytest.raises(settings.SettingsError, match="not valid TOML"):
        settings.resolve(parse(REQUIRED + ["--config", str(broken)]), CONSUME_OPTIONS, {})


def test_kafka_pass_through_merges_file_env_and_command_line_per_client(tmp_path):
    config = tmp_path / "stream.toml"
    config.write_text('[kafka]\n"security.protocol" = "SASL_SSL"\n"sasl.mechanism" = "PLAIN"\n'
                      '"consumer.session.timeout.ms" = 6000\n')
    env = {"RBSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "RBSTREAM_KAFKA_SASL_USERNAME": "alice",
           "RBSTREAM_KAFKA_OPTION": "client.id=rbstream-7,sasl.password=overridden-by-the-command-line"}
    values = settings.resolve(parse(REQUIRED + ["--config", str(config), "--kafka-option", "sasl.password=s3cret"]),
                              CONSUME_OPTIONS, env)
    assert values["kafka"] == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                               "sasl.username": "alice", "sasl.password": "s3cret",
                               "consumer.session.timeout.ms": "6000", "client.id": "rbstream-7"}
    consumer = settings.kafka_client_config(values, "consumer")
    producer = settings.kafka_client_config(values, "producer")
    assert consumer["session.timeout.ms"] == "6000" and "session.timeout.ms" not in producer
    assert producer["sasl.username"] == "alice"
    assert settings.redact(consumer)["sasl.password"] == "***"


@pytest.mark.parametrize("security", [
    {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "p"},
    {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u", "sasl.password": "p"},
    {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc",
     "sasl.oauthbearer.client.id": "rbstream", "sasl.oauthbearer.client.secret": "s",
     "sasl.oauthbearer.token.endpoint.url": "https://idp.example.org/token"},
    {"security.protocol": "SSL", "ssl.certificate.location": "CERT", "ssl.key.location": "KEY"},
])
def test_survey_stream_security_settings_are_accepted_by_librdkafka(security, tmp_path):
    """SASL PLAIN/SCRAM/OAUTHBEARER and TLS with a CA and a client certificate reach both clients."""
    from confluent_kafka import Consumer, Producer

    cert, key = _self_signed(tmp_path)
    security = {k: str(cert) if v == "CERT" else str(key) if v == "KEY" else v for k, v in security.items()}
    options = [f"{k}={v}" for k, v in security.items()] + [f"ssl.ca.location={cert}"]
    argv = REQUIRED + ["--bootstrap-servers", "127.0.0.1:1"] + sum((["--kafka-option", o] for o in options), [])
    values = settings.resolve(parse(argv), CONSUME_OPTIONS, {})
    conf_c, conf_p = consumer_config(values), producer_config(values)
    assert conf_c["enable.auto.commit"] is False and conf_p["enable.idempotence"] is True
    for key_, value in security.items():
        assert conf_c[key_] == value and conf_p[key_] == value
    # librdkafka rejects unknown keys and unreadable certificate or key files right here.
    Consumer(conf_c).close()
    Producer(conf_p).flush(0)


def test_fetching_follows_the_batch_window_and_an_operator_can_override_it():
    """The broker may hold a fetch no longer than the batch window; the prefetch pause is short."""
    from confluent_kafka import Consumer

    conf = consumer_config(settings.resolve(parse(REQUIRED + ["--max-wait-ms", "40"]), CONSUME_OPTIONS, {}))
    assert conf["fetch.wait.max.ms"] == 40 and conf["fetch.queue.backoff.ms"] < 1000
    slow = consumer_config(settings.resolve(parse(REQUIRED + ["--max-wait-ms", "5000"]), CONSUME_OPTIONS, {}))
    assert slow["fetch.wait.max.ms"] == 500  # never longer than librdkafka's own default
    tuned = consumer_config(settings.resolve(parse(REQUIRED + ["--kafka-option", "consumer.fetch.wait.max.ms=7"]),
                                             CONSUME_OPTIONS, {}))
    assert tuned["fetch.wait.max.ms"] == "7"
    Consumer(conf).close()  # librdkafka knows both properties


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and key (the openssl command line)."""
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed: cannot make a test certificate")
    cert, key = folder / "client.pem", folder / "client.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=rbstream-test"], check=True, capture_output=True)
    return cert, key


def test_model_paths_by_survey_or_by_card(default_models):
    assert model_paths(["ztf=/a", "rubin=/b"], "auto") == {"ztf": "/a", "rubin": "/b"}
    assert model_paths(["/a"], "ztf") == {"ztf": "/a"}
    assert model_paths([str(default_models / "rubin")], "auto") == {"rubin": str(default_models / "rubin")}
    with pytest.raises(settings.SettingsError, match="cannot tell its survey"):
        model_paths(["/nowhere"], "auto")


# --- records -------------------------------------------------------------------------------------

def _record(**changes):
    base = dict(survey="ztf", candidate_id=123, object_id="ZTF18aaaaaaa", score=0.75, threshold=0.5,
                model_name="m", model_version="1", observation_mjd=58000.5,
                scored_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc))
    base.update(changes)
    return records.score_record(**base)


def test_score_record_is_a_self_describing_avro_container():
    value = records.RecordEncoder("scores").encode(_record())
    reader = fastavro.reader(io.BytesIO(value))  # any Avro reader, no registry
    assert reader.writer_schema["name"] == "rbstream.ScoreRecord"
    (decoded,) = list(reader)
    assert decoded == _record() and decoded["label"] == "real"
    assert records.decode_records(value) == [_record()]


def test_container_framing_reads_back_with_fastavro_and_matches_its_long_encoding():
    """Header written once per schema, one block per message: any Avro reader reads every message."""
    from service.decode.framing import CONTAINER_MAGIC, encode_long

    many = [_record(candidate_id=i, object_id="ZTF" + "x" * (i * 40)) for i in range(5)]  # blocks > 127 bytes
    for batch in ([_record()], many):
        value = records.container_bytes(records.score_schema(), batch)
        assert list(fastavro.reader(io.BytesIO(value))) == batch
    assert records.container_bytes(records.score_schema(), [_record()])[:4] == CONTAINER_MAGIC
    for number in (0, 1, 63, 64, 127, 128, 300, 2**31, 2**62):
        expected = io.BytesIO()
        fastavro.schemaless_writer(expected, "long", number)
        assert encode_long(number) == expected.getvalue(), number


def test_label_follows_the_threshold():
    assert _record(score=0.4999)["label"] == "bogus"
    assert _record(score=0.5)["label"] == "real"


def test_wire_format_record_reads_back_with_its_schema_id():
    from streaming import TinySchemaRegistry

    from service.registry import SchemaRegistry

    tiny = TinySchemaRegistry({16: {"type": "string"}})
    registry = SchemaRegistry(tiny.url)
    try:
        value = records.RecordEncoder("scores", registry).encode(_record())
        assert value[0] == 0 and int.from_bytes(value[1:5], "big") == 17
        assert tiny.subjects == {"scores-value": [17]}
        assert records.decode_records(value, registry) == [_record()]
        with pytest.raises(records.RecordError, match="schema-registry-url"):
            records.decode_records(value)
        with pytest.raises(records.RecordError, match="unknown schema id 18"):
            records.decode_records(value[:1] + (18).to_bytes(4, "big") + value[5:], registry)
    finally:
        registry.close()
        tiny.close()


@pytest.mark.parametrize("value", [b"", b"garbage", b"Obj\x01truncated"])
def test_undecodable_record_bytes_give_a_clear_error(value):
    with pytest.raises(records.RecordError):
        records.decode_records(value)


# --- the pipeline --------------------------------------------------------------------------------

def _messages(paths):
    return [SourceMessage(p.read_bytes(), "alerts", 0, i, 1_700_000_000_000,
                          headers=((pipeline.HEADER_SOURCE_FILE, p.name.encode()),)) for i, p in enumerate(paths)]


def test_pipeline_scores_every_decodable_sample_and_dead_letters_the_rest(scorers):
    paths = ztf_fits_files() + ztf_jpeg_files() + rubin_files()
    messages = _messages(paths) + [SourceMessage(b"not an alert", "alerts", 0, len(paths))]
    outcome = ScoringPipeline(scorers, records.RecordEncoder("scores")).execute(messages)
    assert len(outcome.scores) == len(ztf_fits_files()) + len(rubin_files())
    assert {o.source.offset for o in outcome.scores} == set(range(len(ztf_fits_files()))) | \
        set(range(len(ztf_fits_files()) + len(ztf_jpeg_files()), len(paths)))
    for out in outcome.scores:
        (record,) = records.decode_records(out.value)
        assert record == out.record and out.key == record["object_id"].encode()
        assert 0.0 <= record["score"] <= 1.0
        card = scorers[record["survey"]].card
        assert (record["model_name"], record["model_version"], record["threshold"]) == \
            (card.name, card.version, card.threshold)
    letters = {o.source.offset: o for o in outcome.dead_letters}
    assert len(letters) == len(ztf_jpeg_files()) + 1
    for offset, letter in letters.items():
        headers = dict(letter.headers)
        assert letter.value == messages[offset].value and letter.kind in ("decode", "schema", "cutout")
        assert headers[pipeline.HEADER_REASON] and headers[pipeline.HEADER_REASON_KIND] == letter.kind.encode()
        assert headers[pipeline.HEADER_SOURCE_OFFSET] == str(offset).encode()
    assert all(b"JPEG" in dict(letters[i].headers)[pipeline.HEADER_REASON]
               for i in range(len(ztf_fits_files()), len(ztf_fits_files()) + len(ztf_jpeg_files())))
    assert dict(letters[len(paths)].headers)[pipeline.HEADER_REASON_KIND] == b"decode"


def test_inference_error_sends_the_batch_to_the_dead_letter_topic(scorers, tmp_path):
    """A model that fails at run time (a real ONNX graph whose Reshape cannot work) never stops the stream."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from service.score.model import Scorer

    contract = scorers["ztf"].contract
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1_000_003, -1])  # a prime no batch size divides
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["stamps", "shape"], ["flat"]),
         helper.make_node("ReduceMean", ["flat"], ["score"], axes=[1], keepdims=0)], "broken",
        [helper.make_tensor_value_info("stamps", TensorProto.FLOAT, ["N", *contract.input_shape])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["M"])], initializer=[shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    shutil.copy(Path(scorers["ztf"].path).parent / "model_card.json", tmp_path / "model_card.json")
    broken = {"ztf": Scorer(tmp_path, device="cpu"), "rubin": scorers["rubin"]}
    messages = _messages(ztf_fits_files()[:3] + rubin_files()[:2])
    outcome = ScoringPipeline(broken, records.RecordEncoder("scores")).execute(messages)
    assert [o.source.offset for o in outcome.dead_letters] == [0, 1, 2]
    assert all(o.kind == "inference" and "inference failed" in o.reason for o in outcome.dead_letters)
    assert [o.source.offset for o in outcome.scores] == [3, 4]  # the other survey's model still scores


def test_republished_alert_is_the_original_with_its_score(scorers):
    messages = _messages(ztf_fits_files()[:2] + rubin_files()[:1])
    plain = ScoringPipeline(scorers, records.RecordEncoder("scores")).execute(messages)
    outcome = ScoringPipeline(scorers, records.RecordEncoder("scores"), republish_alert=True).execute(messages)
    assert len(outcome.scores) == 3 and not outcome.dead_letters
    for out, score in zip(outcome.scores, plain.scores):
        (original,) = list(fastavro.reader(io.BytesIO(out.source.value)))
        (annotated,) = list(fastavro.reader(io.BytesIO(out.value)))
        annotation = annotated.pop(records.ANNOTATION_FIELD)
        same = lambda record: json.dumps(record, sort_keys=True, default=repr)  # NaN != NaN, but "NaN" == "NaN"
        assert same(annotated) == same(original)
        assert annotation["score"] == score.record["score"] and annotation["label"] == score.record["label"]


def test_survey_hint_for_metrics_of_undecodable_messages():
    assert pipeline.survey_hint(ztf_jpeg_files()[0].read_bytes()) == "ztf"
    assert pipeline.survey_hint(b"\x00\x00\x00\x02\xc0rest") == "rubin"
    assert pipeline.survey_hint(b"junk") == pipeline.UNKNOWN_SURVEY


def test_consumer_lag_metric_from_librdkafka_statistics():
    """The lag gauge follows librdkafka's statistics document (STATISTICS.md: topics.partitions.consumer_lag)."""
    from prometheus_client import REGISTRY

    from service.stream.consumer import AlertConsumer

    topic = "lag-test-topic"
    stats = {"brokers": {"127.0.0.1:9092/1": {"nodeid": 1, "state": "UP"}},
             "topics": {topic: {"partitions": {"0": {"consumer_lag": 42}, "1": {"consumer_lag": -1},
                                               "-1": {"consumer_lag": 7}}}}}
    consumer = AlertConsumer({**settings.resolve(parse(REQUIRED), CONSUME_OPTIONS, {})}, scorers={})
    consumer._on_stats(json.dumps(stats))
    assert REGISTRY.get_sample_value("rbstream_consumer_lag", {"topic": topic, "partition": "0"}) == 42
    assert REGISTRY.get_sample_value("rbstream_consumer_lag", {"topic": topic, "partition": "1"}) is None
    assert REGISTRY.get_sample_value("rbstream_consumer_lag", {"topic": topic, "partition": "-1"}) is None
    assert consumer.broker_up


def test_tail_shows_a_republished_alert_as_its_ids_and_score(scorers):
    from service.tools.tail import message_json

    messages = _messages(ztf_fits_files()[:1] + rubin_files()[:1])
    outcome = ScoringPipeline(scorers, records.RecordEncoder("scores"), republish_alert=True).execute(messages)
    ztf, rubin = (message_json(out.value, {}) for out in outcome.scores)
    (ztf,), (rubin,) = ztf, rubin
    assert set(ztf) == {"objectId", "candid", "rbstream"} and ztf["candid"] == outcome.scores[0].record["candidate_id"]
    assert "diaSourceId" in rubin and rubin["rbstream"]["score"] == outcome.scores[1].record["score"]
    assert json.dumps([ztf, rubin])  # JSON-ready: no cutout bytes, datetimes as text


def test_an_unreachable_registry_stops_the_batch_instead_of_dead_lettering_it(scorers):
    """A registry outage is not the alerts' fault: nothing is published or committed (exit 1, re-read later)."""
    from service.tools.broker import free_port
    from service.stream.consumer import AlertConsumer, PublishError

    url = f"http://127.0.0.1:{free_port()}"
    values = settings.resolve(parse(REQUIRED + ["--schema-registry-url", url]), CONSUME_OPTIONS, {})
    consumer = AlertConsumer(values, scorers)
    with pytest.raises(PublishError, match="unreachable"):
        consumer.score_and_publish(consumer.pipeline.decode(_messages(ztf_fits_files()[:2])))


def test_a_stop_waits_a_bounded_time_for_deliveries_to_an_unreachable_broker(scorers, monkeypatch):
    """SIGTERM with the broker gone: the batch is given up (not committed) after the stop's grace
    period, instead of waiting for librdkafka's message.timeout.ms (5 minutes)."""
    from confluent_kafka import Producer

    from service.stream import consumer as consumer_module
    from service.tools.broker import free_port

    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    values = settings.resolve(parse(["--bootstrap-servers", nobody] + REQUIRED), CONSUME_OPTIONS, {})
    alert_consumer = consumer_module.AlertConsumer(values, scorers)
    alert_consumer._producer = Producer(alert_consumer.producer_config())
    letter = pipeline.dead_letter(SourceMessage(b"junk", "in", 0, 7), "decode", "not an alert")
    monkeypatch.setattr(consumer_module, "STOP_GRACE_S", 1.0)
    alert_consumer.stop()
    with pytest.raises(consumer_module.PublishError, match="1 deliveries not confirmed within 1 s of the stop"):
        alert_consumer.publish([letter])
