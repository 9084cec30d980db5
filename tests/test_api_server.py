"""``rbstream serve`` as a real process on 127.0.0.1: slow and malformed clients, and a flood of hostile bodies.

The HTTP layer (uvicorn, `service.api.server`) is only there in a real server, so these
tests start one, talk to it over sockets, and read its resident memory from ``/proc``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import hostile
from processes import wait_until_healthy
from conftest import REPO, rubin_files, ztf_fits_files
from service.tools.broker import free_port

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 12 * 1024 * 1024
#: What a flood of hostile bodies may add to the server's peak resident memory: the decoder's
#: limits bound one body to well under 100 MB, and the server decodes at most 4 at a time.
RSS_BOUND_MB = 400


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port("127.0.0.1")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--header-timeout-s", str(HEADER_TIMEOUT_S),
               "--body-timeout-s", str(BODY_TIMEOUT_S), "--max-body-bytes", str(MAX_BODY_BYTES)]
    process = subprocess.Popen(command, cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log)
        yield {"url": url, "port": port, "process": process, "log": log}
    finally:
        process.terminate()
        process.wait(timeout=30)


def exchange(port: int, data: bytes, wait: float = 6.0) -> bytes:
    """Send ``data`` (and nothing more), then read until the server closes or ``wait`` seconds pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head, "no answer from the server"
    assert b"application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


def test_a_client_that_never_finishes_its_headers_gets_a_408(server):
    started = time.monotonic()
    status, body = status_and_json(exchange(server["port"], b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Ty"))
    assert status == 408 and "headers did not arrive within 1 s" in body["detail"]
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 3


def test_a_client_that_never_finishes_its_body_gets_a_408(server):
    request = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/avro\r\nContent-Length: 5000\r\n\r\n"
               + b"Obj\x01")
    status, body = status_and_json(exchange(server["port"], request))
    assert status == 408 and "body did not arrive within 2 s" in body["detail"]


def test_an_over_long_url_gets_a_json_414(server):
    status, body = status_and_json(exchange(server["port"], b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 414 and "request line (a URL too long) passed the limit of 16384 bytes" in body["detail"]


def test_over_long_headers_get_a_json_431(server):
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"b" * 100) for i in range(300))
    status, body = status_and_json(exchange(server["port"], b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"))
    assert status == 431 and "request headers passed the limit" in body["detail"]


def test_a_bad_request_line_gets_a_json_400(server):
    status, body = status_and_json(exchange(server["port"], b"HELLO THERE\r\n\r\n"))
    assert status == 400 and "invalid HTTP request" in body["detail"]


def test_the_server_still_answers_after_the_slow_clients(server):
    response = httpx.post(f"{server['url']}/classify", content=ztf_fits_files()[0].read_bytes(),
                          headers={"content-type": "application/avro"}, timeout=30)
    assert response.status_code == 200, response.text


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def flood_bodies() -> list[tuple[str, bytes]]:
    big_schema = dict(hostile.ZTF_SCHEMA, doc="z" * (8 * 1024 * 1024))
    return [
        ("deflate bomb", hostile.deflate_bomb(1 << 30)),
        ("bzip2 bomb", hostile.bzip2_bomb(256 << 20)),
        ("huge stamps", hostile.huge_stamps(records=60, side=1000)),
        ("recursive", hostile.recursive_container(5000)),
        ("many records", hostile.many_records(1001)),
        ("8 MB schema", hostile.container(big_schema, [(1, b"\x00")])),
        ("FITS size lie", hostile.ztf_container([hostile.ztf_record(
            {n: hostile.fits_size_lie() for n in ("science", "template", "difference")})])),
    ]


def test_a_flood_of_hostile_bodies_keeps_resident_memory_bounded(server):
    """Every hostile body refused (422/413) while the server's peak RSS grows less than `RSS_BOUND_MB`."""
    print_rss = os.environ.get("RBSTREAM_PRINT_RSS")
    url, pid = server["url"], server["process"].pid
    good = [p.read_bytes() for p in ztf_fits_files()[:4] + rubin_files()[:4]]
    bodies = flood_bodies()
    with httpx.Client(timeout=60) as client:
        for body in good:  # warm up: models, schemas, thread pool
            assert client.post(f"{url}/classify", content=body, headers={"content-type": "application/avro"}
                               ).status_code == 200
    baseline = rss_mb(pid)
    statuses: dict[str, set] = {}

    def send(item):
        name, body = item
        with httpx.Client(timeout=120) as client:
            response = client.post(f"{url}/classify", content=body, headers={"content-type": "application/avro"})
            assert "detail" in response.json() or name == "huge stamps", response.text[:300]
            return name, response.status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        for name, status in pool.map(send, bodies * 6):
            statuses.setdefault(name, set()).add(status)
    peak = rss_mb(pid, "VmHWM")
    if print_rss:
        print(f"baseline {baseline:.0f} MB, peak {peak:.0f} MB, now {rss_mb(pid):.0f} MB")
    assert server["process"].poll() is None, "the server died"
    # Huge stamps are no error: cropped as they are decoded, the sixty alerts are scored.
    assert statuses.pop("huge stamps") == {200}
    assert all(s <= {413, 422} for s in statuses.values()), statuses
    assert peak - baseline < RSS_BOUND_MB, f"peak RSS {peak:.0f} MB, {peak - baseline:.0f} MB above {baseline:.0f} MB"
    with httpx.Client(timeout=60) as client:
        assert client.post(f"{url}/classify", content=good[0], headers={"content-type": "application/avro"}
                           ).status_code == 200
