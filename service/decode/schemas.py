"""Avro writer schemas of alert messages: parsed once, looked up many times.

Two framings reach the decoder (see `service.decode.alerts`):

* **Avro object containers** (every ZTF message; Rubin alerts stored by brokers):
  the writer schema travels in the container header. `SchemaStore.container_schema`
  parses each *distinct* schema text once and caches it by that text (not by the
  whole header: the 16-byte sync marker differs from file to file).
* **Confluent wire format** (the live Rubin stream): byte 0 is the magic 0, bytes
  1-4 a big-endian schema id, the rest one schemaless Avro record.
  `SchemaStore.schema_for_id` resolves the id from a Confluent-compatible schema
  registry when a URL is configured, otherwise from the schemas shipped in
  ``lsst-alert-packet``, whose id convention is ``major * 100 + minor``
  (``lsst.alert.packet.Schema.get_schema_id``: v7.4 -> 704, v11.1 -> 1101).

`to_wire_format` re-frames a Rubin alert (a record or an object container) in the
wire format with the official schema of its version; replay and tests use it.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import fastavro
from isal import isal_zlib

from service.decode.framing import wire_header
from service.limits import DEFAULT_LIMITS, DecodeLimits

#: Environment variables read by `SchemaStore.from_env`.
ENV_REGISTRY_URL = "RBSTREAM_SCHEMA_REGISTRY_URL"
ENV_RUBIN_SCHEMA_VERSION = "RBSTREAM_RUBIN_SCHEMA_VERSION"

#: Distinct writer schemas kept per store; a stream has a handful, hostile input could have many.
#: The store is also bounded in bytes (`DecodeLimits.max_schema_cache_bytes`).
MAX_CACHED_SCHEMAS = 64
#: Seconds an id found unknown stays unknown before it is looked up again (it may be registered later).
MISS_TTL_SECONDS = 30.0


class UnknownSchema(LookupError):
    """No usable writer schema for a message (unknown id, unparsable schema text...)."""


@dataclass(frozen=True)
class WriterSchema:
    """One parsed writer schema and what the decoder needs to know about it.

    Attributes
    ----------
    parsed : dict
        ``fastavro.parse_schema`` output, ready for ``fastavro.schemaless_reader``.
    reader : dict or None
        A parsed *reader* schema with only what scoring needs (`scoring_reader_schema`):
        reading with it skips the histories (``prv_candidates``, ``prvDiaSources``...)
        instead of building thousands of dict entries. None when it cannot be derived.
    head : (dict, dict or None) or None
        ZTF only: parsed writer and reader schemas of the record's leading fields, up to
        ``candidate`` (`service.decode.ztf_fast_path.head_schemas`): what comes before the history.
    tail : tuple or None
        ZTF only: ``(field name, record tag, null tag)`` of the three cutout fields when they
        close the record (`service.decode.ztf_fast_path.cutout_tail_layout`), which lets the decoder
        find them from the record's end without walking the history.
    survey : str or None
        ``ztf`` or ``rubin``, recognised from the top-level field names (never from
        the schema name: community brokers rename it, e.g. ``topLevelRecord``), or
        None when the record looks like neither.
    fields : frozenset of str
        Top-level field names.
    name : str
        The schema's (full) name, for messages only.
    """

    parsed: Any
    survey: str | None
    fields: frozenset
    name: str
    reader: Any = None
    head: Any = None
    tail: Any = None


def survey_of_fields(fields, candidate_fields=()) -> str | None:
    """Recognise the survey of a record from its top-level field names.

    ZTF alerts have ``candid`` and ``candidate``; Rubin alerts have ``diaSource``.
    Brokers that re-write ZTF alerts (Spark's ``topLevelRecord``) may keep ``candid``
    only inside ``candidate``: pass the ``candidate`` record's field names as
    ``candidate_fields`` to recognise those too.
    """
    fields = set(fields)
    if "candidate" in fields and ("candid" in fields or "candid" in set(candidate_fields)):
        return "ztf"
    if "diaSource" in fields:
        return "rubin"
    return None


def candidate_field_names(definition: Mapping) -> frozenset:
    """Field names of the ``candidate`` record of a schema definition (empty when it has none)."""
    try:
        for field in definition.get("fields", ()):
            if field.get("name") != "candidate":
                continue
            branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
            for branch in branches:
                if isinstance(branch, Mapping) and branch.get("type") == "record":
                    return frozenset(f.get("name") for f in branch.get("fields", ()))
    except (AttributeError, TypeError, KeyError):
        pass
    return frozenset()


def parse_writer_schema(schema: Any, limits: DecodeLimits = DEFAULT_LIMITS) -> WriterSchema:
    """Parse a schema (JSON text, bytes or a dict) into a `WriterSchema`.

    The text's size, and the definition's nesting depth and recursion, are checked against
    ``limits`` before fastavro sees it (`check_schema_shape`): fastavro reads nested data
    by recursing in C, so a recursive schema with deeply nested data overflows the stack.

    Raises
    ------
    UnknownSchema
        When the text is not JSON or not a valid Avro record schema, or is over a limit.
    """
    if isinstance(schema, (bytes, bytearray, memoryview, str)) and len(schema) > limits.max_schema_bytes:
        raise UnknownSchema(f"the writer schema is {len(schema)} bytes, over the limit of "
                            f"{limits.max_schema_bytes} (max_schema_bytes)")
    try:
        if isinstance(schema, (bytes, bytearray, memoryview)):
            schema = bytes(schema).decode("utf-8")
        definition = json.loads(schema) if isinstance(schema, str) else schema
    except RecursionError:
        raise UnknownSchema("the writer schema is not usable JSON: nested too deeply") from None
    except Exception as exc:  # json, unicode: the text is unusable
        raise UnknownSchema(f"the writer schema is not JSON ({type(exc).__name__}: {exc})") from None
    if limits.max_schema_depth:
        check_schema_shape(definition, limits.max_schema_depth)
    try:
        parsed = fastavro.parse_schema(definition)
    except Exception as exc:  # fastavro's SchemaParseException, KeyError, ... all mean "unusable"
        raise UnknownSchema(f"the writer schema cannot be parsed ({type(exc).__name__}: {exc})") from None
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise UnknownSchema("the writer schema is not an Avro record")
    fields = frozenset(f.get("name") for f in parsed.get("fields", ()))
    survey = survey_of_fields(fields, candidate_field_names(parsed))
    head = tail = None
    if survey == "ztf":
        from service.decode import ztf_fast_path  # it reads the scoring fields defined here

        head, tail = ztf_fast_path.head_schemas(definition), ztf_fast_path.cutout_tail_layout(definition)
    return WriterSchema(parsed, survey, fields, str(parsed.get("name", "")), _scoring_reader(definition, survey),
                        head, tail if head is not None else None)


_COMPLEX_NAMED = ("record", "error")


def check_schema_shape(definition: Any, max_depth: int) -> int:
    """The nesting depth of a schema definition; `UnknownSchema` if recursive or deeper than ``max_depth``.

    Depth counts records, arrays, maps and unions, one level each; a reference to a named
    type defined earlier counts that type's own depth. A reference to a record from inside
    its own definition is recursion: data of such a schema can nest without end.
    """
    heights: dict[str, int] = {}
    try:
        return _schema_height(definition, 0, frozenset(), "", heights, max_depth)
    except RecursionError:
        raise UnknownSchema(f"the writer schema nests deeper than {max_depth} levels (max_schema_depth)") from None


def _full_name(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _schema_height(node, depth: int, enclosing: frozenset, namespace: str, heights: dict, max_depth: int) -> int:
    if depth > max_depth:
        raise UnknownSchema(f"the writer schema nests deeper than {max_depth} levels (max_schema_depth)")
    if isinstance(node, str):
        if node in _PRIMITIVES:
            return 0
        names = (node, _full_name(node, namespace))
        if any(name in enclosing for name in names):
            raise UnknownSchema(f"the writer schema is recursive (type {node!r} refers to itself): refused, "
                                "since its data can nest without end")
        height = max((heights.get(name, 0) for name in names), default=0)
        if depth + height > max_depth:
            raise UnknownSchema(f"the writer schema nests deeper than {max_depth} levels (max_schema_depth)")
        return height
    if isinstance(node, list):
        return 1 + max((_schema_height(b, depth + 1, enclosing, namespace, heights, max_depth) for b in node),
                       default=0)
    if not isinstance(node, dict):
        return 0  # not a type: fastavro names the problem
    kind = node.get("type")
    if kind in _COMPLEX_NAMED:
        name = str(node.get("name", ""))
        namespace = str(node.get("namespace") or (name.rpartition(".")[0] if "." in name else namespace))
        full = _full_name(name, namespace)
        inner = enclosing | {full}
        fields = node.get("fields") if isinstance(node.get("fields"), list) else []
        height = 1 + max((_schema_height(f.get("type") if isinstance(f, dict) else None, depth + 1, inner,
                                         namespace, heights, max_depth) for f in fields), default=0)
        heights[full] = height
        return height
    if kind in ("enum", "fixed"):
        name = str(node.get("name", ""))
        heights[_full_name(name, str(node.get("namespace") or namespace))] = 0
        return 0
    if kind == "array":
        return 1 + _schema_height(node.get("items"), depth + 1, enclosing, namespace, heights, max_depth)
    if kind == "map":
        return 1 + _schema_height(node.get("values"), depth + 1, enclosing, namespace, heights, max_depth)
    if isinstance(kind, (dict, list)) or (isinstance(kind, str) and kind not in _PRIMITIVES):
        return _schema_height(kind, depth, enclosing, namespace, heights, max_depth)
    return 0


#: Per survey: nested records kept by the scoring reader schema, and the fields kept in each.
#: The survey's own real/bogus scores (ZTF ``rb``/``drb``, Rubin ``reliability``) are kept
#: to be shown beside ours.
SCORING_FIELDS: Mapping[str, Mapping[str, frozenset]] = {
    "ztf": {"candidate": frozenset({"candid", "jd", "isdiffpos", "xpos", "ypos", "rb", "drb"})},
    "rubin": {
        "diaSource": frozenset({"diaSourceId", "diaObjectId", "midpointMjdTai", "midPointTai", "reliability"}),
        "diaObject": frozenset({"diaObjectId"}),
    },
}

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


def scoring_reader_schema(definition: Mapping, survey: str | None) -> dict | None:
    """A reader schema with only the fields an `Alert` needs, or None.

    Kept: top-level fields of primitive type (ids, versions...), the three cutouts, and
    the survey's detection records (`SCORING_FIELDS`) cut down to the fields we read.
    Everything else (histories, forced photometry, solar-system records) is skipped by
    Avro schema resolution, which is faster than building it (`rbstream bench decode` measures it).
    """
    if survey not in SCORING_FIELDS or not isinstance(definition, Mapping):
        return None
    nested = SCORING_FIELDS[survey]
    fields = []
    for field in definition.get("fields", ()):
        name, kind = field.get("name"), field.get("type")
        if name.startswith("cutout"):
            fields.append(field)
        elif name in nested:
            fields.append(dict(field, type=_trim_record_type(kind, nested[name])))
        elif _is_primitive(kind):
            fields.append(field)
    reader = {k: v for k, v in definition.items() if not k.startswith("__")}
    reader["fields"] = fields
    return reader


def _is_primitive(kind) -> bool:
    if isinstance(kind, list):
        return all(_is_primitive(branch) for branch in kind)
    if isinstance(kind, dict):
        return kind.get("type") in _PRIMITIVES and "logicalType" not in kind
    return kind in _PRIMITIVES


def _trim_record_type(kind, keep: frozenset):
    if isinstance(kind, list):
        return [_trim_record_type(branch, keep) for branch in kind]
    if isinstance(kind, dict) and kind.get("type") == "record":
        out = {k: v for k, v in kind.items() if not k.startswith("__")}
        out["fields"] = [f for f in kind["fields"] if f.get("name") in keep]
        return out
    return kind


def _scoring_reader(definition, survey):
    """`scoring_reader_schema`, parsed; None when it cannot be (the full record is read instead)."""
    reader = scoring_reader_schema(definition, survey)
    if reader is None:
        return None
    try:
        return fastavro.parse_schema(reader)
    except Exception:  # e.g. a kept field refers to a named type defined in a skipped one
        return None


class _LRU:
    """A small thread-safe LRU map (the consumer may decode from threads), bounded in entries and in bytes.

    ``put`` takes the entry's cost in bytes; an entry costing more than the whole budget is
    not kept at all.
    """

    def __init__(self, size: int, max_bytes: int | None = None):
        self.size = size
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            self._data.move_to_end(key)
            return entry[0]

    def put(self, key, value, cost: int = 0) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if self.max_bytes is not None and cost > self.max_bytes:
                return
            self._data[key] = (value, cost)
            self.nbytes += cost
            while len(self._data) > self.size or (self.max_bytes is not None and self.nbytes > self.max_bytes):
                _, (_, dropped) = self._data.popitem(last=False)
                self.nbytes -= dropped

    def __len__(self) -> int:
        return len(self._data)


def deep_size(obj) -> int:
    """Bytes held by a parsed schema (dicts, lists, tuples, strings, numbers), each object counted once."""
    seen: set[int] = set()
    stack = [obj]
    total = 0
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, WriterSchema):
            stack.extend((item.parsed, item.reader, item.head, item.tail, item.fields, item.name))
    return total


# --------------------------------------------------------------------------- lsst-alert-packet


def rubin_schema_id(major: int, minor: int) -> int:
    """Schema id of Rubin alert schema ``major.minor`` (lsst-alert-packet's convention)."""
    return int(major) * 100 + int(minor)


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.fullmatch(r"v?(\d+)[._](\d+)", str(version).strip())
    if not match:
        raise UnknownSchema(f"Rubin schema version {version!r} is not of the form MAJOR.MINOR (e.g. 7.4)")
    return int(match.group(1)), int(match.group(2))


_PACKAGE_LOCK = threading.Lock()
_PACKAGE_SCHEMAS: dict[tuple[int, int], dict] = {}


@functools.lru_cache(maxsize=1)
def rubin_versions() -> tuple[tuple[int, int], ...]:
    """Every Rubin alert schema version shipped in ``lsst-alert-packet``, oldest first."""
    from lsst.alert.packet import get_schema_root

    root = get_schema_root()
    versions = []
    for major in root.iterdir():
        if not major.is_dir() or not major.name.isdigit():
            continue
        for minor in major.iterdir():
            if minor.is_dir() and minor.name.isdigit() and minor.joinpath(
                f"lsst.v{major.name}_{minor.name}.alert.avsc"
            ).is_file():
                versions.append((int(major.name), int(minor.name)))
    return tuple(sorted(versions))


def official_rubin_schema(version) -> dict:
    """The official schema definition (fully resolved dict) of a Rubin version.

    Parameters
    ----------
    version : str or (int, int)
        ``"7.4"``, ``"v7_4"`` or ``(7, 4)``.

    Raises
    ------
    UnknownSchema
        When ``lsst-alert-packet`` does not ship that version.
    """
    major, minor = version if isinstance(version, tuple) else _version_tuple(version)
    with _PACKAGE_LOCK:
        if (major, minor) not in _PACKAGE_SCHEMAS:
            from lsst.alert.packet import Schema, get_schema_path

            path = os.path.join(get_schema_path(major, minor), f"lsst.v{major}_{minor}.alert.avsc")
            if not os.path.isfile(path):
                shipped = ", ".join(f"{a}.{b}" for a, b in rubin_versions())
                raise UnknownSchema(f"lsst-alert-packet ships no Rubin schema {major}.{minor} (it has {shipped})")
            _PACKAGE_SCHEMAS[(major, minor)] = Schema.from_file(path).definition
        return _PACKAGE_SCHEMAS[(major, minor)]


# --------------------------------------------------------------------------- the store


class SchemaStore:
    """Writer schemas of container and wire-format messages, each parsed once.

    Parameters
    ----------
    registry_url : str, optional
        A Confluent-compatible schema registry (``GET {url}/schemas/ids/{id}``).
        When set, wire-format ids are resolved there (and only there).
    rubin_version : str, optional
        Rubin schema version (``"7.4"``) to read wire-format messages whose id
        ``lsst-alert-packet`` does not know (a private registry with its own ids).
        Without a registry URL, ids of shipped versions (``major*100+minor``) always
        resolve to their own version.
    timeout : float
        Seconds allowed for one registry request.
    limits : DecodeLimits, optional
        Size and depth of the writer schemas accepted, and the bytes the parsed ones may
        take (shared by the container and the id caches, half each).
    """

    def __init__(self, registry_url: str | None = None, rubin_version: str | None = None, timeout: float = 5.0,
                 limits: DecodeLimits | None = None):
        self.registry_url = registry_url.rstrip("/") if registry_url else None
        self.rubin_version = _version_tuple(rubin_version) if rubin_version else None
        self.timeout = timeout
        self.limits = limits or DEFAULT_LIMITS
        half = self.limits.max_schema_cache_bytes // 2
        self._by_text = _LRU(MAX_CACHED_SCHEMAS, half)
        self._by_id = _LRU(MAX_CACHED_SCHEMAS, half)
        self._misses = _LRU(MAX_CACHED_SCHEMAS)
        self._client = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, limits: DecodeLimits | None = None) -> "SchemaStore":
        """A store configured from ``RBSTREAM_SCHEMA_REGISTRY_URL`` and ``RBSTREAM_RUBIN_SCHEMA_VERSION``."""
        environ = os.environ if environ is None else environ
        return cls(registry_url=environ.get(ENV_REGISTRY_URL) or None,
                   rubin_version=environ.get(ENV_RUBIN_SCHEMA_VERSION) or None, limits=limits)

    def __repr__(self) -> str:
        return f"SchemaStore(registry_url={self.registry_url!r}, rubin_version={self.rubin_version!r})"

    # Containers ------------------------------------------------------------------------------

    def container_schema(self, schema_text: bytes) -> WriterSchema:
        """The parsed writer schema of a container header's ``avro.schema`` value (cached by text).

        The cache is keyed by (length, CRC-32) of the text, ISA-L's CRC being several times
        faster than hashing 20 kB of schema for a dict, and a hit is confirmed by comparing
        the texts, so two schemas can never be confused.
        """
        if len(schema_text) > self.limits.max_schema_bytes:
            raise UnknownSchema(f"the writer schema is {len(schema_text)} bytes, over the limit of "
                                f"{self.limits.max_schema_bytes} (max_schema_bytes)")
        key = (len(schema_text), isal_zlib.crc32(schema_text))
        cached = self._by_text.get(key)
        if cached is not None and cached[0] == schema_text:
            return cached[1]
        writer = parse_writer_schema(schema_text, self.limits)
        text = bytes(schema_text)
        self._by_text.put(key, (text, writer), deep_size(writer) + sys.getsizeof(text))
        return writer

    @property
    def cached_bytes(self) -> int:
        """Estimated memory of the parsed schemas this store keeps."""
        return self._by_text.nbytes + self._by_id.nbytes

    # Wire format -----------------------------------------------------------------------------

    def schema_for_id(self, schema_id: int) -> WriterSchema:
        """The parsed writer schema of a wire-format schema id (cached by id).

        Raises
        ------
        UnknownSchema
            When neither the registry nor ``lsst-alert-packet`` knows the id.
        """
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        miss = self._misses.get(schema_id)
        if miss is not None and time.monotonic() - miss[0] < MISS_TTL_SECONDS:
            # A stream of messages with a bad id must not mean one registry request each.
            raise UnknownSchema(miss[1])
        try:
            if self.registry_url:
                cached = parse_writer_schema(self._fetch_from_registry(schema_id), self.limits)
            else:
                cached = parse_writer_schema(self._package_definition(schema_id), self.limits)
        except UnknownSchema as exc:
            self._misses.put(schema_id, (time.monotonic(), str(exc)))
            raise
        self._by_id.put(schema_id, cached, deep_size(cached))
        return cached

    def _package_definition(self, schema_id: int) -> dict:
        major, minor = divmod(int(schema_id), 100)
        if (major, minor) in rubin_versions():
            return official_rubin_schema((major, minor))
        if self.rubin_version is not None:
            return official_rubin_schema(self.rubin_version)
        shipped = ", ".join(str(rubin_schema_id(a, b)) for a, b in rubin_versions())
        raise UnknownSchema(
            f"unknown schema id {schema_id}: lsst-alert-packet knows ids {shipped} (major*100+minor); "
            f"configure a schema registry URL or a Rubin schema version"
        )

    def _fetch_from_registry(self, schema_id: int) -> str:
        from service.registry import RegistryUnreachable, SchemaNotFound, SchemaRegistry

        if self._client is None:
            self._client = SchemaRegistry(self.registry_url, timeout=self.timeout)
        try:
            return self._client.schema_text(schema_id)
        except (SchemaNotFound, RegistryUnreachable) as exc:
            # Either way a schema problem for this message: it goes to the dead-letter topic.
            raise UnknownSchema(str(exc)) from None


_DEFAULT_STORE: SchemaStore | None = None


def default_store() -> SchemaStore:
    """The process-wide store used when a caller passes no ``schemas`` (configured from the environment)."""
    global _DEFAULT_STORE
    if _DEFAULT_STORE is None:
        _DEFAULT_STORE = SchemaStore.from_env()
    return _DEFAULT_STORE


def project_record(record: Any, schema: Any) -> Any:
    """Keep only what ``schema`` describes of ``record`` (recursively), for re-encoding.

    Community brokers add fields (``fink_broker_version``, ``brokerIngestMjd``...) to the
    records they re-write; fastavro would silently drop unknown fields anyway, but an
    explicit projection makes ``to_wire_format`` independent of that behaviour and
    gives missing fields their schema default (or null), so that a record written by a
    broker is re-encoded with exactly the official schema's fields.
    """
    if isinstance(schema, list):  # union: the first branch the value fits
        if record is None:
            return None
        if "null" in schema and isinstance(record, Mapping) and is_all_null(record):
            # Spark writes an absent record (ssSource of a non-solar-system source, a null
            # diaObject) as a record of nulls, which the official schema's required fields refuse.
            return None
        for branch in schema:
            if isinstance(branch, dict) and branch.get("type") == "record" and isinstance(record, Mapping):
                return project_record(record, branch)
            if isinstance(branch, dict) and branch.get("type") == "array" and isinstance(record, list):
                return project_record(record, branch)
        return record
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record" and isinstance(record, Mapping):
            out = {}
            for field in schema["fields"]:
                name = field["name"]
                if name in record:
                    out[name] = project_record(record[name], field["type"])
                else:
                    out[name] = field.get("default")
            return out
        if kind == "array" and isinstance(record, list):
            return [project_record(item, schema["items"]) for item in record]
        if isinstance(kind, (dict, list)):
            return project_record(record, kind)
    return record


def is_all_null(record: Mapping) -> bool:
    """True when every value of ``record`` is null, or a record (mapping) that is itself all null."""
    return all(value is None or (isinstance(value, Mapping) and is_all_null(value)) for value in record.values())


def rubin_version_of_record(record: Mapping) -> tuple[int, int] | None:
    """The Rubin schema version a record says it follows, when it says so.

    Brokers record it differently; we look at ``lsst_schema_version`` (``lsst.v9_0``),
    ``schemavsn`` and ``schema_version``.
    """
    for key in ("lsst_schema_version", "schema_version", "schemavsn"):
        value = record.get(key)
        if isinstance(value, str):
            match = re.search(r"(\d+)[._](\d+)", value)
            if match:
                return int(match.group(1)), int(match.group(2))
    return None


def _field_paths(record_or_schema: Mapping, is_schema: bool) -> set[str]:
    """Top-level field names plus ``parent.child`` names of nested records (one level)."""
    paths: set[str] = set()
    if is_schema:
        for field in record_or_schema["fields"]:
            paths.add(field["name"])
            branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
            for branch in branches:
                if isinstance(branch, dict) and branch.get("type") == "record":
                    paths.update(f"{field['name']}.{sub['name']}" for sub in branch["fields"])
    else:
        for key, value in record_or_schema.items():
            paths.add(key)
            if isinstance(value, Mapping):
                paths.update(f"{key}.{sub}" for sub in value)
    return paths


def guess_rubin_version(record: Mapping) -> tuple[int, int]:
    """The shipped Rubin schema version whose fields best match a record's.

    For broker-rewritten records that do not say which version they follow: the
    Jaccard similarity of the field names (top level and one level down, e.g.
    ``diaSource.midpointMjdTai``) with each official schema; ties go to the newest.
    Right for every sample in ../shared/data (7.4 and 9.0).
    """
    mine = _field_paths(record, is_schema=False)
    best = None
    for version in rubin_versions():
        theirs = _field_paths(official_rubin_schema(version), is_schema=True)
        score = len(mine & theirs) / max(1, len(mine | theirs))
        if best is None or score >= best[0]:
            best = (score, version)
    return best[1]


def to_wire_format(alert: bytes | Mapping, version=None, schema_id: int | None = None) -> bytes:
    """Re-frame a Rubin alert in the Confluent wire format with its OFFICIAL schema.

    Parameters
    ----------
    alert : bytes or mapping
        An Avro object container holding exactly one alert (as stored by brokers,
        e.g. ``../shared/data/rubin/*.avro``), or a decoded alert record.
    version : str or (int, int), optional
        Rubin schema version to encode with (``"7.4"``). Defaults to the version the
        record names (``lsst_schema_version``...), else `guess_rubin_version`.
    schema_id : int, optional
        Id written after the magic byte; defaults to lsst-alert-packet's id of
        ``version`` (``major*100 + minor``), which `SchemaStore` resolves.

    Returns
    -------
    bytes
        ``b"\\x00" + id (4 bytes, big-endian) + schemaless Avro body``.

    Notes
    -----
    The record is first projected onto the official schema (`project_record`):
    broker-only fields are dropped and official fields the broker did not keep get
    their default; a field that is required and absent makes fastavro raise.
    """
    if isinstance(alert, (bytes, bytearray, memoryview)):
        records = list(fastavro.reader(io.BytesIO(bytes(alert))))
        if len(records) != 1:
            raise ValueError(f"to_wire_format: expected one alert in the container, found {len(records)}")
        record = records[0]
    else:
        record = alert
    if version is None:
        version = rubin_version_of_record(record) or guess_rubin_version(record)
    major, minor = version if isinstance(version, tuple) else _version_tuple(version)
    definition = official_rubin_schema((major, minor))
    body = io.BytesIO()
    body.write(wire_header(rubin_schema_id(major, minor) if schema_id is None else schema_id))
    projected = project_record(record, definition)
    try:
        fastavro.schemaless_writer(body, definition, projected)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"to_wire_format: the record does not fit Rubin schema {major}.{minor}: "
                         f"{_misfit(projected, definition, exc)}") from None
    return body.getvalue()


def _misfit(record: Mapping, definition: Mapping, error: Exception) -> str:
    """Which field of ``record`` ``definition`` refuses (fastavro's own error dumps the whole record)."""
    from fastavro.validation import ValidationError, validate

    try:
        validate(record, definition, raise_errors=True)
    except ValidationError as exc:
        return "; ".join(str(e) for e in exc.errors[:3])
    except Exception:  # noqa: BLE001 - the description is best effort
        pass
    text = str(error)
    return text if len(text) <= 200 else text[:200] + "..."
