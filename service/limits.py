"""Limits on what one untrusted message may make the decoder do, and their settings.

An alert stream is written by software with bugs, or by a hostile producer on a shared
cluster; so is a body posted to ``/classify``. Every resource one message can claim is
bounded here, *before* the work is done: the size and nesting depth of its writer schema
(a recursive schema is refused outright: its depth has no bound), how many records it may
hold, how far each compressed block and each cutout may inflate, and the side of the
images it may declare. A message over a limit is refused with a `service.decode.alerts.DecodeError`
that names the limit and its setting (a dead letter, or a 422).

The defaults are far above any real alert (a ZTF alert: a 20 kB schema nested 6 deep, one
record, blocks of ~100 kB, 63x63 cutouts of 20 kB; Rubin: 60 kB schemas, 30-100 pixel
cutouts) and low enough that one message cannot take more than a few hundred MB.

Each limit is an `service.settings.Option`: ``--max-schema-bytes`` on the command line of
``rbstream consume``/``serve``, ``RBSTREAM_MAX_SCHEMA_BYTES`` in the environment,
``max_schema_bytes`` in their ``--config`` file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from service.settings import Option, SettingsError, non_negative_int, positive_int

MiB = 1024 * 1024


@dataclass(frozen=True)
class DecodeLimits:
    """What one message may cost the decoder; see the module docstring.

    Attributes
    ----------
    max_schema_bytes : int
        Largest writer schema text (a container's ``avro.schema``, a registry's answer).
    max_schema_depth : int
        Deepest nesting of complex types (records, arrays, maps, unions) in a writer
        schema; recursive schemas are refused whatever it is. 0 turns both checks off,
        which is only safe with ``decode_isolation`` (a crash then kills a worker only).
    max_schema_cache_bytes : int
        Memory of the parsed writer schemas a store keeps (estimated from their parsed form).
    max_records : int
        Most alert records in one message (summed over a container's blocks), checked
        before any is decoded.
    max_block_bytes : int
        Largest decompressed container block; every codec is inflated with this cap.
    max_message_bytes : int
        Largest sum of a message's decompressed blocks.
    max_cutout_bytes : int
        Largest decompressed cutout (gzip FITS) and largest image data a FITS header may
        declare; checked before anything is allocated for it.
    min_stamp_side : int
        Smallest side, in pixels, of a cutout that is scored (see `service.contract.assemble`).
    """

    max_schema_bytes: int = 1 * MiB
    max_schema_depth: int = 32
    max_schema_cache_bytes: int = 64 * MiB
    max_records: int = 1000
    max_block_bytes: int = 16 * MiB
    max_message_bytes: int = 64 * MiB
    max_cutout_bytes: int = 4 * MiB
    min_stamp_side: int = 8

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> "DecodeLimits":
        """From resolved settings (`service.settings.resolve` with `LIMIT_OPTIONS`); missing keys keep defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})


DEFAULT_LIMITS = DecodeLimits()

_D = DEFAULT_LIMITS
#: The limits as settings of the Kafka commands and of ``rbstream serve``.
LIMIT_OPTIONS: tuple[Option, ...] = (
    Option("max_schema_bytes", _D.max_schema_bytes, "largest writer schema of a message, bytes",
           type=positive_int, metavar="BYTES"),
    Option("max_schema_depth", _D.max_schema_depth, "deepest nesting of records/arrays/maps/unions in a writer "
           "schema; recursive schemas are refused (0: no check, only with --decode-isolation)",
           type=non_negative_int, metavar="N"),
    Option("max_schema_cache_bytes", _D.max_schema_cache_bytes, "memory of cached parsed writer schemas, bytes",
           type=positive_int, metavar="BYTES"),
    Option("max_records", _D.max_records, "most alert records in one message", type=positive_int, metavar="N"),
    Option("max_block_bytes", _D.max_block_bytes, "largest decompressed Avro container block, bytes",
           type=positive_int, metavar="BYTES"),
    Option("max_message_bytes", _D.max_message_bytes, "largest decompressed size of one message's blocks, bytes",
           type=positive_int, metavar="BYTES"),
    Option("max_cutout_bytes", _D.max_cutout_bytes, "largest decompressed cutout and FITS image data, bytes",
           type=positive_int, metavar="BYTES"),
    Option("min_stamp_side", _D.min_stamp_side, "smallest cutout side scored, pixels", type=positive_int,
           metavar="PIXELS"),
)


__all__ = ["DEFAULT_LIMITS", "DecodeLimits", "LIMIT_OPTIONS", "SettingsError"]
