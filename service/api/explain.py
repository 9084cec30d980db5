"""``POST /explain``: attribution maps for the bodies ``POST /classify`` takes.

The body is read, size-checked and parsed by `/classify`'s own code (`service.api.app`:
content types, ``--max-body-bytes``, ``--max-candidates``, every 4xx message), so both
routes refuse the same inputs with the same words. Explaining a candidate costs hundreds
to thousands of model evaluations, so it never runs on the event loop nor in the shared
worker threads: `Explainer` runs one explanation at a time in its own thread, on its
own single-threaded ONNX session per survey, and `/classify` keeps the cores it had.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal, Mapping

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service.surveys import SurveyChoice

from service.explain.attributions import (ExplainError, Explanation, GradientOptions, OcclusionOptions, explain_stamps,
                             normalise_methods)

#: Most candidates (or alerts of a raw body) explained per request: each costs ~10^3 model calls.
MAX_EXPLAIN_CANDIDATES = 16


class MethodResult(BaseModel):
    """One method's attributions of one candidate."""

    method: Literal["occlusion", "saliency", "integrated-gradients"]
    attributions: dict[str, list[list[float]]] = Field(
        ..., description="Raw image name -> attribution map (rows of the model-sized stamp; 0 at masked pixels). "
                         "Occlusion and integrated gradients: score units; saliency: score per ADU.")
    parameters: dict = Field(default_factory=dict, description="The method's settings.")
    completeness_error: float | None = Field(
        None, description="Integrated gradients: sum of attributions - (score - baseline score).")
    baseline_score: float | None = Field(None, description="Integrated gradients: the score of the baseline.")


class ExplainResult(BaseModel):
    """The explanations of one candidate (or one alert of a raw body)."""

    id: str | int | None
    object_id: str | None = None
    survey: str
    score: float = Field(..., description="Our score of the stamp explained.")
    survey_score: float | None = None
    survey_score_name: str | None = None
    model: str
    model_version: str
    stamp: dict[str, list[list[float | None]]] = Field(
        ..., description="The model input explained: raw image name -> pixels (null where masked).")
    methods: list[MethodResult]


class ExplainResponse(BaseModel):
    results: list[ExplainResult]


class Explainer:
    """Runs explanations one at a time in a dedicated thread, on single-threaded ONNX sessions.

    Parameters
    ----------
    scorers : mapping survey -> Scorer
        The served models; each gets a second session of its own file for explanations.
    device : str
        Device of those sessions (as ``--device``).
    """

    def __init__(self, scorers: Mapping, device: str = "auto"):
        self.scorers = scorers
        self.device = device
        self._sessions: dict = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explain")

    def session(self, survey: str):
        """The explanation session of ``survey``'s model in service (made on first use, in the worker
        thread, and again when a new version of the model is put in service)."""
        served = self.scorers[survey]
        made = self._sessions.get(survey)
        if made is None or made[0] is not served:
            from service.score.model import Scorer

            self._sessions[survey] = (served, Scorer(served.path, device=self.device, intra_op_threads=1))
        return self._sessions[survey][1]

    def explain_now(self, survey: str, stamps: np.ndarray, methods, occlusion_options, gradient_options):
        return explain_stamps(self.session(survey), stamps, methods, occlusion_options, gradient_options)

    async def explain(self, survey: str, stamps: np.ndarray, methods, occlusion_options=OcclusionOptions(),
                      gradient_options: GradientOptions | None = None) -> list[dict[str, Explanation]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.explain_now, survey, stamps, methods,
                                          occlusion_options, gradient_options)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def add_explain_route(app: FastAPI, classifier, explainer: Explainer, settings, error_responses: dict) -> None:
    """Register ``POST /explain`` on ``app``, parsing bodies with ``classifier`` (`service.api.app._Classifier`)."""
    from service.api.app import _CLASSIFY_BODY, ApiError, _read_body, body_is_raw

    @app.post(
        "/explain", response_model=ExplainResponse, tags=["scoring"],
        summary="Why a score: occlusion, saliency or integrated-gradients maps of candidates or raw alerts",
        responses={200: {"description": "One result per candidate, in order; `Accept: image/png` for a picture "
                                        "(one candidate only).",
                         "content": {"image/png": {}}},
                   406: {"description": "A PNG asked for and this server cannot draw (no matplotlib)."},
                   **error_responses},
        openapi_extra={"requestBody": _CLASSIFY_BODY},
    )
    async def explain(
        request: Request,
        survey: Annotated[SurveyChoice, Query(
            description="Raw alert bodies only: the survey of the alert (`auto` tells from the bytes).")] = "auto",
        method: Annotated[Literal["occlusion", "saliency", "integrated-gradients", "all"], Query(
            description="Attribution method; saliency and integrated gradients need the model's torch "
                        "weights and torch on the server.")] = "occlusion",
        window: Annotated[int, Query(ge=1, le=64, description="Occlusion: side of the patch, pixels.")] = 5,
        stride: Annotated[int, Query(ge=1, le=64, description="Occlusion: step of the patch, pixels.")] = 2,
        occlusion_baseline: Annotated[Literal["median", "zero", "masked"], Query(
            description="Occlusion: what the patch is replaced by.")] = "median",
        baseline: Annotated[Literal["noise", "blur", "zero"], Query(
            description="Integrated gradients: the baseline stamp.")] = "noise",
        steps: Annotated[int, Query(ge=2, le=1024, description="Integrated gradients: gradient evaluations "
                                                                "per candidate.")] = 512,
    ):
        """Attribution maps of each candidate's raw pixels: the same bodies as `POST /classify`
        (JSON stamps, or the bytes of an alert), the same limits and errors."""
        is_raw = body_is_raw(request)
        wants_png = "image/png" in request.headers.get("accept", "").lower()
        body = await _read_body(request, settings.max_body_bytes)
        rows = await prepare_rows(classifier, body, is_raw, survey)
        if len(rows) > MAX_EXPLAIN_CANDIDATES:
            raise ApiError(413, f"too many candidates to explain: {len(rows)}; at most {MAX_EXPLAIN_CANDIDATES} per "
                                "request")
        if wants_png and len(rows) != 1:
            raise ApiError(422, f"a PNG shows one candidate, and the body holds {len(rows)}; send one, or ask for JSON")
        try:
            methods = normalise_methods(method)
            occlusion_options = OcclusionOptions(window, stride, occlusion_baseline)
            gradient_options = GradientOptions(baseline, steps)
            for survey_name in {row["survey"] for row in rows}:
                size = explainer.scorers[survey_name].contract.size
                if "occlusion" in methods and window > size:
                    raise ExplainError(f"occlusion window {window} is larger than the {size}-pixel stamp of the "
                                       f"{survey_name} model")
            results = []
            for row in rows:
                (explained,) = await explainer.explain(row["survey"], row["stamp"][None], methods, occlusion_options,
                                                       gradient_options)
                results.append((row, explained))
        except ExplainError as exc:
            raise ApiError(422, str(exc)) from None
        if wants_png:
            from service.explain.render import RenderError, render_png

            row, explained = results[0]
            meta = {**{k: v for k, v in row.items() if k != "stamp"}, "score": next(iter(explained.values())).score}
            try:
                picture = await asyncio.get_running_loop().run_in_executor(
                    explainer._executor, render_png, row["stamp"], explained, meta)
            except RenderError as exc:
                raise ApiError(406, str(exc)) from None
            return Response(picture, media_type="image/png")
        return ExplainResponse(results=[to_result(row, explained) for row, explained in results])


async def prepare_rows(classifier, body: bytes, is_raw: bool, survey: str) -> list[dict]:
    """Model-ready stamps of a `/classify` body with their ids: `/classify`'s parsing and errors, off the loop."""
    from fastapi.concurrency import run_in_threadpool

    from service.api.app import ApiError

    if is_raw and not body:
        raise ApiError(400, "empty body; send the bytes of one alert message")
    async with classifier._decoding:
        if not is_raw:
            prepared = await run_in_threadpool(classifier.stamps_of_json, body)
            return [{"survey": s, "stamp": stamp, "id": ident} for s, stamp, ident in prepared]
        batches = await run_in_threadpool(classifier.stamps_of_alert, body, survey)
    return [{"survey": batch.survey, "stamp": stamp, "id": alert.candidate_id, "object_id": alert.object_id,
             "survey_score": alert.survey_score, "survey_score_name": alert.survey_score_name}
            for batch in batches for alert, stamp in zip(batch.alerts, batch.stamps)]


def _pixels(image: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in image]


def to_result(row: dict, explained: dict[str, Explanation]) -> ExplainResult:
    first = next(iter(explained.values()))
    return ExplainResult(
        id=row["id"], object_id=row.get("object_id"), survey=row["survey"], score=first.score,
        survey_score=row.get("survey_score"), survey_score_name=row.get("survey_score_name"), model=first.model,
        model_version=first.model_version,
        stamp={name: _pixels(image) for name, image in zip(first.channels, row["stamp"])},
        methods=[MethodResult(method=e.method, attributions={n: m.tolist() for n, m in zip(e.channels, e.attributions)},
                              parameters=e.parameters, completeness_error=e.completeness_error,
                              baseline_score=e.baseline_score) for e in explained.values()])
