"""``rbstream evaluate``: how good a model is on real, labelled alerts.

Decodes the alerts with the service's own decoder, scores them with the ONNX model the
service would use (by default the shipped model of each alert's survey), labels them
(`training.real`: human labels first, then the survey's own score as a weak label) and
writes, per survey, the metrics of our score and of the survey's own score on the same
alerts, with plots:

``report.json``, ``report.md``
    every number below, and how many alerts could not be used and why;
``roc_<survey>.png``
    ROC curves of our score and the survey's scores on the same labelled alerts;
``reliability_<survey>.png``
    the reliability diagram (fraction real against mean score, per bin);
``histogram_<survey>.png``
    our score per label;
``disagreements_<survey>.png``
    science, template and difference of the alerts whose score is furthest from their label.

No torch: evaluation needs ONNX Runtime, scikit-learn and matplotlib only.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from training import real
from training.report import metrics

log = logging.getLogger(__name__)

#: The project's own human labels (see training/labels/README.md).
EYE_LABELS = Path(__file__).resolve().parent / "labels" / "eye_labels.csv"
#: Survey-score bands whose mean model score the report gives (the survey score's [low, high)).
SCORE_BANDS = ((0.0, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.01))
WORST_SHOWN = 12


def score_alerts(alerts: Sequence[real.RealAlert], model: str | Path, device: str = "cpu"
                 ) -> tuple[np.ndarray, list[real.RealAlert], list[tuple[str, str]], dict]:
    """Scores of ``alerts`` by one model; also the alerts scored, the failures and the model's identity."""
    from service.score.model import Scorer

    scorer = Scorer(model, device=device)
    x, kept, failures = real.stamps(alerts, scorer.contract)
    scores = scorer.score(x) if len(x) else np.empty(0, np.float32)
    identity = {"name": scorer.card.name, "version": scorer.card.version, "path": str(model),
                "threshold": scorer.threshold}
    return scores.astype(np.float64), kept, failures, identity


def judged_by(alerts: Sequence[real.RealAlert], name: str) -> np.ndarray:
    """Which labelled alerts survey score ``name`` can be judged on: those that carry it and
    whose label it did not give itself."""
    return np.array([a.label is not None and name in a.survey_scores and a.label_source != name for a in alerts],
                    dtype=bool)


def compare(alerts: Sequence[real.RealAlert], scores: np.ndarray, threshold: float) -> dict:
    """Metrics of ``scores`` and of every survey score, on the labelled alerts.

    Each survey score is compared on the alerts that carry it and whose label it did not
    give itself, with ours on the same alerts beside it (``ours_on_same``), so the two are
    judged on one population by labels independent of both.
    """
    labels = np.array([a.label if a.label is not None else -1 for a in alerts])
    labelled = labels >= 0
    out: dict = {"n_alerts": len(alerts), "n_labelled": int(labelled.sum()),
                 "label_sources": dict(Counter(a.label_source for a in alerts if a.label is not None)),
                 "ours": metrics(labels[labelled], scores[labelled], threshold) if labelled.any() else None,
                 "survey_scores": {}}
    names = sorted({n for a in alerts for n in a.survey_scores})
    for name in names:
        has = judged_by(alerts, name)
        theirs = np.array([a.survey_scores.get(name, np.nan) for a in alerts])
        if has.any():
            out["survey_scores"][name] = {
                "theirs": metrics(labels[has], theirs[has], 0.5),
                "ours_on_same": metrics(labels[has], scores[has], threshold),
            }
        bands = {}
        for low, high in SCORE_BANDS:
            inside = (theirs >= low) & (theirs < high)
            if inside.any():
                bands[f"{low:g}-{min(high, 1):g}"] = {"n": int(inside.sum()), "mean_ours": float(scores[inside].mean())}
        out.setdefault("mean_score_by_survey_score", {})[name] = bands
    families = Counter(a.family for a in alerts if a.label == 0 and a.family)
    if families:
        out["scored_real_by_family"] = {
            family: {"n": n, "scored_real": int(sum(1 for a, s in zip(alerts, scores)
                                                    if a.family == family and a.label == 0 and s >= threshold))}
            for family, n in sorted(families.items())}
    return out


def evaluate(spec: Sequence[str | Path], out: str | Path | None = None, models: Mapping[str, str | Path] | None = None,
             label_tables: Sequence[str | Path] = (), label_from: Sequence[str] = ("drb",),
             label_threshold: float = 0.5, split: str = "all", holdout: tuple[float, float] | None = None,
             threshold: float | None = None, device: str = "cpu") -> dict:
    """Evaluate models on alert files and write the report.

    Parameters
    ----------
    spec : sequence of str or path
        Folders, globs or CSV lists of alert files (`training.real.alert_files`).
    out : path, optional
        Folder for the report and plots; nothing is written without it.
    models : mapping of survey to model path
        Default: the shipped model of each survey found (`service.score.model.models_dir`).
    label_tables : sequence of path
        Labels CSVs, first one first (they take precedence over survey scores).
    label_from : sequence of str
        Survey scores used as labels where no CSV labels an alert, first present first.
    label_threshold : float
        A survey score at or above it is real.
    split : ``all``, ``train``, ``valid`` or ``test``
        Keep only the alerts of this object split (`training.real.object_split`).
    holdout : (valid, test), optional
        The split's shares; default: those the model was trained with (`held_out`).
    threshold : float, optional
        Our score at or above it is real; default: each model card's threshold.
    """
    from service.score.model import models_dir

    files = [f for s in spec for f in real.alert_files(s)]
    alerts, failures = real.read_alerts(files)
    tables = [real.read_label_table(p) for p in label_tables]
    real.assign_labels(alerts, tables, label_from, (label_threshold, label_threshold))
    report: dict = {"files": len(files), "split": split, "holdout": None if holdout is None else list(holdout),
                    "labels": {"tables": [str(p) for p in label_tables], "label_from": list(label_from),
                               "label_threshold": label_threshold},
                    "surveys": {}, "undecodable": len(failures),
                    "undecodable_reasons": dict(Counter(_reason_kind(r) for _, r in failures)),
                    "undecodable_examples": failures[:20]}
    plotted = {}
    for survey in sorted({a.survey for a in alerts}):
        group = [a for a in alerts if a.survey == survey]
        model = Path((models or {}).get(survey) or models_dir() / survey)
        if split != "all":
            group = [a for a in group if real.object_split(a.survey, a.object_id or str(a.candidate_id),
                                                           held_out(model, holdout)) == split]
        scores, kept, stamp_failures, identity = score_alerts(group, model, device)
        t = identity["threshold"] if threshold is None else threshold
        result = {"model": identity, "threshold": t, "holdout": list(held_out(model, holdout)),
                  "unscorable": len(stamp_failures),
                  "unscorable_examples": stamp_failures[:20], **compare(kept, scores, t)}
        report["surveys"][survey] = result
        plotted[survey] = (kept, scores, t)
    if out is not None:
        write_report(report, plotted, Path(out))
    return report


def held_out(model: Path, holdout: tuple[float, float] | None) -> tuple[float, float]:
    """``holdout`` if given, else the one the model was trained with (its card), else the default."""
    from service.score.model import CARD_FILE, ModelCard, ModelError

    if holdout is not None:
        return tuple(holdout)
    try:
        card = ModelCard.read((model.parent if model.suffix == ".onnx" else model) / CARD_FILE)
    except ModelError:
        return real.DEFAULT_HOLDOUT
    return card.holdout or real.DEFAULT_HOLDOUT


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0][:80]


# --------------------------------------------------------------------------- writing
def write_report(report: dict, plotted: Mapping, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    for survey, (alerts, scores, threshold) in plotted.items():
        labels = np.array([a.label if a.label is not None else -1 for a in alerts])
        plot_roc(alerts, scores, labels, out / f"roc_{survey}.png", survey)
        plot_reliability(scores, labels, out / f"reliability_{survey}.png", survey)
        plot_histogram(scores, labels, threshold, out / f"histogram_{survey}.png", survey)
        plot_disagreements(alerts, scores, labels, out / f"disagreements_{survey}.png", survey)
    (out / "report.md").write_text(markdown(report))


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metric_row(name: str, m: Mapping | None) -> str:
    if not m:
        return f"| {name} | – | – | – | – | – | – | – | – | – |"
    return (f"| {name} | {m['n']} ({m['n_real']} real) | {_fmt(m['roc_auc'])} | {_fmt(m['accuracy'])} | "
            f"{_fmt(m['fpr'])} | {_fmt(m['fnr'])} | {_fmt(m['threshold_at_fpr_1pct'])} | "
            f"{_fmt(m['fpr_at_fnr_5pct'])} | {_fmt(m['ece'])} | {_fmt(m['brier'])} |")


METRIC_HEADER = ("| score | alerts | AUC | accuracy | FPR | FNR | threshold at FPR 1% | FPR at FNR 5% | ECE | Brier |\n"
                 "|---|---|---|---|---|---|---|---|---|---|")


def markdown(report: dict) -> str:
    lines = ["# rbstream evaluate", "",
             f"{report['files']} file(s), split `{report['split']}`; labels: tables "
             f"{[Path(t).name for t in report['labels']['tables']] or 'none'}, then survey scores "
             f"{report['labels']['label_from'] or 'none'} at >= {report['labels']['label_threshold']:g}.",
             f"Undecodable: {report['undecodable']} {report['undecodable_reasons'] or ''}", ""]
    for survey, r in report["surveys"].items():
        model = r["model"]
        lines += [f"## {survey}: {model['name']} {model['version']}", "",
                  f"{r['n_alerts']} alerts scored ({r['unscorable']} could not be), {r['n_labelled']} labelled "
                  f"({r['label_sources']}); our threshold {r['threshold']:g}, the survey's 0.5.", "",
                  METRIC_HEADER, metric_row("ours (all labelled)", r["ours"])]
        for name, pair in r["survey_scores"].items():
            lines += [metric_row(f"ours (alerts with {name}, not labelled by it)", pair["ours_on_same"]),
                      metric_row(f"{name} (survey)", pair["theirs"])]
        for name, bands in r.get("mean_score_by_survey_score", {}).items():
            lines += ["", f"Our mean score by {name}: " + ", ".join(
                f"{band}: {b['mean_ours']:.3f} (n={b['n']})" for band, b in bands.items())]
        if r.get("scored_real_by_family"):
            lines += ["", "Labelled artifacts scored real, by family: " + ", ".join(
                f"{f} {v['scored_real']}/{v['n']}" for f, v in r["scored_real_by_family"].items())]
        lines += ["", f"![ROC](roc_{survey}.png) ![reliability](reliability_{survey}.png) "
                      f"![histogram](histogram_{survey}.png)", "", f"![worst](disagreements_{survey}.png)", ""]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(alerts, scores, labels, path: Path, survey: str) -> None:
    from sklearn.metrics import RocCurveDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    labelled = labels >= 0
    if len(set(labels[labelled])) == 2:
        RocCurveDisplay.from_predictions(labels[labelled], scores[labelled], ax=ax, name="rbstream (all labelled)")
        for name in sorted({n for a in alerts for n in a.survey_scores}):
            has = judged_by(alerts, name)
            if len(set(labels[has])) == 2:
                theirs = np.array([a.survey_scores.get(name, np.nan) for a in alerts])
                RocCurveDisplay.from_predictions(labels[has], scores[has], ax=ax, name=f"rbstream (with {name})")
                RocCurveDisplay.from_predictions(labels[has], theirs[has], ax=ax, name=f"{name} (survey)",
                                                 curve_kwargs={"linestyle": "--"})
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
    ax.set_title(f"ROC, {survey}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_reliability(scores, labels, path: Path, survey: str, bins: int = 10) -> None:
    from sklearn.calibration import calibration_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    labelled = labels >= 0
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    if labelled.any():
        frac, mean = calibration_curve(labels[labelled], scores[labelled], n_bins=bins, strategy="uniform")
        ax.plot(mean, frac, "o-", label="rbstream")
    ax.set(xlabel="mean score in bin", ylabel="fraction real", title=f"reliability, {survey}", xlim=(0, 1),
           ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_histogram(scores, labels, threshold: float, path: Path, survey: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    edges = np.linspace(0, 1, 26)
    for value, name in ((1, "real"), (0, "bogus"), (-1, "unlabelled")):
        inside = labels == value
        if inside.any():
            ax.hist(scores[inside], bins=edges, histtype="step", lw=2, label=f"{name} ({inside.sum()})")
    ax.axvline(threshold, color="k", ls=":", label=f"threshold {threshold:g}")
    ax.set(xlabel="rbstream score", ylabel="alerts", title=f"scores by label, {survey}", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def display_stretch(image: np.ndarray) -> np.ndarray:
    """An image scaled for the eye: asinh of the image between its 1st and 99.5th percentiles."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image, dtype=np.float64)
    low, high = np.percentile(finite, [1, 99.5])
    scaled = np.clip((image - low) / max(high - low, 1e-12), 0, 1)
    return np.where(np.isfinite(image), np.arcsinh(10 * scaled) / np.arcsinh(10), np.nan)


def plot_disagreements(alerts, scores, labels, path: Path, survey: str, n: int = WORST_SHOWN) -> None:
    plt = _pyplot()
    labelled = np.flatnonzero(labels >= 0)
    worst = labelled[np.argsort(-np.abs(scores[labelled] - labels[labelled]), kind="stable")][:n]
    rows = max(len(worst), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(6.6, 2.3 * rows), squeeze=False)
    cmap = plt.get_cmap("gray").with_extremes(bad="tab:red")
    for row, i in enumerate(worst):
        a = alerts[i]
        theirs = ", ".join(f"{k} {v:.2f}" for k, v in a.survey_scores.items()) or "no survey score"
        for col, name in enumerate(("science", "template", "difference")):
            ax = axes[row, col]
            image = a.images.get(name)
            if image is not None:
                ax.imshow(display_stretch(np.asarray(image, dtype=np.float64)), cmap=cmap, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
        axes[row, 0].set_ylabel(f"{a.candidate_id}\n{'real' if labels[i] else 'bogus'} ({a.label_source})\n"
                                f"ours {scores[i]:.2f}; {theirs}", fontsize=7)
    if not len(worst):
        axes[0, 1].text(0.5, 0.5, "no labelled alert", ha="center")
    fig.suptitle(f"largest disagreements with the label, {survey}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=60)
    plt.close(fig)


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    parser.add_argument("alerts", nargs="+", metavar="ALERTS",
                        help="folders (searched recursively), globs or CSV lists ('file' column) of alert files")
    parser.add_argument("--model", action="append", default=[], metavar="[SURVEY=]PATH",
                        help="model folder, for the survey its card names (or SURVEY=PATH); default: the shipped "
                             "model of each survey")
    parser.add_argument("--labels", action="append", default=None, metavar="CSV",
                        help="labels CSV (candid/diaSourceId/id or file, label real/bogus/unsure[, family]); "
                             "repeatable, first wins; default: the project's eye labels; 'none' for no CSV")
    parser.add_argument("--label-from", nargs="*", default=["drb"], choices=real.WEAK_LABELS, metavar="SCORE",
                        help="survey scores used as labels where no CSV labels an alert, first present first "
                             "(drb, rb, reliability; default drb; none: give the flag alone)")
    parser.add_argument("--label-threshold", type=float, default=0.5,
                        help="a survey score at or above this is a real label (default 0.5)")
    parser.add_argument("--split", choices=("all", *real.SPLITS), default="all",
                        help="only the alerts of this object split (the split training holds out is 'test')")
    parser.add_argument("--holdout", type=float, nargs=2, default=None, metavar=("VALID", "TEST"),
                        help="with --split: the shares of objects held out (default: the model card's, else "
                             "0.15 0.15)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="our score at or above this is real (default: the model card's threshold)")
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="report folder (default evaluation/)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="ONNX Runtime device")


def _models(values: Sequence[str]) -> dict[str, Path]:
    from service.score.model import ModelCard, ModelError, CARD_FILE

    out = {}
    for value in values:
        survey, _, path = value.rpartition("=")
        path = Path(path)
        if not survey:
            folder = path.parent if path.suffix == ".onnx" else path
            try:
                survey = ModelCard.read(folder / CARD_FILE).survey
            except ModelError as exc:
                raise real.LabelError(f"--model {value}: {exc}") from None
        out[survey] = path
    return out


def main(args) -> int:
    import sys

    if args.labels is None:
        tables = [EYE_LABELS] if EYE_LABELS.exists() else []
    else:
        tables = [Path(p) for p in args.labels if p.lower() != "none"]
    try:
        evaluate(args.alerts, args.out, _models(args.model), tables, args.label_from, args.label_threshold,
                 args.split, args.holdout, threshold=args.threshold, device=args.device)
    except real.LabelError as exc:
        print(f"rbstream evaluate: {exc}", file=sys.stderr)
        return 2
    print((args.out / "report.md").read_text())
    print(f"report: {args.out / 'report.json'}")
    return 0
