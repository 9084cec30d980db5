"""Decision thresholds by target error rate: the ``threshold`` setting of ``rbstream consume``
and ``rbstream serve``.

A setting is a comma-separated list of entries ``[SURVEY:]RULE``; an entry without a survey
applies to every survey that has no entry of its own. A rule is

* a number in [0, 1]: that threshold;
* ``fpr=X``: the lowest threshold whose false-positive rate on the card's real validation
  split is at most ``X`` (as many real detections kept as that bogus rate allows);
* ``tpr=Y``: the highest threshold whose true-positive rate there is at least ``Y`` (as few
  bogus ones let through as that completeness allows).

Rates are read from the model card's ``real_validation.roc`` (`service.score.card.RocPoints`,
``sklearn.metrics.roc_curve``'s points, which call a score real by ``score >= threshold`` as
`service.score.card.is_real` does). A card without that curve cannot set a threshold by rate:
`resolve_threshold` refuses it with a `ModelError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from service.score.card import ModelCard, ModelError
from service.surveys import SURVEYS

#: The rates a rule can target.
RATES = ("fpr", "tpr")
#: How a scorer's threshold was set when no rule applies to it.
CARD_RULE = "card"


@dataclass(frozen=True)
class ThresholdRule:
    """One rule: a fixed ``value`` (``rate`` None), or a target of ``rate`` (``fpr``/``tpr``)."""

    value: float
    rate: str | None = None

    def __str__(self) -> str:
        return f"{self.value:g}" if self.rate is None else f"{self.rate}={self.value:g}"


@dataclass(frozen=True)
class ThresholdSetting:
    """A parsed ``threshold`` setting: a rule for every survey and rules of single surveys."""

    every_survey: ThresholdRule | None = None
    by_survey: Mapping[str, ThresholdRule] = field(default_factory=dict)

    def rule_for(self, survey: str) -> ThresholdRule | None:
        """The survey's rule; None when the card's own threshold applies."""
        return self.by_survey.get(survey, self.every_survey)

    def __str__(self) -> str:
        entries = ([str(self.every_survey)] if self.every_survey else []) + \
            [f"{survey}:{rule}" for survey, rule in self.by_survey.items()]
        return ",".join(entries) or CARD_RULE


def _unit_number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"{what}: {text!r} is not in [0, 1]")
    return value


def parse_rule(text: str) -> ThresholdRule:
    """One rule: ``0.7``, ``fpr=0.01`` or ``tpr=0.95``.

    Raises
    ------
    ValueError
        For an unknown rate, or a value that is not a number in [0, 1].
    """
    text = text.strip()
    name, sep, target = text.partition("=")
    if not sep:
        return ThresholdRule(_unit_number(text, "threshold"))
    rate = name.strip().lower()
    if rate not in RATES:
        raise ValueError(f"unknown rate {name.strip()!r} in {text!r}; use fpr=X or tpr=Y")
    return ThresholdRule(_unit_number(target.strip(), rate), rate)


def parse_threshold(value: str | float | ThresholdSetting) -> ThresholdSetting:
    """The ``threshold`` setting from the command line, environment or TOML (where it may be a number).

    Examples: ``0.7``, ``fpr=0.01``, ``ztf:fpr=0.01,rubin:0.7``, ``tpr=0.95,rubin:0.6``.

    Raises
    ------
    ValueError
        Naming the bad entry: an unknown survey or rate, a value outside [0, 1], an empty
        entry, or a survey (or every survey) given twice.
    """
    if isinstance(value, ThresholdSetting):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a number or text like fpr=0.01, got {type(value).__name__}")
    if not isinstance(value, str):
        return ThresholdSetting(ThresholdRule(_unit_number(str(value), "threshold")))
    every_survey, by_survey = None, {}
    for entry in value.split(","):
        survey, sep, rule = entry.partition(":")
        if not entry.strip():
            raise ValueError(f"empty entry in {value!r}")
        if not sep:
            if every_survey is not None:
                raise ValueError(f"two thresholds for every survey in {value!r}")
            every_survey = parse_rule(entry)
            continue
        survey = survey.strip().lower()
        if survey not in SURVEYS:
            raise ValueError(f"unknown survey {survey!r} in {entry.strip()!r}; surveys: {', '.join(SURVEYS)}")
        if survey in by_survey:
            raise ValueError(f"two thresholds for {survey} in {value!r}")
        by_survey[survey] = parse_rule(rule)
    return ThresholdSetting(every_survey, by_survey)


def resolve_threshold(card: ModelCard, rule: ThresholdRule | None) -> float:
    """The threshold ``rule`` gives on ``card`` (the card's own one when ``rule`` is None).

    Raises
    ------
    ModelError
        When the rule targets a rate and the card has no real validation ROC, naming the model.
    """
    if rule is None:
        return card.threshold
    if rule.rate is None:
        return rule.value
    roc = card.real_validation.roc if card.real_validation is not None else None
    if roc is None:
        raise ModelError(f"threshold {rule}: model {card.name} {card.version} ({card.survey}) has no real "
                         "validation ROC (real_validation.roc in its card) to set a threshold by rate; "
                         "give a number instead, e.g. "
                         f"{card.survey}:{card.threshold:g}")
    fpr, tpr, thresholds = (np.asarray(v, dtype=np.float64) for v in (roc.fpr, roc.tpr, roc.thresholds))
    if rule.rate == "fpr":
        allowed = thresholds[fpr <= rule.value]
        chosen = allowed.min() if len(allowed) else None
    else:
        allowed = thresholds[tpr >= rule.value]
        chosen = allowed.max() if len(allowed) else None
    if chosen is None:
        raise ModelError(f"threshold {rule}: no threshold of model {card.name} {card.version} ({card.survey}) "
                         f"reaches it on its real validation split")
    # roc_curve's first point may be +inf (nothing called real); a score is a probability.
    return float(min(chosen, 1.0))


def apply_thresholds(scorers: Mapping[str, object], setting: ThresholdSetting | str | float | None) -> dict:
    """``survey -> scorer`` with each scorer's threshold set by the survey's rule of ``setting``.

    Scorers without a rule are returned as they are; the others are copies
    (`service.score.model.Scorer.with_threshold`), so that scorers shared by several users
    keep their threshold.

    Raises
    ------
    ModelError
        As `resolve_threshold`.
    """
    if setting is None:
        return dict(scorers)
    setting = parse_threshold(setting)
    applied = {}
    for survey, scorer in scorers.items():
        rule = setting.rule_for(survey)
        applied[survey] = scorer if rule is None else \
            scorer.with_threshold(resolve_threshold(scorer.card, rule), str(rule))
    return applied


#: The setting's help, shared by ``rbstream consume`` and ``rbstream serve``.
THRESHOLD_HELP = ("decision threshold instead of the model card's: a number in [0,1], fpr=X (lowest threshold whose "
                  "false-positive rate on the card's real validation ROC is <= X) or tpr=Y (highest whose "
                  "true-positive rate there is >= Y); per survey as ztf:fpr=0.01,rubin:0.7 (an entry without "
                  "SURVEY: holds for every survey)")
