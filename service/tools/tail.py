"""``rbstream tail``: print the messages of a score (or dead-letter) topic as JSON lines.

* a score record prints as its fields (``scored_at`` in ISO 8601);
* an alert re-published with its score (``--republish-alert``) prints as its ids and the
  ``rbstream`` score field (never its cutouts);
* a dead letter (a message with a ``rbstream.reason`` header) prints as its reason, reason
  kind, source topic/partition/offset (and file, for replayed alerts) and size.

The topic is read without a consumer group (nothing is committed; ``tail`` never disturbs
the service), from the end by default like ``tail -f``, or from the beginning.

SIGTERM, SIGINT or SIGHUP stops it within about a second (the current poll, then the
reader's close), exit code 0.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import time
from datetime import datetime
from typing import Any, Callable, Mapping

from service.stream import pipeline

from service.publish import records
from service.registry import SchemaRegistry
from service.lifecycle import on_stop_signals, restore_signals
from service.settings import (COMMON_OPTIONS, Option, SettingsError, add_options, kafka_client_config,
                              non_negative_int, resolve)

log = logging.getLogger(__name__)

TAIL_OPTIONS: tuple[Option, ...] = COMMON_OPTIONS + (
    Option("topic", None, "topic to print (scores, or the dead-letter topic)", required=True, metavar="TOPIC"),
    Option("from_beginning", False, "start at the first message (else only new ones)", kind="flag"),
    Option("max_messages", None, "stop after this many messages", type=non_negative_int, metavar="N"),
    Option("idle_timeout", None, "stop after this many seconds without a message", type=float, metavar="S"),
    Option("schema_registry_url", None, "registry to read Confluent wire-format records", metavar="URL"),
    Option("metadata", False, "add a 'kafka' field: topic, partition, offset, key, timestamp", kind="flag"),
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def dead_letter_json(value: bytes, headers: Mapping[str, str]) -> dict:
    """A dead letter as a dict: reason, kind, source, size (and a short look at the bytes)."""
    return {
        "dead_letter": True,
        "reason_kind": headers.get(pipeline.HEADER_REASON_KIND),
        "reason": headers.get(pipeline.HEADER_REASON),
        "survey": headers.get(pipeline.HEADER_SURVEY),
        "source": {"topic": headers.get(pipeline.HEADER_SOURCE_TOPIC),
                   "partition": _int(headers.get(pipeline.HEADER_SOURCE_PARTITION)),
                   "offset": _int(headers.get(pipeline.HEADER_SOURCE_OFFSET)),
                   "file": headers.get(pipeline.HEADER_SOURCE_FILE)},
        "bytes": len(value),
        "head": base64.b64encode(value[:16]).decode(),
    }


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def record_json(record: Mapping) -> dict:
    """A score record as-is; an annotated alert as its ids and its ``rbstream`` field."""
    if records.ANNOTATION_FIELD in record:
        ids = {}
        for name in ("objectId", "candid"):
            if name in record:
                ids[name] = record[name]
        for name in ("diaObject", "diaSource"):
            part = record.get(name) or {}
            key = name + "Id"
            if key in part:
                ids[key] = part[key]
        return _jsonable({**ids, records.ANNOTATION_FIELD: record[records.ANNOTATION_FIELD]})
    return _jsonable(dict(record))


def message_json(value: bytes, headers: Mapping[str, str],
                 registry: SchemaRegistry | None = None) -> list[dict]:
    """What `tail` prints for one message: one dict per record (or one for a dead letter)."""
    if pipeline.HEADER_REASON in headers:
        return [dead_letter_json(value, headers)]
    try:
        return [record_json(r) for r in records.decode_records(value, registry)]
    except records.RecordError as exc:
        return [{"undecodable": str(exc), "bytes": len(value)}]


def _partitions(consumer, topic: str, deadline: float, stop: Callable[[], bool] = lambda: False):
    """Partitions of ``topic``, waiting for it to exist until ``deadline`` (monotonic); [] once ``stop()``."""
    from confluent_kafka import KafkaException

    problem, waiting = "does not exist", False
    while not stop():
        try:  # short requests, so that a stop signal is seen within a second or so
            info, problem = consumer.list_topics(topic, timeout=1).topics.get(topic), "does not exist"
        except KafkaException as exc:
            info, problem = None, f"is not known: the broker did not answer ({exc})"
        if info is not None and info.error is None and info.partitions:
            return sorted(info.partitions)
        if not waiting:
            log.info("topic %s %s yet; waiting for it (%.0f s at most)", topic, problem,
                     max(0.0, deadline - time.monotonic()))
            waiting = True
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic} {problem}")
        time.sleep(0.5)
    return []


def follow(settings: Mapping, topic: str, handle: Callable[[Any, list[dict]], None], *,
           from_beginning: bool = False, max_messages: int | None = None, idle_timeout: float | None = None,
           stop: Callable[[], bool] = lambda: False, registry: SchemaRegistry | None = None,
           wait_for_topic: float = 60.0) -> int:
    """Read ``topic`` (no consumer group) and call ``handle(message, dicts)`` for each message.

    Returns the number of messages read.
    """
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

    # librdkafka wants a group.id even for assign(); nothing is ever committed under it.
    consumer = Consumer(kafka_client_config(settings, "consumer", **{
        "group.id": "rbstream-tail", "enable.auto.commit": False, "enable.auto.offset.store": False}))
    try:
        partitions = _partitions(consumer, topic, time.monotonic() + wait_for_topic, stop)
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in partitions])
        count = 0
        last = time.monotonic()
        while not stop() and (max_messages is None or count < max_messages):
            message = consumer.poll(0.2)
            if message is None:
                if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                    break
                continue
            if message.error():
                log.warning("%s", message.error())
                continue
            last = time.monotonic()
            headers = pipeline.headers_to_text(message.headers())
            handle(message, message_json(message.value() or b"", headers, registry))
            count += 1
        return count
    finally:
        consumer.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TAIL_OPTIONS)


def main(args: argparse.Namespace) -> int:
    try:
        settings = resolve(args, TAIL_OPTIONS)
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    stopping = []
    previous = on_stop_signals(lambda signum: stopping.append(signum))
    registry = SchemaRegistry(settings["schema_registry_url"]) if settings["schema_registry_url"] else None

    def show(message, dicts):
        for d in dicts:
            if settings["metadata"]:
                kind, ts = message.timestamp()
                d = {**d, "kafka": {"topic": message.topic(), "partition": message.partition(),
                                    "offset": message.offset(),
                                    "key": (message.key() or b"").decode("utf-8", "replace"),
                                    "timestamp_ms": ts if kind else None}}
            print(json.dumps(d), flush=True)

    try:
        follow(settings, settings["topic"], show, from_beginning=settings["from_beginning"],
               max_messages=settings["max_messages"], idle_timeout=settings["idle_timeout"],
               stop=lambda: bool(stopping), registry=registry)
    except TimeoutError as exc:
        log.error("%s", exc)
        return 1
    except BrokenPipeError:  # `rbstream tail ... | head`
        return 0
    finally:
        restore_signals(previous)
    return 0
