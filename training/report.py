"""Test-set metrics and the learning-history, ROC and DET plots of a run."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np

from service.score.card import is_real

#: The intervals of `roc_auc_interval` and `ece_interval`: their confidence and the bootstrap resamples drawn.
INTERVAL_CONFIDENCE = 0.95
INTERVAL_RESAMPLES = 2000
#: How many resampled scores an interval holds in memory at once (resamples of a large set go in batches).
RESAMPLED_VALUES = 4_000_000
#: The equal-width score bins of the expected calibration error.
ECE_BINS = 10


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold (``score >= t`` is real)."""
    from sklearn.metrics import roc_curve as sklearn_roc_curve

    fpr, tpr, thresholds = sklearn_roc_curve(np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64),
                                             drop_intermediate=False)
    return fpr, tpr, thresholds


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def roc_auc_interval(labels: np.ndarray, scores: np.ndarray, confidence: float = INTERVAL_CONFIDENCE,
                     n_resamples: int = INTERVAL_RESAMPLES, seed: int = 0) -> list[float] | None:
    """A bootstrap confidence interval of the ROC AUC; None with fewer than two of either class.

    The reals and the bogus are resampled separately (the stratified bootstrap, as pROC's
    ``ci.auc`` does), so that every resample holds both classes even when one is a handful,
    and the interval is the percentiles of the resampled AUCs (`scipy.stats.bootstrap`).
    Seeded, so a report is reproducible.

    The AUC of a resample is the Mann-Whitney U of its reals over its bogus per pair, ties
    counted half, as `roc_auc` and ``scipy.stats.mannwhitneyu`` count it. It is computed
    here from the resampled indices and one sort of the bogus scores, because
    ``mannwhitneyu`` ranks every resample afresh: over a second per interval on a few
    hundred alerts, and this runs for every model and survey score of a report.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    real, bogus = scores[labels], np.sort(scores[~labels])
    if min(len(real), len(bogus)) < 2:
        return None
    # for each real: how many of the sorted bogus lie below it, and below or level with it
    below, level_or_below = np.searchsorted(bogus, real, "left"), np.searchsorted(bogus, real, "right")

    def auc(real_index, bogus_index, axis=-1):
        shape = real_index.shape[:-1]
        real_index = real_index.reshape(-1, len(real))
        bogus_index = bogus_index.reshape(-1, len(bogus))
        n = len(bogus_index)
        # each resample's multiplicity of each sorted bogus score, accumulated along the sort
        counts = np.bincount((np.arange(n)[:, None] * len(bogus) + bogus_index).ravel(),
                             minlength=n * len(bogus)).reshape(n, len(bogus))
        cumulative = np.concatenate([np.zeros((n, 1)), counts.cumsum(axis=1)], axis=1)
        lower = np.take_along_axis(cumulative, below[real_index], axis=1)
        level = np.take_along_axis(cumulative, level_or_below[real_index], axis=1) - lower
        return ((lower + 0.5 * level).mean(axis=1) / len(bogus)).reshape(shape)

    return _stratified_interval(len(real), len(bogus), auc, confidence, n_resamples, seed)


def _stratified_interval(n_real: int, n_bogus: int, statistic, confidence: float, n_resamples: int,
                         seed: int) -> list[float]:
    """The percentile interval of ``statistic(real_index, bogus_index)`` over resamples that draw
    the reals and the bogus separately (`scipy.stats.bootstrap`, vectorised, in batches that hold
    at most `RESAMPLED_VALUES` indices)."""
    from scipy.stats import bootstrap

    result = bootstrap((np.arange(n_real), np.arange(n_bogus)), statistic, n_resamples=n_resamples,
                       confidence_level=confidence, method="percentile", vectorized=True,
                       batch=max(1, RESAMPLED_VALUES // (n_real + n_bogus)), rng=np.random.default_rng(seed))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def _score_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    """Each score's equal-width bin of the ECE: 0 to ``bins - 1``, a score of 1 in the last."""
    return np.minimum((scores * bins).astype(int), bins - 1)


def ece_interval(labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS, confidence: float = INTERVAL_CONFIDENCE,
                 n_resamples: int = INTERVAL_RESAMPLES, seed: int = 0) -> list[float] | None:
    """A bootstrap confidence interval of the expected calibration error (`calibration`); None
    with fewer than two of either class.

    Resampled as `roc_auc_interval` resamples (reals and bogus separately, so each resample
    keeps the sample's share of reals, percentile interval, seeded). The ECE of a resample is
    the sum over bins of |sum of (label - score)| over the alerts in the bin, divided by their
    number: the count-weighted mean of |fraction real - mean score| of `calibration`, summed
    with one ``bincount`` for every resample at once, because `calibration` called on one
    resample at a time is far slower, and this runs for every model and survey score of a
    report.

    The ECE is biased upwards on few alerts (a perfectly calibrated model shows some), so an
    interval that clears a target says more than the value does.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    real, bogus = np.flatnonzero(labels), np.flatnonzero(~labels)
    if min(len(real), len(bogus)) < 2:
        return None
    which = _score_bins(scores, bins)
    gap = labels.astype(np.float64) - scores

    def ece(real_index, bogus_index, axis=-1):
        shape = real_index.shape[:-1]
        index = np.concatenate([real[real_index.reshape(-1, len(real))], bogus[bogus_index.reshape(-1, len(bogus))]],
                               axis=1)
        n = len(index)
        per_bin = np.bincount((np.arange(n)[:, None] * bins + which[index]).ravel(), weights=gap[index].ravel(),
                              minlength=n * bins).reshape(n, bins)
        return (np.abs(per_bin).sum(axis=1) / len(scores)).reshape(shape)

    return _stratified_interval(len(real), len(bogus), ece, confidence, n_resamples, seed)


def metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, kinds: np.ndarray | None = None,
            interval: bool = False) -> dict:
    """The model card's test metrics.

    Returns accuracy, ROC AUC, FPR and FNR at ``threshold`` (a detection is called real
    when ``score >= threshold``), the threshold that gives FPR = 1% and the FNR there,
    the counts, and, for simulated data, the accuracy per kind of stamp. With ``interval``,
    also the 95% bootstrap intervals of the AUC and the ECE (`roc_auc_interval`,
    `ece_interval`): for the small labelled sets of real alerts, where they say which
    differences between models, and from a target, are noise.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = is_real(scores, threshold)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    bogus_scores = np.sort(scores[~labels])
    if n_neg:
        # smallest threshold whose FPR is <= 1%: at most floor(1% of bogus) bogus scores are >= it
        allowed = int(np.floor(0.01 * n_neg))
        t1 = float(np.nextafter(bogus_scores[n_neg - allowed - 1], np.inf)) if allowed < n_neg else 0.0
    else:
        t1 = float("nan")
    out = {
        "n": int(len(labels)), "n_real": n_pos, "n_bogus": n_neg,
        "accuracy": float((predicted == labels).mean()),
        "roc_auc": roc_auc(labels, scores),
        "threshold": float(threshold),
        "fpr": fp / n_neg if n_neg else float("nan"),
        "fnr": fn / n_pos if n_pos else float("nan"),
        "threshold_at_fpr_1pct": t1,
        "fnr_at_fpr_1pct": float((scores[labels] < t1).mean()) if n_pos and n_neg else float("nan"),
        "fpr_at_fnr_5pct": _fpr_at_fnr(labels, scores, 0.05),
    }
    if interval:
        out["roc_auc_interval"] = roc_auc_interval(labels, scores)
        out["ece_interval"] = ece_interval(labels, scores)
    out.update(calibration(labels, scores))
    if kinds is not None:
        out["accuracy_by_kind"] = {str(k): float((predicted[kinds == k] == labels[kinds == k]).mean())
                                   for k in sorted(set(np.asarray(kinds).tolist()))}
    return out


def _fpr_at_fnr(labels: np.ndarray, scores: np.ndarray, fnr: float) -> float:
    """The false-positive rate at the highest threshold that keeps at least ``1 - fnr`` of the reals."""
    if labels.all() or not labels.any():
        return float("nan")
    real_scores = np.sort(scores[labels])
    threshold = real_scores[int(np.floor(fnr * len(real_scores)))]
    return float(is_real(scores[~labels], threshold).mean())


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> dict:
    """How far scores are from frequencies: the Brier score (mean squared error of the
    probability) and the expected calibration error (ECE: the count-weighted mean of
    |fraction real - mean score| over ``bins`` equal-width score bins). 0 is perfect for both."""
    labels = np.asarray(labels).astype(np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if len(labels) == 0:
        return {"brier": float("nan"), "ece": float("nan"), "ece_bins": bins}
    which = _score_bins(scores, bins)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(labels[inside].mean() - scores[inside].mean())
    from sklearn.metrics import brier_score_loss

    return {"brier": float(brier_score_loss(labels, scores, pos_label=1)), "ece": float(ece), "ece_bins": bins}


def plot_history(history: list[dict], path: Path) -> None:
    """Train and validation loss and accuracy against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(it, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(it, [h["valid_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="iteration", ylabel="cross-entropy loss", yscale="log", title="loss")
    ax_acc.plot(it, [h["train_accuracy"] for h in history], label="train")
    ax_acc.plot(it, [h["valid_accuracy"] for h in history], label="validation")
    ax_acc.set(xlabel="iteration", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_roc(labels, scores, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {roc_auc(labels, scores):.4f}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC {title}".strip(),
           xscale="log", xlim=(1e-4, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_det(labels, scores, path: Path, threshold: float | None = None, title: str = "") -> None:
    """Detection error trade-off: FNR against FPR on normal-deviate axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    eps = 1e-4
    probit = np.vectorize(lambda p: NormalDist().inv_cdf(min(max(p, eps), 1 - eps)))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(probit(fpr), probit(fnr), label="model")
    if threshold is not None:
        y = np.asarray(labels).astype(bool)
        called_real = is_real(np.asarray(scores), threshold)
        ax.plot(probit(called_real[~y].mean()), probit((~called_real[y]).mean()), "o",
                label=f"threshold {threshold:g}")
    ticks = [1e-3, 1e-2, 0.05, 0.2, 0.5]
    ax.set_xticks(probit(ticks), [f"{t:g}" for t in ticks])
    ax.set_yticks(probit(ticks), [f"{t:g}" for t in ticks])
    limits = (float(probit(5e-4)), float(probit(0.6)))
    ax.set(xlabel="false-positive rate", ylabel="false-negative rate", title=f"DET {title}".strip(),
           xlim=limits, ylim=limits)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
