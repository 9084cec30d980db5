"""Load exported real-bogus models and score stamp batches with ONNX Runtime.

A model is a folder (or an ``.onnx`` path inside one) holding

* ``model.onnx`` — input `contract.ONNX_INPUT` float32 ``[batch, raw_inputs, size, size]``
  of raw pixels (NaN allowed), output `contract.ONNX_OUTPUT` float32 ``[batch]``,
  the probability that the detection is real;
* ``model_card.json`` — written by training: ``name``, ``version``, ``survey``,
  ``input`` (a `StampContract` dict), ``threshold`` and metrics.

The default models live in ``models/<survey>/``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from service.contract import ONNX_INPUT, ONNX_OUTPUT, StampContract

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CARD_FILE = "model_card.json"
SURVEYS = ("ztf", "rubin")

#: Where the default models are: ``models/`` at the repository root, or ``RBSTREAM_MODELS_DIR``.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class ModelError(RuntimeError):
    """A model folder that cannot be loaded."""


@dataclass(frozen=True)
class ModelCard:
    """The parts of a model card the service uses; ``raw`` holds all of it."""

    name: str
    version: str
    survey: str
    threshold: float
    contract: StampContract
    raw: Mapping

    @classmethod
    def read(cls, path: Path) -> "ModelCard":
        try:
            raw = json.loads(path.read_text())
            return cls(name=str(raw["name"]), version=str(raw["version"]), survey=str(raw["survey"]),
                       threshold=float(raw["threshold"]), contract=StampContract.from_dict(raw["input"]),
                       raw=raw)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"model card {path}: {exc}") from exc


def resolve_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device`` (auto | cpu | cuda | tensorrt)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        "auto": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    }
    if device not in wanted:
        raise ValueError(f"device: unknown {device!r}; accepted: {', '.join(wanted)}")
    if device in ("cuda", "tensorrt") and wanted[device][0] not in available:
        raise ModelError(f"device {device!r} asked for, but ONNX Runtime offers only {available}")
    return [p for p in wanted[device] if p in available]


class Scorer:
    """One ONNX real-bogus model, ready to score batches.

    Parameters
    ----------
    path : path
        A model folder, or its ``model.onnx``.
    device : str
        ``auto`` (CUDA when present and usable, else CPU), ``cpu``, ``cuda`` or ``tensorrt``.
    """

    def __init__(self, path: str | Path, device: str = "auto", intra_op_threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        onnx_path = folder / MODEL_FILE if path.is_dir() else path
        if not onnx_path.exists():
            raise ModelError(f"no ONNX model at {onnx_path}")
        self.card = ModelCard.read(folder / CARD_FILE)
        self.path = onnx_path
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=resolve_providers(device))
        except Exception as exc:  # ORT raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc
        self.provider = self.session.get_providers()[0]
        log.info("model %s %s (%s) on %s", self.card.name, self.card.version, self.card.survey, self.provider)

    @property
    def contract(self) -> StampContract:
        return self.card.contract

    @property
    def threshold(self) -> float:
        return self.card.threshold

    def score(self, stamps: np.ndarray) -> np.ndarray:
        """Probability of "real" for each stamp of ``stamps`` ``[batch, *contract.input_shape]``."""
        stamps = np.ascontiguousarray(stamps, dtype=np.float32)
        if stamps.ndim != 4 or stamps.shape[1:] != self.contract.input_shape:
            raise ValueError(f"expected stamps of shape [batch, {self.contract.input_shape}], got {stamps.shape}")
        if len(stamps) == 0:
            return np.empty(0, dtype=np.float32)
        return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: stamps})[0].reshape(-1)


def models_dir() -> Path:
    import os

    return Path(os.environ.get("RBSTREAM_MODELS_DIR", DEFAULT_MODELS_DIR))


def load_scorers(models_root: str | Path | None = None, explicit: Mapping[str, str | Path] | None = None,
                 device: str = "auto", surveys: tuple[str, ...] = SURVEYS) -> dict[str, Scorer]:
    """One `Scorer` per survey: ``explicit[survey]`` if given, else ``<models_root>/<survey>/``."""
    root = Path(models_root) if models_root else models_dir()
    explicit = dict(explicit or {})
    scorers = {}
    for survey in surveys:
        path = Path(explicit[survey]) if survey in explicit else root / survey
        if survey not in explicit and not (path / MODEL_FILE).exists():
            continue
        scorers[survey] = Scorer(path, device=device)
    if not scorers:
        raise ModelError(f"no model found for {list(surveys)} under {root}; run `make train`")
    return scorers
