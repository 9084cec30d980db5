"""The API's HTTP server: uvicorn with keep-alive and shutdown settings, and every close it makes logged.

uvicorn closes connections on its own in a few cases and says nothing about most of them.
A client that sends a request on a connection the server is closing at that moment gets
no response at all, only a closed connection. `LoggedClosesH11Protocol` logs every close
the server initiates, with its reason, and counts it in
``rbstream_http_connections_closed_total{reason}``:

``keep_alive_timeout``
    The connection stayed idle for `KEEP_ALIVE_S`. This is the one close that can race a
    client: a client that reuses an idle connection just as the server closes it gets
    nothing back. The server's timeout therefore has to be longer than its clients' own
    idle timeouts (httpx: 5 s, aiohttp: 15 s, browsers: about 60 s), so that the client
    always closes first. uvicorn's default (5 s) equals httpx's, so the two raced.
``invalid_request``
    The bytes were not HTTP/1.1 (h11 refused them). uvicorn answers 400 and closes.
``connection_close``
    The response ended the connection: the request asked for it (``Connection: close``,
    HTTP/1.0), or uvicorn's own 500 or 503 answer did.
``incomplete_response``
    The application failed after it had started its response (logged by uvicorn too).
``shutdown``
    The server is stopping: idle connections are closed at once, busy ones after their
    response (`GRACEFUL_SHUTDOWN_S` at most).

Closes by the client are not logged (they are the normal end of a connection).

`ApiServer` stops on SIGTERM, SIGINT or SIGHUP: it stops accepting, closes idle
connections, gives the requests in flight `GRACEFUL_SHUTDOWN_S`, and returns normally
(``rbstream serve`` exits 0, like the other commands; plain uvicorn re-raises the signal).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator

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

CLOSE_REASONS = ("keep_alive_timeout", "invalid_request", "connection_close", "incomplete_response", "shutdown")

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
    "invalid_request": "the request was not valid HTTP/1.1 (answered 400)",
    "connection_close": "the response ends the connection (Connection: close)",
    "incomplete_response": "the application failed before its response was complete",
    "shutdown": "the server is shutting down",
}


class ApiServer(uvicorn.Server):
    """`uvicorn.Server` that treats SIGTERM, SIGINT and SIGHUP as a request to stop, and then returns."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only: the embedding program stops this server
            return
        previous = on_stop_signals(lambda signum: self.handle_exit(signum, None))
        try:
            yield
        finally:
            restore_signals(previous)


def server_config(app, host: str, port: int, **options: Any) -> uvicorn.Config:
    """The `uvicorn.Config` of the API: `LoggedClosesH11Protocol`, `KEEP_ALIVE_S`, `GRACEFUL_SHUTDOWN_S`.

    ``options`` are further `uvicorn.Config` arguments (``log_level``, ``lifespan`` ...),
    which may also override these defaults.
    """
    settings = {"http": LoggedClosesH11Protocol, "timeout_keep_alive": KEEP_ALIVE_S,
                "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S, **options}
    return uvicorn.Config(app, host=host, port=port, **settings)
