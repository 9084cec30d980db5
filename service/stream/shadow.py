"""The shadow model of ``rbstream consume`` (``--shadow-model``): a second model scores the stream
beside the primary, off its path.

A candidate model (a retrained one, another threshold) is judged on the live stream before it
replaces the primary. The consumer's scoring thread, once the primary has scored a batch, hands
the batch's stamps and the primary's score records to `ShadowRunner.offer`, which never blocks:
it puts them in a queue of `QUEUE_BATCHES` batches with ``put_nowait``, and when the shadow is
still busy with earlier ones the batch is not shadowed (``rbstream_shadow_alerts_skipped_total``).
A worker thread of its own then

1. scores the stamps with the shadow model (the same decoded stamps: a shadow's input contract
   must equal its primary's, which `load_shadow_models` checks at start-up);
2. publishes one score record per alert (``score_record.avsc``, unchanged; ``model_name`` and
   ``model_version`` the shadow's, its own threshold and label) to the shadow topic
   (``--shadow-topic``, default ``<output-topic>-shadow``), with a producer of its own, so that
   the primary's delivery wait never waits for shadow records;
3. updates the agreement gauges over the rolling window of ``--monitor-window``
   (`service.stream.window.RollingWindow`): the Spearman rank correlation of the two scores, and
   the share of alerts whose label flips (each model with its own threshold).

Nothing of it is on the commit path: offsets are committed when the primary's records are
delivered, whatever the shadow does, so the consumer's at-least-once guarantee is the one it
has without a shadow. The shadow topic is best effort: after a kill or a crash it may miss
records, or repeat those of the re-read batch; on a clean stop the worker gets `DRAIN_SECONDS`
to finish its queue and is then abandoned. An error of the shadow (inference raises, a wrong
number of scores, a non-finite score, a record that cannot be encoded or delivered) is counted
in ``rbstream_shadow_failures_total{survey,kind}``, logged once per survey and kind (then at
debug level), and the primary goes on. Alerts the primary dead-lettered, or that a fallback
model without the difference image scored, are not shadowed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from service import metrics
from service.score.card import REAL, ModelError, is_real
from service.settings import Option, SettingsError, non_negative_int
from service.stream.window import RollingWindow, WindowSize, parse_window

log = logging.getLogger(__name__)

#: Options of the shadow model, part of ``rbstream consume``'s (`service.stream.consumer.CONSUME_OPTIONS`).
SHADOW_OPTIONS: tuple[Option, ...] = (
    Option("shadow_model", [], "a second model that scores every batch beside the primary, off its path, and "
           "publishes to --shadow-topic (best effort; the primary's at-least-once is unchanged); SURVEY=PATH or "
           "PATH (survey read from its card), repeatable; its input contract must equal the primary's",
           kind="list", metavar="[SURVEY=]PATH"),
    Option("shadow_topic", None, "topic of the shadow model's score records (default: <output-topic>-shadow)",
           metavar="TOPIC"),
    Option("shadow_threads", 1, "ONNX Runtime threads of the shadow model (default 1, so that it takes at most one "
           "core from the primary; 0: ONNX Runtime's default, one per core)", type=non_negative_int, metavar="N"),
)

#: Batches waiting for the shadow: one being scored and one waiting absorb jitter; more would
#: only let the shadow fall further behind the primary (and hold their stamps in memory).
QUEUE_BATCHES = 2
#: How long a clean stop waits for the shadow to finish its queue before abandoning it.
DRAIN_SECONDS = 5.0
#: How long the shadow waits for room in its producer's queue before dropping a record.
PRODUCE_WAIT_SECONDS = 5.0
#: ONNX Runtime's log severity "fatal": its per-call error lines off for the shadow's session.
ORT_FATAL = 4
#: The ``kind`` label values of ``rbstream_shadow_failures_total``.
FAILURE_KINDS = ("inference", "count", "non_finite", "contract", "encode", "publish", "internal")


def shadow_topic(settings: Mapping[str, Any]) -> str:
    """The topic of the shadow's score records: ``shadow_topic``, else ``<output_topic>-shadow``."""
    return settings.get("shadow_topic") or f"{settings['output_topic']}-shadow"


def _contract_difference(shadow, primary) -> str:
    diffs = [f"{f.name} {getattr(shadow, f.name)!r} (primary: {getattr(primary, f.name)!r})"
             for f in fields(shadow) if getattr(shadow, f.name) != getattr(primary, f.name)]
    return "; ".join(diffs) or "a different contract"


def load_shadow_models(settings: Mapping[str, Any], primaries: Mapping[str, Any]) -> dict:
    """The shadow models the settings name (``shadow_model``), one per survey, thresholds applied.

    The ``threshold`` setting holds for a shadow as for its primary (a rate is read from the
    shadow's own card).

    Raises
    ------
    ModelError
        When a shadow cannot be loaded, belongs to another survey, has no primary to stand
        beside, or takes other input than its primary (it is fed the primary's stamps).
    SettingsError
        When the survey of a bare path cannot be told.
    """
    from service.score.model import Scorer
    from service.score.thresholds import apply_thresholds
    from service.stream.consumer import model_paths

    entries = settings.get("shadow_model") or []
    if not entries:
        return {}
    _check_topic(settings)
    shadows = {}
    for survey, path in model_paths(entries, settings.get("survey", "auto")).items():
        primary = primaries.get(survey)
        if primary is None:
            raise ModelError(f"shadow model {path} for {survey}: no primary {survey} model is loaded "
                             f"(survey setting {settings.get('survey', 'auto')!r}); a shadow scores beside one")
        # ONNX Runtime's own error lines off: a failing shadow is logged once per kind (FailureLog).
        scorer = Scorer(path, device=settings.get("device", "auto"), intra_op_threads=settings.get("shadow_threads", 1),
                        ort_log_severity=ORT_FATAL)
        card = scorer.card
        if card.survey != survey:
            raise ModelError(f"shadow model for {survey} at {path} is a {card.survey} model "
                             f"({card.name} {card.version})")
        if scorer.contract != primary.contract:
            raise ModelError(f"shadow model {card.name} {card.version} at {path} takes other input than the {survey} "
                             f"primary {primary.card.name} {primary.card.version}: "
                             f"{_contract_difference(scorer.contract, primary.contract)}; a shadow is fed the "
                             "primary's stamps, so their input contracts must be equal")
        shadows[survey] = scorer
    return apply_thresholds(shadows, settings.get("threshold"))


def _check_topic(settings: Mapping[str, Any]) -> None:
    """Refuse a shadow topic that is one of the consumer's other topics (the records would mix)."""
    topic = shadow_topic(settings)
    for name in ("input_topic", "output_topic", "dlq_topic"):
        if settings.get(name) == topic:
            raise SettingsError(f"shadow_topic {topic!r} is also the {name.replace('_', ' ')}; give the shadow "
                                "a topic of its own")


def rank_correlation(values: np.ndarray) -> float:
    """Spearman's rank correlation of the two columns of ``values``; NaN with fewer than 2 rows or
    a constant column (where it is undefined)."""
    from scipy.stats import spearmanr

    if len(values) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant column warns and gives NaN: that NaN is the answer
        return float(spearmanr(values[:, 0], values[:, 1]).statistic)


class Agreement:
    """How primary and shadow agree over the rolling window, per survey; sets the gauges.

    Fed and read from the shadow's worker thread only (`RollingWindow` is not thread-safe).
    """

    def __init__(self, size: WindowSize, clock=time.monotonic):
        self.size = size
        self._clock = clock
        self._scores: dict[str, RollingWindow] = {}  # rows (primary score, shadow score)
        self._flips: dict[str, RollingWindow] = {}   # rows 1.0 where the labels differ, else 0.0

    def add(self, survey: str, primary_scores: Sequence[float], primary_real: Sequence[bool],
            shadow_scores: Sequence[float], shadow_threshold: float) -> None:
        """Add one batch's alerts (primary label as published, shadow's by its threshold); update the gauges."""
        if survey not in self._scores:
            self._scores[survey] = RollingWindow(self.size, columns=2, clock=self._clock)
            self._flips[survey] = RollingWindow(self.size, columns=1, clock=self._clock)
        shadow_scores = np.asarray(shadow_scores, dtype=np.float64)
        flipped = np.asarray(primary_real, dtype=bool) != is_real(shadow_scores, shadow_threshold)
        self._scores[survey].extend(zip(primary_scores, shadow_scores))
        self._flips[survey].extend(flipped.astype(np.float64))
        self.publish(survey)

    def publish(self, survey: str) -> None:
        values, flips = self._scores[survey].values(), self._flips[survey].values()
        metrics.SHADOW_RANK_CORRELATION.labels(survey=survey).set(rank_correlation(values))
        metrics.SHADOW_LABEL_FLIP_SHARE.labels(survey=survey).set(float(flips.mean()) if len(flips) else float("nan"))
        metrics.SHADOW_WINDOW_ALERTS.labels(survey=survey).set(len(values))


class FailureLog:
    """Counts the shadow's failures; logs the first of each survey and kind as a warning, the rest at debug."""

    def __init__(self):
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # delivery reports may come on the thread that flushes at stop

    def __call__(self, survey: str, kind: str, alerts: int, message: str, *args: Any, exc_info: bool = False) -> None:
        metrics.SHADOW_FAILURES.labels(survey=survey, kind=kind).inc(alerts)
        with self._lock:
            first = (survey, kind) not in self._seen
            self._seen.add((survey, kind))
        if first:
            log.warning("shadow model (%s, %s): " + message + "; the primary goes on (further %s failures of the "
                        "shadow are counted in rbstream_shadow_failures_total and logged at debug level)",
                        survey, kind, *args, kind, exc_info=exc_info)
        else:
            log.debug("shadow model (%s, %s): " + message, survey, kind, *args)


@dataclass
class ShadowBatch:
    """One survey's part of a batch, handed to the shadow: the alerts the primary scored, their
    stamps (rows in the same order), the primary's score messages, and the pipeline that made them."""

    survey: str
    alerts: list
    stamps: np.ndarray
    primaries: list  # service.stream.pipeline.Outgoing, one per alert
    pipeline: Any    # service.stream.pipeline.ScoringPipeline: builds the shadow's score messages


class ShadowRunner:
    """Scores each batch with the shadow models in a worker thread, publishes and compares.

    Inert when ``scorers`` is empty. `offer` is called from the consumer's scoring thread and
    never raises nor blocks; everything else happens on the worker thread.

    Parameters
    ----------
    scorers : mapping of str to service.score.model.Scorer
        The shadow model of each survey (`load_shadow_models`).
    topic : str
        Where the shadow's score records go.
    encoder : service.publish.records.RecordEncoder
        Frames them (as the primary's: object container, or wire format with a registry).
    window : WindowSize
        The rolling window of the agreement gauges.
    """

    def __init__(self, scorers: Mapping[str, Any], topic: str, encoder, window: WindowSize,
                 queue_batches: int = QUEUE_BATCHES, drain_seconds: float = DRAIN_SECONDS):
        self.scorers = dict(scorers)
        self.topic = topic
        self.encoder = encoder
        self.agreement = Agreement(window)
        self.failures = FailureLog()
        self.drain_seconds = drain_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], scorers: Mapping[str, Any]) -> "ShadowRunner":
        from service.publish.records import RecordEncoder
        from service.registry import SchemaRegistry

        topic = shadow_topic(settings)
        url = settings.get("schema_registry_url")
        window = settings.get("monitor_window") or "1000"  # settings made by hand may lack it
        window = window if isinstance(window, WindowSize) else parse_window(window)
        return cls(scorers, topic, RecordEncoder(topic, SchemaRegistry(url) if url else None), window)

    def __bool__(self) -> bool:
        return bool(self.scorers)

    def describe(self, primaries: Mapping[str, Any]) -> str:
        """One line per survey: which shadow (name, version, provider, threshold) beside which primary."""
        return "; ".join(
            f"{survey}={sc.card.name} {sc.card.version} on {sc.provider}, threshold {sc.threshold:.4g} "
            f"({sc.threshold_rule}), beside {primaries[survey].card.name} {primaries[survey].card.version}"
            for survey, sc in self.scorers.items() if survey in primaries)

    # -- lifecycle (the consumer's thread) -------------------------------------------------------

    def start(self, producer_config: Mapping[str, Any]) -> None:
        """Open the shadow's own producer and start the worker (nothing without shadow models)."""
        from confluent_kafka import Producer

        if not self.scorers:
            return
        import scipy.stats  # noqa: F401 - imported here, not on the first batch (which it would make late)

        self._producer = Producer(dict(producer_config))
        for survey, scorer in self.scorers.items():
            metrics.SHADOW_MODEL_INFO.labels(survey=survey, name=scorer.card.name, version=scorer.card.version,
                                             provider=scorer.provider).set(1)
        self._thread = threading.Thread(target=self._loop, name="rbstream-shadow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the worker finish its queue for at most `drain_seconds`, then abandon it; flush what it produced."""
        if self._thread is None:
            return
        deadline = time.monotonic() + self.drain_seconds
        self._closing.set()
        self._thread.join(self.drain_seconds)
        if self._thread.is_alive():
            self._abandon.set()
            log.warning("shadow model: not done within %.0f s of the stop; abandoned with %d batches queued "
                        "(the shadow topic misses them)", self.drain_seconds, self._queue.qsize())
        left = self._producer.flush(max(deadline - time.monotonic(), 0.5))
        if left:
            log.warning("shadow model: %d records to %s not confirmed at the stop", left, self.topic)
        self._thread = None

    # -- the hand-over (the consumer's scoring thread) -------------------------------------------

    def offer(self, pipeline, decoded, outcome) -> None:
        """Hand a scored batch to the shadow, unless it is still busy (then the batch is counted as skipped).

        Parameters
        ----------
        pipeline : service.stream.pipeline.ScoringPipeline
            The primary's pipeline (its scorers name the contract the stamps were made for).
        decoded : service.stream.pipeline.DecodedBatch
        outcome : service.stream.pipeline.Outcome
            What the primary made of ``decoded``.
        """
        if self._thread is None or decoded.batches is None:
            return
        try:
            work = self._work(pipeline, decoded, outcome)
        except Exception as exc:  # the primary's path must not fail for the shadow
            for out in outcome.scores:
                self.failures(out.survey, "internal", 1, "cannot hand the batch over: %r", exc, exc_info=True)
            return
        if not work:
            return
        try:
            self._queue.put_nowait(work)
        except queue.Full:
            for part in work:
                metrics.SHADOW_ALERTS_SKIPPED.labels(survey=part.survey).inc(len(part.alerts))

    def _work(self, pipeline, decoded, outcome) -> list[ShadowBatch]:
        index_of = {id(message): i for i, message in enumerate(decoded.messages)}
        primary_of = {(index_of.get(id(out.source)), int(out.record["candidate_id"])): out
                      for out in outcome.scores if out.record is not None}
        work = []
        for batch in decoded.batches.values():
            shadow = self.scorers.get(batch.survey)
            if shadow is None or batch.fallback or len(batch.alerts) == 0:
                continue
            rows, primaries = [], []
            for position, (alert, index) in enumerate(zip(batch.alerts, batch.indices)):
                out = primary_of.get((int(index), int(alert.candidate_id)))
                if out is not None:  # dead-lettered by the primary: nothing to compare with
                    rows.append(position)
                    primaries.append(out)
            if not rows:
                continue
            primary = pipeline.scorers.get(batch.survey)
            if primary is None or primary.contract != shadow.contract:
                self.failures(batch.survey, "contract", len(rows), "the primary %s now takes other input than the "
                              "shadow; not shadowed", "(none)" if primary is None else primary.card.version)
                continue
            # decode_stamps makes a fresh array per batch and nobody writes into it, so the
            # shadow may hold on to it; a subset (some alerts dead-lettered) is a copy anyway.
            stamps = batch.stamps if len(rows) == len(batch.alerts) else batch.stamps[rows]
            work.append(ShadowBatch(batch.survey, [batch.alerts[r] for r in rows], stamps, primaries, pipeline))
        return work

    # -- the worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._abandon.is_set():
            try:
                work = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return
                self._producer.poll(0)
                continue
            for part in work:
                if self._abandon.is_set():
                    return
                try:
                    self._shadow(part)
                except Exception as exc:  # the worker must outlive anything one batch does
                    self.failures(part.survey, "internal", len(part.alerts), "%r", exc, exc_info=True)
            self._producer.poll(0)

    def _shadow(self, part: ShadowBatch) -> None:
        """Score one survey's part with its shadow, update the agreement, publish the records."""
        shadow = self.scorers[part.survey]
        n = len(part.alerts)
        try:
            scores = np.asarray(shadow.score(part.stamps), dtype=np.float64).reshape(-1)
        except Exception as exc:  # ONNX Runtime raises its own types
            self.failures(part.survey, "inference", n, "%s %s failed on a batch of %d: %s: %s", shadow.card.name,
                          shadow.card.version, n, type(exc).__name__, exc)
            return
        if len(scores) != n:
            self.failures(part.survey, "count", n, "%s %s returned %d scores for %d alerts", shadow.card.name,
                          shadow.card.version, len(scores), n)
            return
        finite = np.isfinite(scores)
        if not finite.all():
            self.failures(part.survey, "non_finite", int((~finite).sum()), "%s %s returned %d non-finite scores "
                          "in a batch of %d", shadow.card.name, shadow.card.version, int((~finite).sum()), n)
        keep = np.flatnonzero(finite)
        if len(keep) == 0:
            return
        metrics.SHADOW_ALERTS_SCORED.labels(survey=part.survey).inc(len(keep))
        records = [part.primaries[i].record for i in keep]
        self.agreement.add(part.survey, [r["score"] for r in records], [r["label"] == REAL for r in records],
                           scores[keep], shadow.threshold)
        self._publish(part, keep, scores, shadow)

    def _publish(self, part: ShadowBatch, keep: np.ndarray, scores: np.ndarray, shadow) -> None:
        scored_at = datetime.now(timezone.utc)
        on_delivery = self._delivery_report(part.survey)
        for i in keep:
            out = part.pipeline.score_message(part.alerts[i], float(scores[i]), part.primaries[i].source, scored_at,
                                              shadow)
            try:
                value = self.encoder.encode(out.record)
            except Exception as exc:  # e.g. the schema registry cannot be reached
                self.failures(part.survey, "encode", 1, "cannot encode a record: %s: %s", type(exc).__name__, exc)
                continue
            self._produce(part.survey, value, out.key, out.headers, on_delivery)

    def _produce(self, survey: str, value: bytes, key, headers, on_delivery) -> None:
        deadline = time.monotonic() + PRODUCE_WAIT_SECONDS
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:  # its local queue is full: let deliveries drain, for a while
                if time.monotonic() > deadline or self._abandon.is_set():
                    self.failures(survey, "publish", 1, "producer queue full for %.0f s; record dropped",
                                  PRODUCE_WAIT_SECONDS)
                    return
                self._producer.poll(0.1)
            except Exception as exc:  # KafkaException: e.g. an invalid topic
                self.failures(survey, "publish", 1, "cannot produce to %s: %s", self.topic, exc)
                return

    def _delivery_report(self, survey: str):
        def report(error, _message) -> None:
            if error is not None:
                self.failures(survey, "publish", 1, "record not delivered to %s: %s", self.topic, error)
        return report
