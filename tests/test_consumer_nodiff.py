"""The consumer on a real broker with a fallback model without the difference image.

The same four messages are consumed twice: a real ZTF alert as it is, and the same alert
with its difference cutout null, empty and all masked. With ``nodiff_model_ztf`` set, all
four are scored (the last three by the fallback, as their records say); without it, the
three are dead-lettered with the reason they always had.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from conftest import ztf_fits_files  # noqa: E402
from nodiff_support import WAYS, nodiff_model, ztf_without_difference  # noqa: E402
from service.stream import pipeline
from service.publish import records
from service.tools import replay  # noqa: E402
from streaming import (committed, consumer_settings, create_topic, default_models, read_topic,  # noqa: E402,F401
                       running_consumer, scorers, wait_for)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def nodiff_path(tmp_path_factory):
    return nodiff_model(tmp_path_factory.mktemp("nodiff") / "ztf-nodiff")


def _consume(broker, scorers, **settings) -> dict:
    settings = consumer_settings(broker.bootstrap_servers, batch_size=4, **settings)
    # Provisioned beforehand, as a deployment does: an empty dead-letter topic then reads as empty at once.
    for topic in ("input_topic", "output_topic", "dlq_topic"):
        create_topic(broker.bootstrap_servers, settings[topic], partitions=1)
    values = [ztf_fits_files()[0].read_bytes()] + [ztf_without_difference(how) for how in WAYS]
    messages = [replay.AlertMessage(value, f"alert-{i}", "ztf") for i, value in enumerate(values)]
    sent = replay.replay(settings, settings["input_topic"], messages, progress=False)
    assert sent.sent == len(messages) and sent.failed == 0
    with running_consumer(settings, scorers) as consumer:
        wait_for(lambda: committed(broker.bootstrap_servers, settings["group_id"], settings["input_topic"]).get(0, -1)
                 >= len(messages), timeout=90, what="every offset committed")
    return dict(consumer=consumer,
                scores={r.source_offset[1]: records.decode_records(r.value)[0]
                        for r in read_topic(broker.bootstrap_servers, settings["output_topic"])},
                letters={r.source_offset[1]: r for r in read_topic(broker.bootstrap_servers, settings["dlq_topic"])})


def test_with_the_fallback_every_alert_is_scored_and_says_by_which_inputs(broker, scorers, nodiff_path):
    run = _consume(broker, scorers, nodiff_model_ztf=str(nodiff_path))
    assert not run["letters"]
    assert sorted(run["scores"]) == [0, 1, 2, 3]
    whole = run["scores"][0]
    assert whole["model_name"] == scorers["ztf"].card.name
    assert whole["model_inputs"] == ["template", "science", "difference"]
    fallback_scores = {run["scores"][offset]["score"] for offset in (1, 2, 3)}
    for offset in (1, 2, 3):
        record = run["scores"][offset]
        assert record["candidate_id"] == whole["candidate_id"]
        assert record["model_name"] == "nodiff-test" and record["model_inputs"] == ["template", "science"]
    assert len(fallback_scores) == 1, "the same template and science: the same score, whatever the difference"


def test_without_the_fallback_alerts_without_a_difference_are_dead_lettered(broker, scorers):
    run = _consume(broker, scorers)
    assert sorted(run["scores"]) == [0] and sorted(run["letters"]) == [1, 2, 3]
    reasons = {offset: letter.headers[pipeline.HEADER_REASON] for offset, letter in run["letters"].items()}
    assert reasons[1].startswith("cutoutDifference is missing (null)")
    assert reasons[2].startswith("cutoutDifference.stampData is empty")
    assert "'difference' has no finite pixel" in reasons[3]
    assert all(letter.headers[pipeline.HEADER_REASON_KIND] == "cutout" for letter in run["letters"].values())
