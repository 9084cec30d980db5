"""``rbstream run`` (``make run``): the whole service on one machine, fed with real alerts.

It starts, in this one process,

1. a local Kafka-compatible broker (`service.tools.broker.LocalBroker`, tansu, in memory),
2. the API (`service.api.app.create_app` under uvicorn) — ``/classify``, ``/readyz`` (which
   also checks that the broker answers), ``/metrics`` (the consumer's metrics too),
3. the consumer (`service.stream.consumer.AlertConsumer`) reading topic ``alerts`` and writing
   ``scores`` and ``alerts-dlq``,

then replays the sample alerts (ZTF as Avro containers, Rubin in the Confluent wire format,
as each survey streams them), prints one line per score record and per rejected alert as
they arrive on the output topics, and keeps serving until Ctrl-C (or SIGTERM or SIGHUP),
when it stops the replay, the consumer cleanly (batch finished, offsets committed), the API
and the broker, and exits 0. The broker is a child process; if ``run`` itself is killed
(SIGKILL), the kernel stops it too (Linux, `service.lifecycle`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from service.stream import pipeline
from service.surveys import SURVEYS, display_name
from service.score.model import DEVICES
from service.score.thresholds import THRESHOLD_HELP, apply_thresholds, parse_threshold
from service.settings import (Option, SettingsError, add_options, non_negative_int,
                              positive_float, positive_int, resolve)

log = logging.getLogger(__name__)

INPUT_TOPIC = "alerts"
OUTPUT_TOPIC = "scores"
DLQ_TOPIC = "alerts-dlq"
GROUP_ID = "rbstream-run"



def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pick_port(wanted: int, host: str, what: str) -> int:
    """``wanted`` if free, else a free port (said so); 0 means any free port."""
    from service.tools.broker import free_port

    if wanted and _port_free(wanted, host):
        return wanted
    port = free_port(host)
    if wanted:
        print(f"port {wanted} is busy; the {what} uses port {port}", flush=True)
    return port


# -- what is printed -----------------------------------------------------------------------------

def score_line(record: Mapping[str, Any]) -> str:
    """One line for a score record: survey, object id, candidate id, score, label, model, and the
    survey's own score when the alert has one (``survey drb 0.998``, ``survey reliability 0.420``)."""
    survey = display_name(record.get("survey"))
    theirs = record.get("survey_score")
    theirs = f"  survey {record.get('survey_score_name') or 'score'} {theirs:.3f}" if theirs is not None else ""
    return (f"  {survey:<5}  object {record.get('object_id') or '-':<20}  candidate {record.get('candidate_id'):<20}"
            f"  score {record.get('score', float('nan')):.3f}  {record.get('label', '?'):<5}"
            f"  {record.get('model_name')} {record.get('model_version')}{theirs}")


def rejected_line(letter: Mapping[str, Any], samples_root: Path | None = None) -> str:
    """One line for a dead letter: file (or topic/partition/offset) and reason."""
    source = letter.get("source") or {}
    where = source.get("file")
    if where and samples_root is not None:
        try:
            where = str(Path(where).resolve().relative_to(samples_root.resolve()))
        except ValueError:
            pass
    place = f"{source.get('topic')}/{source.get('partition')}@{source.get('offset')}"
    where = f"{where} ({place})" if where else place
    return f"  REJECTED  {where}: [{letter.get('reason_kind')}] {letter.get('reason')}"


class Printer:
    """Prints the score and dead-letter topics as they fill (its own reader, no consumer group)."""

    def __init__(self, settings: Mapping, samples_root: Path | None, out=sys.stdout):
        self.settings = settings
        self.samples_root = samples_root
        self.out = out
        self.scored = 0
        self.rejected = 0
        self.by_survey: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="printer", daemon=True)

    @property
    def seen(self) -> int:
        return self.scored + self.rejected

    def start(self) -> "Printer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from service.settings import kafka_client_config
        from service.tools.tail import message_json

        consumer = Consumer(kafka_client_config(self.settings, "consumer", **{
            "group.id": "rbstream-run-printer", "enable.auto.commit": False}))
        try:
            partitions = []
            for topic in (OUTPUT_TOPIC, DLQ_TOPIC):
                info = consumer.list_topics(topic, timeout=10).topics[topic]
                partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(info.partitions)]
            consumer.assign(partitions)
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if message is None or message.error():
                    continue
                headers = pipeline.headers_to_text(message.headers())
                for item in message_json(message.value() or b"", headers):
                    if item.get("dead_letter"):
                        self.rejected += 1
                        line = rejected_line(item, self.samples_root)
                    else:
                        self.scored += 1
                        self.by_survey[item.get("survey")] = self.by_survey.get(item.get("survey"), 0) + 1
                        line = score_line(item)
                    print(line, file=self.out, flush=True)
        finally:
            consumer.close()


# -- the command ---------------------------------------------------------------------------------

#: Options of ``rbstream run`` (flag ``--NAME``, key ``NAME`` of ``--config``, ``RBSTREAM_<NAME>`` unless
#: named otherwise: host and port are the API's, as for ``rbstream serve``).
RUN_OPTIONS: tuple[Option, ...] = (
    Option("samples", ["../shared/data"], "alert files or folders to replay", kind="list", nargs="+",
           env_var="RBSTREAM_SAMPLE_DATA", metavar="PATH"),
    Option("host", "127.0.0.1", "API host", env_var="RBSTREAM_API_HOST", metavar="HOST"),
    Option("port", 8000, "API port (another free one if busy; 0: any)", type=non_negative_int,
           env_var="RBSTREAM_API_PORT", metavar="PORT"),
    Option("broker_port", 9092, "local broker port (another free one if busy; 0: any)", type=non_negative_int,
           metavar="PORT"),
    Option("models_dir", None, "models folder (default models/)", metavar="DIR"),
    *(Option(f"nodiff_model_{survey}", None, f"fallback {display_name(survey)} model without the difference image "
             f"(e.g. models/{survey}-nodiff): scores the alerts whose difference cutout is missing or unusable, "
             "as rbstream consume and serve do", metavar="PATH") for survey in SURVEYS),
    Option("threshold", None, THRESHOLD_HELP, type=parse_threshold, metavar="[SURVEY:]{T,fpr=X,tpr=Y}[,...]"),
    Option("device", "auto", "where to run the models (auto: CUDA when usable, else CPU)", choices=DEVICES,
           metavar="{" + ",".join(DEVICES) + "}"),
    Option("batch_size", 64, "consumer batch size", type=positive_int, metavar="N"),
    Option("rate", None, "replay rate, alerts per second (default: all at once)", type=positive_float,
           metavar="PER_S"),
    Option("repeat", 1, "replay the samples this many times", type=positive_int, metavar="N"),
    Option("wire_format", True, "replay Rubin alerts in the Confluent wire format (--no-wire-format: as Avro "
           "containers)", kind="flag"),
    Option("exit_after_replay", False, "stop once every replayed alert is accounted for (else serve until Ctrl-C)",
           kind="flag"),
    Option("verbose", False, "show the service's INFO logs between the score lines (default: warnings only)",
           kind="flag"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, RUN_OPTIONS)


def _start_api(scorers, host: str, port: int, readiness_checks, bootstrap_servers: str | None = None,
               fallbacks=None):
    from service.api.app import ApiSettings, create_app
    from service.api.server import ApiServer, server_config

    # The scanning page (/scan) queues the last alerts of the stream this run scores.
    settings = ApiSettings(scan_topic=INPUT_TOPIC, scan_bootstrap_servers=bootstrap_servers) if bootstrap_servers \
        else None
    app = create_app(scorers, settings, readiness_checks=readiness_checks, fallbacks=fallbacks or {})
    server = ApiServer(server_config(app, host, port, log_level="warning", lifespan="on"))
    # In a thread uvicorn installs no signal handlers: Ctrl-C stays ours.
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"the API did not start on {host}:{port}")
    return server, thread


def _create_topics(bootstrap_servers: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1)
                                   for t in (INPUT_TOPIC, OUTPUT_TOPIC, DLQ_TOPIC)])
    for topic, future in futures.items():
        try:
            future.result(timeout=10)
        except Exception as exc:  # already there is fine
            if "exist" not in str(exc).lower():
                raise


def main(args: argparse.Namespace) -> int:
    from service.tools import replay
    from service.tools.broker import LocalBroker
    from service.stream.consumer import AlertConsumer, CONSUME_OPTIONS
    from service.score.model import ModelError, load_fallbacks, load_scorers

    from service.lifecycle import on_stop_signals

    try:
        options = resolve(args, RUN_OPTIONS)
    except SettingsError as exc:
        print(f"rbstream run: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: signal.Signals) -> None:
        if not stop.is_set():
            print(f"\n{signum.name}: stopping (finishing the batch in hand)...", flush=True)
        stop.set()

    on_stop_signals(on_signal)
    if not options["verbose"]:
        # One line per alert reads best without the INFO logs of every part in between.
        service_log = logging.getLogger("service")
        service_log.setLevel(max(service_log.getEffectiveLevel(), logging.WARNING))

    samples = [Path(p) for p in options["samples"]]
    try:
        messages = replay.load_messages(samples, wire_format=options["wire_format"])
        scorers = apply_thresholds(load_scorers(options["models_dir"], device=options["device"]),
                                   options["threshold"])
        fallbacks = apply_thresholds(
            load_fallbacks({s: options[f"nodiff_model_{s}"] for s in SURVEYS if options[f"nodiff_model_{s}"]},
                           device=options["device"]), options["threshold"])
    except (FileNotFoundError, ModelError, SettingsError) as exc:
        print(f"rbstream run: {exc}", file=sys.stderr)
        return 2
    samples_root = samples[0] if len(samples) == 1 and samples[0].is_dir() else None

    print("rbstream: real/bogus scores for ZTF and Rubin alerts", flush=True)
    for survey, scorer in scorers.items():
        print(f"  model  {display_name(survey):<5}  {scorer.card.name} {scorer.card.version}"
              f"  threshold {scorer.threshold:.3f} ({scorer.threshold_rule})  on {scorer.provider}", flush=True)
    for survey, scorer in fallbacks.items():
        print(f"  model  {display_name(survey):<5}  {scorer.card.name} {scorer.card.version}"
              f"  threshold {scorer.threshold:.3f} ({scorer.threshold_rule})  on {scorer.provider}"
              "  (no difference image: for alerts without a usable one)", flush=True)

    broker_log = Path(tempfile.gettempdir()) / f"rbstream-run-tansu-{os.getpid()}.log"
    broker = LocalBroker(port=_pick_port(options["broker_port"], "127.0.0.1", "broker"), log_path=broker_log)
    consumer = server = printer = admin = None
    consumer_thread = api_thread = None
    exit_code = 0
    try:
        broker.start()
        print(f"  broker {broker.bootstrap_servers} (tansu, in memory; log {broker_log})", flush=True)
        _create_topics(broker.bootstrap_servers)
        settings = resolve(argparse.Namespace(
            bootstrap_servers=broker.bootstrap_servers, input_topic=INPUT_TOPIC, output_topic=OUTPUT_TOPIC,
            dlq_topic=DLQ_TOPIC, group_id=GROUP_ID, from_beginning=True, batch_size=options["batch_size"],
            device=options["device"], kafka_option=["consumer.session.timeout.ms=6000"],
            reload_interval=0),  # the in-process API does not reload: neither does the consumer
            CONSUME_OPTIONS, environ={})
        consumer = AlertConsumer(settings, scorers, fallbacks=fallbacks)

        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})

        def broker_reachable():
            """The in-process consumer's broker answers a metadata request, and the consumer runs."""
            if consumer_thread is None or not consumer_thread.is_alive():
                return False, "the consumer is not running"
            admin.list_topics(timeout=2)
            return True, f"broker {broker.bootstrap_servers} reachable"

        host = options["host"]
        api_port = _pick_port(options["port"], host, "API")
        server, api_thread = _start_api(scorers, host, api_port, [broker_reachable], broker.bootstrap_servers,
                                        fallbacks)
        url = f"http://{host}:{api_port}"
        print(f"  API    {url}  (POST /classify, /readyz, /model, docs {url}/docs)", flush=True)
        print(f"  metrics {url}/metrics", flush=True)

        consumer_thread = threading.Thread(target=consumer.run, name="consumer", daemon=True)
        consumer_thread.start()
        printer = Printer({"bootstrap_servers": broker.bootstrap_servers, "kafka": {}}, samples_root).start()

        total = len(messages) * options["repeat"]
        print(f"replaying {total} alerts from {', '.join(map(str, samples))} into topic {INPUT_TOPIC!r} "
              f"(scores -> {OUTPUT_TOPIC!r}, rejected -> {DLQ_TOPIC!r}):", flush=True)
        result = replay.replay({"bootstrap_servers": broker.bootstrap_servers, "kafka": {}}, INPUT_TOPIC, messages,
                               rate=options["rate"], repeat=options["repeat"], progress=False, stop=stop)
        while printer.seen < result.sent and not stop.is_set() and consumer_thread.is_alive():
            time.sleep(0.1)
        if printer.seen >= result.sent:
            per_survey = ", ".join(f"{n} {display_name(s)}" for s, n in sorted(printer.by_survey.items()))
            print(f"done: {result.sent} alerts replayed, {printer.scored} scored ({per_survey}), "
                  f"{printer.rejected} rejected.", flush=True)
        if not consumer_thread.is_alive():
            print("the consumer stopped unexpectedly (see the log above)", file=sys.stderr, flush=True)
            exit_code = 1
        elif not options["exit_after_replay"] and not stop.is_set():
            print(f"serving: API {url}, metrics {url}/metrics, broker {broker.bootstrap_servers} "
                  f"(topic {INPUT_TOPIC!r}: `rbstream replay --bootstrap-servers {broker.bootstrap_servers} "
                  f"--topic {INPUT_TOPIC} FILES` scores more). Ctrl-C stops.", flush=True)
            while not stop.is_set() and consumer_thread.is_alive():
                stop.wait(0.5)
    finally:
        if consumer is not None:
            consumer.stop()
            if consumer_thread is not None:
                consumer_thread.join(timeout=60)
        if printer is not None:
            printer.stop()
        if server is not None:
            server.should_exit = True
            api_thread.join(timeout=10)
        admin = None  # librdkafka handles go before the broker, or they log its disappearance
        broker.stop()
    print("stopped cleanly." if exit_code == 0 else "stopped.", flush=True)
    return exit_code
