"""Labels from the scanning page, kept in SQLite and exported in the CSV training reads.

Every label is stored with its labeller and time; the key is (survey, id, labeller), so a
labeller relabelling an alert replaces their own label and never anyone else's: two
people scanning the same queue both keep theirs. The export (`export_csv`) has the columns of
``training/labels/eye_labels.csv`` — ``survey,id,object_id,file,label,family,comment``
— that `training.real.read_label_table` reads (training's ``alerts`` source, ``rbstream
evaluate``): one row per alert, the label the labellers agree on, or ``unsure`` with the
disagreement in ``comment``; with ``every_labeller`` one row per label, plus ``labeller``
and ``labelled_at``. After each label the export is also written to ``labels.csv`` beside
the database (replaced atomically), ready to point training at.
"""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

#: Label values the page sends (those `training.real.parse_label` reads).
LABELS = ("real", "bogus", "unsure")
#: Columns of the CSV training reads, in order.
COLUMNS = ("survey", "id", "object_id", "file", "label", "family", "comment")
DATABASE_FILE = "labels.sqlite"
EXPORT_FILE = "labels.csv"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    survey TEXT NOT NULL,
    id TEXT NOT NULL,
    object_id TEXT NOT NULL DEFAULT '',
    file TEXT NOT NULL DEFAULT '',
    label TEXT NOT NULL CHECK (label IN ('real', 'bogus', 'unsure')),
    family TEXT NOT NULL DEFAULT '',
    comment TEXT NOT NULL DEFAULT '',
    labeller TEXT NOT NULL,
    labelled_at TEXT NOT NULL,
    PRIMARY KEY (survey, id, labeller)
)
"""


class LabelInputError(ValueError):
    """A label that cannot be stored; the message says why."""


class LabelStore:
    """The labels of one folder (``labels.sqlite``, ``labels.csv``); safe to share between threads."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / DATABASE_FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # WAL + synchronous=FULL: a label acknowledged to the page survives a crash or power loss.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def put(self, survey: str, ident, label: str, labeller: str, object_id: str = "", file: str = "",
            family: str = "", comment: str = "") -> list[dict]:
        """Store ``labeller``'s label of an alert (replacing only their own earlier one); returns every label
        of the alert, this one included."""
        labeller = (labeller or "").strip()
        if not labeller:
            raise LabelInputError("a label needs the labeller's name")
        if label not in LABELS:
            raise LabelInputError(f"label {label!r}; accepted: {', '.join(LABELS)}")
        if len(labeller) > 100 or len(family or "") > 100 or len(comment or "") > 2000:
            raise LabelInputError("labeller and family are at most 100 characters, comment at most 2000")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            self._db.execute(
                "INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (survey, id, labeller) DO UPDATE "
                "SET label = excluded.label, family = excluded.family, comment = excluded.comment, "
                "labelled_at = excluded.labelled_at, object_id = excluded.object_id, file = excluded.file",
                (survey, str(ident), object_id or "", file or "", label, family or "", comment or "", labeller, now))
            self._write_export()
        return self.of(survey, ident)

    def of(self, survey: str, ident) -> list[dict]:
        """Every label of one alert, oldest first."""
        with self._lock:
            cursor = self._db.execute("SELECT * FROM labels WHERE survey = ? AND id = ? ORDER BY labelled_at, labeller",
                                      (survey, str(ident)))
            return _dicts(cursor)

    def all(self) -> list[dict]:
        with self._lock:
            return _dicts(self._db.execute("SELECT * FROM labels ORDER BY survey, id, labelled_at, labeller"))

    def export_csv(self, every_labeller: bool = False) -> str:
        """The labels as CSV text (see the module's docstring)."""
        rows = self.all() if every_labeller else agreed(self.all())
        columns = COLUMNS + (("labeller", "labelled_at") if every_labeller else ())
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def _write_export(self) -> None:
        rows = agreed(_dicts(self._db.execute("SELECT * FROM labels ORDER BY survey, id, labelled_at, labeller")))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        tmp = self.folder / f".{EXPORT_FILE}.tmp"
        tmp.write_text(out.getvalue())
        os.replace(tmp, self.folder / EXPORT_FILE)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def agreed(rows: list[dict]) -> list[dict]:
    """One row per alert: the label when every labeller gave the same one, else ``unsure`` saying who said what."""
    by_alert: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_alert.setdefault((row["survey"], row["id"]), []).append(row)
    out = []
    for labels in by_alert.values():
        last = dict(labels[-1])
        if len({row["label"] for row in labels}) > 1:
            last["label"] = "unsure"
            last["family"] = ""
            last["comment"] = "labellers disagree: " + ", ".join(f"{r['labeller']} {r['label']}" for r in labels)
        elif len(labels) > 1:
            families = {row["family"] for row in labels if row["family"]}
            last["family"] = families.pop() if len(families) == 1 else ""
            last["comment"] = "; ".join(r["comment"] for r in labels if r["comment"])
        out.append(last)
    return out


def _dicts(cursor) -> list[dict]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]
