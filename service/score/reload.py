"""Model reload without downtime: watch each survey's model files, load and check a new version
off the hot path, and hand it to the process that serves it (``rbstream consume``, ``rbstream serve``).

What starts a reload
--------------------
Every ``reload_interval`` seconds (``--reload-interval``; 0: never by itself) `ModelReloader`
reads each served model's source, the path it was loaded from (the explicit ``--model`` path or
``<models_dir>/<survey>/``): the card's ``version`` and the ``model.onnx`` file's size and
modification time (`fingerprint`). A change is acted on only once it has stayed the same over
two polls in a row (`ChangeDetector`), so a copy still in progress is not loaded. It polls rather
than using inotify, so it works the same on Kubernetes ConfigMap and volume mounts (which
swap a symbolic link), network file systems and local disks. SIGHUP (`ModelReloader.request`)
checks every survey at once, without waiting for a second poll, and tries again a model that was
refused even if its files did not change.

The safe way to publish a model is to write it into a new folder next to the one in service and
then rename it into place (``mv models/ztf models/ztf.old && mv models/ztf.new models/ztf``), or
to swap a symbolic link (``ln -s ztf-2.1.0 models/ztf.tmp && mv -T models/ztf.tmp models/ztf``).
A folder that is missing for a moment between the two renames is not a change: the model in
service keeps serving.

What is checked before a switch (`load_checked`)
------------------------------------------------
The new model is loaded on the device of the one in service. Its card must be for the same
survey, and its input contract must equal the running one's. A different contract would need
different decoding of the alerts, which would then have to change with the model at the same
batch, so such a model is refused with a message saying so, and switching to it needs a restart.
A test batch (`service.score.acceleration.check_stamps`) must score finite values in [0, 1].
The ``--threshold`` rule is resolved again on the new card (a rate is read from its own ROC),
and a rule that cannot be resolved there refuses the model. A refused model is logged with
the reason and counted in ``rbstream_model_reloads_total{survey,result="refused"}``. The old
model keeps serving, and the same files are not tried again until they change (or SIGHUP).

The switch itself belongs to the owner (the ``switch`` callable): the consumer swaps its
models on its main thread between two batches, and the API swaps them between requests
(`service.api.served`).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from service import metrics
from service.score.card import CARD_FILE, ModelError
from service.score.model import DEVICE_PROVIDERS, MODEL_FILE, Scorer
from service.settings import Option, non_negative_float

log = logging.getLogger(__name__)

#: ``--reload-interval`` of ``rbstream consume`` and ``rbstream serve``.
RELOAD_OPTION = Option(
    "reload_interval", 10.0, "seconds between checks of the model files for a new version (loaded once it has "
    "stayed the same over two checks; 0: only on SIGHUP)", type=non_negative_float, metavar="S")

#: Stamps in the test batch a new model must score before it serves.
CHECK_BATCH = 64

#: The ``device`` setting that gives a scorer the execution provider of one already running:
#: the device whose first provider it is (``auto`` picks, so it names none).
PROVIDER_DEVICES = {providers[0]: device for device, providers in DEVICE_PROVIDERS.items() if device != "auto"}


@dataclass(frozen=True)
class Fingerprint:
    """What tells one version of a model's files from another: the card's version (None when the
    card cannot be read) and the ONNX file's size and modification time."""

    version: str | None
    size: int
    mtime_ns: int

    def __str__(self) -> str:
        return f"version {self.version}, model.onnx {self.size} bytes"


def model_files(path: str | Path) -> tuple[Path, Path]:
    """``(model.onnx, model_card.json)`` of a model source: a folder, or an ONNX file in one
    (as `service.score.model.Scorer` reads them)."""
    path = Path(path)
    if path.is_dir():
        return path / MODEL_FILE, path / CARD_FILE
    return path, path.parent / CARD_FILE


def fingerprint(path: str | Path) -> Fingerprint | None:
    """The `Fingerprint` of the model at ``path``; None while there is no ONNX file there."""
    onnx, card = model_files(path)
    try:
        stat = onnx.stat()
    except OSError:
        return None
    try:
        version = json.loads(card.read_text()).get("version")
        version = None if version is None else str(version)
    except (OSError, ValueError, AttributeError):  # missing, being written, or not a JSON object
        version = None
    return Fingerprint(version, stat.st_size, stat.st_mtime_ns)


class ChangeDetector:
    """When one model source's files should be loaded: they changed and have settled.

    Parameters
    ----------
    serving : Fingerprint or None
        The files of the model in service (None: unknown, so the first settled files are loaded).
    """

    def __init__(self, serving: Fingerprint | None):
        #: The files of the model in service.
        self.serving = serving
        #: The last files loaded or refused: not tried again by a poll while they stay the same.
        self.tried = serving
        self._previous = serving

    def poll(self, current: Fingerprint | None) -> bool:
        """A poll saw ``current``: True when it should be loaded (the same as at the previous
        poll, so not being written, and not tried yet)."""
        settled = current is not None and current == self._previous
        self._previous = current
        return settled and current != self.tried

    def forced(self, current: Fingerprint | None) -> bool:
        """SIGHUP saw ``current``: True when it differs from the model in service (even if refused before)."""
        self._previous = current
        return current is not None and current != self.serving

    def loaded(self, current: Fingerprint) -> None:
        self.serving = self.tried = current

    def refused(self, current: Fingerprint) -> None:
        self.tried = current


def _describe(contract) -> str:
    return (f"channels {list(contract.channels)}, size {contract.size}, normalisation {contract.normalisation}, "
            f"mask_fill {contract.mask_fill:g}")


def load_checked(path: str | Path, running, survey: str, threshold=None, check_batch: int = CHECK_BATCH):
    """The model at ``path``, loaded and checked to take over from ``running`` (see the module docstring).

    Parameters
    ----------
    path : path
        The model folder (or its ONNX file).
    running : service.score.model.Scorer
        The model in service for ``survey``.
    survey : str
    threshold : service.score.thresholds.ThresholdSetting or str, optional
        The ``--threshold`` setting, resolved on the new card.
    check_batch : int
        Stamps of the test batch.

    Returns
    -------
    service.score.model.Scorer

    Raises
    ------
    ModelError
        Why the model is refused.
    """
    from service.score.acceleration import check_stamps
    from service.score.thresholds import apply_thresholds

    scorer = Scorer(path, device=PROVIDER_DEVICES.get(running.provider, "auto"))
    card = scorer.card
    if card.survey != survey:
        raise ModelError(f"it is a {card.survey} model, not a {survey} one")
    if scorer.provider != running.provider:
        raise ModelError(f"it loaded on {scorer.provider}, the model in service runs on {running.provider}")
    if scorer.contract != running.contract:
        raise ModelError(f"its input ({_describe(scorer.contract)}) differs from that of the model in service "
                         f"({_describe(running.contract)}); the alerts would have to be decoded differently, "
                         "so a model of another input needs a restart to serve")
    stamps = check_stamps(scorer.contract, count=check_batch)
    try:
        scores = np.asarray(scorer.score(stamps), dtype=np.float64).reshape(-1)
    except Exception as exc:  # ONNX Runtime raises its own types
        raise ModelError(f"scoring a test batch failed: {type(exc).__name__}: {exc}") from None
    if len(scores) != len(stamps):
        raise ModelError(f"it gave {len(scores)} scores for a test batch of {len(stamps)}")
    bad = ~(np.isfinite(scores) & (scores >= 0.0) & (scores <= 1.0))
    if bad.any():
        raise ModelError(f"{int(bad.sum())} of the {len(scores)} scores of a test batch are not numbers in [0, 1] "
                         f"(e.g. {scores[bad][0]})")
    return apply_thresholds({survey: scorer}, threshold)[survey]


class ModelReloader:
    """Watches the served models' files and hands over checked new versions (see the module docstring).

    Parameters
    ----------
    serving : callable
        ``() -> {survey: Scorer}``, the models in service now; each one's ``path`` is watched.
    switch : callable
        ``switch(survey, scorer)``: puts a checked model in service (called from the watcher's thread).
    interval : float
        Seconds between polls; 0: only on `request`.
    threshold : ThresholdSetting or str, optional
        The ``--threshold`` setting, applied to each new model.
    """

    def __init__(self, serving: Callable[[], Mapping], switch: Callable[[str, object], None],
                 interval: float = 10.0, threshold=None):
        self._serving = serving
        self._switch = switch
        self.interval = float(interval)
        self.threshold = threshold
        current = dict(serving())
        self.sources = {survey: Path(scorer.path) for survey, scorer in current.items()}
        self._detectors = {survey: ChangeDetector(self._initial(survey, scorer)) for survey, scorer in current.items()}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._checking = threading.Lock()
        self._thread: threading.Thread | None = None

    def _initial(self, survey: str, scorer) -> Fingerprint | None:
        current = fingerprint(self.sources[survey])
        # Files whose version is not the one loaded changed since: loaded at the first settled poll.
        return current if current is not None and current.version == scorer.card.version else None

    # -- the thread -----------------------------------------------------------------------------

    def start(self) -> "ModelReloader":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-reload", daemon=True)
            self._thread.start()
            log.info("watching %s for new model versions (%s)",
                     ", ".join(f"{s}: {p}" for s, p in self.sources.items()) or "nothing",
                     f"every {self.interval:g} s, and on SIGHUP" if self.interval > 0 else "on SIGHUP only")
        return self

    def request(self) -> None:
        """Check every survey now (SIGHUP); safe to call from a signal handler or any thread."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after the check in progress (waiting at most ``timeout``: a model being
        loaded, say a TensorRT engine being built, must not hold up the process's stop)."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            woken = self._wake.wait(self.interval if self.interval > 0 else None)
            if self._stopped.is_set():
                return
            self._wake.clear()
            try:
                self.check(forced=woken)
            except Exception:  # the watcher must outlive anything a model folder can do to it
                log.exception("checking the model files failed; trying again at the next check")

    # -- one check ------------------------------------------------------------------------------

    def check(self, forced: bool = False) -> dict[str, str]:
        """Poll every source once (``forced``: as SIGHUP does); returns ``survey -> result`` of those
        tried: ``loaded``, ``refused``, or ``changed`` (the files changed while being loaded)."""
        results = {}
        with self._checking:
            for survey, source in self.sources.items():
                detector = self._detectors[survey]
                current = fingerprint(source)
                if not (detector.forced(current) if forced else detector.poll(current)):
                    if forced:
                        log.info("%s: %s", survey, f"model at {source} unchanged ({current})" if current
                                 else f"no model at {source}; the one in service keeps serving")
                    continue
                results[survey] = self._reload(survey, source, current, detector)
        return results

    def _reload(self, survey: str, source: Path, current: Fingerprint, detector: ChangeDetector) -> str:
        running = self._serving()[survey]
        old = f"{running.card.name} {running.card.version}"
        log.info("%s: new model files at %s (%s): loading and checking them", survey, source, current)
        try:
            scorer = load_checked(source, running, survey, self.threshold)
            error = None
        except Exception as exc:  # anything a broken model raises: refused, never fatal
            scorer, error = None, (str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}")
        if fingerprint(source) != current:
            log.info("%s: the model files at %s changed while being loaded; trying again once they settle",
                     survey, source)
            return "changed"
        if scorer is None:
            detector.refused(current)
            metrics.MODEL_RELOADS.labels(survey=survey, result="refused").inc()
            log.error("%s: new model at %s refused, %s keeps serving: %s", survey, source, old, error)
            return "refused"
        detector.loaded(current)
        self._switch(survey, scorer)
        metrics.MODEL_RELOADS.labels(survey=survey, result="loaded").inc()
        log.info("%s: model %s %s loaded and checked (threshold %.4g, %s), taking over from %s", survey,
                 scorer.card.name, scorer.card.version, scorer.threshold, scorer.threshold_rule, old)
        return "loaded"
