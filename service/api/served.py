"""The models the API serves, replaced as a whole when a new version is loaded (`service.score.reload`).

`ServedModels` is one consistent set: the scorers, their fallbacks, one request coalescer per
model (`service.api.coalesce`) and the classifier that uses them. `ModelHolder` keeps the set in
service and swaps it atomically. A request takes the current set when it starts (`ModelHolder.using`)
and keeps it to the end, so it is decoded, scored and labelled by one model version even if a
new one arrives meanwhile. A coalescer belongs to one set, so a batch of coalesced requests is
scored by one model. The coalescers of a replaced model are closed once the last request that
holds the old set has finished.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ServedModels:
    """One set of models in service.

    Attributes
    ----------
    scorers, fallbacks : dict of str to service.score.model.Scorer
        survey -> main model, and -> model without the difference image.
    models : dict of str to Scorer
        Model key (a survey, or `service.decode.stamps.fallback_key` of one) -> scorer.
    coalescers : dict of str to service.api.coalesce.RequestCoalescer
        Model key -> the coalescer scoring with that model.
    classifier : object
        The work of ``/classify`` on these models (`service.api.app._Classifier`).
    loaded_at : dict of str to datetime
        survey -> when its main model was put in service (start-up or reload), UTC.
    """

    scorers: dict
    fallbacks: dict
    models: dict
    coalescers: dict
    classifier: Any = None
    loaded_at: dict = field(default_factory=dict)
    users: int = 0
    retired: bool = False


#: ``build(scorers, fallbacks, previous)``: the `ServedModels` of these models; a coalescer of
#: ``previous`` whose model did not change is taken over.
Builder = Callable[[dict, dict, "ServedModels | None"], ServedModels]


class ModelHolder:
    """The `ServedModels` in service, swapped whole (`replace`) while requests keep theirs (`using`)."""

    def __init__(self, build: Builder, scorers: Mapping, fallbacks: Mapping):
        self._build = build
        self._lock = threading.Lock()
        now = datetime.now(timezone.utc)
        self._current = build(dict(scorers), dict(fallbacks), None)
        self._current.loaded_at = {survey: now for survey in self._current.scorers}
        #: Replaced sets that requests still hold.
        self._retiring: list[ServedModels] = []

    @property
    def current(self) -> ServedModels:
        return self._current

    @asynccontextmanager
    async def using(self) -> AsyncIterator[ServedModels]:
        """The set in service now, kept by the caller until it is done with it."""
        with self._lock:
            served = self._current
            served.users += 1
        try:
            yield served
        finally:
            with self._lock:
                served.users -= 1
                done = served.retired and served.users == 0
            if done:
                self._release(served)

    def replace(self, survey: str, scorer) -> ServedModels:
        """Put ``scorer`` in service as ``survey``'s main model (from any thread); returns the new set."""
        with self._lock:
            old = self._current
            new = self._build({**old.scorers, survey: scorer}, dict(old.fallbacks), old)
            new.loaded_at = {**old.loaded_at, survey: datetime.now(timezone.utc)}
            self._current = new
            old.retired = True
            self._retiring.append(old)
            idle = old.users == 0
        if idle:
            self._release(old)
        return new

    def _release(self, old: ServedModels) -> None:
        """``old`` is no longer used: close its coalescers that no set still in use shares."""
        with self._lock:
            if any(s is old for s in self._retiring):
                self._retiring = [s for s in self._retiring if s is not old]
            kept = {id(c) for s in (self._current, *self._retiring) for c in s.coalescers.values()}
            closing = [c for c in old.coalescers.values() if id(c) not in kept]
        for coalescer in closing:
            coalescer.retire()


class LiveModels(Mapping):
    """A read-only mapping survey -> scorer that always shows the models in service now (for the
    parts of the API that look a model up at each use: ``/explain``, the scanning page)."""

    def __init__(self, holder: ModelHolder, attribute: str = "scorers"):
        self._holder, self._attribute = holder, attribute

    def _models(self) -> dict:
        return getattr(self._holder.current, self._attribute)

    def __getitem__(self, survey: str):
        return self._models()[survey]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._models()))

    def __len__(self) -> int:
        return len(self._models())


class CurrentClassifier:
    """The classifier of the models in service at each use (for routes given a classifier once)."""

    def __init__(self, holder: ModelHolder):
        self._holder = holder

    def __getattr__(self, name: str):
        return getattr(self._holder.current.classifier, name)
