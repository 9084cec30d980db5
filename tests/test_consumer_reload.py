"""A new model version while the consumer runs, against a real broker, real ZTF alerts and copies of
the real models: published into the models folder mid-stream, it takes over at a batch boundary
with no message lost or scored twice; a corrupt model, or one of another input, is refused and the
old one keeps scoring. (SIGHUP to a ``rbstream consume`` process: tests/test_consumer_signals.py.)
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from contextlib import contextmanager

import httpx
import pytest

from conftest import MODELS_DIR, ztf_fits_files
from reload_support import counter, models_folder, publish, truncated_onnx
from service.score.card import ModelCard
from service.tools import replay
from service.tools.broker import free_port
from streaming import committed, consumer_settings, create_topic, expected_ids, read_topic, wait_for

pytestmark = pytest.mark.kafka

BATCH_SIZE = 8
OLD_VERSION = ModelCard.read(MODELS_DIR / "ztf" / "model_card.json").version


@contextmanager
def consumer_with_models(broker, models, **settings_values):
    """An `AlertConsumer` of ZTF alerts scoring with the models under ``models``, polled every 0.2 s,
    in a thread, with its probe port; yields ``(consumer, settings, batches, metrics_url)``."""
    from service.stream.consumer import AlertConsumer, load_models, serve_probes

    settings = consumer_settings(broker.bootstrap_servers, batch_size=BATCH_SIZE, survey="ztf",
                                 models_dir=str(models), device="cpu", reload_interval="0.2", **settings_values)
    create_topic(broker.bootstrap_servers, settings["input_topic"], partitions=1)  # offsets = replay order
    batches: list[list] = []
    consumer = AlertConsumer(settings, load_models(settings), on_batch=batches.append)
    port = free_port()
    server = serve_probes(consumer, port, host="127.0.0.1")
    errors = []
    thread = threading.Thread(target=lambda: _run(consumer, errors), daemon=True)
    thread.start()
    try:
        yield consumer, settings, batches, f"http://127.0.0.1:{port}/metrics"
    finally:
        consumer.stop()
        thread.join(timeout=60)
        server.shutdown()
        assert not thread.is_alive(), "the consumer did not stop"
        assert not errors, errors


def _run(consumer, errors):
    try:
        consumer.run()
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)


def send(settings, rounds: int, rate: float | None = None) -> int:
    messages = replay.load_messages(ztf_fits_files())
    result = replay.replay(settings, settings["input_topic"], messages, rate=rate, repeat=rounds, progress=False)
    assert result.sent == len(messages) * rounds and result.failed == 0
    return result.sent


def done(broker, settings) -> int:
    return max(committed(broker.bootstrap_servers, settings["group_id"], settings["input_topic"]).get(0, -1), 0)


def test_a_new_version_mid_stream_takes_over_at_a_batch_boundary_losing_and_repeating_nothing(broker, tmp_path):
    files = ztf_fits_files()
    models = models_folder(tmp_path)
    new_version = "2.1.0-reload-test"
    loaded = counter("rbstream_model_reloads_total", survey="ztf", result="loaded")
    with consumer_with_models(broker, models) as (consumer, settings, batches, metrics_url):
        # 1. The old version scores a first part of the stream.
        total = send(settings, rounds=3)
        before_publish = total
        wait_for(lambda: done(broker, settings) >= total, timeout=90, what="the first part committed")
        # 2. More flows at a steady rate; the new version is published (renamed into place) meanwhile.
        flowing = []
        producer = threading.Thread(target=lambda: flowing.append(send(settings, rounds=6, rate=40.0)), daemon=True)
        producer.start()
        wait_for(lambda: done(broker, settings) > before_publish, timeout=60, what="the stream flowing")
        publish(models, "ztf", version=new_version)
        wait_for(lambda: consumer.scorers["ztf"].card.version == new_version, timeout=60, what="the switch")
        producer.join(timeout=120)
        total += flowing[0]
        # 3. And more after the switch.
        total += send(settings, rounds=2)
        wait_for(lambda: done(broker, settings) >= total, timeout=120, what="the whole stream committed")
        exported = httpx.get(metrics_url, timeout=10).text

    scores = read_topic(broker.bootstrap_servers, settings["output_topic"], count=total, idle=1.0)
    assert all(out.is_score for batch in batches for out in batch), "no dead letter"
    by_offset = Counter(read.source_offset[1] for read in scores)
    assert sorted(by_offset) == list(range(total)), "every alert scored"
    assert set(by_offset.values()) == {1}, f"scored twice: {[o for o, n in by_offset.items() if n > 1][:10]}"
    versions = []
    for read in sorted(scores, key=lambda r: r.source_offset[1]):
        (record,) = read.items
        offset = read.source_offset[1]
        assert record["candidate_id"] == expected_ids(files[offset % len(files)])[1]
        versions.append(record["model_version"])
    switch = versions.index(new_version)
    print(f"published after offset {before_publish}, switch at offset {switch} of {total}")
    assert versions == [OLD_VERSION] * switch + [new_version] * (total - switch), "one switch, old to new"
    assert before_publish <= switch <= total - 2 * len(files), "after the publication, before the last part"
    # Each batch is scored by one version, and the switch is where a batch begins.
    batch_versions = [{out.record["model_version"] for out in batch if out.is_score} for batch in batches if batch]
    assert all(len(v) == 1 for v in batch_versions), batch_versions
    assert switch in {min(out.source.offset for out in batch) for batch in batches if batch}
    assert re.search(r'rbstream_model_reloads_total\{result="loaded",survey="ztf"\} ' + f"{loaded + 1}", exported)
    assert re.search(rf'rbstream_model_info\{{[^}}]*version="{re.escape(new_version)}"[^}}]*\}} 1\.0', exported)
    assert not re.search(rf'rbstream_model_info\{{[^}}]*survey="ztf"[^}}]*version="{re.escape(OLD_VERSION)}"',
                         exported), "the old version's series is gone"


def test_a_corrupt_model_and_one_of_another_input_are_refused_while_the_old_one_keeps_scoring(
        broker, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="service.score.reload")
    models = models_folder(tmp_path)
    refused = counter("rbstream_model_reloads_total", survey="ztf", result="refused")
    loaded = counter("rbstream_model_reloads_total", survey="ztf", result="loaded")
    with consumer_with_models(broker, models) as (consumer, settings, batches, metrics_url):
        total = send(settings, rounds=1)
        wait_for(lambda: done(broker, settings) >= total, timeout=90, what="the first alerts committed")
        publish(models, "ztf", version="2.2.0-corrupt", onnx=truncated_onnx())
        wait_for(lambda: counter("rbstream_model_reloads_total", survey="ztf", result="refused") == refused + 1,
                 timeout=60, what="the corrupt model refused")
        total += send(settings, rounds=1)
        wait_for(lambda: done(broker, settings) >= total, timeout=90, what="alerts after the corrupt model")
        publish(models, "ztf", source=MODELS_DIR / "ztf-nodiff", version="2.3.0-nodiff")
        wait_for(lambda: counter("rbstream_model_reloads_total", survey="ztf", result="refused") == refused + 2,
                 timeout=60, what="the model of another input refused")
        total += send(settings, rounds=1)
        wait_for(lambda: done(broker, settings) >= total, timeout=90, what="alerts after the other model")
        exported = httpx.get(metrics_url, timeout=10).text
        assert consumer.scorers["ztf"].card.version == OLD_VERSION
    scores = read_topic(broker.bootstrap_servers, settings["output_topic"], count=total, idle=1.0)
    assert sorted(r.source_offset[1] for r in scores) == list(range(total))
    assert {r.items[0]["model_version"] for r in scores} == {OLD_VERSION}, "the old model kept scoring"
    # Refused once each: the same broken files are not tried again at every poll (every 0.2 s here).
    assert counter("rbstream_model_reloads_total", survey="ztf", result="refused") == refused + 2
    assert counter("rbstream_model_reloads_total", survey="ztf", result="loaded") == loaded
    assert re.search(r'rbstream_model_reloads_total\{result="refused",survey="ztf"\} ' + f"{refused + 2}", exported)
    messages = [r.getMessage() for r in caplog.records]
    old = f"rbstream-ztf {OLD_VERSION} keeps serving"
    assert any("refused" in m and old in m and "ONNX Runtime cannot load" in m for m in messages), messages
    other_channels = ModelCard.read(MODELS_DIR / "ztf-nodiff" / "model_card.json").contract.channels
    other_input = f"its input (channels {list(other_channels)}"
    assert any("refused" in m and old in m and other_input in m and "needs a restart" in m for m in messages), messages
