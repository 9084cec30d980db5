"""``rbstream bench api``: ``POST /classify`` requests per second and latency, by concurrency and body size.

A real server (``rbstream serve`` under uvicorn, in its own process, on 127.0.0.1 only)
and an asyncio client (httpx) in the benchmark process keeping 1, 8 or 64 requests in
flight. Bodies are JSON holding the real ZTF sample cutouts as base64 gzip-compressed
FITS (what a client that has the alert sends): one candidate, or 64. Request counts are
bounded; every answer must be a 200 with one result per candidate, or the run counts
it as an error. The client shares the machine's cores with the server.

One more run, at the highest concurrency, mixes in a share of bad requests (`BAD_SHARE`,
spread evenly: malformed JSON, an unknown field, an undecodable stamp, a wrong content
type), each of which must get its 4xx answer. Every run counts its **dropped connections**:
requests that got no response at all because the connection was closed or reset (timeouts
are counted as errors instead). The report also gives the connections the server closed
itself, by reason (``rbstream_http_connections_closed_total``, see `service.api.server`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from service.bench import data
from service.bench.report import Result, percentile, summarise
from service.lifecycle import terminate
from service.surveys import CUTOUT_FIELDS

log = logging.getLogger(__name__)

BODY_SIZES = (1, 64)
#: Share of bad requests in the mixed run.
BAD_SHARE = 0.25
FULL_CLIENTS = (1, 8, 64)
QUICK_CLIENTS = (1, 4)


def candidates(messages: list[bytes]) -> list[dict]:
    """One JSON candidate per alert: its cutouts as base64 (gzip-compressed FITS, as ZTF ships them)."""
    import fastavro

    out = []
    for message in messages:
        record = next(iter(fastavro.reader(io.BytesIO(message))))
        candidate = {"id": str(record.get("candid", len(out)))}
        for name, field in CUTOUT_FIELDS.items():
            cutout = record[field]
            stamp = cutout["stampData"] if isinstance(cutout, dict) else cutout
            candidate[name] = base64.b64encode(stamp).decode("ascii")
        out.append(candidate)
    return out


def body(pool: list[dict], size: int, survey: str) -> bytes:
    return json.dumps({"survey": survey, "candidates": [pool[i % len(pool)] for i in range(size)]}).encode()


def bad_requests(pool: list[dict], survey: str) -> list[tuple[bytes, str, int]]:
    """Bad requests as clients get them wrong: (body, content type, the status they must get)."""
    good = body(pool, 1, survey)
    unknown = json.dumps({"survey": survey, "candidates": [{**pool[0], "cutout": "x"}]}).encode()
    undecodable = json.dumps({"survey": survey, "candidates": [{**pool[0], "science": "bm90IGEgRklUUyBmaWxl"}]})
    return [(good[: len(good) // 2], "application/json", 400),       # malformed JSON: cut in the middle
            (unknown, "application/json", 422),                      # an unknown field
            (undecodable.encode(), "application/json", 422),         # a stamp that is not FITS
            (good, "text/plain", 415)]                               # a wrong content type


class Server:
    """``rbstream serve`` on a free loopback port, as a context manager."""

    def __init__(self, args, log_path: Path):
        from service.tools.broker import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--device", args.device]
        if args.models:
            command += ["--models-dir", str(args.models)]
        self.command = command
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        from service.lifecycle import die_with_parent

        env = {k: v for k, v in os.environ.items() if k not in ("RBSTREAM_API_TOKEN", "RBSTREAM_API_TOKEN_FILE")}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        cwd=data.REPO, preexec_fn=die_with_parent())  # a killed bench leaves no server
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited with code {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the API was not ready within 90 s; see {self.log_path}")

    def closes(self) -> dict[str, int]:
        """Connections the server closed itself so far, by reason (its ``/metrics``)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10.0).text
        return {sample.labels["reason"]: int(sample.value)
                for family in text_string_to_metric_families(text) if family.name == "rbstream_http_connections_closed"
                for sample in family.samples if sample.name.endswith("_total")}

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            terminate(self.process, 20)
        self._log.close()


async def _load(url: str, payload: bytes, expected: int, clients: int, requests: int,
                bad: list[tuple[bytes, str, int]] = (), bad_share: float = 0.0) -> dict:
    """``requests`` POSTs of ``payload`` with ``clients`` in flight; latency of each, errors counted.

    With ``bad_share``, that share of the requests (spread evenly) are the ``bad`` ones in turn;
    the latency figures are those of the good requests. A request that got no response because
    its connection was closed or reset counts as ``dropped``.
    """
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    dropped: list[str] = []
    answered = good_answered = 0
    remaining = requests

    def request_of(n: int) -> tuple[bytes, str, int | None]:
        """The n-th request: bad when the running count of bad ones steps up."""
        bad_so_far = int(n * bad_share)
        if bad and int((n + 1) * bad_share) > bad_so_far:
            return bad[bad_so_far % len(bad)]
        return payload, "application/json", None
    # One single-connection client per simulated client: one shared pool of 64 connections
    # costs httpx ~4x the CPU per request (measured: the client, not the server, was then the
    # limit at 64 in flight). Each opens its connection before the clock starts, as a
    # long-lived client has it open already.
    ready = asyncio.Event()

    async def worker():
        nonlocal remaining, answered, good_answered
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1),
                                     timeout=120.0) as client:
            await client.get("/healthz")
            connected.append(client)
            if len(connected) == clients:
                ready.set()
            await ready.wait()
            while remaining > 0:
                remaining -= 1
                content, content_type, status = request_of(requests - remaining - 1)
                start = time.perf_counter()
                try:
                    response = await client.post("/classify", content=content, headers={"content-type": content_type})
                    if status is None:
                        ok = response.status_code == 200 and len(response.json()["results"]) == expected
                    else:
                        ok = response.status_code == status and "detail" in response.json()
                    if not ok:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.TimeoutException as exc:
                    errors.append(repr(exc))
                except httpx.TransportError as exc:  # closed or reset: no response at all
                    dropped.append(repr(exc))
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                else:
                    answered += 1
                    good_answered += ok and status is None
                if status is None:
                    latencies.append(time.perf_counter() - start)

    async def clock() -> float:
        await ready.wait()
        return time.perf_counter()

    connected: list = []
    start, *_ = await asyncio.gather(clock(), *(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    return {"requests": answered, "errors": len(errors), "first_error": errors[0] if errors else None,
            "dropped": len(dropped), "first_dropped": dropped[0] if dropped else None,
            "seconds": elapsed, "requests_per_s": answered / elapsed,
            "candidates_per_s": good_answered * expected / elapsed,
            "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3}


def run(args) -> Result:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the report
    quick = args.quick
    survey = (args.survey or ["ztf"])[0]
    clients_list = tuple(args.clients) if args.clients else (QUICK_CLIENTS if quick else FULL_CLIENTS)
    base_requests = args.requests or (16 if quick else 400)
    repeats = args.repeats or (2 if quick else 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    contract_by_survey, notes = data.contracts(args.models)
    messages, _ = data.decodable_messages(survey, contract_by_survey)
    pool = candidates(messages)
    payloads = {size: body(pool, size, survey) for size in BODY_SIZES}
    result = Result("api", notes=notes, settings={
        "survey": survey, "clients": list(clients_list), "repeats": repeats, "device": args.device,
        "body": "JSON, real ZTF sample cutouts as base64 gzip FITS",
        "body_bytes": {str(k): len(v) for k, v in payloads.items()},
        "requests_per_run": "--requests for 1-candidate bodies, an eighth of it for 64-candidate bodies, "
                            "at least 2 per client",
        "server": "rbstream serve (uvicorn) in a subprocess on 127.0.0.1", "client": "httpx.AsyncClient", "quick": quick})
    result.settings["bad_share"] = f"{BAD_SHARE} of the requests of the mixed run (1-candidate bodies, " \
                                   f"{max(clients_list)} clients): malformed JSON, unknown field, undecodable " \
                                   "stamp, wrong content type"
    result.columns = [("candidates", "candidates per request"), ("clients", "concurrent clients"),
                      ("bad_share", "share of bad requests"), ("requests", "requests per run"),
                      ("requests_per_s", "requests/s"), ("candidates_per_s", "candidates/s"),
                      ("p50_ms", "p50 latency, ms"), ("p99_ms", "p99 latency, ms"), ("errors", "errors"),
                      ("dropped", "dropped connections")]
    bad = bad_requests(pool, survey)
    with Server(args, out / "api-server.log") as server:
        plan = [(size, clients, 0.0) for size in payloads for clients in clients_list]
        plan.append((1, max(clients_list), BAD_SHARE))
        warmed = set()
        for size, clients, share in plan:
            if size not in warmed:  # warm-up: connections, first batches
                asyncio.run(_load(server.url, payloads[size], size, 2, 4))
                warmed.add(size)
            requests = max(base_requests if size == 1 else base_requests // 8, 2 * clients)
            runs = [asyncio.run(_load(server.url, payloads[size], size, clients, requests, bad, share))
                    for _ in range(repeats)]
            errors, dropped = sum(r["errors"] for r in runs), sum(r["dropped"] for r in runs)
            result.rows.append({
                "candidates": size, "clients": clients, "bad_share": share, "requests": requests,
                "requests_per_s": summarise([r["requests_per_s"] for r in runs], 1),
                "candidates_per_s": summarise([r["candidates_per_s"] for r in runs], 1),
                "p50_ms": summarise([r["p50_ms"] for r in runs], 2),
                "p99_ms": summarise([r["p99_ms"] for r in runs], 2), "errors": errors, "dropped": dropped})
            what = f"{size} candidates, {clients} clients" + (f", {share:.0%} bad" if share else "")
            if errors:
                first = next(r["first_error"] for r in runs if r["first_error"])
                result.notes.append(f"{what}: {errors} failed requests, e.g. {first}")
            if dropped:
                first = next(r["first_dropped"] for r in runs if r["first_dropped"])
                result.notes.append(f"{what}: {dropped} requests dropped (no response), e.g. {first}")
        result.settings["server_closes"] = server.closes()
    closes = result.settings["server_closes"]
    result.notes.append("connections closed by the server, by reason: "
                        + (", ".join(f"{reason} {n}" for reason, n in sorted(closes.items())) or "none"))
    return result
