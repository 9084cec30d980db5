"""The ZTF fast path: read what scoring needs of a ZTF alert without walking its history.

A ZTF record leads with its ids and ``candidate`` and closes with the three cutouts; the
history in between (``prv_candidates``, ``fp_hists``) is most of the parsing time. Both
halves of the trick live here: from the writer schema, the schemas of the record's head
(`head_schemas`) and the layout of its cutout tail (`cutout_tail_layout`); from the bytes,
the head read forwards and the cutouts found backwards from the record's end
(`read_from_both_ends`). Any doubt, and the decoder reads the record the usual way.
"""

from __future__ import annotations

import re
from typing import Mapping

import fastavro

from service.decode.framing import encode_long
from service.decode.schemas import SCORING_FIELDS, scoring_reader_schema
from service.surveys import CUTOUT_FIELDS

#: Leading ZTF fields an `Alert` needs (all come before ``prv_candidates``).
ZTF_HEAD_FIELDS = frozenset({"objectId", "alertId", "candid", "candidate"})
#: Names of the cutout fields, in the order ZTF writes them.
CUTOUT_FIELD_NAMES = tuple(CUTOUT_FIELDS.values())


def head_schemas(definition: Mapping) -> tuple | None:
    """Parsed (writer, reader) schemas of a ZTF record cut after its last `ZTF_HEAD_FIELDS` field.

    Avro writes a record as its fields one after the other, so the first k fields of a
    record are exactly readable with a schema of those k fields (and, for the last of
    them when it is a record, of its own first fields). When ``candidate`` closes the
    head it is cut after the last field `Alert` needs; either way the reader schema keeps
    only what `Alert` needs (`scoring_reader_schema`).
    """
    try:
        fields = list(definition["fields"])
        last = max(i for i, f in enumerate(fields) if f["name"] in ZTF_HEAD_FIELDS)
        writer = {k: v for k, v in definition.items() if not k.startswith("__")}
        writer["fields"] = fields[: last + 1]
        candidate = writer["fields"][-1]
        keep = SCORING_FIELDS["ztf"]["candidate"]
        if candidate["name"] == "candidate" and isinstance(candidate["type"], dict):
            # candidate closes the head, so reading stops after the last of its fields we use
            # (drb, the survey's score, is among its last; old schemas stop at jd..ypos).
            inner = candidate["type"]["fields"]
            upto = max(i for i, f in enumerate(inner) if f["name"] in keep)
            writer["fields"] = writer["fields"][:-1] + [
                dict(candidate, type=dict(candidate["type"], fields=inner[: upto + 1]))]
        reader = fastavro.parse_schema(scoring_reader_schema(writer, "ztf"))
        return fastavro.parse_schema(writer), reader
    except Exception:  # an unusual schema: the decoder reads the whole record instead
        return None


def cutout_tail_layout(definition: Mapping) -> tuple | None:
    """How the three cutouts close a ZTF record, or None when they do not.

    Returns ``((field name, record tag, null tag), ...)`` for cutoutScience, Template and
    Difference when they are the record's last three fields, each a record
    ``{fileName: string, stampData: bytes}`` (or a union of it with null); a tag is the
    byte that encodes the union branch (None: not a union / no null branch).
    """
    try:
        fields = list(definition["fields"])[-3:]
        if tuple(f["name"] for f in fields) != CUTOUT_FIELD_NAMES:
            return None
        cutout_name = None
        layout = []
        for field in fields:
            branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
            record_tag = null_tag = None
            for index, branch in enumerate(branches):
                if branch == "null":
                    null_tag = index * 2  # zig-zag encoding of a small non-negative long
                elif isinstance(branch, dict) and branch.get("type") == "record":
                    names = [(f["name"], f["type"]) for f in branch["fields"]]
                    if names != [("fileName", "string"), ("stampData", "bytes")]:
                        return None
                    namespace = branch.get("namespace")
                    cutout_name = branch["name"] if "." in branch["name"] or not namespace else f"{namespace}.{branch['name']}"
                    record_tag = index * 2
                elif isinstance(branch, str) and cutout_name is not None and branch in (cutout_name, cutout_name.rsplit(".", 1)[-1]):
                    record_tag = index * 2
                else:
                    return None
            if record_tag is None or len(branches) > 63:
                return None
            layout.append((field["name"], record_tag if isinstance(field["type"], list) else None,
                           null_tag))
        return tuple(layout)
    except Exception:
        return None



class TailRecord(dict):
    """A ZTF record read by `read_from_both_ends` (a dict; the type marks where it came from)."""


def read_from_both_ends(buffer: bytes, stream, start: int, end: int, writer):
    """The fields an `Alert` needs of a ZTF record in ``buffer[start:end]``, without its history.

    The ids and ``candidate`` lead the record and are read with the head schemas; the three
    cutouts close it and are found backwards from ``end`` (`cutouts_from_end`). The
    history in between (``prv_candidates``, ``fp_hists``: most of the parsing time) is
    never walked. Returns None when the layout is not recognised (the caller then reads
    the record the usual way).
    """
    head_writer, head_reader = writer.head
    record = fastavro.schemaless_reader(stream, head_writer, head_reader)
    found = cutouts_from_end(buffer, stream.tell(), end, writer.tail)
    if found is None:
        return None
    tail = TailRecord(record)
    tail.update(found)
    return tail


_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]*")
#: gzip magic and its only compression method (deflate): how every gzip stream starts.
_GZIP_DEFLATE = b"\x1f\x8b\x08"
#: Gzip-magic positions tried per cutout before giving up (the bytes 1f 8b 08 occur
#: inside compressed data about once per 16 MB; the stamp's start is the first tried).
_GZIP_MAGIC_TRIES = 3


def cutouts_from_end(buffer: bytes, low: int, end: int, layout) -> dict | None:
    """The cutout fields that end a ZTF record at ``end``, found backwards; None if not found.

    Each cutout is ``[union tag] varint(len) fileName varint(len) stampData``, with
    gzip stampData (``1f 8b``) and a printable fileName. Working backwards from ``end``:
    the stampData starts at a gzip magic preceded by the varint of its length to ``end``;
    the fileName is the printable run before it, preceded by the varint of its length and
    the union tag. The three cutouts so found tile ``[start, end)`` exactly, so they are a
    valid parse of the record's tail; that they are *the* parse is then guaranteed by the
    gzip CRC of each stamp (a wrong split cannot give three intact gzip streams), and the
    caller re-reads the whole record when a stamp does not decode.
    """
    values: dict = {}
    for name, record_tag, null_tag in reversed(layout):
        found = one_cutout_before(buffer, low, end, record_tag, null_tag)
        if found is None:
            return None
        end, values[name] = found
    return values


def one_cutout_before(buffer: bytes, low: int, end: int, record_tag, null_tag):
    """(start, value) of the cutout field ending at ``end``; a null cutout only when no stamp fits."""
    rfind = buffer.rfind
    magic = rfind(_GZIP_DEFLATE, low, end)
    tries = 0
    while magic >= low and tries < _GZIP_MAGIC_TRIES:
        tries += 1
        length = encode_long(end - magic)
        name_end = magic - len(length)
        if name_end > low and buffer[name_end:magic] == length:
            # The fileName is printable ASCII; the printable run before the stamp's length is
            # the name plus, maybe, its own one- or two-byte length (which can be printable).
            run = _PRINTABLE_RUN.match(buffer[max(low, name_end - 258) : name_end][::-1]).end()
            for name_length in (run, run - 1, run - 2):
                if name_length < 0:
                    break
                encoded = encode_long(name_length)
                name_start = name_end - name_length
                start = name_start - len(encoded)
                if start < low or buffer[start:name_start] != encoded:
                    continue
                if record_tag is not None:
                    start -= 1
                    if start < low or buffer[start] != record_tag:
                        continue
                return start, {"fileName": buffer[name_start:name_end].decode("ascii"),
                               "stampData": buffer[magic:end]}
        magic = rfind(_GZIP_DEFLATE, low, magic)
    if null_tag is not None and end - 1 >= low and buffer[end - 1] == null_tag:
        return end - 1, None
    return None
