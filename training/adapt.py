"""The second stage of a default model: judge the adapted model beside the simulation-only one.

Stage 1 trains on simulations (``<survey>.toml``); stage 2 fine-tunes that model on real
alerts (``<survey>-adapt.toml``, `training.data.alerts`) and calibrates it. `side_by_side`
then scores, with the exported ONNX files, on the same held-out data:

* the real test split (the objects training never saw), labelled as evaluation labels
  them: human labels first, then the survey score at 0.5 — with the survey's own score
  beside both models;
* the synthetic test set of stage 1, so that what simulations teach is seen not to be lost.

The result goes into the adapted model's card (``real_test``, ``synthetic_test``) and a
ROC plot (``real_roc.png``). The card also gets ``real_validation``: the adapted model's
ROC points and score distribution on the real validation split, for operators to set a
threshold by error rate and to watch the score distribution of a stream drift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.score.model import MODEL_FILE
from training import real
from training.evaluate import compare, judged_by, score_alerts, validation_reference
from training.report import metrics

#: A survey score at or above this is a real label, when judging (not training) a model.
EVALUATION_THRESHOLD = 0.5
REAL_ROC = "real_roc.png"


def evaluation_alerts(config) -> list[real.RealAlert]:
    """The real alerts of an ``alerts`` config, with evaluation labels (human, then survey scores at 0.5)."""
    d = config.table("data")
    found, _ = real.read_alerts(real.alert_files(d["alerts"]), d["survey_format"])
    tables = [real.read_label_table(d["labels"])] if d["labels"] else []
    real.assign_labels(found, tables, d["label_from"], (EVALUATION_THRESHOLD, EVALUATION_THRESHOLD))
    return found


def real_splits(config) -> dict[str, list[real.RealAlert]]:
    """`evaluation_alerts` by object split (its fold's, in cross-validation)."""
    return real.split_by_config(evaluation_alerts(config), config.table("data"))


def side_by_side(config, stages: dict[str, Path], out: Path) -> dict:
    """Both stages' models on the real test split and the synthetic test set.

    Parameters
    ----------
    config : TrainConfig
        The stage-2 config (its ``[data]`` names the real alerts; its simulator is stage 1's).
    stages : dict of str to path
        Run folders by stage name (``simulation_only``, ``adapted``).
    out : path
        Where the ROC plot goes.
    """
    from training.data import _simulate

    threshold = float(config.table("export")["threshold"])
    splits = real_splits(config)
    test = splits["test"]
    synthetic = _simulate(config, config.contract, config.N_test, seed=config.seed * 10 + 2)
    real_test: dict = {"labels": f"human labels, then {list(config.table('data')['label_from']) or 'none'} "
                                 f">= {EVALUATION_THRESHOLD}", "alerts": len(test)}
    synthetic_test: dict = {"n": len(synthetic)}
    curves = {}
    for name, run in stages.items():
        scores, kept, _, _ = score_alerts(test, Path(run) / MODEL_FILE)
        real_test[name] = compare(kept, scores, threshold)
        curves[name] = (kept, scores)
        synthetic_scores = _onnx_scores(Path(run) / MODEL_FILE, synthetic.stamps)
        synthetic_test[name] = metrics(synthetic.labels, synthetic_scores, threshold, synthetic.kinds)
    plot_stages(curves, out / REAL_ROC, config.survey)
    scores, kept, _, _ = score_alerts(splits["valid"], Path(stages["adapted"]) / MODEL_FILE)
    return {"real_test": real_test, "synthetic_test": synthetic_test,
            "real_validation": validation_reference(kept, scores)}


def _onnx_scores(path: Path, stamps: np.ndarray) -> np.ndarray:
    from service.score.model import Scorer

    return Scorer(path, device="cpu").score(stamps).astype(np.float64)


def plot_stages(curves: dict, path: Path, survey: str) -> None:
    """ROC of each stage's model and of the survey's scores on the real test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5.5, 5))
    survey_drawn = False
    for name, (alerts, scores) in curves.items():
        labels = np.array([-1 if a.label is None else a.label for a in alerts])
        keep = labels >= 0
        if len(set(labels[keep])) < 2:
            continue
        RocCurveDisplay.from_predictions(labels[keep], scores[keep], ax=ax, name=f"rbstream, {name}")
        if not survey_drawn:
            for score in sorted({n for a in alerts for n in a.survey_scores}):
                has = judged_by(alerts, score)
                if len(set(labels[has])) == 2:
                    theirs = np.array([a.survey_scores.get(score, np.nan) for a in alerts])
                    RocCurveDisplay.from_predictions(labels[has], theirs[has], ax=ax, name=f"{score} (survey)",
                                                     curve_kwargs={"linestyle": "--"})
            survey_drawn = True
    ax.set_title(f"real test split, {survey}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
