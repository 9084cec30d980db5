"""``rbstream replay``: produce alert files into a Kafka topic, like a survey's stream.

Each file is an Avro object container holding one or more alerts; each alert becomes one
Kafka message, framed the way the surveys frame them:

* a file holding one alert is sent byte for byte (exactly a ZTF message);
* a file holding several is split into one single-alert container per alert;
* with ``--wire-format``, Rubin alerts are re-framed in the Confluent wire format with the
  official ``lsst-alert-packet`` schema of their version (`service.decode.schemas.to_wire_format`),
  as the live Rubin stream carries them; ZTF alerts stay containers (ZTF's own framing), and
  so does a Rubin alert that the official schema cannot hold (a warning names the field);
* a file that is not an Avro container is sent as it is, as one message (handy to see the
  consumer's dead-letter handling).

Every message carries a header ``rbstream.source.file`` naming its file (``#i`` for the
i-th alert of a multi-alert file), which the consumer copies into dead letters.

SIGTERM, SIGINT or SIGHUP stops the sending; what was already handed to the producer is
delivered (waiting at most `STOP_FLUSH_S`), the count is printed, and the exit code is 0
when everything sent was delivered.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from service.lifecycle import on_stop_signals, restore_signals
from service.surveys import SURVEYS
from service.stream.pipeline import HEADER_SOURCE_FILE
from service.settings import (COMMON_OPTIONS, Option, SettingsError, add_options, kafka_client_config,
                              positive_int, resolve)

log = logging.getLogger(__name__)

REPLAY_OPTIONS: tuple[Option, ...] = COMMON_OPTIONS + (
    Option("topic", None, "topic to produce the alerts to", required=True, metavar="TOPIC"),
    Option("rate", None, "messages per second (default: as fast as possible)", type=float, metavar="R"),
    Option("survey", None, "survey of the files (default: recognised from each alert's fields)",
           choices=(None, *SURVEYS)),
    Option("wire_format", False, "send Rubin alerts in the Confluent wire format with the official "
           "lsst-alert-packet schema", kind="flag"),
    Option("repeat", 1, "send the files this many times (a longer stream)", type=positive_int, metavar="N"),
)


@dataclass(frozen=True)
class AlertMessage:
    """One message to produce: its bytes and where it came from."""

    value: bytes
    source: str
    survey: str | None


def alert_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and the ``*.avro`` files under the folders named, sorted within each folder.

    Raises
    ------
    FileNotFoundError
        A path that does not exist, or a folder without any ``.avro`` file.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.avro") if p.is_file())
            if not found:
                raise FileNotFoundError(f"no .avro file under {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


def messages_of_file(path: Path, survey: str | None = None, wire_format: bool = False) -> list[AlertMessage]:
    """The Kafka messages of one alert file (see the module docstring for the framing)."""
    from service.publish import records
    from service.decode import schemas

    data = path.read_bytes()
    try:
        schema, alerts = records.container_schema_and_records(data)
    except records.RecordError as exc:
        log.warning("%s is not an Avro object container (%s): sent as it is", path, exc)
        return [AlertMessage(data, str(path), survey)]
    file_survey = survey or schemas.survey_of_fields((f["name"] for f in schema.get("fields", ())),
                                                     schemas.candidate_field_names(schema))
    messages = []
    for i, alert in enumerate(alerts):
        source = str(path) if len(alerts) == 1 else f"{path}#{i}"
        value = _wire_format_or_none(alert, source) if wire_format and file_survey == "rubin" else None
        if value is None:
            value = data if len(alerts) == 1 else records.container_bytes(schema, [alert])
        messages.append(AlertMessage(value, source, file_survey))
    return messages


def _wire_format_or_none(alert: Mapping, source: str) -> bytes | None:
    """The alert in the Confluent wire format, or None (with a warning) when its official schema refuses it."""
    from service.decode import schemas

    try:
        return schemas.to_wire_format(alert)
    except (ValueError, schemas.UnknownSchema) as exc:
        # Still an alert: it goes out in its broker's framing rather than stopping the replay.
        log.warning("%s cannot be framed in the wire format (%s): sent as an Avro container", source, exc)
        return None


def load_messages(paths: Sequence[str | Path], survey: str | None = None,
                  wire_format: bool = False) -> list[AlertMessage]:
    """Every message of every file of ``paths``, in order."""
    return [m for path in alert_files(paths) for m in messages_of_file(path, survey, wire_format)]


#: Longest wait for the deliveries of messages already produced: after all were sent, and
#: (shorter) after a stop was asked for.
FLUSH_S = 60.0
STOP_FLUSH_S = 10.0


@dataclass
class ReplayResult:
    sent: int = 0
    failed: int = 0
    #: True when a stop was asked for before every message was produced.
    stopped: bool = False


def _paced(messages: Sequence[AlertMessage], repeat: int, rate: float | None,
           stop: threading.Event) -> Iterator[AlertMessage]:
    interval = 1.0 / rate if rate else 0.0
    start = time.monotonic()
    n = 0
    for _ in range(repeat):
        for message in messages:
            if interval:
                delay = start + n * interval - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return
            if stop.is_set():
                return
            n += 1
            yield message


def replay_producer(settings: Mapping):
    """The idempotent ``confluent_kafka.Producer`` `replay` produces with."""
    from confluent_kafka import Producer

    return Producer(kafka_client_config(settings, "producer", **{"enable.idempotence": True, "linger.ms": 5}))


def replay(settings: Mapping, topic: str, messages: Sequence[AlertMessage], rate: float | None = None,
           repeat: int = 1, progress: bool = True, producer=None,
           stop: threading.Event | None = None) -> ReplayResult:
    """Produce ``messages`` (``repeat`` times, at ``rate`` per second) to ``topic`` and wait for delivery.

    Parameters
    ----------
    settings : mapping
        ``bootstrap_servers`` and ``kafka`` (pass-through librdkafka settings), as
        `service.settings.resolve` returns them.
    producer : confluent_kafka.Producer, optional
        A producer to reuse (`replay_producer`); default a new one. A new producer holds its
        first messages until it has connected and set up idempotence (~0.6 s on tansu), which
        a caller timing each message (``rbstream bench e2e``) must not count.
    stop : threading.Event, optional
        Set (from a signal handler or another thread) to stop sending; the messages already
        produced are still waited for, at most `STOP_FLUSH_S`.
    """
    from tqdm import tqdm

    result = ReplayResult()
    stop = stop if stop is not None else threading.Event()
    if producer is None:  # not `producer or ...`: a Producer defines __len__ (its queue length)
        producer = replay_producer(settings)

    def delivered(error, message):
        if error is None:
            result.sent += 1
        else:
            result.failed += 1
            log.error("not delivered (%s): %s", dict(message.headers() or ()).get(HEADER_SOURCE_FILE), error)

    total = len(messages) * repeat
    with tqdm(total=total, unit="alert", desc=f"replay -> {topic}", disable=not progress, file=sys.stderr) as bar:
        produced = 0
        for message in _paced(messages, repeat, rate, stop):
            while not stop.is_set():
                try:
                    producer.produce(topic, value=message.value,
                                     headers=[(HEADER_SOURCE_FILE, message.source.encode())], on_delivery=delivered)
                    produced += 1
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
            bar.update(1)
        result.stopped = produced < total
        remaining = producer.flush(STOP_FLUSH_S if result.stopped else FLUSH_S)
    result.failed += remaining
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, REPLAY_OPTIONS)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="alert files (Avro object containers) or folders")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        settings = resolve(args, REPLAY_OPTIONS)
        messages = load_messages(args.paths, settings["survey"], settings["wire_format"])
    except (SettingsError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum) -> None:
        received.append(signum.name)
        stop.set()

    previous = on_stop_signals(on_signal)
    try:
        result = replay(settings, settings["topic"], messages, rate=settings["rate"], repeat=settings["repeat"],
                        progress=not args.quiet, stop=stop)
    finally:
        restore_signals(previous)
    print(f"{result.sent} alert messages sent to {settings['topic']}"
          + (f", {result.failed} NOT delivered" if result.failed else "")
          + (f"; stopped by {received[0]} before the end" if result.stopped and received else ""), file=sys.stderr)
    return 0 if result.failed == 0 else 1
