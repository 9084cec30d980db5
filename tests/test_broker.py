"""The local tansu broker really speaks Kafka to confluent-kafka."""

import uuid

import pytest
from confluent_kafka import Consumer, Producer

pytestmark = pytest.mark.kafka


def test_produce_and_consume_with_headers_through_a_consumer_group(broker):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    producer.produce(topic, b"value", key=b"key", headers=[("h", b"1")])
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": topic,
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    consumer.subscribe([topic])
    try:
        message = None
        for _ in range(30):
            message = consumer.poll(1.0)
            if message is not None and not message.error():
                break
        assert message is not None and message.value() == b"value" and message.key() == b"key"
        assert dict(message.headers()) == {"h": b"1"}
    finally:
        consumer.close()
