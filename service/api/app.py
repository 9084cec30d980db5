"""The HTTP API: ``rbstream serve``.

Routes
------
``POST /classify``
    Score candidates given as JSON (stamps as base64 FITS or 2-D arrays) or raw alert
    bodies (``application/avro`` / ``application/octet-stream``: a ZTF object container,
    a Rubin Confluent-wire-format message or container). Bad input is answered with
    400/413/415/422 and a message that names the candidate and the stamp.
``POST /explain``
    Attribution maps (occlusion, saliency, integrated gradients) for the same bodies
    (`service.api.explain`).
``GET /scan``
    The scanning page: a queue of alerts to label (`service.api.scan`).
``GET /healthz``, ``GET /readyz``, ``GET /model``, ``GET /metrics``, and ``/docs``.

Stamps of concurrent requests are scored together (`service.api.coalesce`), off the
event loop. `create_app` builds the app around already loaded scorers, so the
consumer (``rbstream run``) can serve it in-process and add its own readiness checks.
`watch_models` (``rbstream serve``) puts new model versions in service without a restart:
each request is answered by the models in service when it started (`service.api.served`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from service import metrics
from service.api.models import (Candidate, ClassifyRequest, ClassifyResponse, ErrorResponse, HealthResponse,
                                ModelsResponse, ReadinessCheck, ReadinessResponse, ScoreResult,
                                ThresholdInfo)
from service.api.stamps import MaskedStampError, StampInputError, stamp_to_array
from service.api.auth import BearerAuthMiddleware, TokenAuth
from service.decode.stamps import fallback_key
from service.contract import RAW_IMAGES, StampError, assemble
from service.api.server import KEEP_ALIVE_S
from service.limits import DEFAULT_LIMITS, LIMIT_OPTIONS, DecodeLimits
from service.score.model import DEVICES
from service.score.thresholds import THRESHOLD_HELP, ThresholdSetting, apply_thresholds, parse_threshold
from service.surveys import SURVEYS, SurveyChoice
from service.settings import (Option, SettingsError, add_options, comma_separated, non_negative_float,
                              non_negative_int, positive_int, resolve)
from service.api.coalesce import RequestCoalescer
from service.api.served import CurrentClassifier, LiveModels, ModelHolder, ServedModels
from service.score.reload import RELOAD_OPTION

log = logging.getLogger(__name__)

#: A readiness check: ``() -> (ok, detail)``; its ``__name__`` names it in ``/readyz``.
ReadinessCheckFn = Callable[[], "tuple[bool, str]"]

#: Content types of raw alert bodies; anything else but JSON is refused with 415.
RAW_CONTENT_TYPES = frozenset({"application/avro", "avro/binary", "application/octet-stream"})
JSON_CONTENT_TYPES = frozenset({"application/json", ""})


@dataclass
class ApiSettings:
    """Limits and behaviour of the API (`SERVE_OPTIONS` of ``rbstream serve``, built by `from_settings`).

    Attributes
    ----------
    max_candidates : int
        Most candidates (or alerts of a raw body) per request; more -> 413.
    max_body_bytes : int
        Largest request body; larger -> 413, refused from ``Content-Length`` before reading,
        or while reading when the body is streamed.
    max_batch : int
        Most stamps in one inference call (requests are batched together up to this).
    max_wait_ms : float
        Longest time a request waits for others to share its inference batch.
    default_survey : str, optional
        Model of JSON requests that name no survey; None: ``ztf`` if loaded, else the only model.
    models_dir, model_paths, device
        Where `create_app` loads models from when it is given none (see `service.score.model.load_scorers`).
    nodiff_model_paths : mapping of str to str
        survey -> fallback model without the difference image (`service.score.model.load_fallbacks`):
        it scores candidates and alerts whose difference is missing, empty or all masked, which
        are refused (422) without one.
    limits : DecodeLimits
        What one raw alert body (or FITS stamp) may cost the decoder (`service.limits`).
    max_concurrent_decodes : int
        Bodies decoded at the same time; others wait. With ``limits`` it bounds the memory
        that hostile bodies can claim at once.
    header_timeout_s, body_timeout_s, keep_alive_timeout_s, max_header_bytes
        The HTTP server's guards against slow or malformed clients (`service.api.server`).
    scan_alerts : str, optional
        Folder of alert files the scanning page (``GET /scan``) queues.
    scan_topic, scan_bootstrap_servers, scan_recent
        Or: the last ``scan_recent`` alerts of this Kafka topic (the stream's input) are the queue.
    scan_labels_dir : str
        Folder of the scanning page's labels (``labels.sqlite``, ``labels.csv``).
    threshold : ThresholdSetting or str, optional
        Decision thresholds instead of the model cards' (`service.score.thresholds.parse_threshold`:
        ``0.7``, ``fpr=0.01``, ``ztf:tpr=0.95,rubin:0.6``); applied to the models and their fallbacks.
    reload_interval : float
        Seconds between checks of the model files for a new version (`watch_models`); 0: on SIGHUP only.
    """

    max_candidates: int = 512
    max_body_bytes: int = 32 * 1024 * 1024
    max_batch: int = 64
    max_wait_ms: float = 5.0
    default_survey: str | None = None
    models_dir: str | None = None
    model_paths: Mapping[str, str] = field(default_factory=dict)
    nodiff_model_paths: Mapping[str, str] = field(default_factory=dict)
    device: str = "auto"
    limits: DecodeLimits = DEFAULT_LIMITS
    max_concurrent_decodes: int = 4
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = KEEP_ALIVE_S
    max_header_bytes: int = 16 * 1024
    scan_alerts: str | None = None
    scan_topic: str | None = None
    scan_bootstrap_servers: str | None = None
    scan_recent: int = 200
    scan_labels_dir: str = "scan-labels"
    threshold: ThresholdSetting | str | None = None
    reload_interval: float = 10.0

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> "ApiSettings":
        """From resolved settings (`service.settings.resolve` with `SERVE_OPTIONS`); missing keys keep defaults."""
        derived = {"model_paths", "nodiff_model_paths", "limits"}
        plain = {f.name: values[f.name] for f in fields(cls)
                 if f.name not in derived and values.get(f.name) is not None}
        return cls(**plain,
                   model_paths={s: values[f"model_{s}"] for s in SURVEYS if values.get(f"model_{s}")},
                   nodiff_model_paths={s: values[f"nodiff_model_{s}"] for s in SURVEYS
                                       if values.get(f"nodiff_model_{s}")},
                   limits=DecodeLimits.from_settings(values))


class ApiError(Exception):
    """A refused request: HTTP ``status`` and the `ErrorResponse` fields."""

    def __init__(self, status: int, detail: str, candidate: int | None = None, stamp: str | None = None,
                 errors: list | None = None):
        super().__init__(detail)
        self.status, self.detail, self.candidate, self.stamp, self.errors = status, detail, candidate, stamp, errors

    def response(self) -> JSONResponse:
        body = ErrorResponse(detail=self.detail, candidate=self.candidate, stamp=self.stamp, errors=self.errors)
        # ASCII-escaped: a message quoting a client's field name that holds a lone surrogate still encodes.
        return Response(json.dumps(body.model_dump(exclude_none=True), ensure_ascii=True), status_code=self.status,
                        media_type="application/json")


_ERRORS = {
    400: {"model": ErrorResponse, "description": "Malformed body: not JSON, not UTF-8, wrong content length."},
    413: {"model": ErrorResponse, "description": "Body larger than `--max-body-bytes`, or more candidates "
                                                 "than `--max-candidates`."},
    415: {"model": ErrorResponse, "description": "Content type neither JSON nor a raw alert type."},
    422: {"model": ErrorResponse, "description": "Well-formed but unusable: unknown or missing fields, a missing "
                                                 "stamp, a stamp that is not a 2-D image (ragged, empty, 3-D, no "
                                                 "finite pixel, undecodable FITS), stamps of different shapes, "
                                                 "a survey without a model, an alert body that cannot be decoded."},
}
_AUTH_ERRORS = {401: {"model": ErrorResponse, "description": "Missing or wrong bearer token (when one is configured)."}}


def create_app(scorers: Mapping | None = None, settings: ApiSettings | None = None,
               readiness_checks: Iterable[ReadinessCheckFn] = (), auth: TokenAuth | None = None,
               registry=None, fallbacks: Mapping | None = None) -> FastAPI:
    """Build the API around loaded models.

    Parameters
    ----------
    scorers : mapping survey -> `service.score.model.Scorer`, optional
        The models to serve; loaded from ``settings`` (models dir / explicit paths) when None.
    settings : ApiSettings, optional
    readiness_checks : iterable of callables ``() -> (ok: bool, detail: str)``
        Extra conditions of ``/readyz`` besides "models loaded" (``rbstream run`` adds
        "broker reachable"). Each runs in a worker thread; one that raises counts as not
        ready. More can be appended later to ``app.state.readiness_checks``.
    auth : TokenAuth, optional
        Bearer-token check; by default from ``RBSTREAM_API_TOKEN`` / ``RBSTREAM_API_TOKEN_FILE``
        (no token configured: open API).
    registry : prometheus_client.CollectorRegistry, optional
        Registry served on ``/metrics`` (default: the process's default registry).
    fallbacks : mapping survey -> `service.score.model.Scorer`, optional
        Models without the difference image, for what lacks a usable one; loaded from
        ``settings.nodiff_model_paths`` when None.
    """
    settings = settings or ApiSettings()
    if scorers is None:
        from service.score.model import load_scorers

        scorers = load_scorers(settings.models_dir, explicit=settings.model_paths, device=settings.device)
    scorers = dict(scorers)
    if fallbacks is None:
        from service.score.model import load_fallbacks

        fallbacks = load_fallbacks(settings.nodiff_model_paths, device=settings.device)
    fallbacks = dict(fallbacks)
    # The scorers are copies when a rule applies: those passed in keep their own threshold.
    scorers = apply_thresholds(scorers, settings.threshold)
    fallbacks = apply_thresholds(fallbacks, settings.threshold)
    for name, scorer in {**scorers, **{f"{s} fallback": f for s, f in fallbacks.items()}}.items():
        log.info("%s: %s %s, threshold %.4g (%s)", name, scorer.card.name, scorer.card.version,
                 scorer.threshold, scorer.threshold_rule)
    auth = auth if auth is not None else TokenAuth.from_env()
    metrics.record_models(scorers)
    from service.decode.schemas import SchemaStore

    # One schema cache and one bound on concurrent decodes, whichever models are in service.
    shared = dict(schemas=SchemaStore.from_env(limits=settings.limits),
                  decoding=asyncio.Semaphore(max(1, settings.max_concurrent_decodes)))

    def build(scorers: dict, fallbacks: dict, previous: ServedModels | None) -> ServedModels:
        """The models' coalescers (those of unchanged models taken over from ``previous``) and classifier."""
        models = {**scorers, **{fallback_key(survey): scorer for survey, scorer in fallbacks.items()}}
        coalescers = {key: previous.coalescers[key] if previous is not None and previous.models.get(key) is scorer
                      else RequestCoalescer(scorer.score, max_batch=settings.max_batch,
                                            max_wait_s=settings.max_wait_ms / 1000.0, on_batch=_batch_metrics,
                                            name=key)
                      for key, scorer in models.items()}
        return ServedModels(scorers, fallbacks, models, coalescers,
                            _Classifier(scorers, coalescers, settings, fallbacks, **shared))

    holder = ModelHolder(build, scorers, fallbacks)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for coalescer in holder.current.coalescers.values():
            await coalescer.aclose()
        app.state.explainer.close()

    app = FastAPI(
        title="rbstream",
        summary="Real/bogus scores for astronomical alert cutouts (ZTF, Rubin).",
        description=_DESCRIPTION,
        version=_version(),
        lifespan=lifespan,
    )
    app.state.models = holder
    app.state.scorers = LiveModels(holder, "scorers")
    app.state.fallbacks = LiveModels(holder, "fallbacks")
    app.state.settings = settings
    app.state.readiness_checks = list(readiness_checks)
    app.state.auth = auth

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        # The last resort: the same JSON body as every other error, and nothing of the server's inside.
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return ApiError(500, "internal error; the request was not scored").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return ApiError(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5]),
                        errors=json.loads(json.dumps(errors, default=str))).response()

    @app.post(
        "/classify", response_model=ClassifyResponse, tags=["scoring"],
        summary="Score candidates (JSON stamps) or raw alerts",
        responses={200: {"description": "One result per candidate (or per alert of a raw body), in order."},
                   **_ERRORS, **(_AUTH_ERRORS if auth.enabled else {})},
        openapi_extra={"requestBody": _CLASSIFY_BODY},
    )
    async def classify(
        request: Request,
        survey: Annotated[SurveyChoice, Query(
            description="Raw alert bodies only: the survey of the alert (`auto` tells from the bytes).")] = "auto",
    ) -> ClassifyResponse:
        """Score one or many candidates.

        * **JSON** (`application/json`): a `ClassifyRequest` (`{"survey": ..., "candidates": [...]}`)
          or a single candidate object. Each candidate gives the stamps its survey's model needs
          (see `GET /model`, `input.raw_inputs`), each as base64 FITS or a 2-D array.
        * **Raw alert** (`application/avro` or `application/octet-stream`): the bytes of one Kafka
          message, a ZTF Avro object container or a Rubin alert (Confluent wire format or object
          container); one result per alert in the body.

        Results come in request order. Stamps are cropped or padded to the model's size around
        the source exactly as for alerts read from Kafka, so a given alert gets the same score here
        and from the stream.
        """
        is_raw = body_is_raw(request)
        body = await _read_body(request, settings.max_body_bytes)
        async with holder.using() as served:  # one model version from decoding to labelling
            if is_raw:
                return await served.classifier.classify_alert(body, survey)
            return await served.classifier.classify_json(body)

    _add_explanation_routes(app, CurrentClassifier(holder), app.state.scorers, settings, auth)

    @app.get("/healthz", response_model=HealthResponse, tags=["operations"], summary="Liveness: the process serves")
    async def healthz() -> HealthResponse:
        return HealthResponse()

    @app.get("/readyz", response_model=ReadinessResponse, tags=["operations"],
             summary="Readiness: models loaded and every extra check passing (else 503)",
             responses={503: {"model": ReadinessResponse, "description": "Not ready; `checks` say why."}})
    async def readyz():
        scorers = holder.current.scorers
        checks = [ReadinessCheck(name="models", ok=bool(scorers),
                                 detail=", ".join(f"{s}: {sc.card.name} {sc.card.version} on {sc.provider}"
                                                  for s, sc in scorers.items()) or "no model loaded")]
        for i, check in enumerate(list(app.state.readiness_checks)):
            checks.append(await run_in_threadpool(_run_check, check, i))
        ready = all(c.ok for c in checks)
        return JSONResponse(ReadinessResponse(ready=ready, checks=checks).model_dump(), status_code=200 if ready else 503)

    @app.get("/model", response_model=ModelsResponse, tags=["operations"], summary="The model cards in service",
             responses=_AUTH_ERRORS if auth.enabled else None)
    async def model() -> ModelsResponse:
        served = holder.current
        scorers, fallbacks = served.scorers, served.fallbacks
        return ModelsResponse(models={s: sc.card.to_dict() for s, sc in scorers.items()},
                              providers={s: sc.provider for s, sc in scorers.items()},
                              inputs={s: list(sc.contract.raw_inputs) for s, sc in scorers.items()},
                              fallbacks={s: sc.card.to_dict() for s, sc in fallbacks.items()},
                              fallback_inputs={s: list(sc.contract.raw_inputs) for s, sc in fallbacks.items()},
                              thresholds={s: _threshold_info(sc) for s, sc in scorers.items()},
                              fallback_thresholds={s: _threshold_info(sc) for s, sc in fallbacks.items()},
                              loaded_at=dict(served.loaded_at))

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics (text exposition format)",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics_endpoint() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return Response(generate_latest(registry or REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # Added last = outermost: metrics see every answer, the 401s of the auth middleware included.
    app.add_middleware(BearerAuthMiddleware, auth=auth)
    app.add_middleware(HttpMetricsMiddleware, router=app.router)
    app.openapi = lambda: _openapi(app)
    return app


def _add_explanation_routes(app: FastAPI, classify_service, scorers: Mapping, settings: ApiSettings,
                            auth: TokenAuth) -> None:
    """``POST /explain`` and the scanning page (``GET /scan``), parsing bodies as ``/classify`` does."""
    from service.api.explain import Explainer, add_explain_route
    from service.api.scan import add_scan_routes

    app.state.explainer = Explainer(scorers, device=settings.device)
    add_explain_route(app, classify_service, app.state.explainer, settings,
                      {**_ERRORS, **(_AUTH_ERRORS if auth.enabled else {})})
    add_scan_routes(app, app.state.explainer, scorers, settings)


def body_is_raw(request: Request) -> bool:
    """Whether the body is a raw alert (else JSON); `ApiError` 415 for any other content type."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_raw = content_type in RAW_CONTENT_TYPES
    if not is_raw and not (content_type in JSON_CONTENT_TYPES or content_type.endswith("+json")):
        raise ApiError(415, f"unsupported content type {content_type!r}; send application/json, or a raw "
                            f"alert as one of {sorted(RAW_CONTENT_TYPES)}")
    return is_raw


class _Classifier:
    """The work of ``POST /classify``: turning a body into stamps, batching, answering."""

    def __init__(self, scorers: Mapping, coalescers: Mapping[str, RequestCoalescer], settings: ApiSettings,
                 fallbacks: Mapping | None = None, schemas=None, decoding: asyncio.Semaphore | None = None):
        from service.decode.schemas import SchemaStore

        self.scorers, self.coalescers, self.settings = scorers, coalescers, settings
        self.fallbacks = dict(fallbacks or {})
        self.schemas = schemas if schemas is not None else SchemaStore.from_env(limits=settings.limits)
        self._decoding = decoding if decoding is not None else \
            asyncio.Semaphore(max(1, settings.max_concurrent_decodes))

    # ---- JSON bodies -------------------------------------------------------------------------------
    async def classify_json(self, body: bytes) -> ClassifyResponse:
        # Parsing and pixel work are CPU-bound: a worker thread keeps the event loop answering.
        async with self._decoding:
            prepared = await run_in_threadpool(self.stamps_of_json, body)
        scores = await self._score_rows(prepared)
        _check_finite(scores, "candidate")
        results = []
        for (key, _, ident), score in zip(prepared, scores):
            results.append(self._result(key, ident, score))
        return ClassifyResponse(results=results)

    def stamps_of_json(self, body: bytes) -> list[tuple[str, np.ndarray, object]]:
        """(model key, model-ready stamp, id) per candidate, in order; `ApiError` naming what is wrong.

        The model key is the survey, or `service.decode.stamps.fallback_key` of it for a candidate its
        fallback model scores."""
        if not body.strip():
            raise ApiError(400, "empty body; send JSON with `candidates` (see /docs)")
        try:
            document = json.loads(body)
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"body is not UTF-8 text: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None
        except ValueError as exc:  # e.g. an integer of more digits than Python converts (4300)
            raise ApiError(400, f"malformed JSON: {exc}") from None
        request = self._validate(document)
        default_survey = request.survey or self._default_survey()
        prepared = []
        for index, candidate in enumerate(request.candidates):
            survey = candidate.survey or default_survey
            ident = candidate.id if candidate.id is not None else index
            key, stamp = self._candidate_stamp(index, candidate, survey)
            prepared.append((key, stamp, ident))
        return prepared

    def _validate(self, document) -> ClassifyRequest:
        if isinstance(document, list):  # a bare list of candidates
            document = {"candidates": document}
        if not isinstance(document, dict):
            raise ApiError(422, f"the body must be a JSON object (or a list of candidates), got a JSON "
                                f"{type(document).__name__}")
        if "candidates" not in document and any(name in document for name in RAW_IMAGES):
            document = {"candidates": [document]}  # one candidate given directly
        candidates = document.get("candidates")
        if isinstance(candidates, list) and len(candidates) > self.settings.max_candidates:
            raise ApiError(413, f"too many candidates: {len(candidates)}; at most {self.settings.max_candidates} "
                                "per request (--max-candidates)")
        try:
            return ClassifyRequest.model_validate(document)
        except ValidationError as exc:
            raise _from_validation_error(exc) from None
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None

    def _default_survey(self) -> str:
        if self.settings.default_survey:
            return self.settings.default_survey
        if "ztf" in self.scorers or not self.scorers:
            return "ztf"
        return next(iter(self.scorers))

    def _candidate_stamp(self, index: int, candidate: Candidate, survey: str) -> tuple[str, np.ndarray]:
        where = f"candidate {index}" + (f" (id {candidate.id!r})" if candidate.id is not None else "")
        scorer = self.scorers.get(survey)
        if scorer is None:
            raise ApiError(422, f"{where}: no model loaded for survey {survey!r}; loaded: {sorted(self.scorers)}",
                           candidate=index)
        fallback = self.fallbacks.get(survey)
        key = survey
        needed = scorer.contract.raw_inputs
        missing = [name for name in needed if getattr(candidate, name) is None]
        if missing == ["difference"] and fallback is not None:
            scorer, key, fallback = fallback, fallback_key(survey), None
            needed = scorer.contract.raw_inputs
            missing = [name for name in needed if getattr(candidate, name) is None]
        if missing:
            raise ApiError(422, f"{where}: missing stamp(s) {missing}; the {survey} model "
                                f"{scorer.card.name} needs {list(needed)}", candidate=index, stamp=missing[0])
        images = {}
        for name in RAW_IMAGES:  # a stamp the model does not need is still checked: it is a client's mistake
            value = getattr(candidate, name)
            if value is None:
                continue
            try:
                images[name] = stamp_to_array(value, self.settings.limits.max_cutout_bytes)
            except MaskedStampError as exc:
                if name != "difference" or fallback is None:
                    raise ApiError(422, f"{where}: stamp {name!r} {exc}", candidate=index, stamp=name) from None
                continue  # an all-masked difference: left out, for the fallback model below
            except StampInputError as exc:
                raise ApiError(422, f"{where}: stamp {name!r} {exc}", candidate=index, stamp=name) from None
        if candidate.negative_difference and "difference" in images:
            images["difference"] = np.negative(images["difference"])
        shapes = {name: image.shape for name, image in images.items()}
        if len(set(shapes.values())) > 1:
            # The stamps share one source position; cutouts of different shapes would put it in different places.
            listed = ", ".join(f"{name} {s[0]}x{s[1]}" for name, s in shapes.items())
            raise ApiError(422, f"{where}: stamps differ in shape ({listed}); the cutouts of one candidate must "
                                "have the same shape", candidate=index)
        try:
            return key, assemble(images, scorer.contract, centre=candidate.centre,
                                 min_side=self.settings.limits.min_stamp_side)
        except StampError as exc:
            if fallback is not None and set(exc.cutouts) == {"difference"}:
                # An empty or all-masked difference: the fallback model does without it.
                return self._fallback_stamp(index, where, images, candidate, survey)
            stamp = next((name for name in needed if repr(name) in str(exc)), None)
            raise ApiError(422, f"{where}: {exc}", candidate=index, stamp=stamp) from None

    def _fallback_stamp(self, index: int, where: str, images: dict, candidate: Candidate,
                        survey: str) -> tuple[str, np.ndarray]:
        scorer = self.fallbacks[survey]
        try:
            return fallback_key(survey), assemble(images, scorer.contract, centre=candidate.centre,
                                                  min_side=self.settings.limits.min_stamp_side)
        except StampError as exc:
            stamp = next((name for name in scorer.contract.raw_inputs if repr(name) in str(exc)), None)
            raise ApiError(422, f"{where}: {exc}", candidate=index, stamp=stamp) from None

    # ---- raw alert bodies --------------------------------------------------------------------------
    async def classify_alert(self, body: bytes, survey: str) -> ClassifyResponse:
        if not body:
            raise ApiError(400, "empty body; send the bytes of one alert message")
        async with self._decoding:
            batches = await run_in_threadpool(self.stamps_of_alert, body, survey)
        results = []
        for batch in batches:
            key = fallback_key(batch.survey) if batch.fallback else batch.survey
            scores = await self.coalescers[key].score(batch.stamps)
            _check_finite(scores, "alert")
            self._observe_scores(batch.survey, scores)
            results.extend(self._result(key, alert.candidate_id, score, object_id=alert.object_id,
                                        survey_score=alert.survey_score, survey_score_name=alert.survey_score_name)
                           for alert, score in zip(batch.alerts, scores))
        return ClassifyResponse(results=results)

    def stamps_of_alert(self, body: bytes, survey: str) -> list:
        """The body's `service.decode.stamps.SurveyStamps` es, made exactly as the consumer makes them
        (`service.decode.stamps.decode_stamps`), so an alert scores the same here and from Kafka."""
        from service.decode.stamps import decode_stamps

        contracts = {name: scorer.contract for name, scorer in self.scorers.items()}
        fallbacks = {name: scorer.contract for name, scorer in self.fallbacks.items()}
        batches, failures = decode_stamps([body], contracts, survey=survey, schemas=self.schemas, fallbacks=fallbacks)
        if failures:
            reasons = "; ".join(f"({failure.kind}): {failure.reason}" for failure in failures[:5])
            raise ApiError(422, f"alert body cannot be decoded {reasons}")
        batches = [batch for batch in batches.values() if len(batch)]
        count = sum(len(batch) for batch in batches)
        if count == 0:
            raise ApiError(422, "alert body holds no alert")
        if count > self.settings.max_candidates:
            raise ApiError(413, f"too many alerts in the body: {count}; at most "
                                f"{self.settings.max_candidates} (--max-candidates)")
        return batches

    # ---- shared --------------------------------------------------------------------------------------
    async def _score_rows(self, prepared: Sequence[tuple[str, np.ndarray, object]]) -> np.ndarray:
        """Scores of each row, in order; rows of each survey go to that survey's coalescer together."""
        scores = np.empty(len(prepared), dtype=np.float32)
        by_model: dict[str, list[int]] = {}
        for i, (key, _, _) in enumerate(prepared):
            by_model.setdefault(key, []).append(i)
        keys = list(by_model)
        stacks = [np.stack([prepared[i][1] for i in by_model[k]]) for k in keys]
        parts = await asyncio.gather(*(self.coalescers[k].score(stack) for k, stack in zip(keys, stacks)))
        for key, part in zip(keys, parts):
            scores[by_model[key]] = part
            self._observe_scores(self._model(key)[0], part)
        return scores

    @staticmethod
    def _observe_scores(survey: str, scores: np.ndarray) -> None:
        histogram = metrics.SCORE.labels(survey=survey)
        for value in scores:
            histogram.observe(float(value))

    def _model(self, key: str):
        """(survey, scorer) of a model key: a survey, or `service.decode.stamps.fallback_key` of one."""
        for survey, scorer in self.fallbacks.items():
            if key == fallback_key(survey):
                return survey, scorer
        return key, self.scorers[key]

    def _result(self, key: str, ident, score: float, object_id: str | None = None,
                survey_score: float | None = None, survey_score_name: str | None = None) -> ScoreResult:
        survey, scorer = self._model(key)
        card = scorer.card
        score = float(score)
        return ScoreResult(id=ident, object_id=object_id, survey=survey, score=score,
                           label=scorer.label(score), threshold=scorer.threshold,
                           model=card.name, model_version=card.version, survey_score=survey_score,
                           survey_score_name=survey_score_name, model_inputs=list(card.contract.raw_inputs))


def watch_models(app: FastAPI):
    """Start putting new versions of the app's models in service (`service.score.reload`): every
    ``settings.reload_interval`` seconds, and whenever the returned reloader's ``request()`` is
    called (SIGHUP). Returns the started `service.score.reload.ModelReloader`."""
    from service.score.reload import ModelReloader

    holder: ModelHolder = app.state.models
    settings: ApiSettings = app.state.settings

    def switch(survey: str, scorer) -> None:
        old = holder.current.scorers.get(survey)
        holder.replace(survey, scorer)
        metrics.record_model_switch(survey, old, scorer)
        log.info("%s: now answering with %s %s (requests already running finish on %s)", survey,
                 scorer.card.name, scorer.card.version, f"{old.card.name} {old.card.version}" if old else "none")

    reloader = ModelReloader(lambda: holder.current.scorers, switch, interval=settings.reload_interval,
                             threshold=settings.threshold)
    app.state.reloader = reloader
    return reloader.start()


def _threshold_info(scorer) -> ThresholdInfo:
    return ThresholdInfo(threshold=scorer.threshold, threshold_rule=scorer.threshold_rule)


def _check_finite(scores: np.ndarray, what: str) -> None:
    """A model that cannot score some input (NaN out) is the input's problem to report, not a crash."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ApiError(422, f"{what} {int(bad[0])}: the model gave no finite score ({scores[bad[0]]}); its stamps "
                            "are probably degenerate (constant, or a handful of pixels)", candidate=int(bad[0]))


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {declared!r} is not a number") from None
        if length > limit:
            raise ApiError(413, f"body of {length} bytes is over the limit of {limit} bytes (--max-body-bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked upload, or a Content-Length that lied
                raise ApiError(413, f"body is over the limit of {limit} bytes (--max-body-bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _from_validation_error(exc: ValidationError) -> ApiError:
    """One `ApiError` naming the candidate and field of pydantic's first errors.

    pydantic reports a value that fits no member of a union once per member (``id.str``,
    ``id.int``); those are merged into one line per field.
    """
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    candidate = stamp = None
    messages: dict[str, list[str]] = {}
    for error in errors:
        loc = list(error["loc"])
        if len(loc) >= 2 and loc[0] == "candidates" and isinstance(loc[1], int):
            candidate = loc[1] if candidate is None else candidate
            field_name = loc[2] if len(loc) > 2 else None
            if field_name in RAW_IMAGES and stamp is None:
                stamp = field_name
            if field_name is not None:  # integer positions inside the field (centre[1]); union tags skipped
                field_name += "".join(f"[{part}]" for part in loc[3:] if isinstance(part, int))
            where = f"candidate {loc[1]}" + (f": field {field_name!r}" if field_name is not None else "")
            known = Candidate.model_fields
        else:
            where = f"field {loc[0]!r}" if loc else "body"
            known = ClassifyRequest.model_fields
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown field; accepted: {', '.join(known)}"
        if message not in messages.setdefault(where, []):
            messages[where].append(message)
    parts = [f"{where}: {' or '.join(found)}" for where, found in list(messages.items())[:5]]
    if len(messages) > 5:
        parts.append(f"... and {len(messages) - 5} more")
    return ApiError(422, "; ".join(parts), candidate=candidate, stamp=stamp, errors=errors)


def _run_check(check: ReadinessCheckFn, index: int) -> ReadinessCheck:
    name = getattr(check, "__name__", "<lambda>")
    if name == "<lambda>":  # a lambda has no useful name: number it
        name = f"check{index}"
    try:
        ok, detail = check()
        return ReadinessCheck(name=name, ok=bool(ok), detail=str(detail))
    except Exception as exc:  # a check that fails to run means "not ready", never a 500
        return ReadinessCheck(name=name, ok=False, detail=f"{type(exc).__name__}: {exc}")


def _batch_metrics(size: int, seconds: float) -> None:
    metrics.BATCH_SIZE.observe(size)
    metrics.INFERENCE_SECONDS.observe(seconds)


class HttpMetricsMiddleware:
    """ASGI middleware counting answers by route template and status, and timing them.

    The label is the route's template (``/classify``), never the raw path, so that
    scanners probing random URLs cannot blow up the number of series: every path
    no route matches is counted as ``unmatched``.
    """

    def __init__(self, app, router):
        self.app = app
        self.router = router

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = "unmatched"
        for candidate in self.router.routes:
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                route = candidate.path
                if match is Match.FULL:
                    break
        status = 500  # what the client gets if the app raises before answering

        async def send_recording_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            metrics.HTTP_REQUESTS.labels(route=route, status=str(status)).inc()
            metrics.HTTP_REQUEST_SECONDS.labels(route=route).observe(time.perf_counter() - started)


# ---- OpenAPI ---------------------------------------------------------------------------------------

_DESCRIPTION = """
Scores the cutouts of astronomical transient candidates with a real/bogus CNN
(one ONNX model per survey: ZTF, Rubin). `POST /classify` takes stamps as JSON
(base64 FITS or 2-D arrays) or the raw bytes of an alert; every refused request is
answered with a JSON `detail` that names the candidate and the stamp at fault.

When the server has a token (`RBSTREAM_API_TOKEN` or `RBSTREAM_API_TOKEN_FILE`),
send `Authorization: Bearer <token>`; `/healthz`, `/readyz`, `/metrics` and these docs stay open.
"""

def _example_stamp(peak: float, sky: float) -> list[list[float]]:
    """An 8x8 stamp (the smallest scored) with a source of ``peak`` in the middle, for the docs."""
    return [[round(sky + peak * 2.0 ** -((r - 3.5) ** 2 + (c - 3.5) ** 2), 2) for c in range(8)] for r in range(8)]


_EXAMPLE_STAMPS = {"science": _example_stamp(50.0, 10.0), "template": _example_stamp(2.0, 10.0),
                   "difference": _example_stamp(48.0, 0.0)}

_CLASSIFY_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"anyOf": [{"$ref": "#/components/schemas/ClassifyRequest"},
                                 {"$ref": "#/components/schemas/Candidate"}]},
            "examples": {
                "arrays": {"summary": "Two candidates, stamps as 2-D arrays (at least 8x8, not constant)",
                           "value": {"survey": "ztf", "candidates": [
                               {"id": "a", "science": _EXAMPLE_STAMPS["science"],
                                "template": _EXAMPLE_STAMPS["template"],
                                "difference": _EXAMPLE_STAMPS["difference"]},
                               {"id": "b", "science": _EXAMPLE_STAMPS["science"],
                                "template": _EXAMPLE_STAMPS["template"],
                                "difference": [[None if (r, c) == (0, 0) else v for c, v in enumerate(row)]
                                               for r, row in enumerate(_EXAMPLE_STAMPS["difference"])]}]}},
                "fits": {"summary": "One candidate, stamps as base64 (gzipped) FITS, as in ZTF alerts",
                         "value": {"survey": "ztf", "candidates": [
                             {"id": 1234567890, "science": "H4sIAAAAAAAA...", "template": "H4sIAAAAAAAA...",
                              "difference": "H4sIAAAAAAAA..."}]}},
            },
        },
        "application/avro": {
            "schema": {"type": "string", "format": "binary"},
            "example": "(bytes of a ZTF alert .avro file, or of a Rubin alert message)",
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the request models of /classify (which reads its body itself, to
    enforce the size limit while streaming and to accept raw alerts) and the bearer scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                         routes=app.routes, tags=[
                             {"name": "scoring", "description": "Real/bogus scores."},
                             {"name": "operations", "description": "Probes, model cards, metrics."},
                             {"name": "scanning", "description": "The scanning page and its labels."}])
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    request_schema = ClassifyRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(request_schema.pop("$defs", {}))
    components["ClassifyRequest"] = request_schema
    auth: TokenAuth = app.state.auth
    if auth.enabled:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            if not auth.is_open(path):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("rbstream")
    except Exception:  # not installed (running from a checkout)
        return "0"


# ---- command line ------------------------------------------------------------------------------------

_API = ApiSettings()

#: Options of ``rbstream serve``: flag ``--NAME``, key ``NAME`` of ``--config``, and the environment
#: variable each had before the API shared `service.settings` (mostly ``RBSTREAM_API_<NAME>``).
SERVE_OPTIONS: tuple[Option, ...] = (
    Option("host", "127.0.0.1", "address to listen on (0.0.0.0 in containers)", env_var="RBSTREAM_API_HOST",
           metavar="HOST"),
    Option("port", 8000, "port", type=non_negative_int, env_var="RBSTREAM_API_PORT", metavar="PORT"),
    Option("models_dir", None, "folder with one model per survey (<dir>/ztf, <dir>/rubin); default models/",
           metavar="DIR"),
    Option("model_ztf", None, "ZTF model folder or .onnx, instead of <models-dir>/ztf", metavar="PATH"),
    Option("model_rubin", None, "Rubin model folder or .onnx", metavar="PATH"),
    Option("nodiff_model_ztf", None, "fallback ZTF model without the difference image (e.g. trained on template "
           "and science): scores what lacks a usable difference, refused (422) without it", metavar="PATH"),
    Option("nodiff_model_rubin", None, "the same for Rubin", metavar="PATH"),
    Option("threshold", None, THRESHOLD_HELP, type=parse_threshold, metavar="[SURVEY:]{T,fpr=X,tpr=Y}[,...]"),
    Option("device", "auto", "inference device", choices=DEVICES, metavar="{" + ",".join(DEVICES) + "}"),
    Option("default_survey", None, "model of JSON requests naming no survey (default: ztf if loaded, else the "
           "only one)", choices=SURVEYS, env_var="RBSTREAM_API_DEFAULT_SURVEY", metavar="{" + ",".join(SURVEYS) + "}"),
    Option("max_candidates", _API.max_candidates, "most candidates per request", type=positive_int,
           env_var="RBSTREAM_API_MAX_CANDIDATES", metavar="N"),
    Option("max_body_bytes", _API.max_body_bytes, "largest request body", type=positive_int,
           env_var="RBSTREAM_API_MAX_BODY_BYTES", metavar="BYTES"),
    Option("max_batch", _API.max_batch, "most stamps per inference batch", type=positive_int,
           env_var="RBSTREAM_API_MAX_BATCH", metavar="N"),
    Option("max_wait_ms", _API.max_wait_ms, "longest wait for a batch to fill", type=non_negative_float,
           env_var="RBSTREAM_API_MAX_WAIT_MS", metavar="MS"),
    Option("token_file", None, "file holding the bearer token, e.g. a mounted Kubernetes Secret; or set the token "
           "itself in RBSTREAM_API_TOKEN (never on the command line, where `ps` shows it)",
           env_var="RBSTREAM_API_TOKEN_FILE", metavar="FILE"),
    Option("open_paths", None, "comma-separated paths served without the token (default: /healthz,/readyz,/metrics "
           "and the docs)", type=comma_separated, env_var="RBSTREAM_API_OPEN_PATHS", metavar="PATH,..."),
    Option("max_concurrent_decodes", _API.max_concurrent_decodes, "bodies decoded at once; others wait",
           type=positive_int, env_var="RBSTREAM_API_MAX_CONCURRENT_DECODES", metavar="N"),
    Option("header_timeout_s", _API.header_timeout_s, "seconds a client has to send its request line and headers; "
           "408 after (0: no limit)", type=non_negative_float, env_var="RBSTREAM_API_HEADER_TIMEOUT_S",
           metavar="S"),
    Option("body_timeout_s", _API.body_timeout_s, "seconds a client has to send the whole body; 408 after "
           "(0: no limit)", type=non_negative_float, env_var="RBSTREAM_API_BODY_TIMEOUT_S", metavar="S"),
    Option("keep_alive_timeout_s", _API.keep_alive_timeout_s, "seconds an idle kept-alive connection stays open",
           type=non_negative_float, env_var="RBSTREAM_API_KEEP_ALIVE_TIMEOUT_S", metavar="S"),
    Option("max_header_bytes", _API.max_header_bytes, "most bytes of request line and headers; 414 or 431 beyond",
           type=positive_int, env_var="RBSTREAM_API_MAX_HEADER_BYTES", metavar="BYTES"),
    Option("scan_alerts", None, "folder of alert files the scanning page GET /scan queues", metavar="DIR"),
    Option("scan_topic", None, "instead of --scan-alerts: queue the last --scan-recent alerts of this Kafka topic",
           metavar="TOPIC"),
    Option("scan_bootstrap_servers", "localhost:9092", "broker of --scan-topic", metavar="HOST:PORT"),
    Option("scan_recent", _API.scan_recent, "how many of the topic's last alerts the queue holds",
           type=positive_int, metavar="N"),
    Option("scan_labels_dir", _API.scan_labels_dir, "folder of the scanning page's labels: labels.sqlite and "
           "labels.csv, the CSV training reads", metavar="DIR"),
    RELOAD_OPTION,
) + LIMIT_OPTIONS


def add_arguments(parser) -> None:
    add_options(parser, SERVE_OPTIONS)


def main(args) -> int:
    from service.api.server import ApiServer, server_config
    from service.score.model import ModelError

    try:
        values = resolve(args, SERVE_OPTIONS)
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    settings = ApiSettings.from_settings(values)
    try:
        auth = TokenAuth.from_env(token_file=values["token_file"], open_paths=values["open_paths"])
        app = create_app(settings=settings, auth=auth)
    except (ModelError, OSError, ValueError) as exc:
        log.error("cannot start the API: %s", exc)
        return 2
    host, port = values["host"], values["port"]
    log.info("API on http://%s:%d (docs at /docs); token %s", host, port,
             "required" if auth.enabled else "not required")
    # Guards against slow clients, logged closes, keep-alive longer than the clients', bounded shutdown.
    config = server_config(app, host, port, header_timeout_s=settings.header_timeout_s,
                           body_timeout_s=settings.body_timeout_s, keep_alive_timeout_s=settings.keep_alive_timeout_s,
                           max_header_bytes=settings.max_header_bytes,
                           log_level=logging.getLevelName(log.getEffectiveLevel()).lower())
    reloader = watch_models(app)
    server = ApiServer(config, on_reload=reloader.request)
    try:
        server.run()
    finally:
        reloader.stop()
    return 0 if server.started else 3  # as uvicorn.run: 3 when it could not start (port taken)
