"""Decode ZTF and Rubin alert messages into `Alert` objects with their cutouts.

* `decode_message(message, survey="auto", schemas=None) -> list[Alert]` — one Kafka
  message value into its alerts (usually one):

  - an Avro object container with its writer schema embedded (every ZTF message,
    schema versions 2016 prototypes .. 4.x; Rubin alerts stored by brokers);
  - the Confluent wire format (magic byte 0, 4-byte big-endian schema id,
    schemaless Avro body): the live Rubin stream; the id is resolved by
    `service.decode.schemas.SchemaStore` (a registry, or ``lsst-alert-packet``).

* raises `DecodeError` with ``kind`` one of ``decode`` (bytes are not an alert),
  ``schema`` (unknown schema id / unusable schema / not the survey asked for),
  ``cutout`` (a cutout missing, not FITS, not 2-D...), and a human ``reason``.
  No other exception escapes `decode_message`, whatever the bytes.

The survey is recognised from the record's field names, never from the schema
name (brokers rename schemas, e.g. ``topLevelRecord``, ``topLevelRecord.value``):
``candidate`` with a ``candid`` (at the top level, or only inside ``candidate`` as
Spark re-writes may have it) is ZTF, ``diaSource`` is Rubin. A record that is neither
but holds one as a field (an envelope) is decoded as that alert.

Speed: each distinct writer schema is parsed once (`SchemaStore`); records
are read with ``fastavro.schemaless_reader`` straight from the message bytes, with a
reader schema that skips what scoring does not need; gzip is ISA-L's; FITS cutouts are
read by `service.decode.fits.read_image`. Most of a ZTF alert's Avro time is its history
(``prv_candidates``: ~100 fields per earlier detection), so for a ZTF message holding
one record the ids are read from the record's head and the cutouts found from its end
(`service.decode.ztf_fast_path`), never walking the history; any doubt (layout not
recognised, a stamp that does not decode) falls back to reading the record from the
front. `Alert.record` still gives the whole record, decoded when first used.
"""

from __future__ import annotations

import bz2
import contextvars
import io
import lzma
import math
import re
import traceback
from dataclasses import dataclass, field
from collections.abc import Mapping

import fastavro
import numpy as np
from isal import isal_zlib

from service.decode import fits, ztf_fast_path
from service.contract import crop_around_source
from service.limits import DEFAULT_LIMITS, DecodeLimits
from service.surveys import CUTOUT_FIELDS, SURVEY_CHOICES, SURVEY_SCORES
from service.decode.framing import (
    WIRE_MAGIC,
    is_container,
    read_container_header,
    read_long,
    read_uvarint,
    split_wire_format,
)
from service.decode.schemas import SchemaStore, UnknownSchema, WriterSchema, default_store, survey_of_fields


#: Side of a full ZTF cutout; smaller ones were cut at the CCD edge.
ZTF_CUTOUT_SIZE = 63

#: Largest decompressed cutout accepted by default (a 63x63 float32 FITS is 20 kB): guards against
#: gzip bombs; `DecodeLimits.max_cutout_bytes` sets it.
MAX_CUTOUT_BYTES = DEFAULT_LIMITS.max_cutout_bytes

#: The limits of the message being decoded (set by `decode_message`, read where cutouts are inflated).
_LIMITS: contextvars.ContextVar[DecodeLimits] = contextvars.ContextVar("rbstream_decode_limits",
                                                                         default=DEFAULT_LIMITS)

#: JD of MJD 0.
MJD_OFFSET = 2400000.5

_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_MAGICS = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG\r\n\x1a\n": "a PNG image", b"GIF8": "a GIF image"}


#: ZTF ``candidate.isdiffpos`` values of a detection on the negative (template - science) difference.
NEGATIVE_DETECTION = ("f", "0")


class DecodeError(ValueError):
    """An alert message that cannot be scored.

    Parameters
    ----------
    kind : str
        ``decode``, ``schema`` or ``cutout`` (labels of ``rbstream_alerts_failed_total``).
    reason : str
        What is wrong, for people (goes in the DLQ header ``rbstream.reason``).
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason

    def __reduce__(self):  # picklable across worker processes (service.decode.stamps)
        return (DecodeError, (self.kind, self.reason))


@dataclass
class Alert:
    """One decoded detection, ready to be turned into model input.

    Attributes
    ----------
    survey : str
        ``ztf`` or ``rubin``.
    candidate_id : int
        ZTF ``candid`` or Rubin ``diaSource.diaSourceId``.
    object_id : str
        ZTF ``objectId`` or Rubin ``diaObject.diaObjectId`` (as a string; may be empty).
    observation_mjd : float or None
        Time of the exposure, MJD (ZTF ``candidate.jd`` - 2400000.5; Rubin ``midpointMjdTai``).
    images : dict of str to ndarray
        ``science``, ``template``, ``difference`` cutouts, native float32 arrays.
    centre : (row, col) or None
        Source position in the cutouts when it is not their geometric centre
        (ZTF cutouts truncated at the CCD edge); see `service.contract.fit_stamp`.
    record : mapping
        The alert's whole Avro record (for re-publishing the alert with its score). A
        `LazyRecord`: decoded on first access, since scoring needs only a few fields.
    survey_score : float or None
        The survey's own real/bogus score, shown beside ours: ZTF ``candidate.drb`` (braai)
        when the alert has it, else ``candidate.rb``; Rubin ``diaSource.reliability``.
        None when the alert has none.
    survey_score_name : str or None
        Which score `survey_score` is: ``drb``, ``rb`` or ``reliability``.
    unreadable : dict of str to str
        Cutouts the alert does not carry (absent, null or empty), by name, with the reason a
        model that needs them refuses the alert; only the difference may be missing (a model
        of template and science scores such an alert), the others fail the decoding.
    """

    survey: str
    candidate_id: int
    object_id: str
    observation_mjd: float | None
    images: dict[str, np.ndarray]
    centre: tuple[float, float] | None = None
    record: Mapping | None = field(default=None, repr=False)
    survey_score: float | None = None
    survey_score_name: str | None = None
    unreadable: dict[str, str] = field(default_factory=dict)


def decode_message(message: bytes, survey: str = "auto", schemas: SchemaStore | None = None,
                   crop: int | None = None) -> list[Alert]:
    """Decode one Kafka message value into its alerts.

    Parameters
    ----------
    message : bytes
        The message value: an Avro object container or a Confluent wire-format message.
    survey : {"auto", "ztf", "rubin"}
        ``auto`` recognises the survey from the record's fields; a named survey
        also rejects (kind ``schema``) alerts of the other survey.
    schemas : SchemaStore, optional
        Where writer schemas are cached and wire-format ids resolved; defaults to a
        process-wide store configured from the environment (`service.decode.schemas.default_store`).
        Its ``limits`` (`service.limits.DecodeLimits`) bound what the message may cost.
    crop : int, optional
        Crop each alert's cutouts, as soon as they are decoded, to ``crop`` pixels a side
        around the source (`service.contract.crop_around_source`; the largest stamp of the
        models in use): a message of many records with huge images then never holds more
        than one record's full images. Stamps cut from the cropped images are the same.

    Returns
    -------
    list of Alert
        One per record in the message (a ZTF message holds one).

    Raises
    ------
    DecodeError
        For every problem with the message; nothing else escapes.
    """
    if survey not in SURVEY_CHOICES:
        raise ValueError(f"survey must be one of {SURVEY_CHOICES}, got {survey!r}")
    store = default_store() if schemas is None else schemas
    token = _LIMITS.set(getattr(store, "limits", DEFAULT_LIMITS))
    try:
        alerts, failure = _decode(message, survey, store, crop)
    finally:
        _LIMITS.reset(token)
    if failure is not None:
        # Raised here, outside any handler and after _decode's frames are gone: the error
        # holds no traceback into the frames that held the inflated blocks and images.
        raise DecodeError(*failure)
    for index, alert in enumerate(alerts):
        alert.record = LazyRecord(message, index, store)
    return alerts


def _decode(message, survey: str, store: SchemaStore, crop: int | None):
    """``(alerts, None)``, or ``(None, (kind, reason))`` for a message that cannot be scored."""
    def to_alerts(records):
        alerts = []
        for record, writer in records:
            alert = _to_alert(record, writer, survey)
            if crop is not None:
                alert.images, alert.centre = crop_around_source(alert.images, alert.centre, crop)
            alerts.append(alert)
        return alerts

    records: list = []
    try:
        try:
            records = _read_records(message, store, FAST)
            return to_alerts(records), None
        except DecodeError as exc:
            if exc.kind != "cutout" or not any(isinstance(r, ztf_fast_path.TailRecord) for r, _ in records):
                raise
            # The cutouts were found from the record's end (see ztf_fast_path.cutouts_from_end); when they
            # do not decode, read the record the long way before blaming the alert.
            records = _read_records(message, store, SCORING)
            return to_alerts(records), None
    except DecodeError as exc:
        failure = (exc.kind, exc.reason)
        _forget(exc)
    except UnknownSchema as exc:
        failure = ("schema", scrub_paths(str(exc)))
        _forget(exc)
    except MemoryError as exc:
        failure = ("decode", "not enough memory to decode this message")
        _forget(exc)
    except Exception as exc:  # noqa: BLE001 - the contract: any other failure is undecodable bytes
        failure = ("decode", f"not a readable alert ({_describe(exc)})")
        _forget(exc)
    return None, failure


def _forget(exc: BaseException) -> None:
    """Drop what a caught exception's traceback keeps alive (the locals of every frame it went
    through: inflated blocks, images), now, instead of whenever the cycle collector runs."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__ or exc.__cause__


def read_full_records(message: bytes, schemas: SchemaStore | None = None) -> list[dict]:
    """Every alert record of a message, with all its fields (what `Alert.record` holds).

    Raises
    ------
    DecodeError
        As `decode_message`.
    """
    store = default_store() if schemas is None else schemas
    token = _LIMITS.set(getattr(store, "limits", DEFAULT_LIMITS))
    try:
        return [record for record, _ in _read_records(message, store, FULL)]
    except DecodeError:
        raise
    except UnknownSchema as exc:
        raise DecodeError("schema", scrub_paths(str(exc))) from None
    except Exception as exc:  # noqa: BLE001 - the contract: any other failure is undecodable bytes
        raise DecodeError("decode", f"not a readable alert ({_describe(exc)})") from None
    finally:
        _LIMITS.reset(token)


class LazyRecord(Mapping):
    """An alert's full Avro record, decoded on first use.

    Scoring needs a few fields, which `decode_message` reads with a reduced reader
    schema; the whole record (histories of hundreds of fields) is only decoded when
    someone looks at it, e.g. to re-publish the alert. It behaves as a read-only dict.
    A message whose history is corrupt (but whose ids and cutouts are fine) is scored,
    and raises `DecodeError` here, on first access.
    """

    __slots__ = ("_message", "_index", "_schemas", "_record")

    def __init__(self, message: bytes, index: int, schemas: SchemaStore | None = None):
        self._message = bytes(message)
        self._index = index
        self._schemas = schemas
        self._record = None

    @property
    def data(self) -> dict:
        """The decoded record, a plain dict."""
        if self._record is None:
            self._record = read_full_records(self._message, self._schemas)[self._index]
        return self._record

    def __getitem__(self, key):
        return self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        state = "decoded" if self._record is not None else "not decoded yet"
        return f"<LazyRecord #{self._index} of a {len(self._message)}-byte message, {state}>"

    def __reduce__(self):
        # Stores hold locks and HTTP clients: a copy sent to another process uses that
        # process's default store (the same configuration, from the environment).
        return (LazyRecord, (self._message, self._index, None))


#: An absolute file path (two or more components, not part of a URL): never shown to clients.
_PATH = re.compile(r"(?<![\w:/.])(?:/[\w.+\-]+){2,}/?")


def scrub_paths(text: str) -> str:
    """``text`` with absolute file paths (a library's message may quote its own files) replaced by ``<path>``."""
    return _PATH.sub("<path>", text)


def _describe(exc: BaseException) -> str:
    text = scrub_paths(str(exc))
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- framing


#: How much of a record `_read_records` reads: FULL, every field; SCORING, the fields an
#: `Alert` needs (reader schema); FAST, as SCORING but ZTF cutouts are found from the end.
FULL, SCORING, FAST = "full", "scoring", "fast"


def _read_records(message, store: SchemaStore, mode: str) -> list[tuple[dict, WriterSchema]]:
    """(record, writer schema) of each alert in the message, read as ``mode`` says."""
    if message is None:
        raise DecodeError("decode", "empty message (no value)")
    if not isinstance(message, bytes):
        if not isinstance(message, (bytearray, memoryview)):
            raise DecodeError("decode", f"a message must be bytes, got {type(message).__name__}")
        message = bytes(message)
    if not message:
        raise DecodeError("decode", "empty message")
    if is_container(message):
        return _read_container(message, store, mode)
    if message[0] == WIRE_MAGIC:
        return _read_wire_format(message, store, mode)
    raise DecodeError(
        "decode",
        f"not an alert: neither an Avro object container (starts with 'Obj\\x01') nor the Confluent "
        f"wire format (magic byte 0); starts with {message[:8]!r}",
    )


def _read_wire_format(message: bytes, store: SchemaStore, mode: str) -> list[tuple[dict, WriterSchema]]:
    if len(message) < 6:
        raise DecodeError("decode", f"truncated wire-format message ({len(message)} bytes)")
    schema_id, _ = split_wire_format(message)
    writer = store.schema_for_id(schema_id)
    stream = io.BytesIO(message)
    stream.seek(5)
    record = _read_one(stream, writer, mode)
    left = len(message) - stream.tell()
    if left:
        # A schemaless body has no framing of its own: bytes left over mean the id names
        # a schema other than the writer's, or the message was corrupted.
        raise DecodeError("decode", f"{left} bytes left after the record: wrong schema id {schema_id} or corrupt body")
    return [(record, writer)]


def _container_blocks(message: bytes, pos: int, sync: bytes, limits: DecodeLimits) -> list[tuple[int, int, int]]:
    """``(record count, start, size)`` of every block, checked before any is decoded.

    The framing is walked first (cheap: no decompression), so that a message holding more
    records than `DecodeLimits.max_records` is refused before a single one is read.
    """
    blocks = []
    total = 0
    size = len(message)
    while pos < size:
        count, pos = read_long(message, pos)
        nbytes, pos = read_long(message, pos)
        # Each record takes at least one byte: a larger count is corruption (and would loop for ages).
        if count < 0 or nbytes < 0 or count > nbytes or pos + nbytes + 16 > size:
            raise DecodeError("decode", "truncated or corrupt Avro container block")
        if message[pos + nbytes : pos + nbytes + 16] != sync:
            raise DecodeError("decode", "Avro container sync marker mismatch (corrupt or concatenated data)")
        total += count
        if total > limits.max_records:
            raise DecodeError("decode", f"the message holds more than {limits.max_records} records "
                                        "(max_records)")
        blocks.append((count, pos, nbytes))
        pos += nbytes + 16
    return blocks


def _inflate(codec: bytes, data: bytes, limit: int) -> bytes:
    """One container block decompressed, refused as soon as it would pass ``limit`` bytes."""
    if codec == b"deflate":
        inflater = isal_zlib.decompressobj(-15)
        out = inflater.decompress(data, limit + 1)
        finished = inflater.eof
    elif codec == b"bzip2":
        inflater = bz2.BZ2Decompressor()
        out = inflater.decompress(data, limit + 1)
        finished = inflater.eof
    elif codec == b"xz":
        inflater = lzma.LZMADecompressor()
        out = inflater.decompress(data, limit + 1)
        finished = inflater.eof
    else:
        out, finished = _inflate_optional(codec, data, limit)
    if len(out) > limit:
        raise DecodeError("decode", f"an Avro container block ({codec.decode('ascii', 'replace')}) decompresses "
                                    f"to more than {limit} bytes (max_block_bytes)")
    if not finished:
        raise DecodeError("decode", f"an Avro container block is not valid {codec.decode('ascii', 'replace')} "
                                    "data (truncated)")
    return out


def _inflate_optional(codec: bytes, data: bytes, limit: int) -> tuple[bytes, bool]:
    """Codecs whose libraries are optional, each bounded by the size its frame declares."""
    name = codec.decode("ascii", "replace")
    if codec == b"zstandard":
        try:
            import zstandard
        except ImportError:
            raise DecodeError("decode", "Avro container codec zstandard is not installed here") from None
        parts, size = [], 0
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while size <= limit:
                chunk = reader.read(min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
        return b"".join(parts), True
    if codec == b"snappy":
        try:
            import snappy
        except ImportError:
            raise DecodeError("decode", "Avro container codec snappy is not installed here") from None
        body = data[:-4]  # Avro appends the CRC-32 of the uncompressed data
        try:
            declared, _ = read_uvarint(body)  # a snappy block starts with its uncompressed length
        except ValueError:
            raise DecodeError("decode", "an Avro container block is not valid snappy data") from None
        if declared > limit:
            raise DecodeError("decode", f"an Avro container block (snappy) declares {declared} bytes, over the "
                                        f"limit of {limit} (max_block_bytes)")
        return snappy.decompress(body), True
    raise DecodeError("decode", f"unknown Avro container codec {name!r} (null, deflate, bzip2, xz, "
                                "zstandard, snappy)")


def _read_container(message: bytes, store: SchemaStore, mode: str) -> list[tuple[dict, WriterSchema]]:
    try:
        metadata, sync, pos = read_container_header(message)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise DecodeError("decode", f"truncated or corrupt Avro container header ({_describe(exc)})") from None
    schema_text = metadata.get("avro.schema")
    if not schema_text:
        raise DecodeError("schema", "the Avro container header has no writer schema (avro.schema)")
    writer = store.container_schema(schema_text)
    limits = _LIMITS.get()
    codec = metadata.get("avro.codec", b"null")
    records = []
    inflated = 0
    stream = io.BytesIO(message)  # shares the bytes; seek() to each block, no copy
    for count, pos, nbytes in _container_blocks(message, pos, sync, limits):
        if codec == b"null":
            buffer, start, end = message, pos, pos + nbytes
        else:
            buffer = _inflate(codec, message[pos : pos + nbytes], limits.max_block_bytes)
            start, end = 0, len(buffer)
            inflated += len(buffer)
            if inflated > limits.max_message_bytes:
                raise DecodeError("decode", f"the message's blocks decompress to more than "
                                            f"{limits.max_message_bytes} bytes (max_message_bytes)")
        block = stream if buffer is message else io.BytesIO(buffer)
        block.seek(start)
        record = None
        if count == 1 and mode == FAST and writer.tail is not None:
            # One record in the block: its end is the block's end, and ZTF cutouts close the record.
            record = ztf_fast_path.read_from_both_ends(buffer, block, start, end, writer)
        if record is not None:
            records.append((record, writer))
        else:
            block.seek(start)  # the tail attempt may have read the head
            for _ in range(count):
                records.append((_read_one(block, writer, mode), writer))
            if block.tell() != end:
                raise DecodeError("decode", "Avro container block size does not match its records (corrupt data)")
        del buffer, block  # one inflated block at a time
    if not records:
        raise DecodeError("decode", "the Avro container holds no record")
    return records


def _read_one(stream, writer: WriterSchema, mode: str):
    if mode == FULL or writer.reader is None:
        return fastavro.schemaless_reader(stream, writer.parsed)
    return fastavro.schemaless_reader(stream, writer.parsed, writer.reader)


# --------------------------------------------------------------------------- records -> alerts


def _to_alert(record, writer: WriterSchema, survey: str) -> Alert:
    if not isinstance(record, dict):
        raise DecodeError("schema", f"the alert record is a {type(record).__name__}, not an Avro record")
    found = writer.survey
    if found is None:
        found, record = _wrapped_alert(record)
    if found is None:
        fields = ", ".join(sorted(writer.fields)[:12])
        raise DecodeError(
            "schema",
            f"record {writer.name or '?'} is neither a ZTF alert (candidate, with a candid) nor a Rubin alert "
            f"(diaSource), nor a record wrapping one; its fields: {fields}",
        )
    if survey != "auto" and survey != found:
        raise DecodeError("schema", f"expected a {survey} alert, got a {found} alert (record {writer.name})")
    return _ztf_alert(record) if found == "ztf" else _rubin_alert(record)


def _wrapped_alert(record: dict) -> tuple[str | None, dict]:
    """(survey, alert) of an alert wrapped in an envelope record (e.g. ``{key, value: alert, topic...}``).

    Some broker and Kafka Connect dumps store the alert as one field of a record of their
    own; a field holding a record recognised as an alert is that alert. (None, record) when
    no field is one.
    """
    for value in record.values():
        if isinstance(value, dict):
            candidate = value.get("candidate")
            found = survey_of_fields(value, candidate if isinstance(candidate, dict) else ())
            if found is not None:
                return found, value
    return None, record


def _ztf_alert(record: dict) -> Alert:
    # 2016 prototypes have no objectId; their alertId is the closest thing.
    object_id = record.get("objectId")
    if object_id is None:
        object_id = record.get("alertId")
    which = f" (objectId {object_id})" if object_id is not None else ""
    candidate = record.get("candidate")
    if not isinstance(candidate, dict):
        raise DecodeError("decode", f"ZTF alert without a candidate record: candidate is null{which}")
    candid = record.get("candid")
    if candid is None:
        candid = candidate.get("candid")
    if candid is None:
        raise DecodeError("decode", f"ZTF alert without a candid: null at the top level and in candidate{which}")
    jd = candidate.get("jd")
    label = f"ztf candid {candid}"
    images, unreadable = _read_cutouts(record, label)
    if "difference" in images and str(candidate.get("isdiffpos", "t")).lower() in NEGATIVE_DETECTION:
        # ZTF cuts a negative detection out of the template-minus-science image; the stamp
        # contract's difference is science minus template, whatever the sign of the source.
        images["difference"] = np.negative(images["difference"])
    return Alert(
        survey="ztf",
        candidate_id=int(candid),
        object_id="" if object_id is None else str(object_id),
        observation_mjd=None if jd is None else float(jd) - MJD_OFFSET,
        images=images,
        # The cutouts of one alert share their shape; the science one is always there.
        centre=ztf_source_position(images["science"].shape, candidate),
        record=record,
        unreadable=unreadable,
        **_survey_score(candidate, SURVEY_SCORES["ztf"]),
    )


def _rubin_alert(record: dict) -> Alert:
    source = record.get("diaSource")
    top_id = record.get("diaSourceId")  # brokers (Fink) copy it to the top level
    which = f" (diaSourceId {top_id})" if top_id is not None else ""
    if not isinstance(source, dict):
        raise DecodeError("decode", f"Rubin alert without a diaSource record: diaSource is null{which}")
    source_id = source.get("diaSourceId")
    if source_id is None:
        source_id = top_id
    if source_id is None:
        raise DecodeError("decode", "Rubin alert without a diaSourceId: null in diaSource and at the top level")
    dia_object = record.get("diaObject")
    if isinstance(dia_object, dict) and dia_object.get("diaObjectId") is not None:
        object_id = dia_object["diaObjectId"]
    else:
        # diaObject is null (e.g. a solar-system source): the source may still name its object.
        object_id = source.get("diaObjectId") or ""
    mjd = source.get("midpointMjdTai")
    if mjd is None:
        mjd = source.get("midPointTai")  # schemas 3.0 and 4.0: the same quantity, older name
    label = f"rubin diaSourceId {source_id}"
    images, unreadable = _read_cutouts(record, label)
    return Alert(
        survey="rubin",
        candidate_id=int(source_id),
        object_id=str(object_id),
        observation_mjd=None if mjd is None else float(mjd),
        images=images,
        centre=None,
        record=record,
        unreadable=unreadable,
        **_survey_score(source, SURVEY_SCORES["rubin"]),
    )


def _survey_score(detection: Mapping, names: tuple[str, ...]) -> dict:
    """``survey_score`` and ``survey_score_name`` of an `Alert`: the first of ``names`` that is a finite number."""
    for name in names:
        value = detection.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return {"survey_score": float(value), "survey_score_name": name}
    return {}


#: Cutouts an alert may lack and still be decoded: without a difference image, a model of
#: template and science can score it; every model needs the other two.
OPTIONAL_CUTOUTS = ("difference",)


class _MissingCutout(Exception):
    """A cutout field that is absent, null or empty: no image at all (not a broken one)."""


def _read_cutouts(record: dict, label: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(images, unreadable)``: the cutouts by name, and the optional ones missing with why."""
    images, unreadable = {}, {}
    for name, field_name in CUTOUT_FIELDS.items():
        try:
            images[name] = _read_cutout_field(record, field_name, label)
        except _MissingCutout as exc:
            if name not in OPTIONAL_CUTOUTS:
                raise DecodeError("cutout", str(exc)) from None
            unreadable[name] = str(exc)
    return images, unreadable


def _read_cutout_field(record: dict, field_name: str, label: str) -> np.ndarray:
    if field_name not in record:
        raise _MissingCutout(f"{field_name} is absent from this alert's schema ({label})")
    value = record[field_name]
    where = field_name
    if isinstance(value, dict):  # ZTF: a record {fileName, stampData}
        where = f"{field_name}.stampData"
        value = value.get("stampData")
    if value is None:
        raise _MissingCutout(f"{where} is missing (null) ({label})")
    if not isinstance(value, bytes):
        raise DecodeError("cutout", f"{where} is a {type(value).__name__}, not FITS bytes ({label})")
    if not value:
        # The same words as read_cutout's, so that a refusal reads as it did before.
        raise _MissingCutout(f"{where} is empty ({label})")
    return read_cutout(value, where, context=f" ({label})")


def read_cutout(data: bytes, where: str = "cutout", context: str = "", max_bytes: int | None = None) -> np.ndarray:
    """One cutout's bytes (FITS, gzip-compressed or not) as a float32 2-D image.

    Parameters
    ----------
    data : bytes
    where : str
        Names the cutout in error messages (``cutoutScience.stampData``).
    context : str
        Appended to error messages (which alert: `` (ztf candid 123)``).
    max_bytes : int, optional
        Largest inflated cutout and declared image data; default: the limits of the message
        being decoded (`DecodeLimits.max_cutout_bytes`).

    Raises
    ------
    DecodeError
        Kind ``cutout``: empty, not gzip/FITS (JPEG stamps are named as such), not 2-D.
    """
    if not data:
        raise DecodeError("cutout", f"{where} is empty{context}")
    max_bytes = _LIMITS.get().max_cutout_bytes if max_bytes is None else max_bytes
    if data[:2] == _GZIP_MAGIC:
        try:
            inflater = isal_zlib.decompressobj(31)  # 16 + 15: gzip framing
            inflated = inflater.decompress(data, max_bytes)
        except Exception as exc:  # noqa: BLE001 - isal raises its own error type
            raise DecodeError("cutout", f"{where} is not valid gzip ({_describe(exc)}){context}") from None
        if inflater.unconsumed_tail:
            raise DecodeError("cutout", f"{where} decompresses to more than {max_bytes} bytes "
                                        f"(max_cutout_bytes){context}")
        if not inflater.eof:
            raise DecodeError("cutout", f"{where} is truncated or not valid gzip{context}")
        data = inflated
    for magic, what in _IMAGE_MAGICS.items():
        if data[: len(magic)] == magic:
            raise DecodeError("cutout", f"{where} is {what}, not FITS{context}")
    try:
        image = fits.read_image(data, max_bytes)
    except fits.FitsError as exc:
        raise DecodeError("cutout", f"{where}: {scrub_paths(str(exc))}{context}") from None
    except Exception as exc:  # noqa: BLE001 - anything astropy throws on junk
        raise DecodeError("cutout", f"{where}: not a readable FITS image ({_describe(exc)}){context}") from None
    if image.ndim != 2 or image.size == 0:
        raise DecodeError("cutout", f"{where}: the image has shape {image.shape}, not a non-empty 2-D image{context}")
    return image


def ztf_source_position(shape, candidate: Mapping, nominal: int = ZTF_CUTOUT_SIZE):
    """Where the source is in a ZTF cutout cut at the CCD edge, else None.

    ZTF cuts ``nominal`` x ``nominal`` pixels centred on the pixel holding the source;
    at a CCD edge the part outside the CCD is simply dropped, so the source is no
    longer at the geometric centre of a smaller cutout. ``candidate.xpos/ypos`` (1-based
    CCD pixels; x runs along columns) tell which edge: a cutout that would start before
    CCD pixel 0 was cut on the low side, and then starts at pixel 0; otherwise it was cut
    on the high side and still starts ``(nominal - 1) // 2`` pixels before the source.

    Returns
    -------
    (row, col) or None
        0-based position in the cutout, for `service.contract.fit_stamp`; None when the
        cutout is not truncated or the position is unknown.
    """
    rows, cols = shape[:2]
    if rows >= nominal and cols >= nominal:
        return None
    x, y = candidate.get("xpos"), candidate.get("ypos")
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return None
    row = _axis_position(rows, float(y) - 1.0, nominal)
    col = _axis_position(cols, float(x) - 1.0, nominal)
    if row is None or col is None:
        return None
    return (row, col)


def _axis_position(length: int, ccd_position: float, nominal: int) -> float | None:
    half = (nominal - 1) // 2
    if length >= nominal:
        return (length - 1) / 2
    nearest = math.floor(ccd_position + 0.5)
    if nearest - half < 0:  # cut on the low side: the cutout starts at CCD pixel 0
        position = ccd_position
    else:  # cut on the high side: the cutout still starts `half` pixels before the source pixel
        position = half + (ccd_position - nearest)
    return position if -0.5 <= position < length - 0.5 else None
