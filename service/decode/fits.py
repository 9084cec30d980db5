"""Read alert cutouts (small FITS images) fast, and exactly as astropy would.

Alert cutouts are tiny (63x63 or 30x30 pixels) and their FITS structure is simple:
one header of a few 2880-byte blocks and an image in the primary HDU. Opening them
with ``astropy.io.fits`` costs more than all the rest of the decoding (`rbstream bench decode`),
so `read_image` parses the header cards it needs itself and reads the pixels with
``numpy.frombuffer``. Anything it does not recognise as the simple case (scaled
integers, BLANK, random groups, no primary image, a header it cannot parse...) goes
to astropy (`read_image_astropy`). ``tests/test_fits.py`` checks the two bit for bit
on every cutout of every sample alert.

The result is always a native-endian float32 2-D array (the model's input type).
"""

from __future__ import annotations

import io
import warnings

import numpy as np

BLOCK = 2880
CARD = 80

#: BITPIX values the fast path reads, with their big-endian numpy types.
_FAST_DTYPES = {-32: np.dtype(">f4"), -64: np.dtype(">f8"), 16: np.dtype(">i2"), 32: np.dtype(">i4")}


class FitsError(ValueError):
    """Bytes that are not a readable 2-D FITS image."""


#: Largest image data a header may declare by default (`service.limits.DecodeLimits.max_cutout_bytes`).
MAX_DATA_BYTES = 4 * 1024 * 1024
#: BITPIX values the FITS standard defines.
VALID_BITPIX = (8, 16, 32, 64, -32, -64)
#: HDUs whose headers `check_declared_sizes` reads before giving up (cutouts have one or two).
MAX_HDUS = 8


def read_image(data: bytes, max_bytes: int = MAX_DATA_BYTES) -> np.ndarray:
    """The primary image of a FITS file, as a native-endian float32 2-D array.

    Parameters
    ----------
    data : bytes
        A whole FITS file (uncompressed).
    max_bytes : int
        Most bytes of image data a header may declare: a header that lies about its size
        is refused before anything is allocated for it.

    Raises
    ------
    FitsError
        When the bytes are not FITS or hold no 2-D image, or declare too much data.
    """
    parsed = _parse_simple_header(data)
    if parsed is None:
        check_declared_sizes(data, max_bytes)
        return read_image_astropy(data)
    offset, dtype, rows, cols = parsed
    if rows * cols * dtype.itemsize > max_bytes:
        raise FitsError(f"the FITS header declares a {rows}x{cols} image of {rows * cols * dtype.itemsize} bytes, "
                        f"over the limit of {max_bytes} (max_cutout_bytes)")
    pixels = np.frombuffer(data, dtype=dtype, count=rows * cols, offset=offset)
    # astype makes the (writable, native-endian) copy; for -32 it is just the byte swap.
    return pixels.astype(np.float32).reshape(rows, cols)


#: Parsed one-block headers, by their bytes: the cutouts of a survey share a handful of
#: headers (ZTF's differ only by NAXISn), so most cutouts skip the card loop.
_HEADER_CACHE: dict[bytes, tuple | None] = {}
_HEADER_CACHE_SIZE = 256


def _parse_simple_header(data: bytes):
    """(data offset, dtype, rows, cols) when the file is the simple case, else None."""
    first_block = data[:BLOCK]
    if first_block in _HEADER_CACHE:
        parsed = _HEADER_CACHE[first_block]
        if parsed is not None and parsed[0] + parsed[2] * parsed[3] * parsed[1].itemsize <= len(data):
            return parsed
        return None
    parsed = _parse_header_cards(data)
    if parsed is not None and parsed[0] == BLOCK and len(first_block) == BLOCK:
        if len(_HEADER_CACHE) >= _HEADER_CACHE_SIZE:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[first_block] = parsed
    return parsed


def _parse_header_cards(data: bytes):
    if data[:6] != b"SIMPLE":
        return None
    # Unfortunately, ZTF writes "SIMPLE  =  T" with the T in column 13 rather than 30
    # (astropy warns); a value is all we need, wherever it is.
    values: dict[bytes, bytes] = {}
    end = -1
    pos = 0
    size = len(data)
    while end < 0:
        if pos + BLOCK > size:
            return None  # no END card in the data: let astropy explain
        block = data[pos : pos + BLOCK]
        for card_start in range(0, BLOCK, CARD):
            card = block[card_start : card_start + CARD]
            key = card[:8].rstrip()
            if key == b"END":
                end = pos + BLOCK
                break
            if card[8:10] == b"= " and key in _KEYS:
                values[key] = card[10:].split(b"/", 1)[0].strip()
        pos += BLOCK
    try:
        if values.get(b"SIMPLE") != b"T" or values.get(b"NAXIS") != b"2":
            return None
        if b"GROUPS" in values or b"BLANK" in values:
            return None
        bitpix = int(values[b"BITPIX"])
        cols = int(values[b"NAXIS1"])
        rows = int(values[b"NAXIS2"])
        if b"BSCALE" in values and float(values[b"BSCALE"].replace(b"D", b"E")) != 1.0:
            return None
        if b"BZERO" in values and float(values[b"BZERO"].replace(b"D", b"E")) != 0.0:
            return None
    except (KeyError, ValueError):
        return None
    dtype = _FAST_DTYPES.get(bitpix)
    if dtype is None or rows <= 0 or cols <= 0 or end + rows * cols * dtype.itemsize > size:
        return None
    return end, dtype, rows, cols


_KEYS = frozenset({b"SIMPLE", b"BITPIX", b"NAXIS", b"NAXIS1", b"NAXIS2", b"BSCALE", b"BZERO", b"BLANK", b"GROUPS"})


def check_declared_sizes(data: bytes, max_bytes: int = MAX_DATA_BYTES) -> None:
    """Refuse, in the user's terms, a FITS file whose headers declare what astropy would choke on.

    Each HDU's header (primary and extensions, up to `MAX_HDUS`) is read for BITPIX, NAXIS,
    NAXISn, PCOUNT and GCOUNT, and for tile-compressed images ZBITPIX and ZNAXISn (the size
    they decompress to). An unsupported BITPIX, or declared data over ``max_bytes`` or past
    the end of the file, raises `FitsError`. Headers this cannot read are left to astropy.
    """
    pos = 0
    for _ in range(MAX_HDUS):
        values, end = _header_values(data, pos)
        if values is None:
            return
        try:
            bitpix = int(values.get(b"BITPIX", b"0"))
            naxis = int(values.get(b"NAXIS", b"0"))
            axes = [int(values.get(b"NAXIS%d" % i, b"0")) for i in range(1, min(naxis, 999) + 1)]
            pcount = int(values.get(b"PCOUNT", b"0"))
            gcount = int(values.get(b"GCOUNT", b"1"))
        except ValueError:
            return  # astropy explains unreadable values
        if bitpix not in VALID_BITPIX:
            raise FitsError(f"unsupported FITS BITPIX {bitpix} (FITS defines {', '.join(map(str, VALID_BITPIX))})")
        if naxis < 0 or naxis > 999 or any(n < 0 for n in axes) or pcount < 0 or gcount < 0:
            raise FitsError(f"the FITS header declares impossible axes (NAXIS {naxis}, {axes})")
        if naxis and axes and axes[0] == 0 and b"GROUPS" in values:
            axes = axes[1:]  # random groups: NAXIS1 = 0 is a marker, not an axis
        pixels = int(np.prod(axes, dtype=object)) if naxis else 0
        size = abs(bitpix) // 8 * gcount * (pcount + pixels)
        shape = "x".join(map(str, axes[::-1])) or "no"
        if size > max_bytes:
            raise FitsError(f"the FITS header declares a {shape} image of {size} bytes, over the limit of "
                            f"{max_bytes} (max_cutout_bytes)")
        if end + size > len(data):
            raise FitsError(f"the FITS header declares a {shape} image of {size} bytes, but only "
                            f"{max(0, len(data) - end)} bytes follow it (truncated, or a header that lies)")
        if b"ZBITPIX" in values:
            try:
                zbitpix = int(values[b"ZBITPIX"])
                zaxes = [int(values.get(b"ZNAXIS%d" % i, b"0")) for i in range(1, min(int(values.get(b"ZNAXIS", b"0")), 999) + 1)]
            except ValueError:
                return
            if zbitpix not in VALID_BITPIX:
                raise FitsError(f"unsupported FITS ZBITPIX {zbitpix} (FITS defines {', '.join(map(str, VALID_BITPIX))})")
            zsize = abs(zbitpix) // 8 * int(np.prod(zaxes, dtype=object))
            if zsize > max_bytes:
                raise FitsError(f"the compressed FITS image declares {'x'.join(map(str, zaxes[::-1]))} pixels "
                                f"({zsize} bytes), over the limit of {max_bytes} (max_cutout_bytes)")
        pos = end + -(-size // BLOCK) * BLOCK
        if pos >= len(data) or data[pos : pos + 8] != b"XTENSION":
            return
    raise FitsError(f"the FITS file has more than {MAX_HDUS} HDUs; cutouts have one or two")


_SIZE_KEYS = frozenset({b"BITPIX", b"NAXIS", b"PCOUNT", b"GCOUNT", b"GROUPS", b"ZBITPIX", b"ZNAXIS"})


def _header_values(data: bytes, pos: int):
    """(keyword -> value bytes, end of header) of the header at ``pos``; (None, pos) when it has no END."""
    values: dict[bytes, bytes] = {}
    size = len(data)
    while pos + BLOCK <= size:
        block = data[pos : pos + BLOCK]
        pos += BLOCK
        for card_start in range(0, BLOCK, CARD):
            card = block[card_start : card_start + CARD]
            key = card[:8].rstrip()
            if key == b"END":
                return values, pos
            if card[8:10] == b"= " and (key in _SIZE_KEYS or key[:5] in (b"NAXIS", b"ZNAXI")):
                values[key] = card[10:].split(b"/", 1)[0].strip()
    return None, pos


def read_image_astropy(data: bytes) -> np.ndarray:
    """The first 2-D image of a FITS file read by astropy, as native float32.

    The primary HDU when it holds an image, else the first extension that does (for
    example a tile-compressed image). Scaling (BSCALE/BZERO, BLANK) is astropy's.
    """
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            # Every ZTF cutout makes astropy warn (VerifyWarning: "Found a SIMPLE card but its
            # format doesn't respect the FITS Standard"), and corrupt headers make it warn about
            # each card: the result or the FitsError raised below is what callers need, not logs.
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=True) as hdus:
                for hdu in hdus:
                    if not getattr(hdu, "is_image", False):
                        continue
                    image = hdu.data
                    if image is None:
                        continue
                    if image.ndim != 2:
                        raise FitsError(f"the FITS image is {image.ndim}-D {image.shape}, not 2-D")
                    if image.size == 0:
                        raise FitsError("the FITS image is empty")
                    return np.array(image, dtype=np.float32)
    except FitsError:
        raise
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError, ... on junk
        raise FitsError(f"not a readable FITS file ({type(exc).__name__}: {exc})") from None
    raise FitsError("the FITS file holds no image")
