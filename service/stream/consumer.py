"""``rbstream consume``: score the alerts of a Kafka topic and publish the scores, at least once.

The loop runs in two overlapping stages, a batch at a time in each:

1. fetch up to ``batch_size`` messages, waiting at most ``max_wait_ms`` (whichever first), and
   decode them into model input (`service.stream.pipeline.ScoringPipeline.decode`, on this thread);
2. in a scoring thread, while the next batch is fetched and decoded: score and encode
   (`ScoringPipeline.score`; ONNX Runtime releases the GIL), produce one score record per
   scored alert to the output topic (keyed by object id) and one dead letter per unscorable
   message to the DLQ topic, then wait until the producer has confirmed every delivery;
3. back on this thread, once stage 2 is done: commit that batch's offsets (synchronously).

At most one batch is in stage 2 at a time, so batches are published in the order they were
read. A consumer killed at any point re-reads at most the batch being published (the one
being decoded was not published yet): nothing is lost, and duplicates are bounded by one
batch. The producer is idempotent, so its own retries add no duplicates. On SIGTERM or SIGINT
the loop stops fetching, finishes the batch in hand, flushes, commits and exits 0.
A stop waits at most `STOP_GRACE_S` for the broker to confirm deliveries (an unreachable
broker would otherwise hold it for librdkafka's ``message.timeout.ms``, 5 minutes by
default); past that it exits 1 without committing the unconfirmed batch, which is re-read.
Partitions taken away by a rebalance are never given up with work pending: ``on_revoke``
waits for the batch in stage 2 and commits it.

With ``--shadow-model``, stage 2 also hands each scored batch to a shadow model's worker thread
without waiting for it (`service.stream.shadow`): the shadow scores, publishes to its own topic
and compares off this path, and nothing of it is committed or waited for.

A new model version (in the models folder, or on SIGHUP) is loaded and checked in a background
thread (`service.score.reload.ModelReloader`) and put in service on this thread between two
batches, once stage 2 is idle: each decoded batch is scored by one model version, and offsets
are untouched by the switch, so no message is lost or scored twice by it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence

from service import metrics
from service.limits import LIMIT_OPTIONS, DecodeLimits
from service.stream.drift import DriftMonitor
from service.stream.window import WindowSize, parse_window
from service.stream.pipeline import DecodedBatch, Outcome, Outgoing, ScoringPipeline, SourceMessage, dead_letter
from service.stream.shadow import SHADOW_OPTIONS, ShadowRunner, load_shadow_models
from service.registry import RegistryUnreachable
from service.score.model import DEVICES
from service.score.reload import RELOAD_OPTION, ModelReloader
from service.score.thresholds import THRESHOLD_HELP, apply_thresholds, parse_threshold
from service.surveys import SURVEY_CHOICES, SURVEYS
from service.settings import (COMMON_OPTIONS, Option, SettingsError, add_options, kafka_client_config,
                              non_negative_int, positive_int, redact, resolve)

log = logging.getLogger(__name__)


#: Options of ``rbstream consume`` (each also ``RBSTREAM_<NAME>`` and a key of ``--config``).
CONSUME_OPTIONS: tuple[Option, ...] = COMMON_OPTIONS + (
    Option("input_topic", None, "topic of the survey's alerts", required=True, metavar="TOPIC"),
    Option("output_topic", None, "topic the score records go to", required=True, metavar="TOPIC"),
    Option("dlq_topic", None, "dead-letter topic for alerts that cannot be scored", required=True,
           metavar="TOPIC"),
    Option("group_id", "rbstream", "consumer group id", metavar="GROUP"),
    Option("survey", "auto", "survey of the input stream; auto recognises each alert by its fields",
           choices=SURVEY_CHOICES, metavar="{" + ",".join(SURVEY_CHOICES) + "}"),
    Option("model", [], "model folder (or its model.onnx) to use instead of the default; SURVEY=PATH "
           "for one survey, or PATH alone (survey read from its model card); repeatable", kind="list",
           metavar="[SURVEY=]PATH"),
    Option("nodiff_model_ztf", None, "fallback ZTF model without the difference image (e.g. trained on template "
           "and science): scores the alerts whose difference cutout is missing, empty or all masked, which are "
           "dead-lettered without it", metavar="PATH"),
    Option("nodiff_model_rubin", None, "the same for Rubin alerts", metavar="PATH"),
    Option("models_dir", None, "folder with one model per survey (<dir>/ztf, <dir>/rubin); default models/",
           metavar="DIR"),
    Option("threshold", None, THRESHOLD_HELP, type=parse_threshold, metavar="[SURVEY:]{T,fpr=X,tpr=Y}[,...]"),
    Option("batch_size", 256, "most alerts per batch", type=positive_int, metavar="N"),
    Option("max_wait_ms", 100, "longest wait for a batch to fill, in milliseconds", type=positive_int,
           metavar="MS"),
    Option("from_beginning", False, "start from the earliest offset when the group has no committed offset "
           "(else the latest)", kind="flag"),
    Option("device", "auto", "where to run the model: auto (CUDA when usable, else CPU), cpu, cuda, tensorrt",
           choices=DEVICES, metavar="{" + ",".join(DEVICES) + "}"),
    Option("metrics_port", None, "serve Prometheus /metrics on this port (0 or unset: off)",
           type=non_negative_int, metavar="PORT"),
    Option("schema_registry_url", None, "Confluent schema registry: read Rubin wire-format schemas from it and "
           "publish records in the Confluent wire format (else self-describing Avro containers)", metavar="URL"),
    Option("rubin_schema_version", None, "Rubin schema version for wire-format ids lsst-alert-packet does not "
           "know (e.g. 9.0)", metavar="MAJOR.MINOR"),
    Option("republish_alert", False, "publish the original alert with an 'rbstream' score field instead of a "
           "score record", kind="flag"),
    Option("decode_workers", None, "parallel decoding workers (default: service.decode.stamps's choice)",
           type=non_negative_int, metavar="N"),
    Option("decode_isolation", False, "decode every message in worker processes (--decode-workers of them, "
           "default 1), so that a message that crashes the decoder is dead-lettered and the worker replaced",
           kind="flag"),
    Option("monitor_window", WindowSize(alerts=1000), "rolling window of the drift and shadow-agreement gauges, "
           "per survey: N alerts, or Nm minutes", type=parse_window, metavar="{N,Nm}"),
    Option("stats_interval_ms", 5000, "librdkafka statistics interval (consumer lag metric)",
           type=non_negative_int, metavar="MS"),
    RELOAD_OPTION,
) + SHADOW_OPTIONS + LIMIT_OPTIONS


class PublishError(RuntimeError):
    """Messages the producer could not deliver, even to the dead-letter topic: nothing is committed."""


#: Longest wait for delivery confirmations once a stop was asked for (SIGTERM): well inside
#: the chart's termination grace period (60 s), after which the pod would be killed anyway.
STOP_GRACE_S = 20.0


def model_paths(entries: Sequence[str], survey: str) -> dict[str, str]:
    """``--model`` entries (``SURVEY=PATH`` or ``PATH``) as ``survey -> path``.

    A bare path belongs to ``survey`` when it is fixed, else to the survey its model card names.
    """
    from pathlib import Path

    from service.score.model import CARD_FILE, ModelCard, ModelError

    paths: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if sep and name in SURVEYS:
            paths[name] = path
            continue
        path = entry
        if survey != "auto":
            paths[survey] = path
            continue
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        try:
            paths[ModelCard.read(folder / CARD_FILE).survey] = path
        except ModelError as exc:
            raise SettingsError(f"model {path}: cannot tell its survey ({exc}); give SURVEY={path}") from None
    return paths


def load_models(settings: Mapping[str, Any]):
    """The scorers the settings ask for (one per survey), on the asked device."""
    from service.score.model import load_scorers

    surveys = SURVEYS if settings["survey"] == "auto" else (settings["survey"],)
    scorers = load_scorers(settings.get("models_dir"), model_paths(settings.get("model") or [], settings["survey"]),
                           device=settings["device"], surveys=surveys)
    return apply_thresholds(scorers, settings.get("threshold"))


def load_fallback_models(settings: Mapping[str, Any]):
    """The fallback models without a difference image the settings name (``nodiff_model_<survey>``)."""
    from service.score.model import load_fallbacks

    survey = settings.get("survey", "auto")
    surveys = SURVEYS if survey == "auto" else (survey,)
    paths = {s: settings[f"nodiff_model_{s}"] for s in surveys if settings.get(f"nodiff_model_{s}")}
    # A survey's rule holds for its fallback too; a rate is read from the fallback's own card.
    return apply_thresholds(load_fallbacks(paths, device=settings.get("device", "auto")), settings.get("threshold"))


def schema_store(settings: Mapping[str, Any]):
    """The `service.decode.schemas.SchemaStore` for the settings (registry URL, Rubin schema version)."""
    from service.decode.schemas import SchemaStore

    return SchemaStore(registry_url=settings.get("schema_registry_url"),
                       rubin_version=settings.get("rubin_schema_version"),
                       limits=DecodeLimits.from_settings(settings))


def record_encoder(settings: Mapping[str, Any]):
    from service.publish.records import RecordEncoder
    from service.registry import SchemaRegistry

    url = settings.get("schema_registry_url")
    return RecordEncoder(settings["output_topic"], SchemaRegistry(url) if url else None)


#: librdkafka pauses a partition's fetching for ``fetch.queue.backoff.ms`` (default 1 s) once its
#: prefetch queue holds ``queued.max.messages.kbytes`` (64 MB): only ~1,300 ZTF alerts, under a
#: second of work. With the default the consumer idles a large part of the time on a backlog
#: (the README's performance section has the measurement).
FETCH_QUEUE_BACKOFF_MS = 20


def consumer_config(settings: Mapping[str, Any], **callbacks: Any) -> dict[str, Any]:
    """librdkafka consumer config: group, offset reset, statistics, fetching tuned for large alerts;
    manual offset commits enforced.

    ``fetch.wait.max.ms`` is capped at ``max_wait_ms``: the consumer promises a batch within that
    window, and a broker that holds a fetch for its whole wait when new data arrives (tansu does)
    would otherwise add up to librdkafka's 500 ms default to every alert's latency.
    """
    conf = kafka_client_config(settings, "consumer", **{
        "group.id": settings["group_id"],
        "auto.offset.reset": "earliest" if settings["from_beginning"] else "latest",
        "statistics.interval.ms": settings["stats_interval_ms"],
        "fetch.wait.max.ms": min(500, settings["max_wait_ms"]),
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
    })
    for key, value in (("enable.auto.commit", False), ("enable.auto.offset.store", False)):
        if str(conf.get(key, value)).lower() not in ("false", "0"):
            log.warning("ignoring %s=%s: offsets are committed only after delivery (at-least-once)", key, conf[key])
        conf[key] = value
    conf.update({k: v for k, v in callbacks.items() if v is not None})
    return conf


def producer_config(settings: Mapping[str, Any], **callbacks: Any) -> dict[str, Any]:
    """librdkafka producer config: idempotent (acks=all, no duplicates from its own retries), enforced."""
    conf = kafka_client_config(settings, "producer", **{"linger.ms": 5, "compression.type": "lz4"})
    if str(conf.get("enable.idempotence", "true")).lower() not in ("true", "1"):
        log.warning("ignoring enable.idempotence=%s: the producer is idempotent", conf["enable.idempotence"])
    conf["enable.idempotence"] = True
    conf.update({k: v for k, v in callbacks.items() if v is not None})
    return conf


class AlertConsumer:
    """The consume -> score -> publish -> commit loop.

    Parameters
    ----------
    settings : mapping
        Resolved settings (`service.settings.resolve` with `CONSUME_OPTIONS`).
    scorers : mapping of str to service.score.model.Scorer
        Loaded models, one per survey.
    on_batch : callable, optional
        Called with each batch's delivered `Outgoing` messages after its commit (``rbstream run``
        prints them).
    fallbacks : mapping of str to service.score.model.Scorer, optional
        Models without a difference image, for the alerts whose difference cutout is missing
        or unusable; default: those the settings name (`load_fallback_models`).
    shadows : mapping of str to service.score.model.Scorer, optional
        Shadow models scoring beside the primary (`service.stream.shadow`); default: those the
        settings name (`service.stream.shadow.load_shadow_models`).
    """

    def __init__(self, settings: Mapping[str, Any], scorers: Mapping[str, Any],
                 on_batch: Callable[[list[Outgoing]], None] | None = None,
                 fallbacks: Mapping[str, Any] | None = None, shadows: Mapping[str, Any] | None = None):
        self.settings = dict(settings)
        self.scorers = dict(scorers)
        self.fallbacks = dict(load_fallback_models(self.settings) if fallbacks is None else fallbacks)
        self.on_batch = on_batch
        self.pipeline = ScoringPipeline(self.scorers, record_encoder(self.settings), survey=self.settings["survey"],
                                        schemas=schema_store(self.settings), workers=self.settings.get("decode_workers"),
                                        republish_alert=bool(self.settings.get("republish_alert")),
                                        isolate=bool(self.settings.get("decode_isolation")),
                                        fallbacks=self.fallbacks)
        #: The monitoring window's gauges (score drift, shares), fed after each delivered batch.
        self.drift = DriftMonitor(self.scorers, self.settings["monitor_window"])
        self.shadow = ShadowRunner.from_settings(
            self.settings, load_shadow_models(self.settings, self.scorers) if shadows is None else shadows)
        if self.settings.get("max_schema_depth") == 0 and not self.settings.get("decode_isolation"):
            log.warning("max_schema_depth=0 turns the recursion and depth checks off: a recursive schema "
                        "can crash this process; use it only with --decode-isolation")
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self._pending: dict[tuple[str, int], int] = {}
        self._consumer = None
        self._producer = None
        #: True once the broker answered; False after librdkafka reported every broker down.
        self.broker_up = False
        self.assigned: list[tuple[str, int]] = []
        self.batches_committed = 0
        self._running = False
        self._last_loop = time.monotonic()
        self._scoring = None  # the stage-2 thread (a one-worker executor) while running
        self._in_flight: Future | None = None
        self._callback_error: BaseException | None = None
        # Checked new models, from the reloader's thread to this one (put in service between batches).
        self._reloaded: dict[str, Any] = {}
        self._reloaded_lock = threading.Lock()
        self.reloader = ModelReloader(lambda: self.scorers, self._model_ready,
                                      interval=self.settings.get("reload_interval") or 0,
                                      threshold=self.settings.get("threshold"))

    # -- lifecycle ------------------------------------------------------------------------------

    def reload(self) -> None:
        """Check the model files for a new version now (SIGHUP; safe from signal handlers)."""
        self.reloader.request()

    def stop(self) -> None:
        """Ask the loop to stop after the batch in hand (safe from signal handlers and other threads)."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + STOP_GRACE_S
        self._stop.set()

    def _stop_grace_left(self) -> float | None:
        """Seconds left to confirm deliveries since a stop was asked for; None while not stopping."""
        return None if self._stop_deadline is None else self._stop_deadline - time.monotonic()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def consumer_config(self) -> dict[str, Any]:
        return consumer_config(self.settings, stats_cb=self._on_stats, error_cb=self._on_error)

    def producer_config(self) -> dict[str, Any]:
        return producer_config(self.settings, error_cb=self._on_error)

    def _open(self) -> None:
        from confluent_kafka import Consumer, Producer

        s = self.settings
        consumer_conf = self.consumer_config()
        log.info("consumer config %s", redact(consumer_conf))
        self._producer = Producer(self.producer_config())
        self._consumer = Consumer(consumer_conf)
        self._consumer.subscribe([s["input_topic"]], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        models = ", ".join(f"{survey}={sc.card.name} {sc.card.version} on {sc.provider}, "
                           f"threshold {sc.threshold:.4g} ({sc.threshold_rule})"
                           for survey, sc in {**self.scorers, **{f"{s} fallback": f for s, f in
                                                                  self.fallbacks.items()}}.items())
        log.info("consuming %s from %s as group %s (survey %s); scores -> %s, dead letters -> %s; "
                 "batches of <= %d alerts or %d ms; models: %s", s["input_topic"], s["bootstrap_servers"],
                 s["group_id"], s["survey"], s["output_topic"], s["dlq_topic"], s["batch_size"],
                 s["max_wait_ms"], models)
        metrics.record_models(self.scorers)
        if self.shadow:
            log.info("shadow models (best effort, off the commit path; scores -> %s): %s", self.shadow.topic,
                     self.shadow.describe(self.scorers))
            self.shadow.start(producer_config(self.settings))
        self._check_topics()

    def _check_topics(self) -> None:
        """Warn early about output topics the broker does not know (unless it auto-creates them,
        their records would wait for ``message.timeout.ms`` before failing)."""
        try:
            known = self._consumer.list_topics(timeout=10).topics
        except Exception as exc:  # KafkaException: the broker is not reachable yet; the loop will retry
            log.warning("cannot list the broker's topics yet: %s", exc)
            return
        for topic in (self.settings["input_topic"], self.settings["output_topic"], self.settings["dlq_topic"]):
            if topic not in known:
                log.warning("topic %s does not exist (yet); it must be created unless the broker auto-creates "
                            "topics", topic)

    def run(self) -> int:
        """Consume until `stop` is called; returns the exit code (0 after a clean stop)."""
        from concurrent.futures import ThreadPoolExecutor

        self._open()
        self._scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rbstream-score")
        self.reloader.start()
        self._running = True
        try:
            while not self._stop.is_set():
                self._last_loop = time.monotonic()
                messages = self._consumer.consume(num_messages=self.settings["batch_size"],
                                                  timeout=self.settings["max_wait_ms"] / 1000)
                self._raise_callback_error()
                sources = self.sources(messages)
                decoded = self.pipeline.decode(sources) if sources else None
                self.complete_in_flight()
                self._switch_models(decoded)  # stage 2 is idle: between two batches
                if decoded is not None:
                    self._in_flight = self._scoring.submit(self.score_and_publish, decoded)
            self.complete_in_flight()
            log.info("stopping: batch finished, offsets committed")
            return 0
        finally:
            self._running = False
            self._close()

    # -- probes (called from the HTTP server's threads) ------------------------------------------

    #: The loop must come back to fetch within this many seconds to count as alive.
    LIVENESS_SECONDS = 300.0

    def health(self) -> tuple[bool, str]:
        """Alive: the loop runs and came back to fetch within `LIVENESS_SECONDS`."""
        if not self._running:
            return (False, "stopped") if self._stop.is_set() else (True, "starting")
        idle = time.monotonic() - self._last_loop
        if idle > self.LIVENESS_SECONDS:
            return False, f"the consume loop has been stuck for {idle:.0f} s"
        return True, f"consume loop alive; {self.batches_committed} batches committed"

    def readiness(self) -> tuple[bool, str]:
        """Ready: the loop runs and the broker answers (partitions assigned, or statistics from it)."""
        if not self._running:
            return False, "the consume loop is not running"
        if not self.broker_up:
            return False, f"broker {self.settings['bootstrap_servers']} not reached yet"
        partitions = ", ".join(f"{t}/{p}" for t, p in self.assigned) or "none yet"
        return True, f"broker {self.settings['bootstrap_servers']} reachable; assigned: {partitions}"

    def _close(self) -> None:
        self.reloader.stop()
        if self._scoring is not None:
            self._scoring.shutdown(wait=True)
            self._scoring = None
        if self._producer is not None:
            left = self._stop_grace_left()
            self._producer.flush(30 if left is None else max(left, 1.0))
            self._producer = None
        if self._consumer is not None:
            self._consumer.close()  # leaves the group (on_revoke commits anything pending)
            self._consumer = None
        self.shadow.stop()  # after the group is left: its drain holds up no rebalance

    # -- model reload ---------------------------------------------------------------------------

    def _model_ready(self, survey: str, scorer) -> None:
        """A checked new model (from the reloader's thread): put in service before the next batch."""
        with self._reloaded_lock:
            self._reloaded[survey] = scorer

    def _switch_models(self, next_batch: DecodedBatch | None) -> None:
        """Put the checked new models in service; called on this thread while stage 2 is idle, so
        that the batch about to be scored, and every later one, is scored by the new version."""
        with self._reloaded_lock:
            ready, self._reloaded = self._reloaded, {}
        if not ready:
            return
        previous, self.scorers = self.scorers, {**self.scorers, **ready}
        self.pipeline.use_models(self.scorers)
        first = next_batch.messages[0] if next_batch is not None and next_batch.messages else None
        for survey, scorer in ready.items():
            old = previous.get(survey)
            metrics.record_model_switch(survey, old, scorer)
            self.drift.use_model(survey, scorer)
            log.info("%s: now scoring with %s %s (was %s), from %s", survey, scorer.card.name, scorer.card.version,
                     f"{old.card.name} {old.card.version}" if old is not None else "none",
                     f"the batch at {first.topic}/{first.partition}@{first.offset}" if first else "the next batch")

    # -- one batch ------------------------------------------------------------------------------

    @staticmethod
    def sources(messages) -> list[SourceMessage]:
        """The alert messages of a ``consume()`` result (partition EOF and fetch errors carry none)."""
        sources = []
        for message in messages:
            if message.error():
                if message.error().fatal():
                    raise RuntimeError(f"fatal consumer error: {message.error()}")
                log.warning("consumer: %s", message.error())
                continue
            sources.append(SourceMessage.from_kafka(message))
        return sources

    def score_and_publish(self, decoded: DecodedBatch) -> tuple[list[SourceMessage], list[Outgoing]]:
        """Stage 2 (the scoring thread): score, encode, deliver; returns the batch and what was delivered."""
        try:
            outcome = self.pipeline.score(decoded)
        except RegistryUnreachable as exc:
            raise PublishError(str(exc)) from exc
        self.shadow.offer(self.pipeline, decoded, outcome)  # never blocks: scored off this path
        delivered = self.publish(outcome.messages)
        self._record_metrics(list(decoded.messages), outcome, delivered)
        return list(decoded.messages), delivered

    def complete_in_flight(self) -> None:
        """Wait for the batch in stage 2, then commit its offsets (stage 3).

        Raises
        ------
        PublishError
            When the batch could not be delivered: it is not committed.
        """
        future, self._in_flight = self._in_flight, None
        if future is None:
            return
        sources, delivered = future.result()
        for source in sources:
            key = (source.topic, source.partition)
            self._pending[key] = max(self._pending.get(key, -1), source.offset + 1)
        self.commit()
        if self.on_batch is not None:
            self.on_batch(delivered)

    def _raise_callback_error(self) -> None:
        error, self._callback_error = self._callback_error, None
        if error is not None:
            raise error

    def _produce(self, outgoing: Sequence[Outgoing]) -> list[tuple[Outgoing, Any]]:
        """Produce and wait for every delivery report; returns ``(message, error or None)`` per message."""
        reports: list[Any] = [None] * len(outgoing)
        done = [False] * len(outgoing)

        def report(i):
            def callback(error, _message):
                reports[i] = error
                done[i] = True
            return callback

        for i, out in enumerate(outgoing):
            topic = self.settings["output_topic"] if out.is_score else self.settings["dlq_topic"]
            while True:
                try:
                    self._producer.produce(topic, value=out.value, key=out.key, headers=out.headers,
                                           on_delivery=report(i))
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self._producer.poll(0.1)
        while not all(done):
            # Retries are librdkafka's job (idempotent, bounded by message.timeout.ms); keep waiting,
            # unless a stop was asked for long enough ago: the batch is then not committed (re-read).
            left = self._stop_grace_left()
            if left is not None and left <= 0:
                raise PublishError(f"stopping: {done.count(False)} deliveries not confirmed within "
                                   f"{STOP_GRACE_S:.0f} s of the stop signal")
            self._producer.flush(1.0)
        return list(zip(outgoing, reports))

    def publish(self, outgoing: list[Outgoing]) -> list[Outgoing]:
        """Deliver the batch's messages; a score that cannot be delivered goes to the DLQ (kind ``publish``).

        Raises
        ------
        PublishError
            When a dead letter cannot be delivered either: the batch is not committed.
        """
        start = time.perf_counter()
        results = self._produce(outgoing)
        delivered = [out for out, error in results if error is None]
        retry = []
        for out, error in results:
            if error is None:
                continue
            if not out.is_score:
                raise PublishError(f"dead letter for {out.source.topic}/{out.source.partition}/"
                                   f"{out.source.offset} not delivered: {error}")
            log.error("score of %s/%d/%d not delivered: %s", out.source.topic, out.source.partition,
                      out.source.offset, error)
            retry.append(dead_letter(out.source, "publish", f"score record not delivered: {error}", out.survey))
        # One dead letter per source message, however many of its records failed.
        unique = {id(d.source): d for d in retry}
        for out, error in self._produce(list(unique.values())):
            if error is not None:
                raise PublishError(f"dead letter for {out.source.topic}/{out.source.partition}/"
                                   f"{out.source.offset} not delivered: {error}")
            delivered.append(out)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - start)
        return delivered

    def commit(self) -> None:
        """Commit the offsets of delivered batches (synchronously)."""
        from confluent_kafka import KafkaException, TopicPartition

        if not self._pending or self._consumer is None:
            return
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in self._pending.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Typically a rebalance took the partitions: their new owner re-reads this batch
            # (a bounded duplicate, never a loss).
            log.warning("commit of %s failed: %s", offsets, exc)
        else:
            self.batches_committed += 1
            log.debug("committed %s", {f"{t}/{p}": o for (t, p), o in self._pending.items()})
        self._pending.clear()

    def _record_metrics(self, sources: list[SourceMessage], outcome: Outcome, delivered: list[Outgoing]) -> None:
        now = time.time()
        for survey, n in outcome.batch_sizes.items():
            metrics.BATCH_SIZE.observe(n)
        metrics.DECODE_SECONDS.observe(outcome.decode_seconds)
        if outcome.batch_sizes:
            metrics.INFERENCE_SECONDS.observe(outcome.inference_seconds)
        survey_of: dict[int, str] = {}
        for out in delivered:
            survey_of.setdefault(id(out.source), out.survey)
            if out.is_score:
                metrics.ALERTS_SCORED.labels(survey=out.survey).inc()
                if out.record is not None:
                    metrics.SCORE.labels(survey=out.survey).observe(out.record["score"])
                if out.source.timestamp_ms is not None:
                    metrics.ALERT_LATENCY.observe(max(0.0, now - out.source.timestamp_ms / 1000))
            else:
                metrics.ALERTS_FAILED.labels(survey=out.survey, reason=out.kind).inc()
        for source in sources:
            metrics.ALERTS_CONSUMED.labels(survey=survey_of.get(id(source), "unknown")).inc()
        self.drift.observe(delivered)

    # -- librdkafka callbacks (run inside consume()/poll() on this thread) -----------------------

    def _on_assign(self, consumer, partitions) -> None:
        self.assigned = [(p.topic, p.partition) for p in partitions]
        self.broker_up = True
        log.info("assigned %s", ", ".join(f"{t}/{p}" for t, p in self.assigned) or "nothing")

    def _on_revoke(self, consumer, partitions) -> None:
        # Called inside consume(): the batch in the scoring thread may hold these partitions'
        # messages. Finish and commit it before they go; the batch decoded on this thread was
        # not fetched yet when this runs, so nothing else is pending.
        log.info("revoked %s", ", ".join(f"{p.topic}/{p.partition}" for p in partitions) or "nothing")
        try:
            self.complete_in_flight()
        except Exception as exc:  # raised from consume() by the loop: a callback must not raise
            self._callback_error = exc
        self.commit()
        self.assigned = []

    def _on_lost(self, consumer, partitions) -> None:
        log.warning("partitions lost: %s (their uncommitted batch will be re-read by their new owner)",
                    ", ".join(f"{p.topic}/{p.partition}" for p in partitions))
        self._pending.clear()
        self.assigned = []

    def _on_error(self, error) -> None:
        from confluent_kafka import KafkaError

        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.broker_up = False if error.code() == KafkaError._ALL_BROKERS_DOWN else self.broker_up
        log.warning("kafka: %s", error)

    def _on_stats(self, text: str) -> None:
        try:
            stats = json.loads(text)
        except ValueError:
            return
        brokers = stats.get("brokers", {}).values()
        self.broker_up = any(b.get("state") == "UP" for b in brokers if b.get("nodeid", -1) >= 0) or self.broker_up
        for topic, info in stats.get("topics", {}).items():
            for partition, p in info.get("partitions", {}).items():
                lag = p.get("consumer_lag", -1)
                if partition != "-1" and lag is not None and lag >= 0:
                    metrics.CONSUMER_LAG.labels(topic=topic, partition=partition).set(lag)


def probe_app(consumer: AlertConsumer, registry=None):
    """WSGI app of the consumer's port: ``/healthz``, ``/readyz`` (JSON, 200 or 503), else Prometheus metrics."""
    from prometheus_client import REGISTRY, make_wsgi_app

    metrics_app = make_wsgi_app(registry or REGISTRY)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(environ, start_response)
        ok, detail = consumer.health() if path == "/healthz" else consumer.readiness()
        body = json.dumps({"ok": ok, "detail": detail}).encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve_probes(consumer: AlertConsumer, port: int, host: str = "0.0.0.0"):
    """Serve `probe_app` on ``host:port`` from a daemon thread; returns the server."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):  # Prometheus scrapes every few seconds: no access log
            pass

    server = make_server(host, port, probe_app(consumer), server_class=Server, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CONSUME_OPTIONS)


def install_signal_handlers(stop: Callable[[], None], reload: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT ask for a clean stop (finish the batch, flush, commit, exit 0); SIGHUP
    calls ``reload`` (check the model files now), or stops too when there is none."""
    from service.lifecycle import on_stop_signals

    def handler(signum: signal.Signals) -> None:
        log.info("%s received: finishing the batch in hand", signum.name)
        stop()

    on_stop_signals(handler, reload=reload)


def main(args: argparse.Namespace) -> int:
    from service.score.model import ModelError

    try:
        settings = resolve(args, CONSUME_OPTIONS)
        scorers = load_models(settings)
        fallbacks = load_fallback_models(settings)
        shadows = load_shadow_models(settings, scorers)
    except (SettingsError, ModelError) as exc:
        log.error("%s", exc)
        return 2
    consumer = AlertConsumer(settings, scorers, fallbacks=fallbacks, shadows=shadows)
    if settings.get("metrics_port"):
        serve_probes(consumer, settings["metrics_port"])
        log.info("metrics on http://0.0.0.0:%d/metrics, probes on /healthz and /readyz", settings["metrics_port"])
    install_signal_handlers(consumer.stop, consumer.reload)
    try:
        return consumer.run()
    except PublishError as exc:
        log.error("%s; exiting without committing the batch (it will be re-read)", exc)
        return 1
