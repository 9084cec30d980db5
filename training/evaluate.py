"""``rbstream evaluate``: how good models are on real, labelled alerts, and on simulated ones.

Decodes the alerts with the service's own decoder, scores them with the ONNX models the
service would use (by default the shipped model of each alert's survey; several models of one
survey are judged side by side on the alerts every one of them can score), labels them
(`training.real`: human labels first, then the survey's own score as a weak label) and
writes, per survey, the metrics of each model and of the survey's own score on the same
alerts, with plots. With ``synthetic`` it also scores simulated triplets drawn as the first
model's synthetic test set, each model given only the images its contract takes:

``report.json``, ``report.md``
    every number below, and how many alerts could not be used and why;
``roc_<survey>.png``
    ROC curves of every model and the survey's scores on the same labelled alerts;
``roc_synthetic_<survey>.png``, ``synthetic_scores_<survey>.npz``
    every model's ROC curve and scores on the simulated triplets (with ``synthetic``);
``reliability_<survey>.png``
    the reliability diagram of every model (fraction real against mean score, per bin, with
    each bin's 95% interval, and how many alerts each bin holds);
``histogram_<survey>.png``
    each model's score per label;
``disagreements_<survey>.png``
    science, template and difference of the alerts the first model scores furthest from their label.

No torch: evaluation needs ONNX Runtime, scikit-learn and matplotlib only.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from service.score.card import is_real, json_text
from service.score.model import DEVICES
from training import real
from training.report import metrics

log = logging.getLogger(__name__)

#: The project's own human labels (see training/labels/README.md).
EYE_LABELS = Path(__file__).resolve().parent / "labels" / "eye_labels.csv"
#: Survey-score bands whose mean model score the report gives (the survey score's [low, high)).
SCORE_BANDS = ((0.0, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.01))
WORST_SHOWN = 12


class EvaluateError(ValueError):
    """An evaluation that cannot be made as asked (models that disagree on their split, no simulator config...)."""


def score_alerts(alerts: Sequence[real.RealAlert], model: str | Path, device: str = "cpu"
                 ) -> tuple[np.ndarray, list[real.RealAlert], list[tuple[str, str]], dict]:
    """Scores of ``alerts`` by one model; also the alerts scored, the failures and the model's identity."""
    from service.score.model import Scorer

    return _score_with(Scorer(model, device=device), alerts, model)


def _score_with(scorer, alerts: Sequence[real.RealAlert], model: str | Path
                ) -> tuple[np.ndarray, list[real.RealAlert], list[tuple[str, str]], dict]:
    x, kept, failures = real.stamps(alerts, scorer.contract)
    scores = scorer.score(x) if len(x) else np.empty(0, np.float32)
    return scores.astype(np.float64), kept, failures, model_identity(scorer, model)


def model_identity(scorer, model: str | Path) -> dict:
    """What the report says of a model: card name and version, path, threshold, the images it takes."""
    return {"name": scorer.card.name, "version": scorer.card.version, "path": str(model),
            "threshold": scorer.threshold, "inputs": list(scorer.contract.raw_inputs)}


@dataclass
class ModelRun:
    """One model of a survey in a report: its scorer, its name there and what it scored."""

    label: str
    path: Path
    scorer: object
    identity: dict
    threshold: float
    scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    failures: list = field(default_factory=list)
    synthetic_scores: np.ndarray | None = None


def model_labels(paths: Sequence[Path], cards: Sequence) -> list[str]:
    """A distinct name per model: its folder's name, with the card's name and version where folders share one."""
    folders = [(p.parent if p.suffix == ".onnx" else p).name or str(p) for p in paths]
    named = [f if folders.count(f) == 1 else f"{f} ({c.name} {c.version})" for f, c in zip(folders, cards)]
    # same folder name and same card: number them in the order given
    return [label if named.count(label) == 1 else f"{label} #{named[:i + 1].count(label)}"
            for i, label in enumerate(named)]


def score_together(alerts: Sequence[real.RealAlert], runs: Sequence[ModelRun]) -> list[real.RealAlert]:
    """Score ``alerts`` with every model; return the alerts every model could score, each run's
    ``scores`` set on exactly those, so that all models are judged on one population."""
    by_alert = []
    for run in runs:
        scores, kept, run.failures, _ = _score_with(run.scorer, alerts, run.path)
        by_alert.append({id(a): s for a, s in zip(kept, scores)})
    common = [a for a in alerts if all(id(a) in scored for scored in by_alert)]
    for run, scored in zip(runs, by_alert):
        run.scores = np.array([scored[id(a)] for a in common], dtype=np.float64)
    return common


def synthetic_set(runs: Sequence[ModelRun], survey: str, n: int) -> dict:
    """``n`` labelled simulated triplets, drawn as the synthetic test set of the first model whose card
    holds its training config: the same simulator settings, stamp size and seed, so that the first ``n``
    stamps are those of that card's ``synthetic_test``. Every model then takes its own channels of them."""
    from dataclasses import replace

    from training.data import SPLITS
    from training.profiles import get_profile
    from training.simulate import SimulatorConfig, simulate

    source = next((r for r in runs if isinstance(r.scorer.card.config, Mapping)), None)
    if source is None:
        raise EvaluateError(f"--synthetic: no model of {survey} has its training config in its card, so its "
                            "synthetic test set cannot be drawn again")
    config = source.scorer.card.config
    settings = dict(config.get("simulator") or {})
    weights = settings.pop("bogus_weights", None)
    if "snr_range" in settings:
        settings["snr_range"] = tuple(settings["snr_range"])
    simulator = SimulatorConfig(**settings, **({"bogus_weights": weights} if weights is not None else {}))
    # the test split's seed of training.data.simulated: never the stamps a model was trained on
    seed = int(config["seed"]) * 10 + SPLITS.index("test")
    profile = replace(get_profile(str(config.get("survey", survey))), stamp_size=source.scorer.contract.size)
    drawn = simulate(profile, n, seed=seed, config=simulator, workers=os.cpu_count() or 1)
    return {**drawn, "seed": seed, "drawn_as": source.label, "size": profile.stamp_size}


def score_synthetic(runs: Sequence[ModelRun], synthetic: Mapping) -> None:
    """Each run's scores of the simulated stamps, given only the images its contract takes."""
    from training.data import to_contract

    for run in runs:
        stamps = to_contract(synthetic["stamps"], synthetic["channels"], run.scorer.contract)
        run.synthetic_scores = run.scorer.score(stamps).astype(np.float64)


def judged_by(alerts: Sequence[real.RealAlert], name: str) -> np.ndarray:
    """Which labelled alerts survey score ``name`` can be judged on: those that carry it and
    whose label it did not give itself."""
    return np.array([a.label is not None and name in a.survey_scores and a.label_source != name for a in alerts],
                    dtype=bool)


def compare(alerts: Sequence[real.RealAlert], scores: np.ndarray, threshold: float) -> dict:
    """Metrics of ``scores`` and of every survey score, on the labelled alerts.

    Each survey score is compared on the alerts that carry it and whose label it did not
    give itself, with ours on the same alerts beside it (``ours_on_same``), so the two are
    judged on one population by labels independent of both. Every AUC here comes with its
    bootstrap interval (`training.report.roc_auc_interval`).
    """
    labels = np.array([a.label if a.label is not None else -1 for a in alerts])
    labelled = labels >= 0
    out: dict = {"n_alerts": len(alerts), "n_labelled": int(labelled.sum()),
                 "label_sources": dict(Counter(a.label_source for a in alerts if a.label is not None)),
                 "ours": (metrics(labels[labelled], scores[labelled], threshold, interval=True)
                          if labelled.any() else None),
                 "survey_scores": {}}
    names = sorted({n for a in alerts for n in a.survey_scores})
    for name in names:
        has = judged_by(alerts, name)
        theirs = np.array([a.survey_scores.get(name, np.nan) for a in alerts])
        if has.any():
            out["survey_scores"][name] = {
                "theirs": metrics(labels[has], theirs[has], 0.5, interval=True),
                "ours_on_same": metrics(labels[has], scores[has], threshold, interval=True),
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
                                                    if a.family == family and a.label == 0 and is_real(s, threshold)))}
            for family, n in sorted(families.items())}
    return out


def evaluate(spec: Sequence[str | Path], out: str | Path | None = None,
             models: Mapping[str, str | Path | Sequence[str | Path]] | None = None,
             label_tables: Sequence[str | Path] = (), label_from: Sequence[str] = ("drb",),
             label_threshold: float = 0.5, split: str = "all", holdout: tuple[float, float] | None = None,
             threshold: float | None = None, device: str = "cpu", synthetic: int = 0,
             write_reference: bool = False) -> dict:
    """Evaluate models on alert files and write the report.

    Parameters
    ----------
    spec : sequence of str or path
        Folders, globs or CSV lists of alert files (`training.real.alert_files`).
    out : path, optional
        Folder for the report and plots; nothing is written without it.
    models : mapping of survey to model path, or to a sequence of them
        Default: the shipped model of each survey found (`service.score.model.models_dir`). Several
        models of one survey are judged side by side on the alerts every one of them can score.
    label_tables : sequence of path
        Labels CSVs, first one first (they take precedence over survey scores).
    label_from : sequence of str
        Survey scores used as labels where no CSV labels an alert, first present first.
    label_threshold : float
        A survey score at or above it is real.
    split : ``all``, ``train``, ``valid`` or ``test``
        Keep only the alerts of this object split (`training.real.object_split`).
    holdout : (valid, test), optional
        The split's shares; default: those the models were trained with (`held_out`).
    threshold : float, optional
        Our score at or above it is real; default: each model card's threshold.
    synthetic : int
        Also score this many simulated triplets per survey (`synthetic_set`); 0: none.
    write_reference : bool
        Write each model's scores on these alerts into its card as the reference a stream is
        watched against and thresholds are set by (``real_validation``: `validation_reference`),
        replacing the one it has. Meant for ``--split valid`` alerts the model was not trained on.

    Returns
    -------
    dict
        Per survey, the first model's metrics at the top (as with one model) and every model's
        under ``models``, keyed by `model_labels`.
    """
    from service.score.model import Scorer, models_dir

    if synthetic < 0:
        raise EvaluateError(f"--synthetic: {synthetic}; accepted: 0 (none) or a number of stamps")
    files = [f for s in spec for f in real.alert_files(s)]
    alerts, failures = real.read_alerts(files)
    tables = [real.read_label_table(p) for p in label_tables]
    real.assign_labels(alerts, tables, label_from, (label_threshold, label_threshold))
    report: dict = {"files": len(files), "split": split, "holdout": None if holdout is None else list(holdout),
                    "labels": {"tables": [str(p) for p in label_tables], "label_from": list(label_from),
                               "label_threshold": label_threshold},
                    "synthetic": synthetic,
                    "surveys": {}, "undecodable": len(failures),
                    "undecodable_reasons": dict(Counter(_reason_kind(r) for _, r in failures)),
                    "undecodable_examples": failures[:20]}
    plotted = {}
    for survey in sorted({a.survey for a in alerts}):
        group = [a for a in alerts if a.survey == survey]
        given = (models or {}).get(survey) or models_dir() / survey
        paths = [Path(p) for p in ([given] if isinstance(given, (str, Path)) else given)]
        shares = survey_holdout(survey, paths, holdout)
        if split != "all":
            group = [a for a in group if real.object_split(a.survey, a.object_id or str(a.candidate_id),
                                                           shares) == split]
        scorers = [Scorer(p, device=device) for p in paths]
        runs = [ModelRun(label, path, scorer, model_identity(scorer, path),
                         scorer.threshold if threshold is None else threshold)
                for label, path, scorer in zip(model_labels(paths, [s.card for s in scorers]), paths, scorers)]
        common = score_together(group, runs)
        result: dict = {"models": {}}
        drawn = None
        for run in runs:
            result["models"][run.label] = {"model": run.identity, "threshold": run.threshold,
                                           "unscorable": len(run.failures),
                                           "unscorable_examples": run.failures[:20],
                                           **compare(common, run.scores, run.threshold)}
        if synthetic:
            drawn = synthetic_set(runs, survey, synthetic)
            score_synthetic(runs, drawn)
            for run in runs:
                result["models"][run.label]["synthetic"] = metrics(drawn["labels"], run.synthetic_scores,
                                                                   run.threshold, drawn["kinds"])
            result["synthetic"] = {"n": synthetic, "seed": drawn["seed"], "drawn_as": drawn["drawn_as"],
                                   "size": drawn["size"], "survey_scores": None,
                                   "note": "simulated alerts carry no survey score"}
        if write_reference:
            for run in runs:
                result["models"][run.label]["reference_written"] = str(write_card_reference(run, common))
        first = result["models"][runs[0].label]
        unscorable = [f for run in runs for f in run.failures]
        # the first model's numbers at the top, where one-model reports always had them
        report["surveys"][survey] = {
            **{k: v for k, v in first.items() if k != "synthetic"}, "holdout": list(shares),
            "unscorable": len(group) - len(common), "unscorable_examples": unscorable[:20], **result}
        plotted[survey] = (common, runs, drawn)
    if out is not None:
        write_report(report, plotted, Path(out))
    return report


#: Bins of the reference score histogram. A validation split of a few hundred alerts cannot
#: fill more: with 20, two random halves of one population of real ZTF alerts can differ
#: by a PSI near the usual 0.25 "major shift" once a model spreads its scores over the middle
#: bins, so the drift alert would fire on noise. Ten bins is also PSI's convention.
REFERENCE_BINS = 10


def validation_reference(alerts: list[real.RealAlert], scores: np.ndarray, bins: int = REFERENCE_BINS) -> dict:
    """What operating the model needs from the real validation split: its ROC points (to set a
    threshold by error rate) and the distribution of its scores (to watch a stream drift from it)."""
    from training.report import roc_curve

    labels = np.array([-1 if a.label is None else a.label for a in alerts])
    keep = labels >= 0
    out = {"n": len(alerts), "n_labelled": int(keep.sum()),
           "score_histogram": {"edges": np.linspace(0, 1, bins + 1).tolist(),
                               "counts": np.histogram(scores, bins=bins, range=(0, 1))[0].tolist()}}
    if len(set(labels[keep])) == 2:
        fpr, tpr, thresholds = roc_curve(labels[keep], scores[keep])
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                      "thresholds": np.minimum(thresholds, 1.0).tolist()}
    return out


def write_card_reference(run: ModelRun, alerts: Sequence[real.RealAlert]) -> Path:
    """Replace ``real_validation`` in the card of ``run``'s model with its scores on ``alerts``;
    returns the card's path."""
    from service.score.card import CARD_FILE

    if not len(alerts):
        raise EvaluateError(f"--write-reference: no alert scored by {run.label}; a reference needs alerts")
    folder = run.path.parent if run.path.suffix == ".onnx" else run.path
    card = run.scorer.card.extended({"real_validation": validation_reference(list(alerts), run.scores)})
    card.write(folder / CARD_FILE)
    log.info("%s: real_validation written from %d alerts (%d labelled)", folder / CARD_FILE, len(alerts),
             card.real_validation.n_labelled)
    return folder / CARD_FILE


def survey_holdout(survey: str, paths: Sequence[Path], holdout: tuple[float, float] | None) -> tuple[float, float]:
    """The object split's shares for all models of a survey: they must agree, or the split one model
    holds out would hold alerts another was trained on."""
    shares = {held_out(p, holdout) for p in paths}
    if len(shares) > 1:
        raise EvaluateError(f"the models of {survey} were trained with different holdouts "
                            f"{sorted(shares)}: their held-out splits differ; give --holdout VALID TEST")
    return shares.pop()


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
    (out / "report.json").write_text(json_text(report))
    for survey, (alerts, runs, synthetic) in plotted.items():
        labels = np.array([a.label if a.label is not None else -1 for a in alerts])
        plot_roc(alerts, runs, labels, out / f"roc_{survey}.png", survey)
        plot_reliability(runs, labels, out / f"reliability_{survey}.png", survey)
        plot_histogram(runs, labels, out / f"histogram_{survey}.png", survey)
        plot_disagreements(alerts, runs, labels, out / f"disagreements_{survey}.png", survey)
        if synthetic is not None:
            plot_synthetic_roc(runs, synthetic["labels"], out / f"roc_synthetic_{survey}.png", survey)
            np.savez_compressed(out / f"synthetic_scores_{survey}.npz", labels=synthetic["labels"],
                                kinds=synthetic["kinds"], models=np.array([r.label for r in runs]),
                                scores=np.stack([r.synthetic_scores for r in runs]))
    (out / "report.md").write_text(markdown(report))


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metric_row(name: str, m: Mapping | None) -> str:
    if not m:
        return f"| {name} | – | – | – | – | – | – | – | – | – |"
    return (f"| {name} | {m['n']} ({m['n_real']} real) | {_value(m, 'roc_auc')} | {_fmt(m['accuracy'])} | "
            f"{_fmt(m['fpr'])} | {_fmt(m['fnr'])} | {_fmt(m['threshold_at_fpr_1pct'])} | "
            f"{_fmt(m['fpr_at_fnr_5pct'])} | {_value(m, 'ece')} | {_fmt(m['brier'])} |")


METRIC_HEADER = ("| score | alerts | AUC | accuracy | FPR | FNR | threshold at FPR 1% | FPR at FNR 5% | ECE | Brier |\n"
                 "|---|---|---|---|---|---|---|---|---|---|")
#: The side-by-side table's metrics, for real alerts and again for simulated ones.
SIDE_BY_SIDE = ("roc_auc", "accuracy", "fpr", "fnr", "fpr_at_fnr_5pct", "ece")
SIDE_BY_SIDE_NAMES = "AUC | accuracy | FPR | FNR | FPR at FNR 5% | ECE"


def _value(m: Mapping, key: str) -> str:
    """A metric, with its bootstrap interval where the metrics have one (the AUC and the ECE)."""
    interval = m.get(f"{key}_interval")
    return _fmt(m[key]) + (f" ({_fmt(interval[0], 2)}–{_fmt(interval[1], 2)})" if interval else "")


def _cells(m: Mapping | None, unit: str = "") -> list[str]:
    if not m:
        return ["–"] * (1 + len(SIDE_BY_SIDE))
    return [f"{m['n']} ({m['n_real']}{unit})"] + [_value(m, k) for k in SIDE_BY_SIDE]


def model_name(label: str, model: Mapping) -> str:
    """A model as the tables name it: its folder (or report label) and its card's name and version."""
    return f"`{label}` ({model['name']} {model['version']})"


def side_by_side(r: Mapping, with_synthetic: bool) -> list[str]:
    """One table: every model on the same labelled real alerts (and simulated stamps), and each
    survey score beside every model on the alerts that score is judged on."""
    header = f"| score | real alerts (real) | {SIDE_BY_SIDE_NAMES} |"
    rule = "|---" * (2 + len(SIDE_BY_SIDE))
    if with_synthetic:
        header += f" synthetic (real) | {SIDE_BY_SIDE_NAMES} |"
        rule += "|---" * (1 + len(SIDE_BY_SIDE))
    lines = [header, rule + "|"]
    none_on_synthetic = ["no score on simulated alerts"] + ["–"] * len(SIDE_BY_SIDE)

    def row(name: str, real_metrics, synthetic_cells=None) -> str:
        cells = [name, *_cells(real_metrics)]
        if with_synthetic:
            cells += synthetic_cells or ["–"] * (1 + len(SIDE_BY_SIDE))
        return "| " + " | ".join(cells) + " |"

    for label, m in r["models"].items():
        lines.append(row(model_name(label, m["model"]), m["ours"], _cells(m.get("synthetic"))))
    for score in r["survey_scores"]:
        same = all(m["survey_scores"][score]["ours_on_same"] == m["ours"] for m in r["models"].values())
        if not same:  # judged on fewer alerts than all labelled: the models again, on those alone
            for label, m in r["models"].items():
                pair = m["survey_scores"][score]["ours_on_same"]
                lines.append(row(f"`{label}`, the {pair['n']} alerts {score} is judged on", pair))
        theirs = r["survey_scores"][score]["theirs"]
        where = "the same alerts" if same else f"the {theirs['n']} alerts it did not label"
        lines.append(row(f"{score} (survey), {where}", theirs, none_on_synthetic))
    return lines


def markdown(report: dict) -> str:
    lines = ["# rbstream evaluate", "",
             f"{report['files']} file(s), split `{report['split']}`; labels: tables "
             f"{[Path(t).name for t in report['labels']['tables']] or 'none'}, then survey scores "
             f"{report['labels']['label_from'] or 'none'} at >= {report['labels']['label_threshold']:g}.",
             f"Undecodable: {report['undecodable']} {report['undecodable_reasons'] or ''}", "",
             "An AUC or ECE on real alerts is followed by its 95% bootstrap interval (reals and bogus "
             "resampled separately): differences between models inside it are noise of the sample.", ""]
    for survey, r in report["surveys"].items():
        runs = r["models"]
        names = ", ".join(f"{m['model']['name']} {m['model']['version']}" for m in runs.values())
        thresholds = ", ".join(f"`{label}` {m['threshold']:g}" for label, m in runs.items())
        lines += [f"## {survey}: {names}", "",
                  f"{r['n_alerts']} alerts scored by every model ({r['unscorable']} could not be: "
                  + ", ".join(f"`{label}` {m['unscorable']}" for label, m in runs.items())
                  + f"), {r['n_labelled']} labelled ({r['label_sources']}), split holdout {r['holdout']}; "
                  f"our thresholds {thresholds}, the survey's 0.5.", ""]
        synthetic = r.get("synthetic")
        if synthetic:
            lines += [f"Synthetic: {synthetic['n']} simulated triplets ({synthetic['size']} px, seed "
                      f"{synthetic['seed']}, the synthetic test set of `{synthetic['drawn_as']}`'s training "
                      "config), each model given only the images it takes; simulated alerts carry no survey "
                      "score.", ""]
        lines += side_by_side(r, bool(synthetic)) + ["", "### Real alerts, all metrics", "", METRIC_HEADER]
        for label, m in runs.items():
            lines.append(metric_row(f"{model_name(label, m['model'])} (all labelled)", m["ours"]))
        for name, pair in r["survey_scores"].items():
            for label, m in runs.items():
                lines.append(metric_row(f"`{label}` (alerts with {name}, not labelled by it)",
                                        m["survey_scores"][name]["ours_on_same"]))
            lines.append(metric_row(f"{name} (survey)", pair["theirs"]))
        if synthetic:
            lines += ["", "### Synthetic, all metrics", "", METRIC_HEADER.replace("| alerts |", "| stamps |")]
            for label, m in runs.items():
                lines.append(metric_row(model_name(label, m["model"]), m["synthetic"]))
            lines.append("| survey scores | no score on simulated alerts | – | – | – | – | – | – | – | – |")
        for label, m in runs.items():
            for name, bands in m.get("mean_score_by_survey_score", {}).items():
                lines += ["", f"`{label}`'s mean score by {name}: " + ", ".join(
                    f"{band}: {b['mean_ours']:.3f} (n={b['n']})" for band, b in bands.items())]
            if m.get("scored_real_by_family"):
                lines += ["", f"Labelled artifacts `{label}` scored real, by family: " + ", ".join(
                    f"{f} {v['scored_real']}/{v['n']}" for f, v in m["scored_real_by_family"].items())]
        pictures = f"![ROC](roc_{survey}.png) ![reliability](reliability_{survey}.png) "
        if synthetic:
            pictures += f"![ROC, synthetic](roc_synthetic_{survey}.png) "
        lines += ["", pictures + f"![histogram](histogram_{survey}.png)", "",
                  f"![worst](disagreements_{survey}.png)", ""]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, title: str, dpi: int = 90) -> None:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)


def plot_roc(alerts, runs, labels, path: Path, survey: str) -> None:
    """ROC of every model on all labelled alerts, and of each survey score beside every model on
    the alerts that score is judged on (`judged_by`), all on one set of axes."""
    from sklearn.metrics import RocCurveDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    labelled = labels >= 0
    if len(set(labels[labelled])) == 2:
        for run in runs:
            RocCurveDisplay.from_predictions(labels[labelled], run.scores[labelled], ax=ax,
                                             name=f"{run.label} (all labelled)")
        for name in sorted({n for a in alerts for n in a.survey_scores}):
            has = judged_by(alerts, name)
            if len(set(labels[has])) == 2:
                theirs = np.array([a.survey_scores.get(name, np.nan) for a in alerts])
                for run in runs:
                    RocCurveDisplay.from_predictions(labels[has], run.scores[has], ax=ax,
                                                     name=f"{run.label} (with {name})",
                                                     curve_kwargs={"linestyle": ":"})
                RocCurveDisplay.from_predictions(labels[has], theirs[has], ax=ax, name=f"{name} (survey)",
                                                 curve_kwargs={"linestyle": "--"})
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
    _finish(fig, ax, path, f"ROC, {survey}")


def plot_synthetic_roc(runs, labels, path: Path, survey: str) -> None:
    """ROC of every model on the simulated stamps (no survey score exists for them)."""
    from sklearn.metrics import RocCurveDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    if len(set(np.asarray(labels).tolist())) == 2:
        for run in runs:
            RocCurveDisplay.from_predictions(labels, run.synthetic_scores, ax=ax, name=run.label)
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
    _finish(fig, ax, path, f"ROC, simulated {survey} triplets")


def plot_reliability(runs, labels, path: Path, survey: str, bins: int = 10) -> None:
    """Fraction real against mean score per score bin, for every model, with the 95% Wilson
    interval of each bin's fraction; below, how many alerts each bin holds. A few hundred
    labelled alerts leave most bins with a handful: the intervals say which swings are noise."""
    from scipy.stats import binomtest
    from sklearn.calibration import calibration_curve

    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    labelled = labels >= 0
    edges = np.linspace(0, 1, bins + 1)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    if labelled.any():
        for run in runs:
            scores = run.scores[labelled]
            frac, mean = calibration_curve(labels[labelled], scores, n_bins=bins, strategy="uniform")
            # the bins as calibration_curve cuts them, to count the alerts behind each point
            n = np.bincount(np.searchsorted(edges[1:-1], scores), minlength=bins)
            filled = n[n > 0]
            ci = [binomtest(int(round(f * m)), int(m)).proportion_ci(method="wilson") for f, m in zip(frac, filled)]
            error = [frac - [c.low for c in ci], [c.high for c in ci] - frac]
            line = ax.errorbar(mean, frac, yerr=error, fmt="o-", capsize=2, label=run.label)
            counts.stairs(n, edges, color=line[0].get_color(), lw=1.5)
    ax.set(ylabel="fraction real (95% interval)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    counts.set(xlabel="score", ylabel="alerts in bin", yscale="log")
    _finish(fig, ax, path, f"reliability, {survey}")


def plot_histogram(runs, labels, path: Path, survey: str) -> None:
    """Each model's scores per label, one panel per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    edges = np.linspace(0, 1, 26)
    for ax, run in zip(axes[0], runs):
        for value, name in ((1, "real"), (0, "bogus"), (-1, "unlabelled")):
            inside = labels == value
            if inside.any():
                ax.hist(run.scores[inside], bins=edges, histtype="step", lw=2, label=f"{name} ({inside.sum()})")
        ax.axvline(run.threshold, color="k", ls=":", label=f"threshold {run.threshold:g}")
        ax.set(xlabel=f"{run.label} score", ylabel="alerts", title=f"scores by label, {survey}: {run.label}",
               yscale="log")
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


def plot_disagreements(alerts, runs, labels, path: Path, survey: str, n: int = WORST_SHOWN) -> None:
    """The alerts the first model scores furthest from their label, with every model's score."""
    plt = _pyplot()
    scores = runs[0].scores
    labelled = np.flatnonzero(labels >= 0)
    worst = labelled[np.argsort(-np.abs(scores[labelled] - labels[labelled]), kind="stable")][:n]
    rows = max(len(worst), 1)
    # the images, then a column of text wide enough to read: the label, every model's score, the survey's
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.2 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
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
                ax.set_title(name, fontsize=10)
        text = [f"{a.survey} {a.candidate_id}", f"label: {'real' if labels[i] else 'bogus'} ({a.label_source})",
                *(f"{run.label}: {run.scores[i]:.3f}" for run in runs), f"survey: {theirs}"]
        axes[row, 3].axis("off")
        axes[row, 3].text(0.02, 0.5, "\n".join(text), fontsize=9, va="center", ha="left", family="monospace",
                          transform=axes[row, 3].transAxes)
    if not len(worst):
        axes[0, 1].text(0.5, 0.5, "no labelled alert", ha="center")
    fig.suptitle(f"largest disagreements of {runs[0].label} with the label, {survey}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=72)
    plt.close(fig)


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    parser.add_argument("alerts", nargs="+", metavar="ALERTS",
                        help="folders (searched recursively), globs or CSV lists ('file' column) of alert files")
    parser.add_argument("--model", action="append", default=[], metavar="[SURVEY=]PATH",
                        help="model folder, for the survey its card names (or SURVEY=PATH); repeatable, also for "
                             "one survey: its models are judged side by side on the same alerts; default: the "
                             "shipped model of each survey")
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
                        help="with --split: the shares of objects held out (default: the model cards', else "
                             "0.15 0.15)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="our score at or above this is real (default: each model card's threshold)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="also score N simulated triplets per survey, drawn as the first model's synthetic "
                             "test set (its card's training config and seed); default 0: none")
    parser.add_argument("--write-reference", action="store_true",
                        help="write each model's scores on these alerts (score histogram, and ROC points where "
                             "they are labelled) into its model card as real_validation: the reference for "
                             "drift monitoring and for thresholds by error rate; use alerts the model was not "
                             "trained on (e.g. --split valid)")
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="report folder (default evaluation/)")
    parser.add_argument("--device", default="cpu", choices=DEVICES, help="ONNX Runtime device")


def _models(values: Sequence[str]) -> dict[str, list[Path]]:
    """``--model`` values by survey, in the order given."""
    from service.score.model import ModelCard, ModelError, CARD_FILE

    out: dict[str, list[Path]] = {}
    for value in values:
        survey, _, path = value.rpartition("=")
        path = Path(path)
        if not survey:
            folder = path.parent if path.suffix == ".onnx" else path
            try:
                survey = ModelCard.read(folder / CARD_FILE).survey
            except ModelError as exc:
                raise real.LabelError(f"--model {value}: {exc}") from None
        out.setdefault(survey, []).append(path)
    return out


def main(args) -> int:
    import sys

    from service.score.model import ModelError

    if args.labels is None:
        tables = [EYE_LABELS] if EYE_LABELS.exists() else []
    else:
        tables = [Path(p) for p in args.labels if p.lower() != "none"]
    try:
        evaluate(args.alerts, args.out, _models(args.model), tables, args.label_from, args.label_threshold,
                 args.split, args.holdout, threshold=args.threshold, device=args.device, synthetic=args.synthetic,
                 write_reference=args.write_reference)
    except (real.LabelError, EvaluateError, ModelError) as exc:
        print(f"rbstream evaluate: {exc}", file=sys.stderr)
        return 2
    print((args.out / "report.md").read_text())
    print(f"report: {args.out / 'report.json'}")
    return 0
