"""Helpers of the tests on the real alerts of ``../shared/real`` (or ``RBSTREAM_REAL_DATA``)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import REAL_DATA


def real_files() -> list[Path]:
    """Every real alert file, sorted (``rubin/*.avro`` then ``ztf/*.avro``)."""
    return sorted(REAL_DATA.rglob("*.avro"))


def labels() -> dict[str, dict]:
    """labels.csv rows by file (relative to REAL_DATA): survey, id, the survey's own scores."""
    with open(REAL_DATA / "labels.csv", newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


def survey_score_of(row: dict) -> tuple[str | None, float | None]:
    """(name, value) of the survey's own score labels.csv gives: ZTF drb, else rb; Rubin reliability."""
    names = ("drb", "rb") if row["survey"] == "ztf" else ("reliability",)
    for name in names:
        if row[name] != "":
            return name, float(row[name])
    return None, None


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "labels.csv").is_file():
        pytest.fail(f"real alerts not found at {REAL_DATA} (set RBSTREAM_REAL_DATA)")
    return REAL_DATA
