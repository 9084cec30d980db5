"""Decode ZTF and Rubin alert messages into `Alert` objects with their cutouts.

INTERFACE (fixed; the implementation is being written):

* `decode_message(message, survey="auto", schemas=None) -> list[Alert]` — one Kafka
  message value (ZTF: Avro object container with embedded writer schema; Rubin:
  Confluent wire format or an object container) into its alerts (usually one).
* raises `DecodeError` with ``kind`` one of ``decode`` (bytes are not an alert),
  ``schema`` (unknown schema id / unusable schema), ``cutout`` (a cutout missing,
  not FITS, not 2-D...), and a human ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


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
        ``science``, ``template``, ``difference`` cutouts, native float arrays.
    centre : (row, col) or None
        Source position in the cutouts when it is not their geometric centre
        (ZTF cutouts truncated at the CCD edge); see `service.contract.fit_stamp`.
    record : mapping
        The decoded Avro record (for re-publishing the alert with its score).
    """

    survey: str
    candidate_id: int
    object_id: str
    observation_mjd: float | None
    images: dict[str, np.ndarray]
    centre: tuple[float, float] | None = None
    record: Mapping | None = field(default=None, repr=False)


def decode_message(message: bytes, survey: str = "auto", schemas=None) -> list[Alert]:
    raise NotImplementedError
