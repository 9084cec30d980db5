"""Helpers of the drift tests: a real model without a reference, the real alerts of each phase,
and the alert rules' thresholds (read from the rules file, so a test judges by what operators get)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import yaml

from conftest import REAL_DATA, REPO

RULES = REPO / "helm" / "rbstream" / "files" / "alert-rules.yaml"


def model_without_reference(model: Path, out: Path) -> Path:
    """A copy of the model folder ``model`` under ``out`` whose card has no ``real_validation``."""
    from service.score.card import CARD_FILE

    folder = out / f"{model.name}-no-reference"
    shutil.copytree(model, folder)
    card = json.loads((folder / CARD_FILE).read_text())
    assert card.pop("real_validation", None) is not None, f"{model} has no reference to take away"
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2))
    return folder


def rule_thresholds() -> dict[str, float]:
    """``rbstream:threshold:<name>`` of the rules file, as ``name -> value``."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    out = {}
    for rule in (r for g in groups for r in g["rules"] if "record" in r):
        if rule["record"].startswith("rbstream:threshold:"):
            out[rule["record"].removeprefix("rbstream:threshold:")] = float(rule["expr"].strip()[len("vector("):-1])
    return out


def _ztf_rows() -> list[dict]:
    with open(REAL_DATA / "labels.csv", newline="") as handle:
        return sorted((row for row in csv.DictReader(handle) if row["survey"] == "ztf"), key=lambda r: r["file"])


def _score(row: dict, name: str) -> float | None:
    return float(row[name]) if row[name] else None


def ztf_split(split: str, holdout: tuple[float, float]) -> list[Path]:
    """The real ZTF alerts of one object split (as training splits them), in file order."""
    from training.real import object_split

    return [REAL_DATA / r["file"] for r in _ztf_rows()
            if object_split("ztf", r["object_id"] or r["id"], holdout) == split]


def ztf_artifacts() -> list[Path]:
    """Real ZTF alerts the survey's own models call bogus: braai ``drb`` < 0.1 or the random
    forest's ``rb`` < 0.3 (the README of the real data says what these scores are)."""
    def bogus(row):
        drb, rb = _score(row, "drb"), _score(row, "rb")
        return (drb is not None and drb < 0.1) or (rb is not None and rb < 0.3)

    return [REAL_DATA / r["file"] for r in _ztf_rows() if bogus(r)]
