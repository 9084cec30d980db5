"""Poison pills on a real topic: ``rbstream consume`` as a real process, good alerts between hostile ones.

Every good alert must be scored, every hostile message dead-lettered with its reason and
committed past, the consumer still running afterwards, and its peak resident memory
(``/proc/<pid>/status``) within a stated bound.

1. The default (decoding in-process, guarded by `service.limits`): a recursive schema with
   data nested 5,000 deep (it used to kill the consumer with a segmentation fault, at every
   restart), codec bombs, many-record containers, huge stamps, FITS size lies, degenerate stamps.
2. ``--decode-isolation`` with the schema guard turned off (``--max-schema-depth 0``): the
   same recursive message really crashes the decoding worker, and the consumer dead-letters
   it, replaces the worker and goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

import hostile
from conftest import REPO, rubin_files, ztf_fits_files
from service.stream import pipeline
from service.tools import replay
from service.tools.broker import free_port
from streaming import committed, create_topic, default_models, read_topic, unique, wait_for  # noqa: F401

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BATCH_SIZE = 8
#: What the hostile flood may add to the consumer's peak resident memory.
RSS_BOUND_MB = 400


def rss_mb(pid: int, field: str) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


class Stream:
    """Topics, a producer and a consumer process for one test."""

    def __init__(self, broker, tmp_path: Path, *consumer_args: str):
        self.bootstrap = broker.bootstrap_servers
        self.topics = {"input": unique("alerts"), "output": unique("scores"), "dlq": unique("dlq"),
                       "group": unique("group")}
        create_topic(self.bootstrap, self.topics["input"], partitions=1)
        self.sent: list[replay.AlertMessage] = []
        self.log = tmp_path / "consumer.log"
        self.metrics_port = free_port("127.0.0.1")
        command = [sys.executable, "-m", "service.cli", "--log-level", "INFO", "consume",
                   "--bootstrap-servers", self.bootstrap, "--input-topic", self.topics["input"],
                   "--output-topic", self.topics["output"], "--dlq-topic", self.topics["dlq"],
                   "--group-id", self.topics["group"], "--from-beginning", "--batch-size", str(BATCH_SIZE),
                   "--max-wait-ms", "50", "--device", "cpu", "--metrics-port", str(self.metrics_port),
                   "--kafka-option", "consumer.session.timeout.ms=6000", *consumer_args]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def send(self, messages: list[replay.AlertMessage]) -> None:
        settings = {"bootstrap_servers": self.bootstrap, "kafka": {}}
        result = replay.replay(settings, self.topics["input"], messages, progress=False)
        assert result.sent == len(messages) and result.failed == 0
        self.sent += messages

    def wait_all_committed(self) -> None:
        def done():
            assert self.process.poll() is None, f"the consumer died: {self.log.read_text()[-3000:]}"
            return committed(self.bootstrap, self.topics["group"], self.topics["input"]).get(0, -1) >= len(self.sent)
        wait_for(done, timeout=180, interval=0.5, what="every offset committed")

    def outputs(self):
        def by_offset(reads):
            grouped: dict[int, list] = {}
            for read in reads:
                grouped.setdefault(read.source_offset[1], []).append(read)
            return grouped
        return (by_offset(read_topic(self.bootstrap, self.topics["output"])),
                by_offset(read_topic(self.bootstrap, self.topics["dlq"])))

    def still_running(self) -> bool:
        healthy = httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=5).json()["ok"]
        return self.process.poll() is None and healthy

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def good_messages() -> list[replay.AlertMessage]:
    return replay.load_messages(ztf_fits_files()[:6] + rubin_files()[:4])


def hostile_message(name: str, value: bytes) -> replay.AlertMessage:
    return replay.AlertMessage(value, f"hostile/{name}", None)


#: Each hostile message, and what its dead letter's reason must say.
FLOOD = {
    "recursive": (hostile.recursive_container(5000), "recursive"),
    "deflate-bomb": (hostile.deflate_bomb(512 << 20), "max_block_bytes"),
    "bzip2-bomb": (hostile.bzip2_bomb(256 << 20), "max_block_bytes"),
    "many-records": (hostile.many_records(150), "max_records"),
    "fits-size-lie": (hostile.ztf_container([hostile.ztf_record(
        {n: hostile.fits_size_lie() for n in ("science", "template", "difference")})]), "max_cutout_bytes"),
    "constant": (hostile.ztf_alert_with(np.full((63, 63), 9.0), hostile.noise_stamp(63), hostile.noise_stamp(63)),
                 "constant"),
    "one-pixel": (hostile.ztf_alert_with(np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1))), "1x1 pixels"),
}


def test_poison_pills_between_good_alerts_are_dead_lettered_and_the_stream_goes_on(broker, default_models, tmp_path):
    stream = Stream(broker, tmp_path, "--max-records", "100")
    try:
        warm_up = good_messages()
        stream.send(warm_up)
        stream.wait_all_committed()
        baseline = rss_mb(stream.process.pid, "VmRSS")
        interleaved = []
        for good, (name, (value, _)) in zip(good_messages()[:len(FLOOD)], FLOOD.items()):
            interleaved += [good, hostile_message(name, value)]
        huge = hostile_message("huge-stamps", hostile.huge_stamps(records=60, side=1000))
        stream.send(interleaved * 3 + [huge] * 2 + good_messages())
        stream.wait_all_committed()
        peak = rss_mb(stream.process.pid, "VmHWM")
        assert stream.still_running()
        scores, letters = stream.outputs()
        for offset, message in enumerate(stream.sent):
            name = message.source.removeprefix("hostile/")
            if name in FLOOD:
                assert offset not in scores, f"{name} was scored"
                (letter,) = letters[offset]
                assert FLOOD[name][1] in letter.headers[pipeline.HEADER_REASON], letter.headers
                assert letter.value == message.value
            elif name == "huge-stamps":  # no error: cropped as decoded, its sixty alerts are scored
                assert len(scores[offset]) == 60 and offset not in letters
            else:
                assert len(scores.get(offset, [])) == 1 and offset not in letters, message.source
        assert peak - baseline < RSS_BOUND_MB, f"peak RSS {peak:.0f} MB, {peak - baseline:.0f} MB over {baseline:.0f}"
    finally:
        assert stream.stop() == 0


def test_a_message_that_crashes_the_decoder_kills_only_an_isolated_worker(broker, default_models, tmp_path):
    stream = Stream(broker, tmp_path, "--decode-isolation", "--max-schema-depth", "0")
    try:
        good = good_messages()
        poison = hostile_message("recursive", hostile.recursive_container(5000))
        stream.send(good[:3] + [poison] + good[3:7] + [poison] + good[7:])
        stream.wait_all_committed()
        assert stream.still_running()
        scores, letters = stream.outputs()
        for offset, message in enumerate(stream.sent):
            if message is poison:
                (letter,) = letters[offset]
                reason = letter.headers[pipeline.HEADER_REASON]
                # a stack overflow in C: SIGSEGV, or an abort of the worker (how it dies varies)
                assert "decoder crashed" in reason and ("SIGSEGV" in reason or "exited with status" in reason), reason
                assert letter.headers[pipeline.HEADER_REASON_KIND] == "decode"
                assert offset not in scores
            else:
                assert len(scores.get(offset, [])) == 1 and offset not in letters, message.source
    finally:
        assert stream.stop() == 0
