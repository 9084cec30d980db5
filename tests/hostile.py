"""Hostile alert messages, built the way an attacker would: small bodies that crash, inflate or lie.

Each builder returns the bytes of one Kafka message value (or of one FITS cutout). The
containers are written by hand (magic, metadata map, sync marker, blocks) so that nothing
here needs the reader under test to accept them, and so that a block can declare any
codec, count or size.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import zlib

import fastavro
import numpy as np

from service.decode.framing import CONTAINER_MAGIC, encode_long

SYNC = b"hostile-sync-16b"

#: A minimal ZTF-shaped alert schema: the fields `service.decode.alerts` reads, cutouts last.
_CUTOUT = {"type": "record", "name": "Cutout", "fields": [{"name": "fileName", "type": "string"},
                                                          {"name": "stampData", "type": "bytes"}]}
ZTF_SCHEMA = {
    "type": "record", "name": "alert", "namespace": "ztf",
    "fields": [
        {"name": "objectId", "type": "string"},
        {"name": "candid", "type": "long"},
        {"name": "candidate", "type": {"type": "record", "name": "candidate", "fields": [
            {"name": "jd", "type": "double"}, {"name": "candid", "type": "long"},
            {"name": "xpos", "type": "float"}, {"name": "ypos", "type": "float"}]}},
        {"name": "cutoutScience", "type": ["null", _CUTOUT]},
        {"name": "cutoutTemplate", "type": ["null", "ztf.Cutout"]},
        {"name": "cutoutDifference", "type": ["null", "ztf.Cutout"]},
    ],
}


def _bytes_field(value: bytes) -> bytes:
    return encode_long(len(value)) + value


def container(schema, blocks: list[tuple[int, bytes]], codec: str = "null") -> bytes:
    """An Avro object container: ``schema`` (dict or text), then ``(count, block bytes)`` blocks as given."""
    text = schema if isinstance(schema, (str, bytes)) else json.dumps(schema)
    text = text.encode() if isinstance(text, str) else text
    out = io.BytesIO()
    out.write(CONTAINER_MAGIC)
    out.write(encode_long(2))
    out.write(_bytes_field(b"avro.schema") + _bytes_field(text))
    out.write(_bytes_field(b"avro.codec") + _bytes_field(codec.encode()))
    out.write(b"\x00")
    out.write(SYNC)
    for count, data in blocks:
        out.write(encode_long(count) + encode_long(len(data)) + data + SYNC)
    return out.getvalue()


def recursive_container(depth: int = 5000) -> bytes:
    """A record whose only field is ``["null", <the same record>]``, holding data ``depth`` levels deep."""
    schema = {"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]}
    # Each level is the union branch 1 (zig-zag 2); the innermost is branch 0, null.
    return container(schema, [(1, b"\x02" * depth + b"\x00")])


def deeply_nested_schema_container(depth: int = 5000) -> bytes:
    """No recursion, but a schema of ``depth`` nested arrays (and data that fills them)."""
    # Written as text: json.dumps itself gives up on a few thousand levels.
    kind = '{"type": "array", "items": ' * depth + '"null"' + "}" * depth
    schema = '{"type": "record", "name": "Deep", "fields": [{"name": "deep", "type": ' + kind + "}]}"
    # every level: an array block of one item, then the end of the array
    return container(schema, [(1, b"\x02" * depth + b"\x00" * depth)])


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def deflate_bomb(inflated_bytes: int) -> bytes:
    """A ZTF-shaped container whose one ``deflate`` block inflates to ``inflated_bytes`` zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(inflated_bytes >> 20)]
    parts.append(compressor.compress(bytes(inflated_bytes & ((1 << 20) - 1))))
    parts.append(compressor.flush())
    return container(ZTF_SCHEMA, [(1, b"".join(parts))], codec="deflate")


def bzip2_bomb(inflated_bytes: int) -> bytes:
    """A ZTF-shaped container whose one ``bzip2`` block inflates to ``inflated_bytes`` zeros."""
    compressor = bz2.BZ2Compressor(9)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(inflated_bytes >> 20)]
    parts.append(compressor.compress(bytes(inflated_bytes & ((1 << 20) - 1))))
    parts.append(compressor.flush())
    return container(ZTF_SCHEMA, [(1, b"".join(parts))], codec="bzip2")


def fits_bytes(image: np.ndarray, extra_cards: dict | None = None, bitpix: int = -32) -> bytes:
    """A primary-HDU FITS file holding ``image`` (big-endian), with optional header cards overriding ours."""
    rows, cols = image.shape
    cards = {"SIMPLE": "T", "BITPIX": str(bitpix), "NAXIS": "2", "NAXIS1": str(cols), "NAXIS2": str(rows)}
    cards.update(extra_cards or {})
    header = b"".join(f"{key:<8}= {value:>20}".ljust(80).encode() for key, value in cards.items())
    header += b"END".ljust(80)
    header = header.ljust(-(-len(header) // 2880) * 2880, b" ")
    dtype = {-32: ">f4", -64: ">f8", 16: ">i2", 32: ">i4"}.get(bitpix, ">f4")
    data = np.ascontiguousarray(image, dtype=dtype).tobytes()
    return header + data.ljust(-(-len(data) // 2880) * 2880, b"\x00")


def fits_size_lie(side: int = 100_000) -> bytes:
    """A FITS header that declares a ``side`` x ``side`` float64 image (80 GB at 100 000) over one block of data."""
    return fits_bytes(np.zeros((1, 1)), {"BITPIX": "-64", "NAXIS1": str(side), "NAXIS2": str(side)})[:2880 * 2]


def ztf_record(images: dict[str, bytes | None], candid: int = 1, object_id: str = "ZTF00hostile") -> dict:
    """A record of `ZTF_SCHEMA` with the given cutout bytes (``science``, ``template``, ``difference``)."""
    def cutout(name):
        data = images.get(name)
        return None if data is None else {"fileName": f"{candid}_{name}.fits.gz", "stampData": data}

    return {"objectId": object_id, "candid": candid,
            "candidate": {"jd": 2459000.5, "candid": candid, "xpos": 500.0, "ypos": 500.0},
            "cutoutScience": cutout("science"), "cutoutTemplate": cutout("template"),
            "cutoutDifference": cutout("difference")}


def ztf_container(records: list[dict], codec: str = "null") -> bytes:
    """Records of `ZTF_SCHEMA` in one container, written by fastavro."""
    out = io.BytesIO()
    fastavro.writer(out, ZTF_SCHEMA, records, codec=codec, sync_interval=1 << 30)
    return out.getvalue()


def noise_stamp(side: int, seed: int = 0) -> np.ndarray:
    """A stamp of Gaussian noise with a point source in the middle (not degenerate)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 5.0, (side, side))
    image[side // 2, side // 2] += 200.0
    return image


def ztf_alert_with(science: np.ndarray, template: np.ndarray, difference: np.ndarray, candid: int = 1) -> bytes:
    """A one-record ZTF-shaped container whose cutouts are these images (gzip FITS, like ZTF's)."""
    images = {name: gzip.compress(fits_bytes(image), 1)
              for name, image in (("science", science), ("template", template), ("difference", difference))}
    return ztf_container([ztf_record(images, candid)])


def many_records(count: int, side: int = 8) -> bytes:
    """A container of ``count`` small ZTF-shaped records in one block."""
    stamp = gzip.compress(fits_bytes(noise_stamp(side)), 1)
    images = {"science": stamp, "template": stamp, "difference": stamp}
    return ztf_container([ztf_record(images, candid=i + 1) for i in range(count)])


def huge_stamps(records: int = 60, side: int = 2000) -> bytes:
    """``records`` records, each with three ``side`` x ``side`` (gzip, nearly constant) stamps: small body, big images."""
    image = np.zeros((side, side), dtype=np.float32)
    image[side // 2, side // 2] = 1.0  # not constant near the centre: the stamps themselves are scorable
    image[side // 2 + 1, side // 2] = 2.0
    stamp = gzip.compress(fits_bytes(image), 9)
    images = {"science": stamp, "template": stamp, "difference": stamp}
    return ztf_container([ztf_record(images, candid=i + 1) for i in range(records)])
