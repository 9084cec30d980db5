"""Turn the stamps of a JSON `/classify` request into pixel arrays, or say why not.

A stamp arrives either as a 2-D array of numbers or as a base64 FITS file (gzip-compressed
or not). Every problem raises `StampInputError` with a message fit for the client;
the API adds which candidate it belongs to. Cropping, padding and normalisation are
not done here: `service.contract.assemble` does them, exactly as for Kafka alerts.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
import zlib

import numpy as np

#: Largest side of a stamp accepted, in pixels (survey cutouts are 30-63 pixels; this only
#: keeps a hostile request from making the server allocate a huge image).
MAX_STAMP_SIDE = 2048

#: Largest FITS file a stamp may decompress to (a gzip bomb stops here).
MAX_FITS_BYTES = 32 * 1024 * 1024

_GZIP_MAGIC = b"\x1f\x8b"
_FITS_MAGIC = b"SIMPLE  ="
# JSON numbers arrive as int or float; null stands for a missing pixel. bool is an int
# subclass in Python, so types are compared exactly to keep `true` out.
_PIXEL_TYPES = (int, float, type(None))


class StampInputError(ValueError):
    """A stamp of a request that cannot be turned into a 2-D image; the message says why."""


def stamp_to_array(value) -> np.ndarray:
    """Pixels of one JSON stamp (2-D array or base64 FITS) as a float32 2-D array.

    Raises
    ------
    StampInputError
        When ``value`` is neither, or is not a non-empty 2-D image of at most
        `MAX_STAMP_SIDE` pixels a side with at least one finite pixel.
    """
    if isinstance(value, str):
        image = fits_to_array(decode_base64(value))
    elif isinstance(value, list):
        image = rows_to_array(value)
    else:
        raise StampInputError(
            f"must be a base64 FITS string or a 2-D array of numbers, got a JSON {_json_type(value)}")
    if not np.isfinite(image).any():
        raise StampInputError(f"has no finite pixel (all {image.size} are NaN, null or infinite)")
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


def fits_to_array(data: bytes) -> np.ndarray:
    """The first 2-D image of a FITS file (gzip-compressed or not) as float32."""
    if data[:2] == _GZIP_MAGIC:
        data = _gunzip(data)
    if not data.startswith(_FITS_MAGIC):
        what = "a JPEG" if data[:3] == b"\xff\xd8\xff" else "a PNG" if data[:4] == b"\x89PNG" else "not FITS"
        raise StampInputError(f"decodes to {len(data)} bytes that are {what} (a FITS file starts with 'SIMPLE  =')")
    image = _read_fits_image(data)
    if image.ndim != 2 or 0 in image.shape:
        raise StampInputError(f"FITS image has shape {image.shape}; a stamp must be a non-empty 2-D image")
    if max(image.shape) > MAX_STAMP_SIDE:
        raise StampInputError(f"FITS image is {image.shape[0]}x{image.shape[1]}; at most {MAX_STAMP_SIDE} "
                              "pixels a side are accepted")
    return image


def _gunzip(data: bytes) -> bytes:
    inflater = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
    try:
        out = inflater.decompress(data, MAX_FITS_BYTES + 1)
    except zlib.error as exc:
        raise StampInputError(f"is gzip data that cannot be decompressed ({exc})") from None
    if len(out) > MAX_FITS_BYTES:
        raise StampInputError(f"decompresses to more than {MAX_FITS_BYTES} bytes")
    if not inflater.eof:
        raise StampInputError("is truncated gzip data")
    return out


def _read_fits_image(data: bytes) -> np.ndarray:
    """Read with astropy, refusing images whose header promises more pixels than the file holds."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy warns on non-standard cards of survey cutouts
            with fits.open(io.BytesIO(data), memmap=False) as hdus:
                for hdu in hdus:
                    header = hdu.header
                    if header.get("NAXIS", 0) == 0 or not getattr(hdu, "is_image", False):
                        continue
                    shape = tuple(int(header.get(f"NAXIS{k}", 0)) for k in range(header["NAXIS"], 0, -1))
                    needed = int(np.prod(shape, dtype=np.int64)) * abs(int(header.get("BITPIX", 8))) // 8
                    if needed > len(data):
                        raise StampInputError(f"FITS header declares a {shape} image but the file holds only "
                                              f"{len(data)} bytes (truncated FITS)")
                    return np.asarray(hdu.data, dtype=np.float32)
    except StampInputError:
        raise
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError, KeyError... on bad files
        raise StampInputError(f"is not a readable FITS file ({type(exc).__name__}: {exc})") from None
    raise StampInputError("FITS file holds no image")


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
