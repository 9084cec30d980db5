"""At-least-once across crashes and clean stops: ``rbstream consume`` as a real process.

One stream flows at a steady rate while three consumer processes of one group take turns:

1. the first is killed with SIGKILL as soon as it has committed a batch (mid-stream);
2. the second takes over, and gets SIGTERM once it has committed two batches of its own:
   it must exit 0 with everything it published committed (no work left behind);
3. the third finishes the stream and gets SIGTERM at the end.

Then every input message has a score record or a dead letter, and the duplicates (the
batch the killed consumer had published but not committed) are at most one batch. The same
holds with a shadow model beside the primary (``--shadow-model``): it is off the commit path,
and its own topic is best effort.

SIGHUP does not stop a consumer: it loads the new model version in its models folder and goes
on consuming (the switch at a batch boundary: tests/test_consumer_reload.py); SIGTERM then stops
it cleanly, with no child process left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest

from conftest import REPO, rubin_files, ztf_files, ztf_fits_files
from service.tools import replay
from service.tools.broker import free_port
from streaming import committed, create_topic, default_models, read_topic, unique, wait_for  # noqa: F401

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BATCH_SIZE = 16
REPEAT = 30          # 32 samples x 30 = 960 messages...
RATE = 50.0          # ...over about 19 s, so that every signal lands mid-stream


def start_consumer(bootstrap_servers: str, topics: dict, log_path: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "service.cli", "--log-level", "INFO", "consume",
               "--bootstrap-servers", bootstrap_servers, "--input-topic", topics["input"],
               "--output-topic", topics["output"], "--dlq-topic", topics["dlq"], "--group-id", topics["group"],
               "--from-beginning", "--batch-size", str(BATCH_SIZE), "--max-wait-ms", "50", "--device", "cpu",
               "--kafka-option", "consumer.session.timeout.ms=6000", *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("shadow", [False, True], ids=["primary-only", "with-shadow"])
def test_sigkill_loses_nothing_and_sigterm_stops_cleanly(broker, default_models, tmp_path, shadow):
    bootstrap = broker.bootstrap_servers
    topics = {"input": unique("alerts"), "output": unique("scores"), "dlq": unique("dlq"), "group": unique("group")}
    # The shipped ZTF model as its own shadow: the test is about the primary's guarantee.
    shadow_args = ("--shadow-model", str(default_models / "ztf"), "--shadow-topic", unique("shadow")) if shadow else ()
    create_topic(bootstrap, topics["input"], partitions=1)
    messages = replay.load_messages(ztf_files() + rubin_files())
    total = len(messages) * REPEAT
    settings = {"bootstrap_servers": bootstrap, "kafka": {}}
    replayed = []
    producer = threading.Thread(target=lambda: replayed.append(
        replay.replay(settings, topics["input"], messages, rate=RATE, repeat=REPEAT, progress=False)), daemon=True)
    producer.start()

    def done() -> int:
        return max(committed(bootstrap, topics["group"], topics["input"]).get(0, -1), 0)

    log = tmp_path / "consumers.log"
    processes = []
    try:
        # 1. SIGKILL as soon as a batch is committed.
        first = start_consumer(bootstrap, topics, log, *shadow_args)
        processes.append(first)
        wait_for(lambda: done() > 0, timeout=90, what="the first consumer's first commit")
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
        after_kill = done()
        assert after_kill < total, "the stream should still be flowing when the consumer is killed"

        # 2. A second consumer takes over; SIGTERM once it has committed two batches of its own.
        second = start_consumer(bootstrap, topics, log, *shadow_args)
        processes.append(second)
        wait_for(lambda: done() >= after_kill + 2 * BATCH_SIZE, timeout=90, what="the second consumer's commits")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0, log.read_text()[-3000:]
        after_term = done()
        assert after_term < total, "SIGTERM should arrive mid-stream"
        published = read_topic(bootstrap, topics["output"], idle=1.0) + read_topic(bootstrap, topics["dlq"], idle=1.0)
        beyond = [r.source_offset[1] for r in published if r.source_offset[1] >= after_term]
        assert not beyond, f"published but not committed after SIGTERM: offsets {beyond[:10]}"

        # 3. A third consumer finishes the stream.
        metrics_port = free_port()
        third = start_consumer(bootstrap, topics, log, "--metrics-port", str(metrics_port), *shadow_args)
        processes.append(third)
        producer.join(timeout=120)
        assert replayed and replayed[0].sent == total
        wait_for(lambda: done() >= total, timeout=120, what="the whole stream committed")
        exported = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert re.search(r'rbstream_alerts_scored_total\{survey="ztf"\} [1-9]', exported)
        assert re.search(r'rbstream_alerts_failed_total\{reason="cutout",survey="ztf"\} [1-9]', exported)
        assert "rbstream_model_info{" in exported
        if shadow:
            assert re.search(r'rbstream_shadow_alerts_scored_total\{survey="ztf"\} [1-9]', exported)
        for probe in ("healthz", "readyz"):  # the chart's liveness and readiness probes
            answer = httpx.get(f"http://127.0.0.1:{metrics_port}/{probe}", timeout=10)
            assert answer.status_code == 200 and answer.json()["ok"] is True, answer.text
        third.send_signal(signal.SIGTERM)
        assert third.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    scores = read_topic(bootstrap, topics["output"], idle=1.0)
    letters = read_topic(bootstrap, topics["dlq"], idle=1.0)
    outputs = Counter(r.source_offset[1] for r in scores + letters)
    missing = sorted(set(range(total)) - set(outputs))
    assert not missing, f"{len(missing)} input messages lost, e.g. offsets {missing[:10]}"
    duplicates = sum(outputs.values()) - len(outputs)
    print(f"killed at {after_kill}, terminated at {after_term} of {total}; {duplicates} duplicates")
    assert duplicates <= BATCH_SIZE, f"{duplicates} duplicates: more than one batch ({BATCH_SIZE})"
    # Every message is either scored or dead-lettered, never both.
    assert not {r.source_offset[1] for r in scores} & {r.source_offset[1] for r in letters}
    assert log.read_text().count("stopping: batch finished, offsets committed") == 2
    if shadow:
        assert log.read_text().count("shadow models (best effort, off the commit path") == 3
        shadowed = read_topic(bootstrap, shadow_args[3], idle=1.0)
        assert shadowed and {r.source_offset[1] for r in shadowed} <= {r.source_offset[1] for r in scores}


def test_sighup_reloads_the_models_without_stopping_and_sigterm_then_stops_with_no_child_left(
        broker, tmp_path):
    """SIGHUP: the new version in the models folder is loaded (polling is off here, so only the
    signal can have done it), the consumer keeps consuming; SIGTERM stops it cleanly."""
    from processes import children
    from reload_support import models_folder, publish
    from service.score.card import ModelCard

    old = ModelCard.read(REPO / "models" / "ztf" / "model_card.json").version
    models = models_folder(tmp_path)
    topics = {"input": unique("alerts"), "output": unique("scores"), "dlq": unique("dlq"), "group": unique("group")}
    create_topic(broker.bootstrap_servers, topics["input"], partitions=1)
    log = tmp_path / "consumer.log"
    consumer = start_consumer(broker.bootstrap_servers, topics, log, "--survey", "ztf", "--models-dir", str(models),
                              "--reload-interval", "0")
    messages = replay.load_messages(ztf_fits_files())
    settings = {"bootstrap_servers": broker.bootstrap_servers, "kafka": {}}

    def done() -> int:
        return max(committed(broker.bootstrap_servers, topics["group"], topics["input"]).get(0, -1), 0)

    try:
        wait_for(lambda: f"assigned {topics['input']}/0" in log.read_text(), timeout=90, what="the assignment")
        replay.replay(settings, topics["input"], messages, progress=False)
        wait_for(lambda: done() >= len(messages), timeout=90, what="the first alerts committed")
        publish(models, "ztf", version="2.1.0-sighup")
        consumer.send_signal(signal.SIGHUP)
        wait_for(lambda: "ztf: now scoring with rbstream-ztf 2.1.0-sighup" in log.read_text(), timeout=60,
                 what="the switch after SIGHUP")
        assert consumer.poll() is None, "SIGHUP must not stop the consumer"
        replay.replay(settings, topics["input"], messages, progress=False)
        wait_for(lambda: done() >= 2 * len(messages), timeout=90, what="the alerts after the reload committed")
        assert children(consumer.pid) == []
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    text = log.read_text()
    assert "SIGHUP received: checking the model files for a new version" in text
    assert text.count("finishing the batch in hand") == 1 and "SIGTERM received: finishing the batch in hand" in text
    assert "stopping: batch finished, offsets committed" in text
    scores = sorted(read_topic(broker.bootstrap_servers, topics["output"], count=2 * len(messages), idle=1.0),
                    key=lambda read: read.source_offset[1])
    assert [r.items[0]["model_version"] for r in scores] == [old] * len(messages) + ["2.1.0-sighup"] * len(messages)
