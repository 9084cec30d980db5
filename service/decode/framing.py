"""The two Avro framings of a Kafka message, byte by byte: the one definition of each.

* **Avro object container** (every ZTF alert; rbstream's score records by default): the
  magic ``Obj\\x01``, a metadata map holding the writer schema and codec, a 16-byte sync
  marker, then data blocks (record count, byte size, records, sync marker).
* **Confluent wire format** (the live Rubin stream; score records when a schema registry
  is configured): the magic byte 0, a 4-byte big-endian schema id, one schemaless record.

Both count and size fields are Avro ``long``\\ s: zig-zag varints.
"""

from __future__ import annotations

import struct

#: First bytes of an Avro object container file.
CONTAINER_MAGIC = b"Obj\x01"
#: First byte of a Confluent wire-format message.
WIRE_MAGIC = 0
#: Bytes before the Avro body in the wire format: magic byte + 4-byte schema id.
WIRE_HEADER = struct.Struct(">bI")
#: Bytes of the sync marker that ends an object container's header and each of its blocks.
SYNC_SIZE = 16


def is_container(message: bytes) -> bool:
    """Whether ``message`` starts like an Avro object container."""
    return message[:4] == CONTAINER_MAGIC


def is_wire_format(message: bytes) -> bool:
    """Whether ``message`` starts like a Confluent wire-format message (magic byte and a whole header)."""
    return len(message) >= WIRE_HEADER.size and message[0] == WIRE_MAGIC


def read_long(buf, pos: int) -> tuple[int, int]:
    """Read one zig-zag varint (Avro ``long``) at ``pos``; returns (value, next position)."""
    byte = buf[pos]
    pos += 1
    value = byte & 0x7F
    shift = 7
    while byte & 0x80:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if shift > 63:
            raise ValueError("malformed Avro long (more than 10 bytes)")
    return (value >> 1) ^ -(value & 1), pos


def read_uvarint(data: bytes) -> tuple[int, int]:
    """Read a plain (not zig-zag) unsigned varint at the start of ``data``, as snappy blocks begin.

    Returns (value, bytes read).
    """
    value = shift = 0
    for i, byte in enumerate(data[:10]):
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("malformed varint")


_SMALL_LONGS = tuple(bytes([2 * n]) for n in range(64))


def encode_long(value: int) -> bytes:
    """Avro ``long`` encoding (zig-zag varint) of a non-negative count or length."""
    if value < 64:
        return _SMALL_LONGS[value]
    value <<= 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_container_header(message: bytes) -> tuple[dict[str, bytes], bytes, int]:
    """Parse an Avro object container header.

    Returns
    -------
    metadata : dict of str to bytes
        ``avro.schema``, ``avro.codec``, ...
    sync : bytes
        The 16-byte sync marker.
    offset : int
        Where the first data block starts.

    Raises
    ------
    ValueError, IndexError
        On anything that is not a well-formed header (the decoder turns them into
        `service.decode.alerts.DecodeError`).
    """
    if not is_container(message):
        raise ValueError("not an Avro object container (no 'Obj\\x01' magic)")
    pos = 4
    metadata: dict[str, bytes] = {}
    while True:
        count, pos = read_long(message, pos)
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = read_long(message, pos)  # block size in bytes, not needed
        for _ in range(count):
            size, pos = read_long(message, pos)
            if size < 0 or pos + size > len(message):
                raise ValueError("container header: metadata key runs past the end")
            key = bytes(message[pos : pos + size]).decode("utf-8")
            pos += size
            size, pos = read_long(message, pos)
            if size < 0 or pos + size > len(message):
                raise ValueError("container header: metadata value runs past the end")
            metadata[key] = bytes(message[pos : pos + size])
            pos += size
    sync = bytes(message[pos : pos + SYNC_SIZE])
    if len(sync) != SYNC_SIZE:
        raise ValueError("container header: truncated sync marker")
    return metadata, sync, pos + SYNC_SIZE


def container_block(records: bytes, count: int, sync: bytes) -> bytes:
    """One data block of an object container: ``count`` records already encoded in ``records``."""
    return b"".join((encode_long(count), encode_long(len(records)), records, sync))


def wire_header(schema_id: int) -> bytes:
    """The 5 bytes that start a wire-format message of schema ``schema_id``."""
    return WIRE_HEADER.pack(WIRE_MAGIC, schema_id)


def split_wire_format(message: bytes) -> tuple[int, memoryview]:
    """Split a Confluent wire-format message into (schema id, Avro body).

    Raises
    ------
    ValueError
        When ``message`` does not start with the magic byte and a whole header.
    """
    if not is_wire_format(message):
        raise ValueError("not a Confluent wire-format message (magic byte 0 + 4-byte schema id)")
    _, schema_id = WIRE_HEADER.unpack_from(message, 0)
    return schema_id, memoryview(message)[WIRE_HEADER.size :]
