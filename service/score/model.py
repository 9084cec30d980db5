"""Load exported real-bogus models and score stamp batches with ONNX Runtime.

A model is a folder (or an ``.onnx`` path inside one) holding

* ``model.onnx`` — input `contract.ONNX_INPUT` float32 ``[batch, raw_inputs, size, size]``
  of raw pixels (NaN allowed), output `contract.ONNX_OUTPUT` float32 ``[batch]``,
  the probability that the detection is real;
* ``model_card.json`` — written by training, read as a `service.score.card.ModelCard`:
  ``name``, ``version``, ``survey``, ``input`` (a `StampContract` dict), ``threshold`` and
  what training measured.

The default models live in ``models/<survey>/``.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from service.contract import ONNX_INPUT, ONNX_OUTPUT, StampContract
from service.surveys import SURVEYS
# The card's definition is service.score.card's; importable from here as before.
from service.score.card import CARD_FILE, ModelCard, ModelError, label_for  # noqa: F401
from service.score.thresholds import CARD_RULE

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"

#: Where the default models are: ``models/`` at the repository root, or ``RBSTREAM_MODELS_DIR``.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


#: ONNX Runtime execution providers of each device setting, in the order they are tried.
DEVICE_PROVIDERS: Mapping[str, tuple[str, ...]] = {
    "auto": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
#: The device settings, for command-line choices.
DEVICES: tuple[str, ...] = tuple(DEVICE_PROVIDERS)


def resolve_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device`` (one of `DEVICES`)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = DEVICE_PROVIDERS
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
    intra_op_threads : int
        ONNX Runtime threads per inference (0: env ``RBSTREAM_ORT_THREADS`` if set, else
        ONNX Runtime's default, one per core).
    precision : str
        ``auto`` or ``fp16``: fp16 on TensorRT when its scores stay within 1e-3 of fp32 on
        ``check_stamps`` (checked at load; fp32 otherwise); ``fp32``: never fp16.
    io_binding : bool, optional
        Run through IO binding with reusable per-thread host buffers (pinned on a GPU).
        Default: on for CUDA/TensorRT, off on CPU (where ``session.run`` is as fast).
    check_stamps : ndarray, optional
        Stamps for the fp16 check; default `service.score.acceleration.check_stamps`.
    ort_log_severity : int, optional
        ONNX Runtime's own log level for this model's session (0 verbose ... 4 fatal); default
        its own (warnings). A shadow model uses 4: its errors are raised to rbstream, which
        logs them once, where ONNX Runtime would print one line per failing batch.

    Environment: ``RBSTREAM_ORT_THREADS=N`` sets the intra-op threads of every scorer (the
    consumer and the API create theirs with the default); ``RBSTREAM_ORT_SPINNING=1`` lets ONNX
    Runtime's threads busy-wait between parallel sections, as ONNX Runtime does by default
    (rbstream does not: the busy threads took the CPU the consumer decodes the next batch on;
    single-stamp calls gain a little with it).
    """

    def __init__(self, path: str | Path, device: str = "auto", intra_op_threads: int = 0, *,
                 precision: str = "auto", io_binding: bool | None = None, check_stamps: np.ndarray | None = None,
                 ort_log_severity: int | None = None):
        import onnxruntime as ort

        from service.score import acceleration

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        onnx_path = folder / MODEL_FILE if path.is_dir() else path
        if not onnx_path.exists():
            raise ModelError(f"no ONNX model at {onnx_path}")
        if precision not in ("auto", "fp32", "fp16"):
            raise ValueError(f"precision: unknown {precision!r}; accepted: auto, fp32, fp16")
        self.card = ModelCard.read(folder / CARD_FILE)
        #: The threshold every label of this scorer is made with, and how it was set: the
        #: card's own one until `with_threshold` (``rbstream consume/serve --threshold``).
        self.threshold: float = self.card.threshold
        self.threshold_rule: str = CARD_RULE
        self.path = onnx_path
        self._options = ort.SessionOptions()
        if ort_log_severity is not None:
            self._options.log_severity_level = ort_log_severity
        # 0: the environment's RBSTREAM_ORT_THREADS if set, else ONNX Runtime's default (one per core).
        intra_op_threads = intra_op_threads or int(os.environ.get("RBSTREAM_ORT_THREADS", "0") or 0)
        if intra_op_threads:
            self._options.intra_op_num_threads = intra_op_threads
        if os.environ.get("RBSTREAM_ORT_SPINNING", "0").strip() in ("", "0"):
            # ORT's pool threads busy-wait between parallel sections; that burns the CPU the
            # consumer decodes the next batch on while this one is scored.
            self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = resolve_providers(device)
        #: fp16 runs only through TensorRT, and only when its scores stay within
        #: `acceleration.FP16_TOLERANCE` of fp32 on `check_stamps` (see `_check_fp16`).
        want_fp16 = precision in ("auto", "fp16") and providers[0] == "TensorrtExecutionProvider"
        if precision == "fp16" and not want_fp16:
            log.warning("fp16 asked for, but it runs only on TensorRT (providers: %s); using fp32", providers)
        self.session = self._session(providers, fp16=want_fp16)
        self.provider = self.session.get_providers()[0]
        self.precision = "fp32"
        #: Largest |fp16 - fp32| score seen by the precision check (None when no check ran).
        self.fp16_max_difference: float | None = None
        if want_fp16:
            self._check_fp16(providers, check_stamps)
        on_gpu = self.provider in acceleration.GPU_PROVIDERS
        #: IO binding with pinned per-thread host buffers; on by default on a GPU. On CPU it gives
        #: the same scores bit for bit and saves little, so the plain ``session.run`` stays the default.
        self.io_binding = on_gpu if io_binding is None else bool(io_binding)
        self._runner = (acceleration.BoundRunner(self.session, self.contract.input_shape, pinned=on_gpu)
                        if self.io_binding else None)
        log.info("model %s %s (%s) on %s, %s, io binding %s", self.card.name, self.card.version,
                 self.card.survey, self.provider, self.precision, "on" if self.io_binding else "off")

    def _session(self, providers: list[str], fp16: bool):
        import onnxruntime as ort

        from service.score import acceleration

        try:
            return ort.InferenceSession(str(self.path), self._options,
                                        providers=acceleration.provider_options(providers, self.contract, fp16))
        except Exception as exc:  # ORT raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc

    def _check_fp16(self, providers: list[str], stamps: np.ndarray | None) -> None:
        """Keep the fp16 session only if its scores match the fp32 CPU session's within tolerance."""
        from service.score import acceleration

        reference = self._session(["CPUExecutionProvider"], fp16=False)
        if stamps is None:
            stamps = acceleration.check_stamps(self.contract)
        difference = acceleration.max_score_difference(self.session, reference, stamps)
        self.fp16_max_difference = difference
        if difference <= acceleration.FP16_TOLERANCE:
            self.precision = "fp16"
            return
        log.warning("fp16 scores differ from fp32 by up to %.3g (> %g) on %d check stamps; using fp32",
                    difference, acceleration.FP16_TOLERANCE, len(stamps))
        self.session = self._session(providers, fp16=False)
        self.provider = self.session.get_providers()[0]

    @property
    def contract(self) -> StampContract:
        return self.card.contract

    def with_threshold(self, threshold: float, rule: str) -> "Scorer":
        """This scorer (sharing its session) deciding by ``threshold``, set by ``rule`` (e.g. ``fpr=0.01``)."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold!r} is not in [0, 1]")
        scorer = copy.copy(self)
        scorer.threshold, scorer.threshold_rule = float(threshold), rule
        return scorer

    def label(self, score: float) -> str:
        """`service.score.card.label_for` the score against this scorer's threshold."""
        return label_for(score, self.threshold)

    def input_buffer(self, rows: int) -> np.ndarray:
        """A ``[rows, *contract.input_shape]`` float32 host buffer to fill in place and pass to `score`.

        With IO binding it is this thread's reusable (pinned, on a GPU) buffer, so `score`
        copies nothing on the host; otherwise a fresh array. Valid until the next call from
        the same thread.
        """
        if self._runner is not None:
            return self._runner.buffer(rows)
        return np.empty((rows, *self.contract.input_shape), dtype=np.float32)

    def score(self, stamps: np.ndarray) -> np.ndarray:
        """Probability of "real" for each stamp of ``stamps`` ``[batch, *contract.input_shape]``."""
        stamps = np.ascontiguousarray(stamps, dtype=np.float32)
        if stamps.ndim != 4 or stamps.shape[1:] != self.contract.input_shape:
            raise ValueError(f"expected stamps of shape [batch, {self.contract.input_shape}], got {stamps.shape}")
        if len(stamps) == 0:
            return np.empty(0, dtype=np.float32)
        if self._runner is not None:
            return self._runner.run(stamps)
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


def load_fallbacks(paths: Mapping[str, str | Path], device: str = "auto") -> dict[str, Scorer]:
    """The fallback model of each survey in ``paths``: one that needs no difference image.

    It scores the alerts whose difference cutout is missing or unusable, which the main
    model refuses (`service.decode.stamps.decode_stamps`'s ``fallbacks``). A model that takes the
    difference, or that was trained for another survey, is refused here rather than at the
    first such alert.
    """
    fallbacks = {}
    for survey, path in paths.items():
        scorer = Scorer(path, device=device)
        if "difference" in scorer.contract.raw_inputs:
            raise ModelError(f"fallback model for {survey} at {path} takes the difference image "
                             f"(inputs {list(scorer.contract.raw_inputs)}); a fallback for alerts without one "
                             "must not, e.g. one trained with [input] channels = [\"template\", \"science\"]")
        if scorer.card.survey != survey:
            raise ModelError(f"fallback model for {survey} at {path} is a {scorer.card.survey} model")
        fallbacks[survey] = scorer
    return fallbacks
