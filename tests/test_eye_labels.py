"""The committed eye labels (every round) name real alerts of ``../shared/real`` with the families of the
labelling rules, and the labelling grids' selections choose what they say."""

from __future__ import annotations

import csv

import pytest

from conftest import EYE_LABELS, REAL_DATA
from real_support import real_data  # noqa: F401  (fixture)
from service.api.scan import FAMILIES
from training.labels.make_grids import CUT, select


@pytest.fixture(scope="module")
def survey_rows(real_data):  # noqa: F811
    with open(real_data / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


#: Every round of eye labels: the first trains the default models, later ones only evaluate.
ROUNDS = (EYE_LABELS, EYE_LABELS.with_name("eye_labels_round2.csv"))


def eye_rows() -> list[dict]:
    rows = []
    for path in ROUNDS:
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def test_every_eye_label_names_a_shared_alert_once_with_a_family_only_when_bogus(survey_rows):
    by_file = {row["file"]: row for row in survey_rows}
    rows = eye_rows()
    assert len({row["id"] for row in rows}) == len(rows), "one label per alert, over all rounds"
    for row in rows:
        alert = by_file[row["file"]]
        assert (row["survey"], row["id"], row["object_id"]) == (alert["survey"], alert["id"], alert["object_id"])
        assert (REAL_DATA / row["file"]).is_file()
        assert row["label"] in ("real", "bogus", "unsure"), row
        assert (row["family"] in FAMILIES) if row["label"] == "bogus" else row["family"] == "", row


def _score(row: dict, name: str) -> float | None:
    return float(row[name]) if row[name] else None


def test_the_model_disputed_selection_is_unlabelled_ztf_alerts_the_survey_calls_real_and_ours_bogus(survey_rows):
    ztf = [row for row in survey_rows if row["survey"] == "ztf"]
    # every third ZTF alert scored low by "our model", the others high; a few of the low ones labelled already
    scores = {row["id"]: 0.1 if i % 3 == 0 else 0.9 for i, row in enumerate(ztf)}
    labelled = frozenset(row["id"] for row in ztf[:30])
    chosen = select(survey_rows, "ztf-model-disputed", scores, labelled)

    def theirs(row):
        drb = _score(row, "drb")
        return drb if drb is not None else _score(row, "rb")

    expected = [row for row in ztf if row["id"] not in labelled and scores[row["id"]] < CUT
                and theirs(row) is not None and theirs(row) >= CUT]
    assert chosen == sorted(expected, key=lambda row: row["file"]) and chosen
    # an alert without an out-of-fold score (the test split) is never chosen
    assert select(survey_rows, "ztf-model-disputed", {}, frozenset()) == []
