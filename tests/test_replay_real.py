"""Every real alert of ``../shared/real``, replayed onto a real broker in both framings, is scored.

``rbstream replay`` sends the 2,058 files once as the brokers stored them (Avro object
containers) and once with ``--wire-format`` (Rubin alerts re-framed in the Confluent wire
format, ZTF alerts as they are). The consumer (in this process, the default models) scores
both topics; nothing may reach the dead-letter topic, each message gets exactly one score
record with its ids and the survey's own score, and ``rbstream tail`` prints that score.
"""

from __future__ import annotations

import json
import math

import pytest

from service import cli

from service.stream import pipeline

from service.tools import replay
from streaming import (committed, consumer_settings, create_topic, default_models, read_topic,  # noqa: F401
                       running_consumer, scorers, wait_for)
from real_support import REAL_DATA, labels, real_data, real_files, survey_score_of  # noqa: F401  (real_data: fixture)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

FRAMINGS = {"container": [], "wire": ["--wire-format"]}


@pytest.fixture(scope="module")
def streams(broker, scorers, real_data):
    """Per framing: the replayed input, the score and dead-letter topics read back."""
    files = real_files()
    out = {}
    for framing, flags in FRAMINGS.items():
        settings = consumer_settings(broker.bootstrap_servers, batch_size=64)
        # One input partition: offset i is the i-th message replay sends. The dead-letter topic
        # exists from the start, so that reading it back empty needs no wait for it to appear.
        for topic in ("input_topic", "output_topic", "dlq_topic"):
            create_topic(broker.bootstrap_servers, settings[topic], partitions=1)
        assert cli.main(["replay", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                         settings["input_topic"], "--quiet", *flags, str(real_data)]) == 0
        with running_consumer(settings, scorers):
            wait_for(lambda: committed(broker.bootstrap_servers, settings["group_id"],
                                       settings["input_topic"]).get(0, -1) >= len(files),
                     timeout=240, what=f"every {framing} message committed")
        out[framing] = dict(
            settings=settings,
            sent=replay.load_messages([real_data], wire_format=bool(flags)),
            scores=read_topic(broker.bootstrap_servers, settings["output_topic"], count=len(files)),
            letters=read_topic(broker.bootstrap_servers, settings["dlq_topic"], idle=2.0))
    return out


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
def test_every_real_alert_replayed_is_scored_and_none_is_dead_lettered(streams, framing):
    stream, files, rows = streams[framing], real_files(), labels()
    reasons = [f"{r.headers.get(pipeline.HEADER_SOURCE_FILE)}: [{r.headers.get(pipeline.HEADER_REASON_KIND)}] "
               f"{r.headers.get(pipeline.HEADER_REASON)}" for r in stream["letters"]]
    assert not reasons, f"{len(reasons)} real alerts dead-lettered:\n" + "\n".join(reasons)
    file_at = dict(enumerate(message.source for message in stream["sent"]))
    assert list(file_at.values()) == list(map(str, files))
    if framing == "wire":
        rubin = [message for message in stream["sent"] if message.survey == "rubin"]
        assert len(rubin) == sum(row["survey"] == "rubin" for row in rows.values())
        assert all(message.value[0] == 0 for message in rubin), "Rubin in the wire format"
    by_offset: dict[int, list] = {}
    for read in stream["scores"]:
        by_offset.setdefault(read.source_offset[1], []).extend(read.items)
    assert sorted(by_offset) == sorted(file_at), "one score message per input message"
    for offset, items in by_offset.items():
        (record,) = items
        row = rows[str(file_at[offset])[len(str(REAL_DATA)) + 1:]]
        assert (record["survey"], record["candidate_id"]) == (row["survey"], int(row["id"]))
        assert 0.0 <= record["score"] <= 1.0
        name, value = survey_score_of(row)
        assert record["survey_score_name"] == name, file_at[offset]
        assert math.isclose(record["survey_score"], value, rel_tol=1e-6), file_at[offset]


def test_tail_prints_the_survey_score_beside_ours(broker, streams, capsys):
    topic = streams["wire"]["settings"]["output_topic"]
    assert cli.main(["tail", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
                     "--from-beginning", "--max-messages", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5
    for line in lines:
        assert 0.0 <= line["score"] <= 1.0
        assert line["survey_score_name"] in ("drb", "rb", "reliability")
        assert 0.0 <= line["survey_score"] <= 1.0
