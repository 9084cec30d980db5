"""service.decode.fits: the fast FITS reader is bit-identical to astropy, and falls back to it."""

from __future__ import annotations

import gzip
import io
import warnings

import fastavro
import numpy as np
import pytest
from astropy.io import fits as afits

from conftest import rubin_files, ztf_fits_files
from service.decode import fits
from service.surveys import CUTOUT_FIELDS


def astropy_image(data: bytes) -> np.ndarray:
    """The primary image as astropy reads it, converted to native float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with afits.open(io.BytesIO(data)) as hdus:
            return np.asarray(hdus[0].data).astype(np.float32)


def sample_cutouts() -> list[tuple[str, bytes]]:
    """(label, uncompressed FITS bytes) of every cutout of every sample alert with FITS stamps."""
    out = []
    for path in ztf_fits_files() + rubin_files():
        record = next(fastavro.reader(io.BytesIO(path.read_bytes())))
        for field_name in CUTOUT_FIELDS.values():
            value = record[field_name]
            data = value["stampData"] if isinstance(value, dict) else value
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            out.append((f"{path.name}:{field_name}", data))
    return out


SAMPLE_CUTOUTS = sample_cutouts()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype and bytes (NaNs included, payload and all)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def fits_bytes(hdus) -> bytes:
    buffer = io.BytesIO()
    afits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


def test_there_are_78_sample_cutouts():
    assert len(SAMPLE_CUTOUTS) == 3 * (16 + 10)


@pytest.mark.parametrize("label,data", SAMPLE_CUTOUTS, ids=[label for label, _ in SAMPLE_CUTOUTS])
def test_fast_path_is_bit_identical_to_astropy(label, data):
    # The fast path must really be the one taken for the real cutouts...
    assert fits._parse_simple_header(data) is not None, "the sample cutout fell back to astropy"
    image = fits.read_image(data)
    reference = astropy_image(data)
    # ...and give exactly astropy's pixels, as a writable native-endian float32 array.
    assert same_bits(image, reference)
    assert image.dtype == np.dtype("float32") and image.dtype.isnative and image.flags.writeable


def test_astropy_fallback_is_also_identical_on_samples():
    for label, data in SAMPLE_CUTOUTS[::7]:
        assert same_bits(fits.read_image_astropy(data), astropy_image(data)), label


def test_ztf_simple_card_warning_is_not_emitted():
    ztf_cutout = SAMPLE_CUTOUTS[0][1]
    assert ztf_cutout[:30].startswith(b"SIMPLE  =  T")  # the non-standard card astropy warns about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits.read_image(ztf_cutout)
        fits.read_image_astropy(ztf_cutout)


@pytest.mark.parametrize("bitpix_dtype", [np.int16, np.int32, np.float64, np.float32])
def test_unscaled_types_take_the_fast_path(bitpix_dtype):
    rng = np.random.default_rng(1)
    pixels = (rng.normal(size=(7, 5)) * 1000).astype(bitpix_dtype)
    data = fits_bytes([afits.PrimaryHDU(pixels)])
    assert fits._parse_simple_header(data) is not None
    assert same_bits(fits.read_image(data), astropy_image(data))


def test_bscale_bzero_falls_back_to_astropy_scaling():
    hdu = afits.PrimaryHDU(np.arange(12, dtype=np.int16).reshape(3, 4))
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 100.0
    data = fits_bytes([hdu])
    assert fits._parse_simple_header(data) is None
    image = fits.read_image(data)
    assert same_bits(image, astropy_image(data))
    np.testing.assert_array_equal(image, np.arange(12).reshape(3, 4) * 0.5 + 100.0)


def test_unsigned_16_bit_convention_falls_back():
    data = fits_bytes([afits.PrimaryHDU(np.array([[0, 40000], [65535, 1]], dtype=np.uint16))])
    image = fits.read_image(data)
    np.testing.assert_array_equal(image, [[0, 40000], [65535, 1]])


def test_blank_keyword_falls_back():
    hdu = afits.PrimaryHDU(np.array([[1, -32768], [3, 4]], dtype=np.int16))
    hdu.header["BLANK"] = -32768
    data = fits_bytes([hdu])
    assert fits._parse_simple_header(data) is None
    assert same_bits(fits.read_image(data), astropy_image(data))


def test_image_in_an_extension_when_the_primary_is_empty():
    pixels = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = fits_bytes([afits.PrimaryHDU(), afits.ImageHDU(pixels, name="SCI")])
    np.testing.assert_array_equal(fits.read_image(data), pixels)


def test_bitpix_8_and_odd_card_layout_fall_back():
    data = fits_bytes([afits.PrimaryHDU(np.array([[1, 2], [3, 250]], dtype=np.uint8))])
    np.testing.assert_array_equal(fits.read_image(data), [[1, 2], [3, 250]])
    # A header whose value is not where the standard puts it, but still parseable by astropy.
    standard = b"NAXIS1  =                    2"
    odd = data.replace(standard, b"NAXIS1  = 2".ljust(len(standard)), 1)
    assert odd != data
    np.testing.assert_array_equal(fits.read_image(odd), [[1, 2], [3, 250]])


def test_not_2d_is_an_error():
    data = fits_bytes([afits.PrimaryHDU(np.zeros((2, 3, 4), dtype=np.float32))])
    with pytest.raises(fits.FitsError, match="3-D"):
        fits.read_image(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"not a fits file at all", b"SIMPLE  =                    T" + b" " * 50, b"\x00" * 2880],
    ids=["empty", "text", "header-without-end", "zeros"],
)
def test_junk_is_a_fits_error(data):
    with pytest.raises(fits.FitsError):
        fits.read_image(data)


def test_truncated_pixels_are_an_error_not_garbage():
    data = SAMPLE_CUTOUTS[0][1]
    with pytest.raises(fits.FitsError):
        fits.read_image(data[: 2880 + 100])
