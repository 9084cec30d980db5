"""Optional bearer-token protection of the HTTP API.

The token comes from the environment (``RBSTREAM_API_TOKEN``) or from a file
(``RBSTREAM_API_TOKEN_FILE``, e.g. a Kubernetes Secret mounted as a volume); the file
is read again when it changes, so a rotated Secret takes effect without a restart.
Without a token the API is open. With one, every path except the open ones needs
``Authorization: Bearer <token>``; the open paths default to the probes and the
scrape endpoint (kubelet and Prometheus carry no token) and to the API's own
documentation, and are configurable (``RBSTREAM_API_OPEN_PATHS``, comma-separated).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from pathlib import Path
from typing import Iterable, Mapping

log = logging.getLogger(__name__)

TOKEN_ENV = "RBSTREAM_API_TOKEN"
TOKEN_FILE_ENV = "RBSTREAM_API_TOKEN_FILE"
OPEN_PATHS_ENV = "RBSTREAM_API_OPEN_PATHS"

#: Paths served without a token when one is configured.
#: ``/scan`` is the scanning page's HTML and script only; its data (``/scan/api/*``) needs the token.
DEFAULT_OPEN_PATHS: tuple[str, ...] = ("/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect",
                                       "/openapi.json", "/scan")


class TokenAuth:
    """Checks ``Authorization: Bearer`` headers against a configured token.

    Parameters
    ----------
    token : str, optional
        The token itself.
    token_file : path, optional
        A file holding the token (surrounding whitespace ignored); used when ``token`` is not given.
    open_paths : iterable of str
        Request paths that need no token.
    """

    def __init__(self, token: str | None = None, token_file: str | Path | None = None,
                 open_paths: Iterable[str] = DEFAULT_OPEN_PATHS):
        self._token = token.strip().encode() if token and token.strip() else None
        self.token_file = Path(token_file) if token_file and not self._token else None
        self.open_paths = frozenset(open_paths)
        self._file_state: tuple[float, int] | None = None
        self._file_token: bytes | None = None
        self._lock = threading.Lock()
        if self.token_file is not None:
            self._read_file()  # fail at start, not at the first request, if the Secret is not mounted

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, token_file: str | Path | None = None,
                 open_paths: Iterable[str] | None = None) -> "TokenAuth":
        """From ``RBSTREAM_API_TOKEN``, ``RBSTREAM_API_TOKEN_FILE`` and ``RBSTREAM_API_OPEN_PATHS``
        (arguments given here win over the environment)."""
        if open_paths is None:
            raw = environ.get(OPEN_PATHS_ENV)
            open_paths = DEFAULT_OPEN_PATHS if raw is None else [p.strip() for p in raw.split(",") if p.strip()]
        return cls(token=environ.get(TOKEN_ENV), token_file=token_file or environ.get(TOKEN_FILE_ENV) or None,
                   open_paths=open_paths)

    @property
    def enabled(self) -> bool:
        return self._token is not None or self.token_file is not None

    def is_open(self, path: str) -> bool:
        return not self.enabled or path in self.open_paths

    def check(self, authorization: str | None) -> str | None:
        """None when ``authorization`` (the header's value) carries the token, else why not."""
        expected = self._token if self._token is not None else self._read_file()
        if not authorization:
            return "missing Authorization header; send 'Authorization: Bearer <token>'"
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return "Authorization header must be 'Bearer <token>'"
        # Constant-time comparison: the time to refuse says nothing about how much of the token matched.
        if not hmac.compare_digest(credentials.strip().encode(), expected):
            return "invalid token"
        return None

    def _read_file(self) -> bytes:
        with self._lock:
            stat = self.token_file.stat()  # OSError if the Secret is gone: the middleware answers 503
            state = (stat.st_mtime, stat.st_size)
            if state != self._file_state:
                token = self.token_file.read_text().strip()
                if not token:
                    raise OSError(f"token file {self.token_file} is empty")
                self._file_token, self._file_state = token.encode(), state
                log.info("API token read from %s", self.token_file)
            return self._file_token


class BearerAuthMiddleware:
    """ASGI middleware refusing requests to non-open paths without the token (401).

    It runs before routing and before the body is read, so a refused upload costs nothing.
    """

    def __init__(self, app, auth: TokenAuth):
        self.app = app
        self.auth = auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.auth.is_open(scope["path"]):
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            problem = self.auth.check(header)
            status = 401
        except OSError as exc:
            problem, status = f"the API token cannot be read: {exc}", 503
            log.error("%s", problem)
        if problem is None:
            return await self.app(scope, receive, send)
        body = json.dumps({"detail": problem}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="rbstream"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
