"""Turn the stamps of a JSON `/classify` request into pixel arrays, or say why not.

A stamp arrives either as a 2-D array of numbers or as a base64 FITS file (gzip-compressed
or not). Every problem raises `StampInputError` with a message fit for the client;
the API adds which candidate it belongs to. Cropping, padding and normalisation are
not done here: `service.contract.assemble` does them, exactly as for Kafka alerts.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

#: Largest side of a stamp accepted, in pixels (survey cutouts are 30-63 pixels; this only
#: keeps a hostile request from making the server allocate a huge image).
MAX_STAMP_SIDE = 2048

# JSON numbers arrive as int or float; null stands for a missing pixel. bool is an int
# subclass in Python, so types are compared exactly to keep `true` out.
_PIXEL_TYPES = (int, float, type(None))


class StampInputError(ValueError):
    """A stamp of a request that cannot be turned into a 2-D image; the message says why."""


class MaskedStampError(StampInputError):
    """A well-formed stamp with no finite pixel: an empty image rather than a broken one."""


def stamp_to_array(value, max_cutout_bytes: int | None = None) -> np.ndarray:
    """Pixels of one JSON stamp (2-D array or base64 FITS) as a float32 2-D array.

    Raises
    ------
    StampInputError
        When ``value`` is neither, or is not a non-empty 2-D image of at most
        `MAX_STAMP_SIDE` pixels a side with at least one finite pixel.
    """
    if isinstance(value, str):
        image = fits_to_array(decode_base64(value), max_cutout_bytes)
    elif isinstance(value, list):
        image = rows_to_array(value)
    else:
        raise StampInputError(
            f"must be a base64 FITS string or a 2-D array of numbers, got a JSON {_json_type(value)}")
    if not np.isfinite(image).any():
        raise MaskedStampError(f"has no finite pixel (all {image.size} are NaN, null or infinite)")
    return image


def rows_to_array(rows: list) -> np.ndarray:
    """A list of equally long lists of numbers (null = missing pixel) as float32."""
    if not rows:
        raise StampInputError("is an empty array; a stamp must be a non-empty 2-D array (list of rows)")
    if not isinstance(rows[0], list):
        raise StampInputError(
            f"must be 2-D (a list of rows), but element 0 is a JSON {_json_type(rows[0])}, not a row")
    width = len(rows[0])
    if width == 0:
        raise StampInputError("row 0 is empty; a stamp must be a non-empty 2-D array")
    if len(rows) > MAX_STAMP_SIDE or width > MAX_STAMP_SIDE:
        raise StampInputError(f"is {len(rows)}x{width}; at most {MAX_STAMP_SIDE} pixels a side are accepted")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise StampInputError(f"must be 2-D (a list of rows), but element {i} is a JSON {_json_type(row)}")
        if len(row) != width:
            raise StampInputError(
                f"rows have different lengths (row 0 has {width} values, row {i} has {len(row)})")
        for j, pixel in enumerate(row):
            if type(pixel) not in _PIXEL_TYPES:
                dims = "3 or more dimensions" if isinstance(pixel, list) else f"a JSON {_json_type(pixel)}"
                raise StampInputError(f"pixel [{i}][{j}] is {dims}; pixels must be numbers or null")
    try:
        return np.array(rows, dtype=np.float64).astype(np.float32)
    except OverflowError:
        raise StampInputError("holds an integer too large to be a pixel value") from None


def decode_base64(text: str) -> bytes:
    """Bytes of a base64 string (standard alphabet; whitespace and line breaks ignored)."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise StampInputError(f"is a string but not valid base64 ({exc}); a string stamp must be base64 FITS") \
            from None


def fits_to_array(data: bytes, max_cutout_bytes: int | None = None) -> np.ndarray:
    """The image of a FITS file (gzip-compressed or not) as float32, read exactly as the
    cutouts of Kafka alerts are (`service.decode.alerts.read_cutout`), so both give the same pixels."""
    from service.decode.alerts import DecodeError, read_cutout

    try:
        image = read_cutout(data, where="its FITS data", max_bytes=max_cutout_bytes)
    except DecodeError as exc:
        raise StampInputError(f"is not a usable FITS image: {exc.reason}") from None
    if max(image.shape) > MAX_STAMP_SIDE:
        raise StampInputError(f"FITS image is {image.shape[0]}x{image.shape[1]}; at most {MAX_STAMP_SIDE} "
                              "pixels a side are accepted")
    return image


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
