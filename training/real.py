"""Real alerts as labelled data: find the files, decode them, give each a label, split by object.

Training's ``alerts`` data source and ``rbstream evaluate`` both read alerts through this
module, so a model is judged on exactly the stamps and labels it is trained on.

Labels, in order of precedence:

1. a labels CSV (human labels, such as ``training/labels/eye_labels.csv``), matched by
   alert id (``candid``, ``diaSourceId`` or ``id``) or by file name; ``label`` is
   real/bogus (1/0, true/false) or ``unsure``, which is no label;
2. the alert's own survey score (``label_from``: ``drb``, ``rb``, ``reliability``, the
   first one the alert carries), read as a weak label: at or above the upper band edge
   real, below the lower edge bogus, in between unlabelled. With soft targets every
   scored alert is labelled (real at or above 0.5) and trains towards the score itself.

Splits are by object: an object's every alert lands in the same split, chosen by a hash
of the survey and object id, so a split never changes when alerts are added or removed
and no object is seen in training and judged in the test split.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from service.decode.alerts import DecodeError, decode_message
from service.surveys import DETECTION_RECORD, SURVEY_SCORES

log = logging.getLogger(__name__)

#: Every survey score that can serve as a weak label.
WEAK_LABELS = tuple(name for names in SURVEY_SCORES.values() for name in names)
#: Label values accepted in a labels CSV.
REAL_VALUES = {"1", "real", "true", "yes", "r"}
BOGUS_VALUES = {"0", "bogus", "false", "no", "b"}
UNSURE_VALUES = {"unsure", "?", "skip", ""}
ID_COLUMNS = ("candid", "diaSourceId", "candidate_id", "id")
SPLITS = ("train", "valid", "test")
#: Shares of objects held out for validation and test, unless a config says otherwise.
DEFAULT_HOLDOUT = (0.15, 0.15)


class LabelError(ValueError):
    """A labels CSV or alert list that cannot be read."""


def parse_label(value, where: str) -> int | None:
    """1 (real), 0 (bogus) or None (unsure) from a CSV cell."""
    text = str(value if value is not None else "").strip().lower()
    if text in REAL_VALUES:
        return 1
    if text in BOGUS_VALUES:
        return 0
    if text in UNSURE_VALUES:
        return None
    raise LabelError(f"{where}: label {value!r}; accepted: real/bogus/unsure, 1/0, true/false")


# --------------------------------------------------------------------------- files
def alert_files(spec: str | Path) -> list[Path]:
    """The alert files named by a folder (searched recursively), a glob, or a CSV with a ``file`` column.

    Files in a CSV are relative to the CSV's folder unless absolute.
    """
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.avro") if p.is_file())
    elif path.suffix == ".csv" and path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if "file" not in (reader.fieldnames or []):
                raise LabelError(f"{path}: a list of alerts needs a 'file' column; has {reader.fieldnames}")
            files = [p if p.is_absolute() else path.parent / p for p in (Path(r["file"]) for r in reader)]
    else:
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True))
    if not files:
        raise LabelError(f"no alert file matches {spec}; accepted: a folder, a glob or a CSV with a 'file' column")
    return files


# --------------------------------------------------------------------------- alerts
@dataclass
class RealAlert:
    """One decoded alert with what evaluation and training need of it."""

    file: Path
    survey: str
    candidate_id: int
    object_id: str
    images: dict[str, np.ndarray] = field(repr=False)
    centre: tuple[float, float] | None
    survey_scores: dict[str, float]
    label: int | None = None
    label_source: str | None = None
    family: str | None = None
    #: What training pulls the score towards: the survey's score for a soft weak label, else the label.
    target: float | None = None


def survey_scores(survey: str, record: Mapping) -> dict[str, float]:
    """Every real/bogus score of the survey's own that an alert record carries (present and finite)."""
    detection = record.get(DETECTION_RECORD[survey])
    if not isinstance(detection, Mapping):
        return {}
    values = {name: detection.get(name) for name in SURVEY_SCORES[survey]}
    return {name: float(v) for name, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


def read_alerts(files: Iterable[Path], survey: str = "auto") -> tuple[list[RealAlert], list[tuple[str, str]]]:
    """Decode every file; returns the alerts and the ``(file, reason)`` of those that failed."""
    alerts, failures = [], []
    for path in files:
        path = Path(path)
        try:
            decoded = decode_message(path.read_bytes(), survey)
        except DecodeError as exc:
            failures.append((path.name, str(exc)))
            continue
        except OSError as exc:
            failures.append((path.name, f"cannot read the file: {exc.strerror}"))
            continue
        for alert in decoded:
            alerts.append(RealAlert(path, alert.survey, alert.candidate_id, alert.object_id, alert.images,
                                    alert.centre, survey_scores(alert.survey, alert.record or {})))
    return alerts, failures


# --------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class LabelTable:
    """Labels from a CSV, by alert id and by file name: ``(label or None, family or None)``."""

    by_id: Mapping[int, tuple[int | None, str | None]]
    by_file: Mapping[str, tuple[int | None, str | None]]
    source: str

    def get(self, alert: RealAlert) -> tuple[int | None, str | None] | None:
        found = self.by_id.get(alert.candidate_id)
        return found if found is not None else self.by_file.get(alert.file.name)


def read_label_table(path: str | Path) -> LabelTable:
    """A labels CSV: ``label`` and an id column (``candid``/``diaSourceId``/``id``) or ``file``; ``family`` optional."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"labels: no such file {path}")
    by_id, by_file = {}, {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        id_column = next((c for c in ID_COLUMNS if c in fields), None)
        if "label" not in fields or not (id_column or "file" in fields):
            raise LabelError(f"{path}: needs a 'label' column and an id column ({', '.join(ID_COLUMNS)}) or "
                             f"'file'; has {fields}")
        for line, row in enumerate(reader, start=2):
            value = (parse_label(row["label"], f"{path.name}:{line}"), (row.get("family") or "").strip() or None)
            if id_column and (row.get(id_column) or "").strip():
                try:
                    by_id[int(row[id_column])] = value
                except ValueError:
                    raise LabelError(f"{path.name}:{line}: {id_column} {row[id_column]!r} is not an integer") from None
            elif row.get("file"):
                by_file[Path(row["file"]).name] = value
    return LabelTable(by_id, by_file, path.name)


def assign_labels(alerts: Sequence[RealAlert], tables: Sequence[LabelTable] = (),
                  label_from: Sequence[str] = (), bands: tuple[float, float] = (0.5, 0.5),
                  soft: bool = False) -> None:
    """Give each alert its label (in place), by the module's order of precedence.

    Parameters
    ----------
    tables : sequence of LabelTable
        Human labels, first table first. An ``unsure`` there is no label: the survey score
        (if any) still labels the alert, since it is then the best information there is.
    label_from : sequence of str
        Survey scores to fall back on, first present first (``drb``, ``rb``, ``reliability``).
    bands : (low, high)
        A survey score ``>= high`` is real, ``< low`` bogus, in between unlabelled;
        ``(t, t)`` is a plain threshold. Not used with ``soft``.
    soft : bool
        Every alert with a survey score is labelled, real at or above 0.5, and its
        ``target`` is the score itself, so that training learns the survey model's
        graded confidence (distillation) rather than a cut through it.
    """
    low, high = (0.5, 0.5) if soft else bands
    for alert in alerts:
        alert.label = alert.label_source = alert.family = alert.target = None
        found = next(((t.source, hit) for t in tables if (hit := t.get(alert)) is not None and hit[0] is not None),
                     None)
        if found is not None:
            alert.label_source, (alert.label, alert.family) = found
            alert.target = float(alert.label)
            continue
        name = next((n for n in label_from if n in alert.survey_scores), None)
        if name is not None:
            score = alert.survey_scores[name]
            alert.label = 1 if score >= high else 0 if score < low else None
            alert.label_source = name if alert.label is not None else None
            if alert.label is not None:
                alert.target = score if soft else float(alert.label)


# --------------------------------------------------------------------------- splits
def object_split(survey: str, object_id: str, holdout: tuple[float, float] = DEFAULT_HOLDOUT,
                 fold: tuple[int, int] | None = None) -> str:
    """``train``, ``valid`` or ``test`` for an object, from a stable hash of its survey and id.

    ``holdout`` is the (validation, test) share of objects. With ``fold = (k, n)``, the
    objects outside the test split are cut into ``n`` folds of equal share and fold ``k``
    is the validation split (cross-validation, `training.crossval`); the test split is the
    same as without it.
    """
    digest = hashlib.sha256(f"{survey}:{object_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    valid, test = holdout
    if u < test:
        return "test"
    if fold is not None:
        k, n = fold
        return "valid" if min(int((u - test) / (1 - test) * n), n - 1) == k else "train"
    return "valid" if u < test + valid else "train"


def by_split(alerts: Sequence[RealAlert], holdout: tuple[float, float] = DEFAULT_HOLDOUT,
             fold: tuple[int, int] | None = None) -> dict[str, list[RealAlert]]:
    out: dict[str, list[RealAlert]] = {s: [] for s in SPLITS}
    for alert in alerts:
        out[object_split(alert.survey, alert.object_id or str(alert.candidate_id), holdout, fold)].append(alert)
    return out


def split_by_config(alerts: Sequence[RealAlert], data: Mapping) -> dict[str, list[RealAlert]]:
    """`by_split` with the ``holdout`` and ``fold`` of a training config's ``[data]`` table."""
    return by_split(alerts, tuple(data["holdout"]), tuple(data["fold"]) or None)


def stamps(alerts: Sequence[RealAlert], contract) -> tuple[np.ndarray, list[RealAlert], list[tuple[str, str]]]:
    """Model input for each alert under ``contract``; also the alerts kept and ``(file, reason)`` of the rest."""
    from service.contract import StampError, assemble

    out, kept, failures = [], [], []
    for alert in alerts:
        try:
            out.append(assemble(alert.images, contract, alert.centre))
            kept.append(alert)
        except StampError as exc:
            failures.append((alert.file.name, str(exc)))
    array = np.stack(out).astype(np.float32) if out else np.empty((0, *contract.input_shape), np.float32)
    return array, kept, failures
