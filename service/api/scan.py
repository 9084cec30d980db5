"""The scanning page: ``GET /scan`` and its data routes under ``/scan/api``.

The page (``service/api/static/scan.html``: plain HTML and JavaScript, no build step, nothing
fetched from elsewhere) holds no data, so it is served without the token; it asks for
the token and sends it with every ``/scan/api`` request, which the API's bearer-token
middleware guards like every other route.

The queue is the alert files of a folder (``--scan-alerts``; re-read when its files change)
or the last N alerts of a Kafka topic (``--scan-topic``, ``--scan-bootstrap-servers``,
``--scan-recent``; re-read when the page reloads its queue), decoded and scored by the
served models. Labels go to a `LabelStore` in ``--scan-labels-dir``.
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

from service.api.scan_labels import LabelInputError, LabelStore

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent / "static" / "scan.html"
#: Artifact families offered on the page (those of ``training/labels/eye_labels.csv``); keys 1-9.
FAMILIES = ("noise peak", "bright-star residual", "cosmic ray", "hot pixel/column", "banding/readout", "trail",
            "edge", "other", "ghost")
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

    key: str = Field(..., description="The candidate's `key` in the queue (`survey:id`).")
    label: str = Field(..., description="real, bogus or unsure.")
    labeller: str = Field(..., description="Who labels.")
    family: str = Field("", description="Artifact family (bogus).")
    comment: str = Field("", description="Free text.")


def candidate_key(candidate: Candidate) -> str:
    return f"{candidate.survey}:{candidate.id}"


class AlertQueue:
    """The candidates to scan: the alert files under ``folder``, or the last ``recent`` alerts of a Kafka
    topic (the stream the consumer scores), decoded and scored by ``scorers``.

    Candidates are looked up by key (`candidate_key`), never by position, and every candidate
    a page was shown stays known after the queue is rebuilt: a label always lands on the alert
    the labeller saw, however the queue moved meanwhile.
    """

    def __init__(self, folder: str | Path | None, scorers: Mapping, topic: str | None = None,
                 bootstrap_servers: str | None = None, recent: int = 200):
        self.folder = Path(folder) if folder else None
        self.topic, self.bootstrap_servers, self.recent = topic, bootstrap_servers, recent
        self.scorers = scorers
        self._candidates: list[Candidate] | None = None
        self._known: dict[str, Candidate] = {}
        self._signature = None
        self._lock = threading.Lock()

    @property
    def source(self) -> str | None:
        if self.folder is not None:
            return str(self.folder)
        if self.topic:
            return f"the last {self.recent} alerts of topic {self.topic} at {self.bootstrap_servers}"
        return None

    def candidates(self, refresh: bool = False) -> list[Candidate]:
        """The queue; a folder is re-read when its files change, a topic when ``refresh`` (or first asked)."""
        if self.folder is not None:
            files = sorted(p for p in self.folder.rglob("*.avro") if p.is_file())[:MAX_QUEUE]
            signature = tuple((str(p), p.stat().st_mtime_ns) for p in files)
            with self._lock:
                if self._candidates is None or signature != self._signature:
                    self._set(self._build(self._read_files(files)))
                    self._signature = signature
                return self._candidates
        if self.topic:
            with self._lock:
                if self._candidates is None or refresh:
                    from service.api.scan_stream import last_messages

                    messages = last_messages(self.bootstrap_servers, self.topic, self.recent)
                    self._set(self._build([("", value) for value in messages]))
                return self._candidates
        return []

    def get(self, key: str) -> Candidate | None:
        if self._candidates is None:
            self.candidates()
        with self._lock:
            return self._known.get(key)

    def _set(self, candidates: list[Candidate]) -> None:
        self._candidates = candidates
        for candidate in candidates:
            self._known[candidate_key(candidate)] = candidate
        while len(self._known) > 4 * MAX_QUEUE:  # oldest first: dicts keep insertion order
            self._known.pop(next(iter(self._known)))

    def _read_files(self, files) -> list[tuple[str, bytes]]:
        out = []
        for path in files:
            try:
                out.append((path.relative_to(self.folder).as_posix(), path.read_bytes()))
            except OSError as exc:
                log.warning("scan queue: %s skipped: %s", path, exc)
        return out

    def _build(self, messages: list[tuple[str, bytes]]) -> list[Candidate]:
        from service.decode.alerts import DecodeError, decode_message
        from service.contract import StampError, assemble

        found = []
        for name, value in messages:
            try:
                alerts = decode_message(value)
            except DecodeError as exc:
                log.warning("scan queue: %s skipped: %s", name or "a message", exc)
                continue
            for alert in alerts:
                scorer = self.scorers.get(alert.survey)
                if scorer is None:
                    continue
                try:
                    stamp = assemble(alert.images, scorer.contract, alert.centre)
                except StampError as exc:
                    log.warning("scan queue: %s skipped: %s", name or alert.candidate_id, exc)
                    continue
                found.append(Candidate(alert.survey, alert.candidate_id, alert.object_id, name, stamp, 0.0,
                                       alert.survey_score, alert.survey_score_name))
        for survey, scorer in self.scorers.items():
            rows = [c for c in found if c.survey == survey]
            if rows:
                for candidate, score in zip(rows, scorer.score(np.stack([c.stamp for c in rows]))):
                    candidate.score = float(score)
        return found


def add_scan_routes(app: FastAPI, explainer, scorers: Mapping, settings) -> None:
    """Register ``GET /scan`` and ``/scan/api/*`` (queue and labels folder from `service.api.app.ApiSettings`)."""
    from service.api.app import ApiError

    queue = AlertQueue(settings.scan_alerts, scorers, topic=settings.scan_topic,
                       bootstrap_servers=settings.scan_bootstrap_servers, recent=settings.scan_recent)
    app.state.scan_queue = queue
    app.state.labels = None  # opened on first use: a server that is never asked to scan creates no folder

    def labels() -> LabelStore:
        if app.state.labels is None:
            app.state.labels = LabelStore(settings.scan_labels_dir)
        return app.state.labels

    async def candidate_of(key: str) -> Candidate:
        try:
            candidate = await run_in_threadpool(queue.get, key)
        except OSError as exc:  # the stream's broker unreachable
            raise ApiError(503, f"cannot read the scanning queue from {queue.source}: {exc}") from None
        if candidate is None:
            raise ApiError(404, f"no candidate {key!r} in the queue")
        return candidate

    @app.get("/scan", response_class=HTMLResponse, tags=["scanning"], summary="The scanning page")
    async def scan_page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/scan/api/queue", tags=["scanning"], summary="The candidates to scan and their labels")
    async def scan_queue(refresh: bool = False):
        try:
            candidates = await run_in_threadpool(queue.candidates, refresh)
        except OSError as exc:  # the stream's broker unreachable: the page says so
            raise ApiError(503, f"cannot read the scanning queue from {queue.source}: {exc}") from None
        store = await run_in_threadpool(labels)
        every = await run_in_threadpool(store.all)
        by_alert: dict[tuple[str, str], list[dict]] = {}
        for row in every:
            by_alert.setdefault((row["survey"], row["id"]), []).append(
                {k: row[k] for k in ("label", "family", "comment", "labeller", "labelled_at")})
        return {"source": queue.source, "families": list(FAMILIES),
                "items": [{"key": candidate_key(c), "survey": c.survey, "id": str(c.id), "object_id": c.object_id,
                           "file": c.file, "score": c.score, "threshold": scorers[c.survey].threshold,
                           "survey_score": c.survey_score, "survey_score_name": c.survey_score_name,
                           "labels": by_alert.get((c.survey, str(c.id)), [])}
                          for c in candidates]}

    @app.get("/scan/api/candidate/{key}", tags=["scanning"], summary="The cutouts of one candidate")
    async def scan_candidate(key: str):
        candidate = await candidate_of(key)
        names = scorers[candidate.survey].contract.raw_inputs
        return {"key": key, "stamp": {name: _pixels(image) for name, image in zip(names, candidate.stamp)}}

    @app.get("/scan/api/occlusion/{key}", tags=["scanning"], summary="The occlusion map of one candidate")
    async def scan_occlusion(key: str):
        candidate = await candidate_of(key)
        (explained,) = await explainer.explain(candidate.survey, candidate.stamp[None], ("occlusion",))
        result = explained["occlusion"]
        return {"key": key, "model": result.model, "model_version": result.model_version,
                "parameters": result.parameters,
                "attributions": {name: m.tolist() for name, m in zip(result.channels, result.attributions)}}

    @app.post("/scan/api/labels", tags=["scanning"], summary="Label one candidate")
    async def scan_label(request: LabelRequest):
        candidate = await candidate_of(request.key)
        store = await run_in_threadpool(labels)
        try:
            every = await run_in_threadpool(store.put, candidate.survey, candidate.id, request.label, request.labeller,
                                            candidate.object_id, candidate.file, request.family, request.comment)
        except LabelInputError as exc:
            raise ApiError(422, str(exc)) from None
        return {"key": request.key, "labels": [{k: r[k] for k in ("label", "family", "comment", "labeller",
                                                                   "labelled_at")} for r in every]}

    @app.get("/scan/api/labels.csv", tags=["scanning"], summary="The labels, as training reads them",
             response_class=Response, responses={200: {"content": {"text/csv": {}}}})
    async def scan_labels_csv(every_labeller: bool = False) -> Response:
        store = await run_in_threadpool(labels)
        text = await run_in_threadpool(store.export_csv, every_labeller)
        return Response(text, media_type="text/csv")


def _pixels(image: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in image]
