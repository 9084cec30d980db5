"""The API's HTTP server (`service.api.server`): connections it keeps, and every one it closes logged.

A real uvicorn server around the real app and models, on a loopback port, in a thread of
the test process (so that its log records reach ``caplog``).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import socket
import threading
import time

import httpx
import pytest

from api_support import good_request, real_scorers
from service.api.app import create_app
from service.tools.broker import free_port
from service.api.server import ApiServer, server_config

CLOSE_LOG = re.compile(r"closing the connection of (\S+): .* \[(\w+)\]")


@pytest.fixture
def serve(caplog):
    """``serve(**uvicorn options)`` -> (server, port), stopped at the end of the test."""
    caplog.set_level(logging.INFO, logger="service.api.server")
    started = []

    def start(**options):
        port = free_port()
        server = ApiServer(server_config(create_app(real_scorers()), "127.0.0.1", port, log_level="warning",
                                         **options))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        return server, port

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(timeout=20)


def closes(caplog) -> list[tuple[str, str]]:
    """(client address, reason) of each close the server logged."""
    return [m.groups() for r in caplog.records if (m := CLOSE_LOG.search(r.getMessage()))]


def settle(port: int) -> None:
    """One more request on a new connection: the server has handled what came before (one event loop)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/healthz")
        assert connection.getresponse().read()
    finally:
        connection.close()


def test_good_and_bad_requests_of_many_clients_keep_their_connections(serve, caplog):
    _, port = serve()
    good = json.dumps(good_request()).encode()
    requests = [(good, "application/json", 200), (b'{"candidates": [', "application/json", 400),
                (json.dumps({"candidates": [{"cutout": 1}]}).encode(), "application/json", 422),
                (good, "text/plain", 415), (b"\0" * 100, "application/avro", 422), (b"", "application/json", 400)]
    clients, rounds = 16, 3
    answers: list[int] = []
    ports_used: list[set] = []

    async def client():
        ports = set()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=1),
                                     timeout=60) as http:
            for _ in range(rounds):
                for content, content_type, _status in requests:
                    response = await http.post("/classify", content=content, headers={"content-type": content_type})
                    answers.append(response.status_code)
                    ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])
        ports_used.append(ports)

    async def everyone():
        await asyncio.gather(*(client() for _ in range(clients)))

    asyncio.run(everyone())
    settle(port)
    assert sorted(answers) == sorted([status for *_, status in requests] * clients * rounds)
    assert all(len(ports) == 1 for ports in ports_used), "a client had to open a second connection"
    assert closes(caplog) == [], "the server closed connections under a mix of good and bad requests"


def test_an_idle_connection_closed_at_the_keep_alive_timeout_is_logged(serve, caplog):
    _, port = serve(timeout_keep_alive=1)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/healthz")
    assert connection.getresponse().read()
    client = "%s:%d" % connection.sock.getsockname()
    assert connection.sock.recv(1) == b"", "the idle connection should have been closed"
    connection.close()
    assert (client, "keep_alive_timeout") in closes(caplog)
    assert any("idle for 1 s (keep-alive timeout)" in r.getMessage() for r in caplog.records)


def test_bytes_that_are_not_http_get_400_and_the_close_is_logged(serve, caplog):
    _, port = serve()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"this is not HTTP\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
        client = "%s:%d" % raw.getsockname()
    assert answer.startswith(b"HTTP/1.1 400")
    assert (client, "invalid_request") in closes(caplog)
    warning = [r for r in caplog.records if "[invalid_request]" in r.getMessage()]
    assert warning and warning[0].levelno == logging.WARNING


def test_a_request_asking_to_close_is_answered_then_closed_and_logged(serve, caplog):
    _, port = serve()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
        client = "%s:%d" % raw.getsockname()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}')
    assert (client, "connection_close") in closes(caplog)


def test_a_client_closing_its_connection_is_not_reported_as_a_server_close(serve, caplog):
    _, port = serve()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/healthz")
    assert connection.getresponse().read()
    connection.close()
    settle(port)
    assert closes(caplog) == []


def test_shutdown_closes_idle_connections_with_the_reason_logged(serve, caplog):
    server, port = serve()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/healthz")
    assert connection.getresponse().read()
    client = "%s:%d" % connection.sock.getsockname()
    server.should_exit = True
    assert connection.sock.recv(1) == b""
    connection.close()
    assert (client, "shutdown") in closes(caplog)
