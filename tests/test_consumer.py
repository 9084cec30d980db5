"""The consumer against a real local broker, the real sample alerts and the real default models.

One stream serves the module: every sample alert as its survey frames it in an object
container, the Rubin alerts once more in the Confluent wire format, and two messages that
are not alerts at all. The consumer (in this process, batches of 8) scores it; the tests
then read the score and dead-letter topics and the group's committed offsets.
"""

from __future__ import annotations

import pytest

from conftest import rubin_files, ztf_fits_files, ztf_jpeg_files
from service.stream import pipeline
from service.publish import records
from service.score.card import label_for
from service.tools import replay
from streaming import (committed, consumer_settings, create_topic, default_models, end_offsets,  # noqa: F401
                       expected_ids, read_topic, running_consumer, scorers, wait_for)

pytestmark = pytest.mark.kafka

BATCH_SIZE = 8
GARBAGE = [b"this is not an alert", b"Obj\x01" + b"\x00" * 40]


@pytest.fixture(scope="module")
def stream(broker, scorers):
    """Replay the samples (+ Rubin in wire format + garbage), consume them all, read everything back."""
    settings = consumer_settings(broker.bootstrap_servers, batch_size=BATCH_SIZE)
    create_topic(broker.bootstrap_servers, settings["input_topic"], partitions=1)  # offsets = replay order
    containers = replay.load_messages(ztf_fits_files() + ztf_jpeg_files() + rubin_files())
    wire = replay.load_messages(rubin_files(), wire_format=True)
    garbage = [replay.AlertMessage(value, f"garbage-{i}", None) for i, value in enumerate(GARBAGE)]
    messages = containers + wire + garbage
    assert all(m.value[0] == 0 for m in wire)
    sent = replay.replay(settings, settings["input_topic"], messages, progress=False)
    assert sent.sent == len(messages) and sent.failed == 0
    with running_consumer(settings, scorers) as consumer:
        wait_for(lambda: committed(broker.bootstrap_servers, settings["group_id"], settings["input_topic"]).get(0, -1)
                 >= len(messages), timeout=90, what="every offset committed")
    scores = read_topic(broker.bootstrap_servers, settings["output_topic"])
    letters = read_topic(broker.bootstrap_servers, settings["dlq_topic"])
    return dict(settings=settings, messages=messages, n_containers=len(containers), n_wire=len(wire),
                scores=scores, letters=letters, consumer=consumer,
                committed=committed(broker.bootstrap_servers, settings["group_id"], settings["input_topic"]),
                end=end_offsets(broker.bootstrap_servers, settings["input_topic"]))


def by_source(reads) -> dict[int, list]:
    grouped: dict[int, list] = {}
    for read in reads:
        grouped.setdefault(read.source_offset[1], []).append(read)
    return grouped


def test_every_decodable_sample_has_exactly_one_score_record_with_its_ids(stream):
    paths = ztf_fits_files() + ztf_jpeg_files() + rubin_files()
    scores = by_source(stream["scores"])
    decodable = [i for i, p in enumerate(paths) if p not in ztf_jpeg_files()]
    assert len(decodable) == 26
    for offset in decodable:
        assert len(scores.get(offset, [])) == 1, f"{paths[offset].name}: {len(scores.get(offset, []))} records"
        (read,) = scores[offset]
        (record,) = read.items
        survey, candidate_id, object_id = expected_ids(paths[offset])
        assert (record["survey"], record["candidate_id"], record["object_id"]) == (survey, candidate_id, object_id)
        assert read.key == object_id.encode()  # keyed by object id: per-object order holds
        card = stream["consumer"].scorers[survey].card
        assert record["model_name"] == card.name and record["model_version"] == card.version
        assert record["label"] == label_for(record["score"], card.threshold)
        assert record["observation_mjd"] is not None and 50000 < record["observation_mjd"] < 70000
    assert len(stream["scores"]) == 26 + stream["n_wire"], "no other score record"


def test_jpeg_samples_and_garbage_go_to_the_dead_letter_topic_with_reason_and_source(stream):
    letters = by_source(stream["letters"])
    jpeg_offsets = range(len(ztf_fits_files()), len(ztf_fits_files()) + len(ztf_jpeg_files()))
    garbage_offsets = range(len(stream["messages"]) - len(GARBAGE), len(stream["messages"]))
    assert sorted(letters) == [*jpeg_offsets, *garbage_offsets]
    for offset, (read,) in letters.items():
        assert read.value == stream["messages"][offset].value, "the original bytes"
        assert read.headers[pipeline.HEADER_SOURCE_TOPIC] == stream["settings"]["input_topic"]
        assert read.headers[pipeline.HEADER_SOURCE_PARTITION] == "0"
        assert read.headers[pipeline.HEADER_SOURCE_FILE] == stream["messages"][offset].source
        assert read.headers[pipeline.HEADER_REASON]
        kind = read.headers[pipeline.HEADER_REASON_KIND]
        if offset in jpeg_offsets:
            assert kind == "cutout" and "JPEG" in read.headers[pipeline.HEADER_REASON]
        elif offset == garbage_offsets[0]:
            assert kind == "decode"
        else:  # a container header without a schema
            assert kind in ("decode", "schema")


def test_offsets_committed_up_to_the_end_of_the_input(stream):
    assert stream["committed"] == stream["end"] == {0: len(stream["messages"])}


def test_rubin_wire_format_is_scored_like_the_container_form(stream):
    scores = by_source(stream["scores"])
    first_rubin = len(ztf_fits_files()) + len(ztf_jpeg_files())
    for i, path in enumerate(rubin_files()):
        (container,) = scores[first_rubin + i][0].items
        (wire,) = scores[stream["n_containers"] + i][0].items
        assert wire["candidate_id"] == container["candidate_id"] == expected_ids(path)[1]
        assert wire["score"] == pytest.approx(container["score"], abs=1e-6)


def test_score_via_kafka_equals_score_via_classify(stream, scorers):
    """POST /classify with the raw alert body gives the score the stream gave (to 1e-6)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    scores = by_source(stream["scores"])
    paths = ztf_fits_files() + ztf_jpeg_files() + rubin_files()
    with TestClient(create_app(scorers)) as client:
        for offset, path in enumerate(paths):
            if path in ztf_jpeg_files():
                continue
            response = client.post("/classify", content=path.read_bytes(),
                                   headers={"Content-Type": "application/avro"})
            assert response.status_code == 200, response.text
            (answer,) = response.json()["results"]
            (record,) = scores[offset][0].items
            assert answer["score"] == pytest.approx(record["score"], abs=1e-6), path.name
            assert answer["label"] == record["label"]


def test_metrics_count_the_stream(stream):
    from prometheus_client import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    # The registry is the process's: other tests may add to it, never subtract.
    assert value("rbstream_alerts_failed_total", survey="ztf", reason="cutout") >= len(ztf_jpeg_files())
    assert value("rbstream_alerts_scored_total", survey="rubin") >= 2 * len(rubin_files())
    assert value("rbstream_alert_latency_seconds_count") >= len(stream["scores"])


def test_with_a_schema_registry_rubin_schemas_come_from_it_and_scores_go_out_in_wire_format(broker, scorers, stream):
    """``--schema-registry-url``: wire-format input resolved there, score records registered and framed there."""
    from service.decode.schemas import official_rubin_schema, rubin_schema_id, rubin_versions
    from streaming import TinySchemaRegistry

    from service.registry import SchemaRegistry

    registry = TinySchemaRegistry({rubin_schema_id(*v): official_rubin_schema(v) for v in rubin_versions()})
    try:
        settings = consumer_settings(broker.bootstrap_servers, batch_size=BATCH_SIZE,
                                     schema_registry_url=registry.url)
        messages = replay.load_messages(rubin_files(), wire_format=True) + replay.load_messages(ztf_fits_files()[:2])
        create_topic(broker.bootstrap_servers, settings["input_topic"], partitions=1)
        assert replay.replay(settings, settings["input_topic"], messages, progress=False).sent == len(messages)
        with running_consumer(settings, scorers):
            wait_for(lambda: committed(broker.bootstrap_servers, settings["group_id"],
                                       settings["input_topic"]).get(0, -1) >= len(messages), timeout=90,
                     what="every offset committed")
        scores = read_topic(broker.bootstrap_servers, settings["output_topic"], count=len(messages))
        assert len(scores) == len(messages)
        (subject_ids,) = registry.subjects.values()
        assert list(registry.subjects) == [f"{settings['output_topic']}-value"]
        client = SchemaRegistry(registry.url)
        via_kafka = by_source(stream["scores"])
        first_rubin = len(ztf_fits_files()) + len(ztf_jpeg_files())
        for read in scores:
            assert read.value[0] == 0 and int.from_bytes(read.value[1:5], "big") == subject_ids[0]
            (record,) = records.decode_records(read.value, client)
            offset = read.source_offset[1]
            reference = first_rubin + offset if offset < len(rubin_files()) else offset - len(rubin_files())
            (expected,) = via_kafka[reference][0].items
            assert record["candidate_id"] == expected["candidate_id"]
            assert record["score"] == pytest.approx(expected["score"], abs=1e-6)
    finally:
        registry.close()


def test_the_next_batch_is_decoded_while_this_one_is_scored(broker, scorers):
    """Stage overlap: scoring of batch 1 holds until batch 2 was decoded; nothing is lost, all committed."""
    import threading

    settings = consumer_settings(broker.bootstrap_servers, batch_size=4)
    create_topic(broker.bootstrap_servers, settings["input_topic"], partitions=1)
    messages = replay.load_messages(ztf_fits_files()[:12])
    assert replay.replay(settings, settings["input_topic"], messages, progress=False).sent == 12
    second_decoded = threading.Event()
    events: list[str] = []

    def run_with_probes(consumer):
        decode, score = consumer.pipeline.decode, consumer.pipeline.score

        def probed_decode(sources):
            events.append(f"decode {len(sources)}")
            decoded = decode(sources)
            if sum(e.startswith("decode") for e in events) >= 2:
                second_decoded.set()
            return decoded

        def probed_score(decoded, now=None):
            if not events.count("score"):
                events.append("overlapped" if second_decoded.wait(30) else "not overlapped")
            events.append("score")
            return score(decoded, now)

        consumer.pipeline.decode, consumer.pipeline.score = probed_decode, probed_score

    with running_consumer(settings, scorers) as consumer:
        run_with_probes(consumer)
        wait_for(lambda: committed(broker.bootstrap_servers, settings["group_id"], settings["input_topic"]).get(0, -1)
                 >= 12, timeout=90, what="every offset committed")
    assert "overlapped" in events, events
    assert len(read_topic(broker.bootstrap_servers, settings["output_topic"], count=12)) == 12
