"""The last alerts of a Kafka topic, for the scanning page's queue of what the stream scored."""

from __future__ import annotations

import time
import uuid

#: Seconds to wait for the broker (metadata, then the messages).
TIMEOUT_S = 10.0
#: Seconds without a new message after which the end of the topic is taken as reached.
IDLE_S = 1.0


def last_messages(bootstrap_servers: str, topic: str, count: int, timeout: float = TIMEOUT_S) -> list[bytes]:
    """The values of the last ``count`` messages of ``topic`` (of all partitions together), oldest first.

    Reads without a consumer group's commits (a throwaway group id, no commits), so the
    consumer's own offsets are never touched.

    Raises
    ------
    OSError
        When the broker does not answer or the topic does not exist.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": f"rbstream-scan-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "socket.timeout.ms": int(timeout * 1000)})
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=timeout)
        except KafkaException as exc:
            raise OSError(f"broker {bootstrap_servers}: {exc}") from None
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            raise OSError(f"no topic {topic!r} at {bootstrap_servers}")
        assignments = []
        for partition in sorted(described.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
            if high > low:
                assignments.append(TopicPartition(topic, partition, max(low, high - count)))
        if not assignments:
            return []
        consumer.assign(assignments)
        # Read to the end rather than to the high watermark: some brokers (tansu) answer a stale one
        # right after a write, and messages may arrive while we read. Keep the newest `count`.
        found: list[tuple[int, int, int, bytes]] = []
        deadline, last_seen = time.monotonic() + timeout, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_seen < IDLE_S:
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            last_seen = time.monotonic()
            found.append((message.timestamp()[1], message.partition(), message.offset(), message.value()))
        found.sort(key=lambda item: item[:3])
        return [value for *_, value in found[-count:]]
    finally:
        consumer.close()
