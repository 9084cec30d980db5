"""The surveys rbstream knows, and what their alerts call things: the one definition of each.

Training imports these too (`training.real` reads the surveys' scores as weak labels), so
that a survey, its cutout fields and its own real/bogus score are spelled in one place.
"""

from __future__ import annotations

from typing import Literal, Mapping

#: The surveys a model can be made for, in the order they are listed.
SURVEYS: tuple[str, ...] = ("ztf", "rubin")
#: A survey setting: one of `SURVEYS`, or ``auto`` to tell each alert's survey from its fields.
AUTO = "auto"
SURVEY_CHOICES: tuple[str, ...] = (AUTO, *SURVEYS)
#: How the surveys write their own names, for people.
DISPLAY_NAMES: Mapping[str, str] = {"ztf": "ZTF", "rubin": "Rubin"}

#: The same choices, as types for request models and query parameters.
Survey = Literal["ztf", "rubin"]
SurveyChoice = Literal["auto", "ztf", "rubin"]

#: The record of an alert that describes the detection (ZTF ``candidate``, Rubin ``diaSource``).
DETECTION_RECORD: Mapping[str, str] = {"ztf": "candidate", "rubin": "diaSource"}
#: The survey's own real/bogus scores an alert may carry in its detection record, best
#: first: ZTF's braai (``drb``), then its random forest (``rb``); Rubin's ``reliability``.
SURVEY_SCORES: Mapping[str, tuple[str, ...]] = {"ztf": ("drb", "rb"), "rubin": ("reliability",)}
#: Alert field of each raw image (the same names in ZTF and Rubin alerts), in the order ZTF writes them.
CUTOUT_FIELDS: Mapping[str, str] = {
    "science": "cutoutScience",
    "template": "cutoutTemplate",
    "difference": "cutoutDifference",
}
#: The names of the surveys' own scores, as a type for response models.
SurveyScoreName = Literal[tuple(name for names in SURVEY_SCORES.values() for name in names)]


def display_name(survey: str | None) -> str:
    """``ZTF`` for ``ztf``; any other value as it is."""
    return DISPLAY_NAMES.get(survey, str(survey))
