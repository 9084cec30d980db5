"""The consumer's work on one batch, independent of Kafka: decode, score, build what to publish.

`ScoringPipeline.execute` takes the messages of one batch (`SourceMessage`: value, topic,
partition, offset, timestamp, key, headers) and returns an `Outcome`. It is two steps, so
that the consumer can decode the next batch while this one is scored: `ScoringPipeline.decode`
(decode and assemble the stamps: Python, holds the GIL) and `ScoringPipeline.score` (score and
encode: ONNX Runtime, which releases it). The outcome holds:

* one `Outgoing` score message per scored alert, for the output topic, keyed by object id
  (a score record — see ``service/publish/schemas/score_record.avsc`` — or, with
  ``republish_alert``, the original alert with an ``rbstream`` field holding the score);
* one `Outgoing` dead-letter message per message that could not be scored: the original
  bytes, key and headers, plus headers naming the reason and the source.

The consumer (`service.stream.consumer`) only moves these between Kafka and this module, which is
what makes the steps testable without a broker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from service.decode.framing import WIRE_MAGIC, is_container, split_wire_format
from service.decode.stamps import decode_stamps
from service.publish import records
from service.registry import RegistryUnreachable

log = logging.getLogger(__name__)

# DLQ and provenance headers (values are UTF-8 text).
HEADER_REASON = "rbstream.reason"
HEADER_REASON_KIND = "rbstream.reason.kind"
HEADER_SOURCE_TOPIC = "rbstream.source.topic"
HEADER_SOURCE_PARTITION = "rbstream.source.partition"
HEADER_SOURCE_OFFSET = "rbstream.source.offset"
HEADER_SURVEY = "rbstream.survey"
#: Set by ``rbstream replay``: the file an alert came from (copied along to the DLQ).
HEADER_SOURCE_FILE = "rbstream.source.file"

#: Label of ``survey`` in metrics and headers when an undecodable message's survey is unknown.
UNKNOWN_SURVEY = "unknown"


@dataclass(frozen=True)
class SourceMessage:
    """One consumed message, as much of it as the pipeline needs (no librdkafka object)."""

    value: bytes
    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp_ms: int | None = None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def from_kafka(cls, message) -> "SourceMessage":
        """From a ``confluent_kafka.Message``."""
        kind, timestamp = message.timestamp()
        return cls(value=message.value() or b"", topic=message.topic(), partition=message.partition(),
                   offset=message.offset(), timestamp_ms=timestamp if kind != 0 and timestamp >= 0 else None,
                   key=message.key(), headers=tuple(message.headers() or ()))

    def provenance(self) -> list[tuple[str, bytes]]:
        """Headers naming where this message came from."""
        return [(HEADER_SOURCE_TOPIC, self.topic.encode()),
                (HEADER_SOURCE_PARTITION, str(self.partition).encode()),
                (HEADER_SOURCE_OFFSET, str(self.offset).encode())]


@dataclass
class Outgoing:
    """A message to publish: a score (``kind == "score"``) or a dead letter (``kind`` = failure kind)."""

    kind: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    source: SourceMessage
    survey: str
    record: dict | None = None
    reason: str | None = None

    @property
    def is_score(self) -> bool:
        return self.kind == "score"


@dataclass
class DecodedBatch:
    """A decoded batch on its way to `ScoringPipeline.score`.

    Attributes
    ----------
    messages : sequence of SourceMessage
    batches : dict of str to service.decode.stamps.SurveyStamps, or None
        Model input per survey; None when the batch could not be decoded as a whole (its
        messages are then scored one by one).
    failures : list of service.decode.stamps.Failure
    decode_seconds : float
    """

    messages: Sequence[SourceMessage]
    batches: dict[str, Any] | None
    failures: list = field(default_factory=list)
    decode_seconds: float = 0.0


@dataclass
class Outcome:
    """What one batch produced, and how long its steps took (seconds)."""

    scores: list[Outgoing] = field(default_factory=list)
    dead_letters: list[Outgoing] = field(default_factory=list)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    decode_seconds: float = 0.0
    inference_seconds: float = 0.0

    @property
    def messages(self) -> list[Outgoing]:
        return self.scores + self.dead_letters

    def add(self, other: "Outcome") -> None:
        """Append ``other``'s messages and add its counts and times to this outcome's."""
        self.scores += other.scores
        self.dead_letters += other.dead_letters
        self.decode_seconds += other.decode_seconds
        self.inference_seconds += other.inference_seconds
        for survey, n in other.batch_sizes.items():
            self.batch_sizes[survey] = self.batch_sizes.get(survey, 0) + n


def dead_letter(message: SourceMessage, kind: str, reason: str, survey: str = UNKNOWN_SURVEY) -> Outgoing:
    """The dead-letter message for ``message``: its bytes, key and headers, plus reason and source headers."""
    headers = [h for h in message.headers if not h[0].startswith("rbstream.reason")]
    headers += [(HEADER_REASON, reason.encode("utf-8", "replace")), (HEADER_REASON_KIND, kind.encode()),
                (HEADER_SURVEY, survey.encode())]
    headers += message.provenance()
    return Outgoing(kind=kind, key=message.key, value=message.value, headers=headers, source=message,
                    survey=survey, reason=reason)


def survey_hint(value: bytes) -> str:
    """Best guess of an undecodable message's survey, for metrics labels only.

    The Confluent wire format is Rubin's framing; an object container whose schema names
    ``ztf`` is ZTF's. Anything else is `UNKNOWN_SURVEY`.
    """
    if value[:1] == bytes([WIRE_MAGIC]):
        return "rubin"
    if is_container(value):
        head = value[:4096]
        if b"ztf" in head:
            return "ztf"
        if b"diaSource" in head:
            return "rubin"
    return UNKNOWN_SURVEY


def headers_to_text(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """Kafka headers as a ``name -> text`` dict (the last value wins)."""
    return {name: (value or b"").decode("utf-8", "replace") for name, value in headers or ()}


class ScoringPipeline:
    """Decodes, scores and encodes batches of alert messages.

    Parameters
    ----------
    scorers : mapping of str to service.score.model.Scorer
        One model per survey.
    encoder : service.publish.records.RecordEncoder
        Frames the output messages (object container or Confluent wire format).
    survey : str
        ``ztf``, ``rubin`` or ``auto`` (decided per message from its fields).
    schemas : optional
        Schema source for Rubin's wire format, passed to `service.decode.stamps.decode_stamps`.
    workers : int, optional
        Decoding threads/processes, passed to `service.decode.stamps.decode_stamps`.
    republish_alert : bool
        Publish the original alert with an ``rbstream`` score field instead of a score record.
    isolate : bool
        Decode in worker processes that may crash (`service.decode.stamps.decode_stamps`'s ``isolate``).
    fallbacks : mapping of str to service.score.model.Scorer, optional
        A survey's model without a difference image, which scores that survey's alerts whose
        difference cutout is missing or unusable (else refused as ``cutout``).
    """

    def __init__(self, scorers: Mapping[str, Any], encoder: records.RecordEncoder, survey: str = "auto",
                 schemas: Any = None, workers: int | None = None, republish_alert: bool = False,
                 isolate: bool = False, fallbacks: Mapping[str, Any] | None = None):
        self.scorers = dict(scorers)
        self.contracts = {name: scorer.contract for name, scorer in self.scorers.items()}
        self.fallbacks = dict(fallbacks or {})
        self.fallback_contracts = {name: scorer.contract for name, scorer in self.fallbacks.items()}
        self.encoder = encoder
        self.survey = survey
        self.schemas = schemas
        self.workers = workers
        self.republish_alert = republish_alert
        self.isolate = isolate

    def use_models(self, scorers: Mapping[str, Any]) -> None:
        """Score with ``scorers`` from now on (a reload). Their contracts must be those in use, as
        a batch already decoded is scored by them; call it only while no batch is being scored."""
        self.scorers = dict(scorers)
        self.contracts = {name: scorer.contract for name, scorer in self.scorers.items()}

    # -- the steps ------------------------------------------------------------------------------

    def infer(self, batch) -> tuple[np.ndarray | None, str | None]:
        """Scores of one survey's batch, or ``(None, reason)`` when inference fails."""
        scorer = self.scorer_of(batch)
        if scorer is None:
            return None, f"no model loaded for survey {batch.survey!r}"
        try:
            scores = np.asarray(scorer.score(batch.stamps), dtype=np.float64).reshape(-1)
        except Exception as exc:  # ONNX Runtime errors have many types; any of them must not stop the stream
            log.exception("inference failed for a %s batch of %d", batch.survey, len(batch.alerts))
            return None, f"inference failed: {type(exc).__name__}: {exc}"
        if len(scores) != len(batch.alerts):
            return None, f"model returned {len(scores)} scores for {len(batch.alerts)} alerts"
        return scores, None

    def scorer_of(self, batch):
        """The model that scores ``batch``: its survey's fallback model, or its main one."""
        return (self.fallbacks if batch.fallback else self.scorers).get(batch.survey)

    def score_message(self, alert, score: float, source: SourceMessage, scored_at: datetime,
                      scorer=None) -> Outgoing:
        """The output message of one scored alert (score record, or annotated alert) by ``scorer``
        (default: the survey's main model)."""
        scorer = scorer or self.scorers[alert.survey]
        card = scorer.card
        record = records.score_record(survey=alert.survey, candidate_id=alert.candidate_id,
                                      object_id=alert.object_id, score=score, threshold=scorer.threshold,
                                      model_name=card.name, model_version=card.version,
                                      observation_mjd=alert.observation_mjd, scored_at=scored_at,
                                      survey_score=alert.survey_score, survey_score_name=alert.survey_score_name,
                                      model_inputs=card.contract.raw_inputs)
        headers = [(HEADER_SURVEY, alert.survey.encode())] + source.provenance()
        key = record["object_id"].encode() if record["object_id"] else None
        return Outgoing(kind="score", key=key, value=b"", headers=headers, source=source, survey=alert.survey,
                        record=record)

    def encode(self, outgoing: list[Outgoing]) -> list[Outgoing]:
        """Fill in the bytes of score messages; those that cannot be encoded become dead letters."""
        done: list[Outgoing] = []
        if not self.republish_alert:
            for out in outgoing:
                out.value = self.encoder.encode(out.record)
                done.append(out)
            return done
        # Re-publishing: one annotated copy of each source message holding every alert it carried.
        by_source: dict[int, list[Outgoing]] = {}
        for out in outgoing:
            by_source.setdefault(id(out.source), []).append(out)
        for group in by_source.values():
            try:
                group[0].value = self.annotated_alert(group[0].source.value, [o.record for o in group])
            except RegistryUnreachable:
                raise  # an outage: the consumer stops without committing (see service.stream.consumer)
            except Exception as exc:
                log.warning("cannot re-publish alert at %s/%d/%d: %s", group[0].source.topic,
                            group[0].source.partition, group[0].source.offset, exc)
                done.append(dead_letter(group[0].source, "publish", f"cannot re-publish with score: {exc}",
                                        group[0].survey))
                continue
            done.append(group[0])
        return done

    def annotated_alert(self, value: bytes, scores: list[dict]) -> bytes:
        """The alert message ``value`` re-encoded with its score(s) in an ``rbstream`` field."""
        if is_container(value):
            schema, alerts = records.container_schema_and_records(value)
        else:
            schema, alerts = self._wire_schema_and_records(value)
        if len(alerts) != len(scores):
            raise records.RecordError(f"{len(alerts)} alerts in the message, {len(scores)} scored")
        annotated = [dict(alert, **{records.ANNOTATION_FIELD: records.annotation(s)})
                     for alert, s in zip(alerts, scores)]
        out_schema = records.annotated_schema(schema)
        if self.encoder.registry is None:
            return records.container_bytes(out_schema, annotated)
        if len(annotated) != 1:
            raise records.RecordError("the wire format holds one alert per message")
        return self.encoder.encode(annotated[0], out_schema)

    def _wire_schema_and_records(self, value: bytes) -> tuple[dict, list[dict]]:
        import io

        import fastavro

        from service.decode import schemas as alert_schemas

        store = self.schemas if self.schemas is not None else alert_schemas.default_store()
        schema_id, body = split_wire_format(value)
        writer = store.schema_for_id(schema_id)
        record = fastavro.schemaless_reader(io.BytesIO(body), writer.parsed)
        # fastavro's parsed form carries bookkeeping keys ("__fastavro_parsed", ...); the rest is the schema.
        definition = {k: v for k, v in writer.parsed.items() if not k.startswith("__")}
        return definition, [record]

    # -- the whole batch ------------------------------------------------------------------------

    def execute(self, messages: Sequence[SourceMessage], now: datetime | None = None) -> Outcome:
        """Decode, score and encode one batch (`decode` then `score`); never raises for bad input."""
        return self.score(self.decode(messages), now)

    def decode(self, messages: Sequence[SourceMessage]) -> DecodedBatch:
        """Decode one batch into model input (the step that holds the GIL).

        A batch that fails as a whole is left to `score`, which takes its messages one by one.
        """
        try:
            return self._decode(messages)
        except Exception:
            log.exception("decoding a batch of %d failed as a whole; retrying message by message", len(messages))
            return DecodedBatch(messages, None)

    def score(self, decoded: DecodedBatch, now: datetime | None = None) -> Outcome:
        """Score and encode a decoded batch: one score or one dead letter per message.

        If the batch fails as a whole, its messages are taken one at a time: the decoder
        promises to report bad messages as failures, and this is the last line that keeps
        one message nobody foresaw from stopping the stream.

        Raises
        ------
        service.registry.RegistryUnreachable
            When the output schema cannot be registered: an outage, not a bad message.
        """
        if decoded.batches is not None:
            try:
                return self._score(decoded, now)
            except RegistryUnreachable:
                raise
            except Exception:
                log.exception("batch of %d failed as a whole; retrying message by message", len(decoded.messages))
        outcome = Outcome()
        for source in decoded.messages:
            try:
                single = self._score(self._decode([source]), now)
            except RegistryUnreachable:
                raise
            except Exception as exc:
                single = Outcome(dead_letters=[dead_letter(source, "decode", f"internal error: {exc!r}")])
            outcome.add(single)
        return outcome

    def _decode(self, messages: Sequence[SourceMessage]) -> DecodedBatch:
        start = time.perf_counter()
        batches, failures = (decode_stamps([m.value for m in messages], self.contracts, survey=self.survey,
                                           schemas=self.schemas, workers=self.workers, isolate=self.isolate,
                                           fallbacks=self.fallback_contracts)
                             if messages else ({}, []))
        return DecodedBatch(messages, batches, failures, time.perf_counter() - start)

    def _score(self, decoded: DecodedBatch, now: datetime | None) -> Outcome:
        messages, batches = decoded.messages, decoded.batches
        outcome = Outcome(decode_seconds=decoded.decode_seconds)
        rejected: dict[int, Outgoing] = {}
        for failure in decoded.failures:
            if failure.index not in rejected:
                source = messages[failure.index]
                survey = self.survey if self.survey != "auto" else survey_hint(source.value)
                rejected[failure.index] = dead_letter(source, failure.kind, failure.reason, survey)
        scored: list[tuple[int, int, Outgoing]] = []
        scored_at = now or datetime.now(timezone.utc)
        start = time.perf_counter()
        for survey, batch in batches.items():
            if len(batch.alerts) == 0:
                continue
            survey = batch.survey
            outcome.batch_sizes[survey] = outcome.batch_sizes.get(survey, 0) + len(batch.alerts)
            scores, error = self.infer(batch)
            scorer = self.scorer_of(batch)
            for position, (alert, index) in enumerate(zip(batch.alerts, batch.indices)):
                index = int(index)
                if error is None and not np.isfinite(scores[position]):
                    error_here = "model returned a non-finite score"
                else:
                    error_here = error
                if error_here is not None:
                    rejected.setdefault(index, dead_letter(messages[index], "inference", error_here, survey))
                    continue
                scored.append((index, position,
                               self.score_message(alert, float(scores[position]), messages[index], scored_at,
                                                  scorer)))
        outcome.inference_seconds = time.perf_counter() - start
        # Publish in input order so that the records of one object keep their order.
        scored.sort(key=lambda item: (item[0], item[1]))
        for out in self.encode([out for index, _, out in scored if index not in rejected]):
            (outcome.scores if out.is_score else outcome.dead_letters).append(out)
        outcome.dead_letters.extend(rejected[i] for i in sorted(rejected))
        return outcome
