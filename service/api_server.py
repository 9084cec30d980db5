"""The HTTP server under the API: uvicorn with timeouts for slow clients and JSON errors.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and caps the size of a
request line plus headers (``h11_max_incomplete_event_size``), but it waits without end for
a client that sends its headers or its body a byte at a time, and it answers protocol
errors in plain text. `GuardedH11Protocol` adds

* a **header timeout**: the request line and headers must be complete within
  ``header_timeout_s`` of the connection (or of the previous answer on a kept-alive one);
* a **body timeout**: the whole body must arrive within ``body_timeout_s`` of the headers;

and answers a timeout with 408, a request line or headers over ``max_header_bytes`` with
414 or 431, a malformed request (bad request line or header) with 400, all with the API's
JSON error body (``{"detail": "..."}``), then closes the connection. `server_config` builds the
``uvicorn.Config`` that ``rbstream serve`` and ``rbstream run`` use.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol


def _json_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body timeouts and JSON protocol errors (see the module)."""

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
        self.transport.write(_json_response(
            400, "Bad Request", "invalid HTTP request: a malformed request line or header"))
        self.transport.close()


def server_config(app, host: str, port: int, header_timeout_s: float = 10.0, body_timeout_s: float = 60.0,
                  keep_alive_timeout_s: float = 5.0, max_header_bytes: int = 16 * 1024, **options: Any) -> Config:
    """A ``uvicorn.Config`` for the API, its HTTP protocol guarded against slow and malformed clients.

    Parameters
    ----------
    header_timeout_s : float
        Seconds a client has to send its request line and headers (0: no limit).
    body_timeout_s : float
        Seconds a client has to send the whole body once its headers are in (0: no limit).
    keep_alive_timeout_s : float
        Seconds an idle kept-alive connection stays open.
    max_header_bytes : int
        Most bytes of request line plus headers; more is answered 400.
    **options
        Passed to ``uvicorn.Config`` (``log_level``, ``lifespan``...).
    """
    protocol = type("GuardedH11", (GuardedH11Protocol,), {
        "header_timeout_s": float(header_timeout_s), "body_timeout_s": float(body_timeout_s),
        "max_header_bytes": int(max_header_bytes)})
    return Config(app, host=host, port=port, http=protocol, timeout_keep_alive=keep_alive_timeout_s,
                  h11_max_incomplete_event_size=int(max_header_bytes), **options)
