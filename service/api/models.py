"""Request and response bodies of the HTTP API (pydantic), as `/docs` shows them.

A stamp is either a base64 string holding a FITS file (gzip-compressed or not) or a
2-D array of numbers; it is typed ``Any`` here and documented by `STAMP_SCHEMA`,
because turning it into pixels (and explaining what is wrong with it) is the job of
`service.api.stamps`, which can name the candidate and the stamp in its messages.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, WithJsonSchema, field_validator

from service.surveys import Survey, SurveyScoreName

#: Surveys a request may name; each has its own model.

STAMP_SCHEMA: dict = {
    "description": (
        "One cutout, either a base64 string holding a FITS file (gzip-compressed or not; the first "
        "2-D image HDU is used) or a 2-D array of numbers (list of rows, all rows the same length). "
        "Pixels may be null, NaN or ±Infinity where there is no data (they are masked, as the model "
        "masks padding), but a stamp needs at least one finite pixel."
    ),
    "anyOf": [
        {"type": "string", "format": "byte", "title": "base64 FITS"},
        {"type": "array", "title": "2-D array",
         "items": {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "null"}]}}},
    ],
}

#: A stamp as it arrives in JSON; see `STAMP_SCHEMA`.
Stamp = Annotated[Any, WithJsonSchema(STAMP_SCHEMA)]

_EXAMPLE_ROWS = [[0.0, 1.5, 0.0], [2.0, 40.0, 1.0], [0.0, 3.0, 0.5]]


class Candidate(BaseModel):
    """One detection to score: its cutouts and an optional id."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"id": "ZTF18abcdefg-1", "science": _EXAMPLE_ROWS, "template": _EXAMPLE_ROWS,
             "difference": _EXAMPLE_ROWS},
        ]},
    )

    id: str | int | None = Field(
        None, description="Your identifier, echoed in the answer; defaults to the candidate's position (0-based).",
        examples=["ZTF18abcdefg-1"])
    survey: Survey | None = Field(
        None, description="Model to use for this candidate; overrides the request's `survey`.")
    science: Stamp = Field(None, description="Science cutout (the new image).")
    template: Stamp = Field(None, description="Template (reference) cutout.")
    difference: Stamp = Field(None, description="Difference cutout (science minus template).")
    negative_difference: bool = Field(
        False, description=(
            "The difference cutout is template minus science, as ZTF cuts its negative detections "
            "(`candidate.isdiffpos` = 'f'). It is negated before scoring: the model takes science minus "
            "template. Raw alerts need no such flag."))
    centre: tuple[FiniteFloat, FiniteFloat] | None = Field(
        None, description=(
            "Source position (row, column, 0-based pixels) in the cutouts, when it is not their "
            "geometric centre (cutouts truncated at a CCD edge). The cutouts are centre-cropped or "
            "padded to the model's stamp size around it."),
        examples=[[31.0, 31.0]])

    @field_validator("id")
    @classmethod
    def _id_is_unicode(cls, value):
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no UTF-8 answer can echo back.
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
        return value


class ClassifyRequest(BaseModel):
    """Candidates to score. A single candidate object (without `candidates`) is accepted too."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"survey": "ztf", "candidates": [
                {"id": 1, "science": _EXAMPLE_ROWS, "template": _EXAMPLE_ROWS, "difference": _EXAMPLE_ROWS},
            ]},
        ]},
    )

    survey: Survey | None = Field(
        None, description=(
            "Model to use: `ztf` or `rubin`. Default: the server's default survey "
            "(`--default-survey`; `ztf` when a ZTF model is loaded, else the only model loaded)."))
    candidates: list[Candidate] = Field(
        ..., min_length=1, description="One or more candidates (at most the server's `--max-candidates`).")


class ScoreResult(BaseModel):
    """The score of one candidate (or of one alert of a raw alert body)."""

    id: str | int | None = Field(
        ..., description="The candidate's `id` (its position when none was given); for a raw alert, "
                         "ZTF `candid` or Rubin `diaSource.diaSourceId`.")
    object_id: str | None = Field(
        None, description="Raw alerts only: ZTF `objectId` or Rubin `diaObject.diaObjectId`.")
    survey: Survey = Field(..., description="Survey whose model gave the score.")
    # The range is documented, not enforced: an answer is never turned into a 500 by its own check.
    score: float = Field(..., description="Probability that the detection is real.",
                         json_schema_extra={"minimum": 0.0, "maximum": 1.0})
    label: Literal["real", "bogus"] = Field(
        ..., description="`real` when `score` >= `threshold`, else `bogus`.")
    threshold: float = Field(..., description="The decision threshold: the model card's, or the one "
                                              "`--threshold` set (see `GET /model`, `thresholds`).")
    model: str = Field(..., description="Model name (model card `name`).")
    model_version: str = Field(..., description="Model version (model card `version`).")
    survey_score: float | None = Field(
        None, description="Raw alerts only: the survey's own real/bogus score of the alert, to compare with "
                          "ours (ZTF `candidate.drb` when present, else `candidate.rb`; Rubin "
                          "`diaSource.reliability`); null when the alert has none.")
    survey_score_name: SurveyScoreName | None = Field(
        None, description="Which survey score `survey_score` is.")
    model_inputs: list[str] | None = Field(
        None, description="The raw images the model that gave the score took (its model card's "
                          "`input.raw_inputs`): `[\"template\", \"science\", \"difference\"]` for a triplet model, "
                          "`[\"template\", \"science\"]` for the fallback model without the difference image, "
                          "which scores what has no usable difference when one is configured.")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "ZTF18abcdefg-1", "object_id": None, "survey": "ztf", "score": 0.93, "label": "real",
         "threshold": 0.5, "model": "rbcnn-ztf", "model_version": "1.0.0", "survey_score": None,
         "survey_score_name": None, "model_inputs": ["template", "science", "difference"]}]})


class ClassifyResponse(BaseModel):
    """Scores in the order of the request's candidates (or of the alerts in the body)."""

    results: list[ScoreResult]


class ErrorResponse(BaseModel):
    """Why a request was refused. `detail` names the problem, the candidate and the stamp."""

    detail: str = Field(..., description="What is wrong, for people.",
                        examples=["candidate 0 (id 'a'): stamp 'science': rows have different lengths "
                                  "(row 0 has 63 values, row 5 has 62)"])
    candidate: int | None = Field(None, description="Position (0-based) of the offending candidate, if one.")
    stamp: str | None = Field(None, description="Name of the offending stamp, if one.")
    errors: list[dict] | None = Field(
        None, description="Validation errors of the request's structure (pydantic's list), when that is the problem.")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessCheck(BaseModel):
    name: str = Field(..., description="What was checked (`models`, or the name of an extra check).")
    ok: bool
    detail: str = Field("", description="Why it is (not) ready.")


class ReadinessResponse(BaseModel):
    ready: bool = Field(..., description="True when every check passed (HTTP 200); else HTTP 503.")
    checks: list[ReadinessCheck]


class ThresholdInfo(BaseModel):
    threshold: float = Field(..., description="The threshold labels are made with: `real` when score >= it.")
    threshold_rule: str = Field(..., description="How it was set: `card` (the model card's), a number, or a "
                                                 "target rate on the card's real validation ROC (`fpr=0.01`, "
                                                 "`tpr=0.95`), from `--threshold`.")


class ModelsResponse(BaseModel):
    """The model card of each loaded model, by survey, plus the execution provider it runs on."""

    models: dict[str, dict] = Field(..., description="survey -> the whole model card (`model_card.json`).")
    providers: dict[str, str] = Field(..., description="survey -> ONNX Runtime execution provider.")
    inputs: dict[str, list[str]] = Field(
        default_factory=dict, description="survey -> the raw images its model takes, in order.")
    fallbacks: dict[str, dict] = Field(
        default_factory=dict, description="survey -> the model card of its fallback model without the difference "
                                          "image (`--nodiff-model-<survey>`), which scores what has no usable "
                                          "difference; absent surveys refuse such input.")
    fallback_inputs: dict[str, list[str]] = Field(
        default_factory=dict, description="survey -> the raw images its fallback model takes.")
    thresholds: dict[str, ThresholdInfo] = Field(
        default_factory=dict, description="survey -> the decision threshold in service and how it was set.")
    fallback_thresholds: dict[str, ThresholdInfo] = Field(
        default_factory=dict, description="survey -> the same for its fallback model.")
    loaded_at: dict[str, datetime] = Field(
        default_factory=dict, description="survey -> when its model was put in service (UTC): at start-up, or "
                                          "when a new version was loaded (`--reload-interval`, SIGHUP).")
