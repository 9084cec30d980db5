"""Cross-validation of a fine-tuning config on its real alerts (``rbstream train --folds``).

A few hundred labelled alerts make one validation split too small to choose settings by:
with a dozen or two bogus in it, its AUC is uncertain by several hundredths. Cross-validation
uses every labelled alert outside the test split once: those objects are cut into ``n``
folds (`training.real.object_split`), and ``n`` runs each train on ``n - 1`` folds and score
the last with their exported model. The out-of-fold scores of all runs are then judged
together, as ``rbstream evaluate`` judges a model (`training.evaluate.compare`: the config's
human labels first, then its survey scores at 0.5, the survey scores beside ours), and
against each survey score alone. The test split is never trained on nor scored: it stays
held out for the final model.

A fold's run stops early and fits its temperature on the fold it scores, so the
out-of-fold ECE, and slightly the AUC, are optimistic: compare settings with them, and
quote the test split for the final model.

The output folder holds ``fold<k>/`` (each fold's run folder), ``crossval.json`` (the
judgement) and ``out_of_fold.csv`` (each alert's file, id, fold, label and score).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from service.score.card import json_text
from service.score.model import MODEL_FILE
from training import real
from training.adapt import EVALUATION_THRESHOLD, evaluation_alerts
from training.config import ConfigError, load_config
from training.evaluate import compare, score_alerts
from training.report import metrics

REPORT = "crossval.json"
SCORES = "out_of_fold.csv"


def fold_config(path: str | Path, fold: int, folds: int, overrides: dict | None = None):
    """The config at ``path`` with fold ``fold`` of ``folds`` as its validation split."""
    overrides = dict(overrides or {})
    overrides["data"] = {**overrides.get("data", {}), "fold": [fold, folds]}
    config = load_config(path, overrides)
    data = config.table("data")
    if data["source"] != "alerts" or data["split"] != "object":
        raise ConfigError(f"{path}: cross-validation needs data.source = \"alerts\" and data.split = \"object\"")
    return config


def cross_validate(path: str | Path, folds: int, out: str | Path, overrides: dict | None = None) -> dict:
    """Train ``folds`` runs of the config at ``path`` and judge their out-of-fold scores.

    Parameters
    ----------
    path : path
        A training config with ``[data] source = "alerts"``, split by object.
    folds : int
        How many folds (>= 2) the objects outside the test split are cut into.
    out : path
        The output folder (see the module).
    overrides : dict, optional
        Laid over the config, as `training.config.load_config` lays them.

    Returns
    -------
    dict
        What ``crossval.json`` holds.
    """
    from training.train import train

    if folds < 2:
        raise ConfigError(f"--folds: bad value {folds}; accepted: an integer >= 2")
    out = Path(out)
    configs = [fold_config(path, k, folds, overrides) for k in range(folds)]  # every fold's config checked first
    started = time.time()
    found = evaluation_alerts(configs[0])  # the folds differ in their split only
    alerts, scores, rows = [], [], []
    for k, config in enumerate(configs):
        run = out / f"fold{k}"
        train(config, run)
        held_out = real.split_by_config(found, config.table("data"))["valid"]
        fold_scores, kept, _, _ = score_alerts(held_out, run / MODEL_FILE)
        alerts += kept
        scores.append(fold_scores)
        rows += [(a.file.name, a.candidate_id, k, "" if a.label is None else a.label, float(s))
                 for a, s in zip(kept, fold_scores)]
    scores = np.concatenate(scores)
    threshold = float(configs[0].table("export")["threshold"])
    label_from = list(configs[0].table("data")["label_from"])
    report = {
        "config": str(path), "folds": folds, "seconds": round(time.time() - started, 1), "threshold": threshold,
        "labels": f"human labels, then {label_from or 'none'} >= {EVALUATION_THRESHOLD}",
        "out_of_fold": compare(alerts, scores, threshold),
        "by_survey_score": {},
    }
    for name in label_from:
        has = np.array([name in a.survey_scores for a in alerts], dtype=bool)
        if has.any():
            theirs = np.array([a.survey_scores[name] for a, h in zip(alerts, has) if h])
            report["by_survey_score"][name] = metrics(theirs >= EVALUATION_THRESHOLD, scores[has], threshold,
                                                      interval=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json_text(report))
    with open(out / SCORES, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "id", "fold", "label", "score"])
        writer.writerows(rows)
    return report


def summary(report: dict) -> str:
    """One line per judgement of ``report``: the out-of-fold AUC with its interval."""
    def line(what: str, m: dict | None) -> str:
        if not m or m["roc_auc"] is None:
            return f"  {what}: AUC undefined (one class)"
        interval = m.get("roc_auc_interval")
        within = f" (95% {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""
        return (f"  {what}: AUC {m['roc_auc']:.4f}{within}, {m['n']} alerts, {m['n_bogus']} bogus; "
                f"FPR {m['fpr']:.3f} / FNR {m['fnr']:.3f} at {m['threshold']:g}; ECE {m['ece']:.3f}")

    lines = [f"cross-validation of {report['config']}, {report['folds']} folds, out-of-fold scores:",
             line(report["labels"], report["out_of_fold"]["ours"])]
    lines += [line(f"{name} >= {EVALUATION_THRESHOLD} alone", m) for name, m in report["by_survey_score"].items()]
    return "\n".join(lines)
