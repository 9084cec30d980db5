"""The naive decoder: how community brokers decode alerts today (the benchmark's baseline).

A fresh ``fastavro.reader`` per message (the writer schema is parsed again for every
alert), the standard library's gzip, and ``astropy.io.fits`` for every cutout.
``rbstream bench decode`` reports `service.decode.alerts.decode_message` against it in the
same run. Not used by the service.
"""

from __future__ import annotations

import gzip
import io
import warnings

import fastavro
import numpy as np

from service.decode.alerts import NEGATIVE_DETECTION
from service.surveys import CUTOUT_FIELDS


def naive_decode(message: bytes) -> dict[str, np.ndarray]:
    """Decode one alert message the naive way.

    Parameters
    ----------
    message : bytes
        An Avro object container holding one alert (ZTF or Rubin).

    Returns
    -------
    dict of str to ndarray
        ``science``, ``template``, ``difference`` images as native float32 arrays.
    """
    from astropy.io import fits

    record = next(iter(fastavro.reader(io.BytesIO(message))))
    images = {}
    for name, field_name in CUTOUT_FIELDS.items():
        cutout = record[field_name]
        data = cutout["stampData"] if isinstance(cutout, dict) else cutout
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(data)) as hdus:
                images[name] = np.asarray(hdus[0].data, dtype=np.float32)
    candidate = record.get("candidate")
    if isinstance(candidate, dict) and str(candidate.get("isdiffpos", "t")).lower() in NEGATIVE_DETECTION:
        images["difference"] = np.negative(images["difference"])  # the same contract as the fast path
    return images
