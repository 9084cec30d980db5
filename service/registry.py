"""The schema registry, for both directions of the data path: one client.

Decoding asks it for the writer schema of a wire-format alert's id; publishing registers
the score record schema under ``<topic>-value`` and frames records with its id. Both go
through confluent-kafka's own `SchemaRegistryClient` (its caching, authentication and
TLS settings), wrapped here only to turn its errors into the two kinds the service acts on.
"""

from __future__ import annotations

import json
from typing import Mapping

#: Seconds allowed for one registry request, unless a caller says otherwise.
DEFAULT_TIMEOUT_S = 5.0


class RegistryUnreachable(RuntimeError):
    """The registry cannot be reached or answers with a server error: an outage, not a bad alert."""


class SchemaNotFound(LookupError):
    """The registry answered, and it has no schema with that id."""


class SchemaRegistry:
    """A Confluent-compatible schema registry.

    Parameters
    ----------
    url : str
        Base URL, e.g. ``https://registry.example.org``; ``https://user:password@host`` for
        basic authentication.
    timeout : float
        Seconds allowed for one request. The client does not retry: a consumer that waits
        on a registry outage holds its whole batch.
    """

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT_S):
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.url = url.rstrip("/")
        self._client = SchemaRegistryClient({"url": self.url, "timeout": timeout, "max.retries": 0})

    def __repr__(self) -> str:
        return f"SchemaRegistry({self.url!r})"

    def register(self, subject: str, schema: Mapping) -> int:
        """Register ``schema`` under ``subject`` (idempotent, cached) and return its id.

        Raises
        ------
        RegistryUnreachable
            When the registry cannot be reached or refuses the schema.
        """
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return self._client.register_schema(subject, Schema(json.dumps(schema, sort_keys=True), "AVRO"))
        except SchemaRegistryError as exc:
            raise RegistryUnreachable(f"schema registry {self.url}: registering {subject} failed: "
                                      f"{_describe(exc)}") from None
        except Exception as exc:  # the transport's errors: connection refused, timeouts, TLS
            raise RegistryUnreachable(f"schema registry {self.url} unreachable: {_describe(exc)}") from None

    def schema_text(self, schema_id: int) -> str:
        """The text of the schema with id ``schema_id``.

        Raises
        ------
        SchemaNotFound
            When the registry has no such id.
        RegistryUnreachable
            When the registry cannot be reached, or answers with another error.
        """
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return self._client.get_schema(int(schema_id)).schema_str
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise SchemaNotFound(f"unknown schema id {schema_id}: not in the schema registry {self.url}") from None
            raise RegistryUnreachable(f"schema registry {self.url} answered {exc.http_status_code} for id "
                                      f"{schema_id}: {exc.error_message}") from None
        except Exception as exc:
            raise RegistryUnreachable(f"schema registry unreachable for id {schema_id} ({self.url}): "
                                      f"{_describe(exc)}") from None

    def schema(self, schema_id: int) -> dict:
        """The schema with id ``schema_id``, parsed (see `schema_text` for the errors)."""
        return json.loads(self.schema_text(schema_id))

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()


def _describe(exc: BaseException) -> str:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    if isinstance(exc, SchemaRegistryError):
        return f"{exc.http_status_code} {exc.error_message}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]
