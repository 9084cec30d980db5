"""Avro encoding of what the consumer publishes: score records, or alerts annotated with their score.

Two framings, as the surveys use them:

* **object container** (default): each Kafka message is a complete Avro object container
  file holding one record and its writer schema, like ZTF's alerts — self-describing,
  readable with any Avro library (``fastavro.reader``) and no registry;
* **Confluent wire format** (when a schema registry URL is configured): magic byte 0,
  the 4-byte big-endian schema id, then the schemaless Avro body, like Rubin's alerts;
  the schema is registered under the subject ``<topic>-value`` (TopicNameStrategy).

The score record schema is ``service/publish/schemas/score_record.avsc``.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import fastavro

from service.decode.framing import SYNC_SIZE, container_block, is_container, is_wire_format, split_wire_format, wire_header
from service.registry import SchemaRegistry
from service.score.card import label_for

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
SCORE_SCHEMA_PATH = SCHEMA_DIR / "score_record.avsc"

#: Name of the field added to an alert re-published with its score (``--republish-alert``).
ANNOTATION_FIELD = "rbstream"

#: The record added to a re-published alert (a subset of the score record).
ANNOTATION_SCHEMA: dict = {
    "type": "record",
    "name": "RealBogusScore",
    "namespace": "rbstream",
    "doc": "Real/bogus score added by rbstream.",
    "fields": [
        {"name": "score", "type": "double"},
        {"name": "label", "type": "string"},
        {"name": "threshold", "type": "double"},
        {"name": "model_name", "type": "string"},
        {"name": "model_version", "type": "string"},
        {"name": "scored_at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    ],
}


class RecordError(ValueError):
    """Bytes that are not a record this module can read."""


@lru_cache(maxsize=1)
def score_schema() -> dict:
    """The score record schema (``score_record.avsc``) as a dict."""
    return json.loads(SCORE_SCHEMA_PATH.read_text())


def score_record(*, survey: str, candidate_id: int, object_id: str, score: float, threshold: float,
                 model_name: str, model_version: str, observation_mjd: float | None,
                 scored_at: datetime | None = None, survey_score: float | None = None,
                 survey_score_name: str | None = None, model_inputs: Sequence[str] | None = None) -> dict:
    """One score record, as a dict that follows ``score_record.avsc``.

    ``survey_score`` / ``survey_score_name`` are the survey's own score of the alert
    (`service.decode.alerts.Alert.survey_score`), published beside ours; None when it has none.
    ``model_inputs`` are the raw images the scoring model took (its contract's
    ``raw_inputs``, e.g. ``["template", "science"]`` for a model without the difference).
    """
    score = float(score)
    return {
        "survey": survey,
        "candidate_id": int(candidate_id),
        "object_id": "" if object_id is None else str(object_id),
        "score": score,
        "label": label_for(score, threshold),
        "threshold": float(threshold),
        "model_name": model_name,
        "model_version": model_version,
        "observation_mjd": None if observation_mjd is None else float(observation_mjd),
        "scored_at": scored_at or datetime.now(timezone.utc),
        "survey_score": None if survey_score is None else float(survey_score),
        "survey_score_name": None if survey_score is None else survey_score_name,
        "model_inputs": None if model_inputs is None else [str(name) for name in model_inputs],
    }


def annotation(record: Mapping[str, Any]) -> dict:
    """The part of a score record added to a re-published alert."""
    return {field["name"]: record[field["name"]] for field in ANNOTATION_SCHEMA["fields"]}


# --- framing -------------------------------------------------------------------------------------

def container_bytes(schema: Mapping, records: Sequence[Mapping]) -> bytes:
    """An Avro object container holding ``records`` with ``schema`` embedded."""
    return _container(json.dumps(schema, sort_keys=True), records)


def _container(schema_json: str, records: Sequence[Mapping]) -> bytes:
    # The header (magic, schema, codec, sync marker) is the same for every message of a
    # schema: written once by fastavro, then each message is that header and one data block
    # (record count, byte size, the records, the sync marker), per the Avro specification.
    parsed, header = _parsed(schema_json), _container_header(schema_json)
    body = io.BytesIO()
    for record in records:
        fastavro.schemaless_writer(body, parsed, record)
    data = body.getvalue()
    return header + container_block(data, len(records), header[-SYNC_SIZE:])


@lru_cache(maxsize=64)
def _container_header(schema_json: str) -> bytes:
    buffer = io.BytesIO()
    fastavro.writer(buffer, _parsed(schema_json), [], codec="null")
    return buffer.getvalue()


def wire_bytes(schema: Mapping, schema_id: int, record: Mapping) -> bytes:
    """One record in the Confluent wire format."""
    buffer = io.BytesIO()
    buffer.write(wire_header(schema_id))
    fastavro.schemaless_writer(buffer, _parsed(json.dumps(schema, sort_keys=True)), record)
    return buffer.getvalue()


@lru_cache(maxsize=64)
def _parsed(schema_json: str):
    # Parsing a schema costs far more than writing a small record: cache by its text.
    return fastavro.parse_schema(json.loads(schema_json))


class RecordEncoder:
    """Encodes records of one schema for one topic: object container, or wire format with a registry.

    Parameters
    ----------
    registry : SchemaRegistry, optional
        When given, records are framed in the Confluent wire format and the schemas are
        registered under ``<topic>-value``.
    topic : str
        Output topic (names the registry subject).
    """

    def __init__(self, topic: str, registry: SchemaRegistry | None = None):
        self.topic = topic
        self.registry = registry
        self._score_schema_json = json.dumps(score_schema(), sort_keys=True)

    def encode(self, record: Mapping, schema: Mapping | None = None) -> bytes:
        if schema is None and self.registry is None:
            return _container(self._score_schema_json, [record])  # the hot path: no schema to serialise
        schema = score_schema() if schema is None else schema
        if self.registry is None:
            return container_bytes(schema, [record])
        return wire_bytes(schema, self.registry.register(f"{self.topic}-value", schema), record)


def annotated_schema(alert_schema: Mapping) -> dict:
    """``alert_schema`` with a nullable ``rbstream`` field (`ANNOTATION_SCHEMA`) appended."""
    if alert_schema.get("type") != "record":
        raise RecordError("an alert schema must be an Avro record")
    fields = [f for f in alert_schema["fields"] if f["name"] != ANNOTATION_FIELD]
    fields.append({"name": ANNOTATION_FIELD, "type": ["null", ANNOTATION_SCHEMA], "default": None,
                   "doc": "Real/bogus score added by rbstream."})
    return {**alert_schema, "fields": fields}


def container_schema_and_records(value: bytes) -> tuple[dict, list[dict]]:
    """Writer schema and records of an Avro object container message."""
    try:
        reader = fastavro.reader(io.BytesIO(value))
        return reader.writer_schema, list(reader)
    except Exception as exc:  # fastavro raises many types on corrupt input
        raise RecordError(f"not an Avro object container: {exc}") from None


# --- reading (tail, tests) -----------------------------------------------------------------------

def decode_records(value: bytes, registry: SchemaRegistry | None = None) -> list[dict]:
    """Records of a message written by `RecordEncoder` (either framing).

    Raises
    ------
    RecordError
        When the bytes are neither framing, or a wire-format message comes without a registry.
    """
    if is_container(value):
        return container_schema_and_records(value)[1]
    if is_wire_format(value):
        schema_id, body = split_wire_format(value)
        if registry is None:
            raise RecordError(f"Confluent wire format (schema id {schema_id}): give --schema-registry-url")
        try:
            schema = registry.schema(schema_id)
        except LookupError as exc:
            raise RecordError(str(exc)) from None
        try:
            return [fastavro.schemaless_reader(io.BytesIO(body), fastavro.parse_schema(schema))]
        except Exception as exc:
            raise RecordError(f"wire format body does not match schema {schema_id}: {exc}") from None
    raise RecordError("neither an Avro object container nor the Confluent wire format")
