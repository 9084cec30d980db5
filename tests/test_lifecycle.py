"""Long-running commands stop cleanly on a stop signal and leave no process behind.

``rbstream broker`` as a process, stopped with SIGTERM, SIGINT, SIGHUP, or killed with
SIGKILL: its tansu child is gone and the port is free each time (after SIGKILL through the
parent-death signal, Linux). ``replay``, ``tail`` and ``serve`` stop on SIGTERM within the
time the README states, with exit code 0. (``consume``: tests/test_consumer_signals.py;
``run``: tests/test_run.py.) SIGHUP stops every command but ``consume`` and ``serve``, for which
it is a model reload (`service.lifecycle.on_stop_signals` with ``reload``; the commands:
tests/test_consumer_signals.py, tests/test_api_reload.py).
"""

from __future__ import annotations

import http.client
import os
import re
import signal

import pytest

from conftest import ztf_fits_files
from processes import Command, children, command_line, kill_leftovers, listening, running, wait_until
from service.tools.broker import LocalBroker, free_port
from service.lifecycle import PARENT_DEATH_SIGNAL_SUPPORTED
from streaming import create_topic, read_topic, unique

pytestmark = pytest.mark.kafka

#: What the README promises for each command, with room for a loaded test machine.
BROKER_STOP_S = LocalBroker.STOP_TIMEOUT_S + 5
REPLAY_STOP_S = 15
TAIL_STOP_S = 10
SERVE_STOP_S = 20


def tansu_children(pid: int) -> list[int]:
    return [child for child in children(pid) if "tansu" in command_line(child)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_broker_command_leaves_no_broker_running(signum):
    if signum == signal.SIGKILL and not PARENT_DEATH_SIGNAL_SUPPORTED:
        pytest.skip("no parent-death signal on this platform")
    port = free_port()
    command = Command("broker", "--port", str(port))
    brokers: list[int] = []
    try:
        command.until(r"Ctrl-C stops it", timeout=30)
        brokers = tansu_children(command.pid)
        assert len(brokers) == 1, command.output()
        assert listening(port)
        os.kill(command.pid, signum)
        code = command.wait(timeout=BROKER_STOP_S)
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 0), command.output()
        assert wait_until(lambda: not running(brokers[0]), timeout=BROKER_STOP_S), \
            f"tansu ({brokers[0]}) still runs after {signum.name} to its parent"
        assert not listening(port), f"port {port} still taken"
    finally:
        command.kill()
        kill_leftovers(brokers)


def test_sighup_is_a_stop_signal_unless_a_reload_handler_is_given():
    from service.lifecycle import on_stop_signals, restore_signals

    stops, reloads = [], []
    previous = on_stop_signals(stops.append)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_until(lambda: stops, timeout=5) and stops == [signal.SIGHUP] and reloads == []
    finally:
        restore_signals(previous)
    previous = on_stop_signals(stops.append, reload=lambda: reloads.append(True))
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_until(lambda: reloads, timeout=5) and stops == [signal.SIGHUP], "SIGHUP reloads, stops nothing"
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_until(lambda: len(stops) == 2, timeout=5) and stops[-1] == signal.SIGTERM
    finally:
        restore_signals(previous)


def _high_watermark(bootstrap_servers: str, topic: str) -> int:
    """tansu's high watermark counts record batches, not messages: enough to see that some arrived."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": unique("watermark")})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        consumer.close()


def test_replay_stops_sending_on_sigterm_and_delivers_what_it_sent(broker):
    topic = unique("alerts")
    create_topic(broker.bootstrap_servers, topic)
    files = [str(p) for p in ztf_fits_files()[:4]]
    total = 4 * 100  # at 20 messages/s: 20 s, far longer than the test waits
    command = Command("--log-level", "WARNING", "replay", "--bootstrap-servers", broker.bootstrap_servers,
                      "--topic", topic, "--rate", "20", "--repeat", "100", "--quiet", *files)
    try:
        assert wait_until(lambda: _high_watermark(broker.bootstrap_servers, topic) >= 3, timeout=60), command.output()
        command.process.send_signal(signal.SIGTERM)
        assert command.wait(timeout=REPLAY_STOP_S) == 0, command.output()
    finally:
        command.kill()
    report = re.search(r"(\d+) alert messages sent to \S+; stopped by SIGTERM before the end", command.output())
    assert report, command.output()
    sent = int(report.group(1))
    assert 3 <= sent < total
    held = read_topic(broker.bootstrap_servers, topic, idle=1.0)
    assert len(held) == sent, "what replay reports is what the topic holds"


def test_tail_stops_on_sigterm_while_waiting_for_its_topic(broker):
    command = Command("--log-level", "INFO", "tail", "--bootstrap-servers", broker.bootstrap_servers,
                      "--topic", unique("not-there"))
    try:
        command.until(r"does not exist yet; waiting for it", timeout=60)
        command.process.send_signal(signal.SIGTERM)
        assert command.wait(timeout=TAIL_STOP_S) == 0, command.output()
    finally:
        command.kill()


def test_tail_stops_on_sigterm_while_following(broker):
    from confluent_kafka import Producer

    topic = unique("scores")
    create_topic(broker.bootstrap_servers, topic)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    producer.produce(topic, b"not a record")
    assert producer.flush(10) == 0
    command = Command("--log-level", "WARNING", "tail", "--bootstrap-servers", broker.bootstrap_servers,
                      "--topic", topic, "--from-beginning")
    try:
        command.until(r'"undecodable"', timeout=60)
        command.process.send_signal(signal.SIGTERM)
        assert command.wait(timeout=TAIL_STOP_S) == 0, command.output()
    finally:
        command.kill()


def test_serve_stops_on_sigterm_and_logs_why_it_closes_an_idle_connection():
    port = free_port()
    command = Command("--log-level", "INFO", "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu")
    try:
        command.until(r"Uvicorn running on", timeout=90)
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # HTTP/1.1: kept alive
        try:
            idle.request("GET", "/healthz")
            response = idle.getresponse()
            assert response.status == 200 and response.read() == b'{"status":"ok"}'
            local = "%s:%d" % idle.sock.getsockname()
            assert children(command.pid) == []
            command.process.send_signal(signal.SIGTERM)
            assert idle.sock.recv(4096) == b"", "the server should close the idle connection on shutdown"
        finally:
            idle.close()
        assert command.wait(timeout=SERVE_STOP_S) == 0, command.output()
    finally:
        command.kill()
    assert re.search(rf"closing the connection of {re.escape(local)}: the server is shutting down \[shutdown\]",
                     command.output()), command.output()
