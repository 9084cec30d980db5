"""Prometheus metrics of the consumer and the API (documented in the README).

Both processes register into the default registry; the API serves them on
``/metrics``, the consumer on its own port (``--metrics-port``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Failure reasons, the label values of `ALERTS_FAILED` (and the DLQ's ``rbstream.reason.kind`` header).
FAILURE_REASONS = ("decode", "schema", "cutout", "inference", "publish")

_BATCH_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

ALERTS_CONSUMED = Counter("rbstream_alerts_consumed", "Alert messages read from Kafka.", ["survey"])
ALERTS_SCORED = Counter("rbstream_alerts_scored", "Alerts scored and whose score record was delivered.", ["survey"])
ALERTS_FAILED = Counter("rbstream_alerts_failed", "Alerts not scored, by reason (sent to the dead-letter topic).",
                        ["survey", "reason"])
BATCH_SIZE = Histogram("rbstream_batch_size", "Alerts per inference batch.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
DECODE_SECONDS = Histogram("rbstream_decode_seconds", "Time to decode one batch of alert messages.",
                           buckets=_BATCH_SECONDS)
INFERENCE_SECONDS = Histogram("rbstream_inference_seconds", "Time of one batch's model inference.",
                              buckets=_BATCH_SECONDS)
PUBLISH_SECONDS = Histogram("rbstream_publish_seconds", "Time to publish one batch and confirm its delivery.",
                            buckets=_BATCH_SECONDS)
ALERT_LATENCY = Histogram("rbstream_alert_latency_seconds",
                          "From an alert's Kafka timestamp to the delivery of its score.", buckets=_LATENCY_SECONDS)
CONSUMER_LAG = Gauge("rbstream_consumer_lag", "Messages behind the partition's high watermark (librdkafka stats).",
                     ["topic", "partition"])
SCORE = Histogram("rbstream_score", "Real-bogus scores given, per survey.", ["survey"],
                  buckets=tuple(round(0.05 * i, 2) for i in range(1, 21)))
MODEL_INFO = Gauge("rbstream_model_info", "The model in service (value 1).", ["survey", "name", "version", "provider"])
# The monitoring window's gauges (`service.stream.drift`), set after each delivered batch.
SCORE_PSI = Gauge("rbstream_score_psi", "Population stability index of the scores in the monitoring window against "
                  "the model card's reference histogram (real validation split), over the reference's bins; not "
                  "exported for a model without a reference.", ["survey"])
SCORE_KS = Gauge("rbstream_score_ks", "Kolmogorov-Smirnov statistic of the scores in the monitoring window against "
                 "the model card's reference: the largest CDF difference, evaluated at the bin edges of the binned "
                 "reference; not exported for a model without a reference.", ["survey"])
SHARE_REAL = Gauge("rbstream_share_real", "Share of the scored alerts in the monitoring window labelled real.",
                   ["survey"])
REFERENCE_SHARE_REAL = Gauge("rbstream_reference_share_real", "Share of the model card's reference scored real at "
                             "the threshold in use.", ["survey"])
SHARE_UNDECODABLE = Gauge("rbstream_share_undecodable", "Share of the messages in the monitoring window that could "
                          "not be decoded into model input (dead-lettered as decode, schema or cutout).", ["survey"])
MONITOR_WINDOW_ALERTS = Gauge("rbstream_monitor_window_alerts", "Entries in the monitoring window: scored alerts and "
                              "dead-lettered messages.", ["survey"])
MONITOR_WINDOW_SCORES = Gauge("rbstream_monitor_window_scores", "Scores by the survey's model in the monitoring "
                              "window: what rbstream_score_psi and rbstream_score_ks are computed over.", ["survey"])

# The shadow model (``rbstream consume --shadow-model``, `service.stream.shadow`): its own
# counts and how it agrees with the primary over the rolling window (``--monitor-window``).
SHADOW_MODEL_INFO = Gauge("rbstream_shadow_model_info", "The shadow model beside the primary (value 1).",
                          ["survey", "name", "version", "provider"])
SHADOW_ALERTS_SCORED = Counter("rbstream_shadow_alerts_scored", "Alerts the shadow model scored beside the primary.",
                               ["survey"])
SHADOW_ALERTS_SKIPPED = Counter("rbstream_shadow_alerts_skipped",
                                "Alerts left unshadowed because the shadow was still busy with earlier batches.",
                                ["survey"])
SHADOW_FAILURES = Counter("rbstream_shadow_failures", "Alerts the shadow model could not score or publish, by kind.",
                          ["survey", "kind"])
SHADOW_RANK_CORRELATION = Gauge("rbstream_shadow_rank_correlation",
                                "Spearman rank correlation of primary and shadow scores over the rolling window.",
                                ["survey"])
SHADOW_LABEL_FLIP_SHARE = Gauge("rbstream_shadow_label_flip_share",
                                "Share of the rolling window's alerts labelled differently by primary and shadow "
                                "(each with its own threshold).", ["survey"])
SHADOW_WINDOW_ALERTS = Gauge("rbstream_shadow_window_alerts", "Alerts in the window the agreement gauges cover.",
                             ["survey"])

#: ``result`` of `MODEL_RELOADS`: a new model put in service, or refused (the old one keeps serving).
RELOAD_RESULTS = ("loaded", "refused")
MODEL_RELOADS = Counter("rbstream_model_reloads", "New model versions loaded or refused (service.score.reload).",
                        ["survey", "result"])
HTTP_REQUESTS = Counter("rbstream_http_requests", "HTTP requests answered by the API.", ["route", "status"])
HTTP_REQUEST_SECONDS = Histogram("rbstream_http_request_seconds", "HTTP request handling time.", ["route"],
                                 buckets=_BATCH_SECONDS)


def record_models(scorers) -> None:
    """Set `MODEL_INFO` for each loaded `service.score.model.Scorer` (a mapping survey -> scorer)."""
    for survey, scorer in scorers.items():
        MODEL_INFO.labels(survey=survey, name=scorer.card.name, version=scorer.card.version,
                          provider=scorer.provider).set(1)


def record_model_switch(survey: str, old, new) -> None:
    """`MODEL_INFO` after ``survey``'s model ``old`` (a Scorer, or None) was replaced by ``new``."""
    if old is not None:
        try:
            MODEL_INFO.remove(survey, old.card.name, old.card.version, old.provider)
        except KeyError:  # never recorded
            pass
    record_models({survey: new})
