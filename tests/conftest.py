"""Shared fixtures: the real sample alerts, the default models, a real local broker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = Path(os.environ.get("RBSTREAM_SAMPLE_DATA", REPO.parent / "shared" / "data"))
ZTF_DIR = SAMPLE_DATA / "ztf"
RUBIN_DIR = SAMPLE_DATA / "rubin"
MODELS_DIR = REPO / "models"
#: The shared real alerts that training and evaluation may use (not test fixtures).
REAL_DATA = Path(os.environ.get("RBSTREAM_REAL_DATA", REPO.parent / "shared" / "real"))
EYE_LABELS = REPO / "training" / "labels" / "eye_labels.csv"

#: The six 2016 prototype ZTF alerts whose stampData is a JPEG, not FITS.
ZTF_JPEG_NAMES = {f"{prefix}{i}.avro" for prefix in ("8770446315500", "172695872515500") for i in range(3)}


def ztf_files() -> list[Path]:
    return sorted(ZTF_DIR.glob("*.avro"))


def ztf_fits_files() -> list[Path]:
    return [p for p in ztf_files() if p.name not in ZTF_JPEG_NAMES]


def ztf_jpeg_files() -> list[Path]:
    return [p for p in ztf_files() if p.name in ZTF_JPEG_NAMES]


def rubin_files() -> list[Path]:
    return sorted(RUBIN_DIR.glob("*.avro"))


def strict_json(text: str):
    """``text`` parsed as JSON is: Python's reader takes NaN and Infinity, other readers refuse them."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="session")
def sample_data() -> Path:
    if not SAMPLE_DATA.is_dir():
        pytest.fail(f"real sample alerts not found at {SAMPLE_DATA} (set RBSTREAM_SAMPLE_DATA)")
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def broker():
    """A real tansu broker on a free port for the whole session."""
    from service.tools.broker import LocalBroker

    with LocalBroker() as running:
        yield running
