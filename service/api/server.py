"""The API's HTTP server: uvicorn guarded against slow and malformed clients, every close it makes logged.

`ApiH11Protocol` is uvicorn's h11 protocol with

* a **header timeout**: the request line and headers must be complete within
  ``header_timeout_s`` of the connection (or of the previous answer on a kept-alive one);
* a **body timeout**: the whole body must arrive within ``body_timeout_s`` of the headers;
* protocol errors answered with the API's JSON error body (``{"detail": "..."}``): a
  timeout with 408, a request line or headers over ``max_header_bytes`` with 414 or 431, a
  malformed request with 400; then the connection is closed;
* every close the server initiates logged with its reason and counted in
  ``rbstream_http_connections_closed_total{reason}``.

uvicorn closes connections on its own in a few cases and says nothing about most of them.
A client that sends a request on a connection the server is closing at that moment gets
no response at all, only a closed connection. The reasons:

``keep_alive_timeout``
    The connection stayed idle for the keep-alive timeout (`KEEP_ALIVE_S`). This is the
    one close that can race a client: a client that reuses an idle connection just as the
    server closes it gets nothing back. The server's timeout therefore has to be longer
    than its clients' own idle timeouts (httpx: 5 s, aiohttp: 15 s, browsers: about 60 s),
    so that the client always closes first. uvicorn's default (5 s) equals httpx's.
``slow_client``
    The request line, headers or body did not arrive in time (answered 408).
``header_too_large``
    The request line or headers passed ``max_header_bytes`` (answered 414 or 431).
``invalid_request``
    The bytes were not HTTP/1.1 (h11 refused them; answered 400).
``connection_close``
    The response ended the connection: the request asked for it (``Connection: close``,
    HTTP/1.0), or uvicorn's own 500 or 503 answer did.
``incomplete_response``
    The application failed after it had started its response (logged by uvicorn too).
``shutdown``
    The server is stopping: idle connections are closed at once, busy ones after their
    response (`GRACEFUL_SHUTDOWN_S` at most).

Closes by the client are not logged (they are the normal end of a connection).

`ApiServer` stops on SIGTERM or SIGINT: it stops accepting, closes idle connections, gives
the requests in flight `GRACEFUL_SHUTDOWN_S`, and returns normally (``rbstream serve`` exits 0,
like the other commands; plain uvicorn re-raises the signal). SIGHUP calls its ``on_reload``
(``rbstream serve``: check the model files for a new version) and stops it only when there is none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from typing import Any, Callable, Iterator

import h11
import uvicorn
from prometheus_client import Counter
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.lifecycle import on_stop_signals, restore_signals

log = logging.getLogger(__name__)

#: Seconds an idle keep-alive connection is kept open; longer than the idle timeouts of
#: common HTTP clients, so that they close idle connections first (see the module docstring).
KEEP_ALIVE_S = 75

#: On SIGTERM, seconds the requests in flight get to finish before they are cancelled.
GRACEFUL_SHUTDOWN_S = 10

CLOSE_REASONS = ("keep_alive_timeout", "slow_client", "header_too_large", "invalid_request", "connection_close", "incomplete_response", "shutdown")

CONNECTIONS_CLOSED = Counter("rbstream_http_connections_closed",
                             "HTTP connections closed by the server, by reason (closes by the client not counted).",
                             ["reason"])


class LoggedClosesH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, logging (and counting) each close it initiates with its reason."""

    _reason: str | None = None
    _lost = False
    _close_logged = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        close = transport.close

        def close_with_reason() -> None:
            self._log_close()
            close()

        # Every path of uvicorn that ends a connection goes through transport.close().
        transport.close = close_with_reason

    def eof_received(self) -> None:
        self._lost = True  # the client closed its side; asyncio's close that follows is not ours
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True  # a close from here on only tidies up after the client's
        super().connection_lost(exc)

    def timeout_keep_alive_handler(self) -> None:
        self._reason = "keep_alive_timeout"
        super().timeout_keep_alive_handler()

    def send_400_response(self, msg: str) -> None:
        self._reason = "invalid_request"
        super().send_400_response(msg)

    def shutdown(self) -> None:
        self._reason = "shutdown"
        super().shutdown()

    def _log_close(self) -> None:
        if self._lost or self._close_logged or self.transport.is_closing():
            return
        self._close_logged = True
        reason = self._reason or self._reason_from_state()
        peer = "%s:%d" % self.client if self.client else "a client"
        detail = _DETAILS[reason]
        if reason == "keep_alive_timeout":
            detail = detail.format(seconds=self.timeout_keep_alive)
        level = logging.INFO if reason in ("keep_alive_timeout", "shutdown") else logging.WARNING
        log.log(level, "closing the connection of %s: %s [%s]", peer, detail, reason)
        CONNECTIONS_CLOSED.labels(reason=reason).inc()

    def _reason_from_state(self) -> str:
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            return "incomplete_response"
        if cycle is not None and not cycle.keep_alive:
            return "shutdown"
        if self.conn.our_state in (h11.MUST_CLOSE, h11.CLOSED):
            return "connection_close"
        return "incomplete_response"


_DETAILS = {
    "keep_alive_timeout": "idle for {seconds} s (keep-alive timeout)",
    "slow_client": "the request did not arrive in time (answered 408)",
    "header_too_large": "the request line or headers were too long (answered 414 or 431)",
    "invalid_request": "the request was not valid HTTP/1.1 (answered 400)",
    "connection_close": "the response ends the connection (Connection: close)",
    "incomplete_response": "the application failed before its response was complete",
    "shutdown": "the server is shutting down",
}


def _json_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head + body


class ApiH11Protocol(LoggedClosesH11Protocol):
    """`LoggedClosesH11Protocol` with header and body timeouts and JSON protocol errors (see the module)."""

    #: Set by `server_config` (a subclass per server, so two servers in one process can differ).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_header_bytes: int = 16 * 1024

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard: asyncio.TimerHandle | None = None
        self._arm(self.header_timeout_s, "the request line and headers")

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        if seconds and seconds > 0:
            self._guard = self.loop.call_later(seconds, self._timed_out, what, seconds)

    def _disarm(self) -> None:
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.cancel()
            self._guard = None

    def data_received(self, data: bytes) -> None:
        waiting_for_headers = self.conn.their_state is h11.IDLE
        if waiting_for_headers and self._head_too_long(data):
            return
        super().data_received(data)
        if waiting_for_headers and self.conn.their_state is h11.SEND_BODY:
            self._arm(self.body_timeout_s, "the request body")
        elif waiting_for_headers and self.conn.their_state is not h11.IDLE:
            self._disarm()  # a request without a body: nothing more to wait for
        elif self.conn.their_state is h11.DONE:
            self._disarm()

    def _head_too_long(self, data: bytes) -> bool:
        """Answer 414/431 when the request line or headers pass ``max_header_bytes``.

        h11's own cap (``h11_max_incomplete_event_size``) only applies while a request is
        incomplete: a long one that arrives in one piece gets through it.
        """
        head = getattr(self, "_head", b"") + data[: self.max_header_bytes + 4]
        end = head.find(b"\r\n\r\n")
        self._head = b"" if end >= 0 else head[-(self.max_header_bytes + 4):]
        if (end if end >= 0 else len(head)) <= self.max_header_bytes:
            if end >= 0:
                self._head = b""
            return False
        line_end = head.find(b"\r\n")
        if line_end < 0 or line_end > self.max_header_bytes:
            status, reason, what = 414, "URI Too Long", "the request line (a URL too long)"
        else:
            status, reason, what = 431, "Request Header Fields Too Large", "the request headers"
        self._disarm()
        self._reason = "header_too_large"
        self.transport.write(_json_response(status, reason, f"{what} passed the limit of {self.max_header_bytes} "
                                                            "bytes"))
        self.transport.close()
        return True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self.header_timeout_s, "the request line and headers")  # the next request's

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _timed_out(self, what: str, seconds: float) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        self._reason = "slow_client"
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and (self.cycle is None or not self.cycle.response_started):
            self.transport.write(_json_response(408, "Request Timeout",
                                                f"{what} did not arrive within {seconds:g} s"))
        if self.cycle is not None:
            # The app may be waiting for the body: it sees a disconnect, and anything it sends is dropped.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self._reason = "invalid_request"
        self.transport.write(_json_response(
            400, "Bad Request", "invalid HTTP request: a malformed request line or header"))
        self.transport.close()


class ApiServer(uvicorn.Server):
    """`uvicorn.Server` that treats SIGTERM and SIGINT as a request to stop, and then returns; SIGHUP
    calls ``on_reload`` when given (else it stops the server too)."""

    def __init__(self, config: uvicorn.Config, on_reload: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_reload = on_reload

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only: the embedding program stops this server
            return
        previous = on_stop_signals(lambda signum: self.handle_exit(signum, None), reload=self.on_reload)
        try:
            yield
        finally:
            restore_signals(previous)


def server_config(app, host: str, port: int, header_timeout_s: float = 10.0, body_timeout_s: float = 60.0,
                  keep_alive_timeout_s: float = KEEP_ALIVE_S, max_header_bytes: int = 16 * 1024,
                  **options: Any) -> uvicorn.Config:
    """The `uvicorn.Config` of the API: `ApiH11Protocol`, its guards, keep-alive and bounded shutdown.

    Parameters
    ----------
    header_timeout_s : float
        Seconds a client has to send its request line and headers (0: no limit).
    body_timeout_s : float
        Seconds a client has to send the whole body once its headers are in (0: no limit).
    keep_alive_timeout_s : float
        Seconds an idle kept-alive connection stays open; longer than the clients' own.
    max_header_bytes : int
        Most bytes of request line plus headers; more is answered 414 or 431.
    **options
        Further `uvicorn.Config` arguments (``log_level``, ``lifespan``, ``timeout_keep_alive``...),
        which may also override these defaults.
    """
    # a subclass per server, so that two servers in one process can differ
    protocol = type("ApiH11", (ApiH11Protocol,), {
        "header_timeout_s": float(header_timeout_s), "body_timeout_s": float(body_timeout_s),
        "max_header_bytes": int(max_header_bytes)})
    settings = {"http": protocol, "timeout_keep_alive": keep_alive_timeout_s,
                "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
                "h11_max_incomplete_event_size": int(max_header_bytes), **options}
    return uvicorn.Config(app, host=host, port=port, **settings)
