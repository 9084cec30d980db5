"""The scanning page: ``GET /scan`` and its data routes under ``/scan/api``.

The page (``service/static/scan.html``: plain HTML and JavaScript, no build step, nothing
fetched from elsewhere) holds no data, so it is served without the token; it asks for
the token and sends it with every ``/scan/api`` request, which the API's bearer-token
middleware guards like every other route.

The queue is the alert files of a folder (``--scan-alerts``), decoded and scored once when
first asked for (and again when the folder changes). Labels go to a `LabelStore` in
``--scan-labels-dir``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service.scan_labels import LabelInputError, LabelStore

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent / "static" / "scan.html"
#: Artifact families offered on the page (those of ``training/labels/eye_labels.csv``); keys 1-8.
FAMILIES = ("noise peak", "bright-star residual", "cosmic ray", "hot pixel/column", "banding/readout", "trail",
            "edge", "other")
#: Most alert files in a queue (the first ones, by path).
MAX_QUEUE = 2000


@dataclass
class Candidate:
    survey: str
    id: int
    object_id: str
    file: str
    stamp: np.ndarray
    score: float
    survey_score: float | None
    survey_score_name: str | None


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(..., ge=0, description="Position of the candidate in the queue.")
    label: str = Field(..., description="real, bogus or unsure.")
    labeller: str = Field(..., description="Who labels.")
    family: str = Field("", description="Artifact family (bogus).")
    comment: str = Field("", description="Free text.")


class AlertQueue:
    """The candidates of the alert files under ``folder``, scored by ``scorers``, built on first use."""

    def __init__(self, folder: str | Path | None, scorers: Mapping):
        self.folder = Path(folder) if folder else None
        self.scorers = scorers
        self._candidates: list[Candidate] | None = None
        self._signature = None
        self._lock = threading.Lock()

    def candidates(self) -> list[Candidate]:
        if self.folder is None:
            return []
        files = sorted(p for p in self.folder.rglob("*.avro") if p.is_file())[:MAX_QUEUE]
        signature = tuple((str(p), p.stat().st_mtime_ns) for p in files)
        with self._lock:
            if self._candidates is None or signature != self._signature:
                self._candidates, self._signature = self._build(files), signature
            return self._candidates

    def _build(self, files) -> list[Candidate]:
        from service.alerts import DecodeError, decode_message
        from service.contract import StampError, assemble

        found = []
        for path in files:
            try:
                alerts = decode_message(path.read_bytes())
            except (DecodeError, OSError) as exc:
                log.warning("scan queue: %s skipped: %s", path, exc)
                continue
            for alert in alerts:
                scorer = self.scorers.get(alert.survey)
                if scorer is None:
                    continue
                try:
                    stamp = assemble(alert.images, scorer.contract, alert.centre)
                except StampError as exc:
                    log.warning("scan queue: %s skipped: %s", path, exc)
                    continue
                found.append(Candidate(alert.survey, alert.candidate_id, alert.object_id,
                                       path.relative_to(self.folder).as_posix(), stamp, 0.0, alert.survey_score,
                                       alert.survey_score_name))
        for survey, scorer in self.scorers.items():
            rows = [c for c in found if c.survey == survey]
            if rows:
                for candidate, score in zip(rows, scorer.score(np.stack([c.stamp for c in rows]))):
                    candidate.score = float(score)
        return found


def add_scan_routes(app: FastAPI, explainer, scorers: Mapping, alerts_folder=None, labels_folder="scan-labels") -> None:
    """Register ``GET /scan`` and ``/scan/api/*``."""
    from service.api import ApiError

    queue = AlertQueue(alerts_folder, scorers)
    app.state.scan_queue = queue
    app.state.labels = None  # opened on first use: a server that is never asked to scan creates no folder

    def labels() -> LabelStore:
        if app.state.labels is None:
            app.state.labels = LabelStore(labels_folder)
        return app.state.labels

    async def candidate_at(index: int) -> Candidate:
        candidates = await run_in_threadpool(queue.candidates)
        if not 0 <= index < len(candidates):
            raise ApiError(404, f"no candidate {index} in the queue of {len(candidates)}")
        return candidates[index]

    @app.get("/scan", response_class=HTMLResponse, tags=["scanning"], summary="The scanning page")
    async def scan_page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/scan/api/queue", tags=["scanning"], summary="The candidates to scan and their labels")
    async def scan_queue():
        candidates = await run_in_threadpool(queue.candidates)
        store = await run_in_threadpool(labels)
        every = await run_in_threadpool(store.all)
        by_alert: dict[tuple[str, str], list[dict]] = {}
        for row in every:
            by_alert.setdefault((row["survey"], row["id"]), []).append(
                {k: row[k] for k in ("label", "family", "comment", "labeller", "labelled_at")})
        return {"source": str(queue.folder) if queue.folder else None, "families": list(FAMILIES),
                "items": [{"index": i, "survey": c.survey, "id": str(c.id), "object_id": c.object_id, "file": c.file,
                           "score": c.score, "threshold": scorers[c.survey].threshold,
                           "survey_score": c.survey_score, "survey_score_name": c.survey_score_name,
                           "labels": by_alert.get((c.survey, str(c.id)), [])}
                          for i, c in enumerate(candidates)]}

    @app.get("/scan/api/candidate/{index}", tags=["scanning"], summary="The cutouts of one candidate")
    async def scan_candidate(index: int):
        candidate = await candidate_at(index)
        names = scorers[candidate.survey].contract.raw_inputs
        return {"index": index, "stamp": {name: _pixels(image) for name, image in zip(names, candidate.stamp)}}

    @app.get("/scan/api/occlusion/{index}", tags=["scanning"], summary="The occlusion map of one candidate")
    async def scan_occlusion(index: int):
        candidate = await candidate_at(index)
        (explained,) = await explainer.explain(candidate.survey, candidate.stamp[None], ("occlusion",))
        result = explained["occlusion"]
        return {"index": index, "model": result.model, "model_version": result.model_version,
                "parameters": result.parameters,
                "attributions": {name: m.tolist() for name, m in zip(result.channels, result.attributions)}}

    @app.post("/scan/api/labels", tags=["scanning"], summary="Label one candidate")
    async def scan_label(request: LabelRequest):
        candidate = await candidate_at(request.index)
        store = await run_in_threadpool(labels)
        try:
            every = await run_in_threadpool(store.put, candidate.survey, candidate.id, request.label, request.labeller,
                                            candidate.object_id, candidate.file, request.family, request.comment)
        except LabelInputError as exc:
            raise ApiError(422, str(exc)) from None
        return {"index": request.index, "labels": [{k: r[k] for k in ("label", "family", "comment", "labeller",
                                                                       "labelled_at")} for r in every]}

    @app.get("/scan/api/labels.csv", tags=["scanning"], summary="The labels, as training reads them",
             response_class=Response, responses={200: {"content": {"text/csv": {}}}})
    async def scan_labels_csv(every_labeller: bool = False) -> Response:
        store = await run_in_threadpool(labels)
        text = await run_in_threadpool(store.export_csv, every_labeller)
        return Response(text, media_type="text/csv")


def _pixels(image: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in image]
