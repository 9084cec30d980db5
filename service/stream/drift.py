"""Score drift of the consumer's stream, per survey, against the model card's reference.

A model card's ``real_validation.score_histogram`` is how the model scored the real
validation split (`training.evaluate.validation_reference`). `DriftMonitor` keeps, for each
survey the consumer scores, a `service.stream.window.RollingWindow` (``--monitor-window``)
of the latest outcomes, and after each delivered batch sets the gauges of
`service.metrics` from it:

``rbstream_score_psi``, ``rbstream_score_ks``
    The window's scores against the reference histogram: the population stability index
    (`population_stability_index`) and the Kolmogorov–Smirnov statistic (`ks_at_edges`).
    The reference is binned, so both are computed over its bins: the window's scores are
    counted in the same bins, and KS is the largest difference of the two CDFs at the bin
    edges (a lower bound of the unbinned statistic). Only scores by the survey's own model
    count (not those of its fallback without a difference image, whose scores the reference
    does not describe).
``rbstream_share_real``
    Share of the window's scored alerts labelled real, by the label of their score record
    (the scorer's threshold decides, fallback scorers included).
``rbstream_share_undecodable``
    Share of the window's messages dead-lettered because they could not be turned into
    model input: failure kinds `UNDECODABLE_KINDS`. Dead letters for other reasons
    (inference, publish) count in the window but not as undecodable.
``rbstream_reference_share_real``
    Share of the reference scored real at the scorer's threshold, set once (what
    ``rbstream_share_real`` is compared with; exact when the threshold is a bin edge, linear
    within a bin otherwise).
``rbstream_monitor_window_alerts``, ``rbstream_monitor_window_scores``
    What the window holds (scored alerts plus dead-lettered messages), and how many of them
    are scores by the survey's model (what PSI and KS are computed over): alert rules judge
    a window only once it is full enough.

Counting: a scored alert is one entry; a dead letter is one entry per message (a message
that could not be decoded may have carried several alerts; nobody can tell). A dead letter
whose survey could not be told (`service.stream.pipeline.UNKNOWN_SURVEY`, e.g. bytes that
are no alert at all) is counted in the window of every survey this consumer scores: it
could have been any of theirs, and a stream of one survey then has it in that survey's
share. Dead letters of a survey without a model here are not counted anywhere.

A survey whose card has no reference (no ``real_validation``): `DriftMonitor` logs it once,
when built, with how to add one (``rbstream evaluate --write-reference``); its share and
window gauges are exported as for any survey, its PSI, KS and reference share gauges are
not (no series, so no alert rule can fire on them). A share or statistic over an empty
window is NaN, which no alert rule's comparison is true for.

Not thread-safe: fed and read from the consumer's scoring thread only. The cost per batch
is a few numpy passes over at most the window's entries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from service import metrics
from service.score.card import REAL
from service.stream.pipeline import UNKNOWN_SURVEY, Outgoing
from service.stream.window import RollingWindow, WindowSize, parse_window

log = logging.getLogger(__name__)

#: Failure kinds (`service.metrics.FAILURE_REASONS`) of a message that could not be decoded
#: into model input: not an alert, an unreadable schema, or cutouts the model cannot take.
UNDECODABLE_KINDS = frozenset({"decode", "schema", "cutout"})

#: Floor of a bin's share in PSI: a bin empty in the window (or the reference) would
#: otherwise make the index infinite. An empty bin then weighs as if it held one alert of
#: the default 1000-alert window; a smaller floor lets the bins a window of a few hundred
#: scores leaves empty by chance dominate the index (the reference's sparse bins hold a few
#: of its ~300 validation alerts).
PSI_EPSILON = 1e-3

#: Columns of a window row.
_SCORE, _REAL, _UNDECODABLE = 0, 1, 2


@dataclass(frozen=True)
class Reference:
    """A binned reference score distribution: ``edges`` (bins + 1, increasing) and each bin's share."""

    edges: np.ndarray
    shares: np.ndarray
    n: int

    @classmethod
    def from_card(cls, card) -> "Reference | None":
        """The card's ``real_validation.score_histogram``, or None when the card has none (or it is empty)."""
        validation = getattr(card, "real_validation", None)
        if validation is None:
            return None
        edges = np.asarray(validation.score_histogram.edges, dtype=np.float64)
        counts = np.asarray(validation.score_histogram.counts, dtype=np.float64)
        if len(edges) != len(counts) + 1 or len(counts) == 0 or counts.sum() <= 0 or np.any(np.diff(edges) <= 0):
            log.warning("model %s %s: real_validation.score_histogram is not a usable histogram "
                        "(%d edges, %d counts, total %g)", card.name, card.version, len(edges), len(counts),
                        counts.sum())
            return None
        return cls(edges, counts / counts.sum(), int(counts.sum()))

    def share_at_or_above(self, threshold: float) -> float:
        """Share of the reference scored ``>= threshold``: exact at a bin edge, linear inside a bin."""
        cdf = np.concatenate([[0.0], np.cumsum(self.shares)])
        return float(1.0 - np.interp(threshold, self.edges, cdf))


def binned_shares(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each bin's share of ``scores``, binned as ``np.histogram`` bins (the last bin closed).

    Scores outside the edges are counted in the first or last bin: the reference covers the
    score's whole range ([0, 1]), so only rounding can put one outside.
    """
    counts = np.histogram(np.clip(scores, edges[0], edges[-1]), bins=edges)[0].astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def population_stability_index(window: np.ndarray, reference: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """PSI of two binned distributions (shares per bin): ``sum((w - r) * ln(w / r))``.

    Each share is floored at ``epsilon`` first (`PSI_EPSILON`), so that a bin empty on one
    side adds a large but finite term. Symmetric, 0 for equal distributions; 0.1 is commonly
    read as a moderate shift and 0.25 as a major one.
    """
    w = np.maximum(np.asarray(window, dtype=np.float64), epsilon)
    r = np.maximum(np.asarray(reference, dtype=np.float64), epsilon)
    return float(np.sum((w - r) * np.log(w / r)))


def ks_at_edges(window: np.ndarray, reference: np.ndarray) -> float:
    """Kolmogorov–Smirnov statistic of two binned distributions: the largest difference of
    their CDFs, evaluated at the bin edges (all a binned reference allows)."""
    return float(np.max(np.abs(np.cumsum(window) - np.cumsum(reference)), initial=0.0))


@dataclass(frozen=True)
class DriftReading:
    """What one survey's window says; NaN where it holds nothing to say it from."""

    alerts: int
    scores: int
    share_real: float
    share_undecodable: float
    psi: float | None = None
    ks: float | None = None


class SurveyDrift:
    """One survey's window and reference.

    Parameters
    ----------
    survey : str
    scorer : service.score.model.Scorer
        The survey's model: its card gives the reference and says which scores are its own.
    size : WindowSize
    clock : callable
        Passed to the window (minutes windows).
    """

    def __init__(self, survey: str, scorer: Any, size: WindowSize, clock=time.monotonic):
        self.survey = survey
        self.model = (scorer.card.name, scorer.card.version)
        self.reference = Reference.from_card(scorer.card)
        self.window = RollingWindow(size, columns=3, clock=clock)

    def row(self, out: Outgoing) -> tuple[float, float, float]:
        """The window row of one delivered message: (score or NaN, real 1/0 or NaN, undecodable 1/0)."""
        if not out.is_score:
            return np.nan, np.nan, float(out.kind in UNDECODABLE_KINDS)
        record = out.record or {}
        own = (record.get("model_name"), record.get("model_version")) == self.model
        score = float(record["score"]) if own and record.get("score") is not None else np.nan
        real = float(record.get("label") == REAL) if record.get("label") is not None else np.nan
        return score, real, 0.0

    def reading(self) -> DriftReading:
        rows = self.window.values()
        scores = rows[:, _SCORE][~np.isnan(rows[:, _SCORE])]
        real = rows[:, _REAL][~np.isnan(rows[:, _REAL])]
        psi = ks = None
        if self.reference is not None:
            if len(scores):
                shares = binned_shares(scores, self.reference.edges)
                psi = population_stability_index(shares, self.reference.shares)
                ks = ks_at_edges(shares, self.reference.shares)
            else:
                psi = ks = float("nan")
        return DriftReading(alerts=len(rows), scores=len(scores),
                            share_real=float(real.mean()) if len(real) else float("nan"),
                            share_undecodable=float(rows[:, _UNDECODABLE].mean()) if len(rows) else float("nan"),
                            psi=psi, ks=ks)


class DriftMonitor:
    """The drift windows of every survey the consumer scores, and the gauges they set.

    Parameters
    ----------
    scorers : mapping of str to service.score.model.Scorer
        The consumer's models, one per survey.
    size : WindowSize or str
        ``--monitor-window``, or its text form (`service.stream.window.parse_window`).
    clock : callable
        Seconds, monotonic (for a window sized in minutes).
    """

    def __init__(self, scorers: Mapping[str, Any], size: WindowSize | str, clock=time.monotonic):
        self.size = size = size if isinstance(size, WindowSize) else parse_window(size)
        self.clock = clock
        self.surveys: dict[str, SurveyDrift] = {}
        for survey, scorer in scorers.items():
            self.use_model(survey, scorer)

    def use_model(self, survey: str, scorer: Any) -> None:
        """Measure ``survey`` against ``scorer``'s reference from now on, in a fresh window
        (a reloaded model: the previous model's scores and statistics say nothing of it)."""
        self.surveys[survey] = drift = SurveyDrift(survey, scorer, self.size, self.clock)
        # The previous model's statistics must not stay exported beside the new one's.
        for gauge in (metrics.SCORE_PSI, metrics.SCORE_KS, metrics.REFERENCE_SHARE_REAL):
            try:
                gauge.remove(survey)
            except KeyError:
                pass
        if drift.reference is None:
            card, folder = scorer.card, _folder(scorer)
            log.warning("score drift of %s is not measured: the card of model %s %s (%s) has no reference "
                        "score distribution (real_validation); rbstream_score_psi and rbstream_score_ks are "
                        "not exported for %s, the share gauges are. Add one with `rbstream evaluate "
                        "ALERTS --model %s=%s --split valid --write-reference` on real alerts the model was "
                        "not trained on", survey, card.name, card.version, folder, survey, survey, folder)
        else:
            metrics.REFERENCE_SHARE_REAL.labels(survey=survey).set(drift.reference.share_at_or_above(scorer.threshold))
            log.info("score drift of %s measured over %s against the reference of %d validation alerts",
                     survey, self.size, drift.reference.n)

    def observe(self, delivered: Sequence[Outgoing]) -> dict[str, DriftReading]:
        """Add one delivered batch to the windows, set the gauges; returns each survey's reading."""
        rows: dict[str, list] = {survey: [] for survey in self.surveys}
        for out in delivered:
            targets = self.surveys if out.survey == UNKNOWN_SURVEY else (
                (out.survey,) if out.survey in self.surveys else ())
            for survey in targets:
                rows[survey].append(self.surveys[survey].row(out))
        readings = {}
        for survey, drift in self.surveys.items():
            drift.window.extend(rows[survey])
            readings[survey] = reading = drift.reading()
            _export(survey, reading)
        return readings


def _export(survey: str, reading: DriftReading) -> None:
    metrics.MONITOR_WINDOW_ALERTS.labels(survey=survey).set(reading.alerts)
    metrics.MONITOR_WINDOW_SCORES.labels(survey=survey).set(reading.scores)
    metrics.SHARE_REAL.labels(survey=survey).set(reading.share_real)
    metrics.SHARE_UNDECODABLE.labels(survey=survey).set(reading.share_undecodable)
    if reading.psi is not None:
        metrics.SCORE_PSI.labels(survey=survey).set(reading.psi)
        metrics.SCORE_KS.labels(survey=survey).set(reading.ks)


def _folder(scorer: Any) -> str:
    path = getattr(scorer, "path", None)
    return str(path.parent) if path is not None else "MODEL_DIR"
