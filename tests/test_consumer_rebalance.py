"""A second consumer joins the group mid-stream: partitions move, nothing is lost.

The first consumer's ``on_revoke`` waits for the batch being scored and published and
commits it, so handing a partition over re-reads at most one batch (on a broker that
accepts the commit during the rebalance, none).
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from conftest import rubin_files, ztf_files
from service.tools import replay
from streaming import (committed, consumer_settings, create_topic, default_models, read_topic,  # noqa: F401
                       running_consumer, scorers, wait_for)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BATCH_SIZE = 8
REPEAT = 20   # 640 messages at 32/s: 20 s of stream, ample time for two group joins and a rebalance


def test_partitions_move_to_a_new_consumer_without_loss(broker, scorers):
    settings = consumer_settings(broker.bootstrap_servers, batch_size=BATCH_SIZE)
    create_topic(broker.bootstrap_servers, settings["input_topic"], partitions=2)
    messages = replay.load_messages(ztf_files() + rubin_files())
    total = len(messages) * REPEAT
    producer = threading.Thread(target=replay.replay, args=(settings, settings["input_topic"], messages),
                                kwargs={"rate": 32.0, "repeat": REPEAT, "progress": False}, daemon=True)
    producer.start()

    def done() -> int:
        offsets = committed(broker.bootstrap_servers, settings["group_id"], settings["input_topic"])
        return sum(max(o, 0) for o in offsets.values())

    with running_consumer(settings, scorers) as first:
        wait_for(lambda: done() > 0 and len(first.assigned) == 2, timeout=60, what="the first consumer's commits")
        with running_consumer(settings, scorers) as second:
            wait_for(lambda: second.assigned and len(first.assigned) == 1, timeout=60, what="a rebalance")
            producer.join(timeout=60)
            wait_for(lambda: done() >= total, timeout=90, what="the whole stream committed")
            assert first.batches_committed > 0 and second.batches_committed > 0

    outputs = read_topic(broker.bootstrap_servers, settings["output_topic"], idle=1.0) + \
        read_topic(broker.bootstrap_servers, settings["dlq_topic"], idle=1.0)
    counts = Counter(read.source_offset for read in outputs)
    ends = Counter()
    for partition, offset in counts:
        ends[partition] = max(ends[partition], offset + 1)
    assert sum(ends.values()) == total
    missing = [(p, o) for p in ends for o in range(ends[p]) if (p, o) not in counts]
    assert not missing, f"lost across the rebalance: {missing[:10]}"
    duplicates = sum(counts.values()) - len(counts)
    print(f"{duplicates} duplicates; batches committed: {first.batches_committed} + {second.batches_committed}")
    assert duplicates <= BATCH_SIZE, f"{duplicates} duplicates"
