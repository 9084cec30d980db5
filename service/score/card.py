"""The model card (``model_card.json``): one typed definition for the training that writes it
and the service that reads it.

Training (`training.export.model_card`, then `training.adapt.side_by_side` for a default
model) builds a `ModelCard` and writes it with `ModelCard.write`; the service, ``rbstream
evaluate`` and the benchmarks read it with `ModelCard.read`. Only the identity (``name``,
``version``, ``survey``), the decision ``threshold`` and the stamp contract (``input``, a
`service.contract.StampContract`) are required: they are all the service needs to score, and
all a hand-made test model carries. Every other section is what training measured, typed here
so that a reader gets a clear `ModelError` on a card that lacks or mistypes a field, not a
``KeyError`` deep in a report.

A card keeps the keys it was read with, in the order of this module's fields, so a card read
and written again is the same file byte for byte (values that are JSON already stay as they
are: training writes the card through `to_jsonable` first).

The decision rule (`is_real`, `label_for`) lives here too: the threshold it applies is the
card's, and the score it judges is the card's ``output``; the stamp contract
(`service.contract`) says what goes into the model, not how its output is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator

from service.contract import ONNX_INPUT, ONNX_OUTPUT, StampContract

CARD_FILE = "model_card.json"

#: The labels a score gets against its model's threshold (`label_for`).
REAL, BOGUS = "real", "bogus"


class ModelError(RuntimeError):
    """A model folder (or its card) that cannot be loaded."""


def is_real(score, threshold: float):
    """Whether a detection is called real: ``score >= threshold`` (elementwise on arrays).

    The one decision rule of rbstream: the stream's records, ``POST /classify``, the test
    metrics training writes into the card and the plots all call a score real by it.
    """
    return np.greater_equal(score, threshold) if isinstance(score, np.ndarray) else score >= threshold


def label_for(score: float, threshold: float) -> str:
    """`REAL` when the score is real by `is_real`, else `BOGUS`."""
    return REAL if is_real(score, threshold) else BOGUS


def to_jsonable(value: Any) -> Any:
    """``value`` as JSON holds it: numpy scalars and arrays, tuples and paths become what
    ``json.dumps`` writes for them, and a number that is not finite (a metric undefined on
    one class, such as an AUC) becomes null, which JSON has and NaN is not; so a card built in
    memory equals the card read back, and every JSON parser reads it."""
    return _finite_or_null(json.loads(json.dumps(value, default=_json_default)))


def json_text(value: Any) -> str:
    """``value`` as indented JSON text, by `to_jsonable`: never NaN, which JSON readers refuse."""
    return json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n"


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


class _Section(BaseModel):
    """A part of the card: every key named, types checked (no str -> number coercion)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class Output(_Section):
    """What the ONNX graph returns."""

    name: str
    meaning: str
    shape: list[str]


class Architecture(_Section):
    """``training.model.ArchConfig`` plus how the rotated views are pooled."""

    conv_channels: list[int]
    kernel_sizes: list[int]
    pool_after: list[int]
    fc_units: list[int]
    activation_function: str
    dropout: float
    dihedral: bool
    rotation_pooling: str


class DataInfo(_Section):
    """The training data (`training.data.load_datasets`): its source, the source's settings
    (those of ``simulator``, ``chunks``, or of ``alerts``/``braai``), and the split sizes."""

    source: str
    # data.source = simulator
    simulator: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    seed: int | None = None
    # data.source = chunks
    path_to_chunks: str | None = None
    data_interface: str | None = None
    # data.source = alerts or braai
    alerts: str | None = None
    labels: str | None = None
    triplets: str | None = None
    # data.source = alerts
    label_from: list[str] | None = None
    weak_label_bands: list[float] | None = None
    weak_targets: Literal["hard", "soft"] | None = None
    split: str | None = None
    holdout: list[float] | None = Field(None, min_length=2, max_length=2)
    #: [k, n]: validated on fold k of n (cross-validation); [] or absent: on the holdout share.
    fold: list[int] | None = None
    rehearsal: int | None = None
    rehearsal_valid: int | None = None
    balance: bool | None = None
    real_repeat: int | None = None
    kinds: dict[str, dict[str, int]] | None = None
    # every source
    size: dict[str, int]
    real_fraction: dict[str, float]


class ValidationPoint(_Section):
    """One validation of the training history."""

    iteration: int
    epoch: float
    train_loss: float
    train_accuracy: float
    valid_loss: float
    valid_accuracy: float
    lr: float


class TrainingRun(_Section):
    """How the run went (`training.train.train`)."""

    iterations: int
    epochs: float
    best_iteration: int
    best_valid_loss: float
    stopped_early: bool
    max_iterations: int
    parameters: int
    frozen_layers: int
    finetuned_from: str | None
    seconds: float
    threads: int
    device: str
    torch: str
    final_valid: ValidationPoint | None


class Metrics(_Section):
    """Scores judged against labels (`training.report.metrics`)."""

    n: int
    n_real: int
    n_bogus: int
    accuracy: float
    #: None where the labels hold one class only (AUC and the rates need both).
    roc_auc: float | None
    threshold: float
    fpr: float | None
    fnr: float | None
    threshold_at_fpr_1pct: float | None
    fnr_at_fpr_1pct: float | None
    #: Absent from cards written before it was measured; None as the rates above.
    fpr_at_fnr_5pct: float | None = None
    #: The AUC's 95% bootstrap interval, [low, high] (`training.report.roc_auc_interval`): given
    #: on real alerts only, where labelled sets are small; None as the AUC.
    roc_auc_interval: list[float] | None = None
    brier: float
    ece: float
    ece_bins: int
    #: The ECE's 95% bootstrap interval (`training.report.ece_interval`), where the AUC has one.
    ece_interval: list[float] | None = None
    #: Only for data whose samples have kinds (simulated artefacts, label sources).
    accuracy_by_kind: dict[str, float] | None = None


class Verification(_Section):
    """The export's check of the ONNX file against PyTorch (`training.export.verify`)."""

    parity_max_abs_diff: float
    rotation_max_abs_diff: float
    verification_batch: int
    size_mb: float
    opset: int


class Inference(_Section):
    """The ONNX Runtime CPU cost measured at export (`training.export.measure_inference`)."""

    ms_per_stamp: float
    ms_per_stamp_min: float
    ms_per_stamp_max: float
    batch: int
    threads: int
    runtime: str
    cpus: int | None
    load_average_1m: float


class Calibration(_Section):
    """The temperature the exported graph divides its logits by (`training.calibrate.calibrate`)."""

    method: Literal["temperature"]
    temperature: float = Field(gt=0)
    fitted_on: str
    n: int
    n_real: int
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float


class SurveyComparison(_Section):
    """A survey's own score and ours, on the alerts it can be judged on."""

    theirs: Metrics
    ours_on_same: Metrics


class ScoreBand(_Section):
    n: int
    mean_ours: float


class FamilyCount(_Section):
    n: int
    scored_real: int


class Comparison(_Section):
    """One model on labelled real alerts, beside the survey scores (`training.evaluate.compare`)."""

    n_alerts: int
    n_labelled: int
    label_sources: dict[str, int]
    ours: Metrics | None
    survey_scores: dict[str, SurveyComparison]
    mean_score_by_survey_score: dict[str, dict[str, ScoreBand]] | None = None
    scored_real_by_family: dict[str, FamilyCount] | None = None


class RealTest(_Section):
    """Both stages of a default model on the real test split (`training.adapt.side_by_side`)."""

    labels: str
    alerts: int
    simulation_only: Comparison | None = None
    adapted: Comparison | None = None


class SyntheticTest(_Section):
    """Both stages of a default model on stage 1's synthetic test set."""

    n: int
    simulation_only: Metrics | None = None
    adapted: Metrics | None = None


class Histogram(_Section):
    edges: list[float]
    counts: list[int]


class RocPoints(_Section):
    fpr: list[float]
    tpr: list[float]
    thresholds: list[float]


class RealValidation(_Section):
    """The adapted model on the real validation split: for setting a threshold by error rate
    and for watching a stream's scores drift (`training.evaluate.validation_reference`)."""

    n: int
    n_labelled: int
    score_histogram: Histogram
    #: Only when the split holds both classes.
    roc: RocPoints | None = None


class ModelCard(_Section):
    """A model card; see the module docstring.

    ``contract`` is the card's ``input``. Sections a card does not carry are None (and stay
    absent when it is written again); a section written as ``null`` stays ``null``.
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", arbitrary_types_allowed=True,
                              populate_by_name=True)

    name: str
    version: str
    survey: str
    created: str | None = None
    git_commit: str | None = None
    threshold: float = Field(ge=0, le=1)
    contract: StampContract = Field(alias="input")
    output: Output | None = None
    architecture: Architecture | None = None
    data: DataInfo | None = None
    training: TrainingRun | None = None
    test_metrics: Metrics | None = None
    verification: Verification | None = None
    inference: Inference | None = None
    calibration: Calibration | None = None
    #: The full training configuration, TOML-shaped; its schema is ``training.config``'s.
    config: dict[str, Any] | None = None
    real_test: RealTest | None = None
    synthetic_test: SyntheticTest | None = None
    real_validation: RealValidation | None = None

    @field_validator("contract", mode="before")
    @classmethod
    def _contract(cls, value):
        if isinstance(value, StampContract):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"a stamp contract (mapping) is required, got {type(value).__name__}")
        try:
            contract = StampContract.from_dict(value)
        except KeyError as exc:
            raise ValueError(f"missing {exc}") from None
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        # What the card states beyond the channels must be what they give, or the card lies.
        stated = {"raw_inputs": list(contract.raw_inputs), "onnx_input": ONNX_INPUT, "onnx_output": ONNX_OUTPUT}
        for key, expected in stated.items():
            if key in value and value[key] != expected:
                raise ValueError(f"{key} is {value[key]!r}, but the contract gives {expected!r}")
        return contract

    @field_serializer("contract")
    def _contract_dict(self, contract: StampContract) -> dict:
        return contract.to_dict()

    @classmethod
    def from_dict(cls, card: Mapping, source: str = "model card") -> "ModelCard":
        """Validate a card's dict (as JSON holds it, or as training built it).

        Raises
        ------
        ModelError
            Naming every missing, unknown or ill-typed field, by its path in the card.
        """
        if not isinstance(card, Mapping):
            raise ModelError(f"{source}: a JSON object is required, got {type(card).__name__}")
        try:
            return cls.model_validate(to_jsonable(dict(card)))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in error['loc']) or '(card)'}: {error['msg']}"
                                 for error in exc.errors())
            raise ModelError(f"{source}: {problems}") from None
        except TypeError as exc:  # a value JSON cannot hold
            raise ModelError(f"{source}: {exc}") from None

    @classmethod
    def read(cls, path: str | Path) -> "ModelCard":
        """The card in ``path`` (a ``model_card.json``); `ModelError` when unreadable or invalid."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ModelError(f"model card {path}: {exc.strerror or exc}") from None
        try:
            card = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"model card {path}: not JSON ({exc})") from None
        return cls.from_dict(card, f"model card {path}")

    def to_dict(self) -> dict:
        """The card as JSON holds it: the keys it was made with, in this class's order."""
        return self.model_dump(by_alias=True, exclude_unset=True)

    def to_json(self) -> str:
        return json_text(self.to_dict())

    def write(self, path: str | Path) -> Path:
        """Write the card to ``path`` (a file, or a folder to write `CARD_FILE` in)."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        path.write_text(self.to_json())
        return path

    def extended(self, sections: Mapping) -> "ModelCard":
        """This card with ``sections`` added or replaced (validated like a card read)."""
        return type(self).from_dict({**self.to_dict(), **sections}, f"model card {self.name}")

    @property
    def holdout(self) -> tuple[float, float] | None:
        """The shares of objects held out for validation and test, when trained on real alerts by object."""
        return None if self.data is None or self.data.holdout is None else tuple(self.data.holdout)
