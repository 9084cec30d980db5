"""POST /classify and the other routes, on the real models and the real sample alerts."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest

from api_support import (assert_still_serving, candidate_json, decoded, good_request, make_client, real_scorers,
                         two_channel_model)
from conftest import rubin_files, ztf_fits_files
from service.api.app import ApiSettings, create_app
from service.api.auth import TokenAuth
from service.contract import assemble
from service.score.card import label_for
from service.api.coalesce import RequestCoalescer


@pytest.fixture(scope="module")
def client():
    with make_client() as c:
        yield c


def _score(client, body, **kwargs) -> dict:
    response = client.post("/classify", **kwargs) if body is None else client.post("/classify", json=body, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


# ---- happy paths -----------------------------------------------------------------------------------

@pytest.mark.parametrize("survey, files", [("ztf", ztf_fits_files), ("rubin", rubin_files)])
def test_same_score_from_arrays_fits_gzip_fits_and_raw_alert(client, survey, files):
    """Every decodable sample alert: one score whichever way its stamps come."""
    scorer = real_scorers()[survey]
    for path in files():
        alert = decoded(path)
        expected = float(scorer.score(assemble(alert.images, scorer.contract, alert.centre)[None])[0])
        scores = {}
        for form in ("array", "fits", "fits_gz"):
            (result,) = _score(client, {"survey": survey, "candidates": [candidate_json(alert, form)]})["results"]
            assert result["id"] == str(alert.candidate_id)
            scores[form] = result["score"]
        (raw,) = _score(client, None, content=path.read_bytes(),
                        headers={"content-type": "application/avro"})["results"]
        assert raw["id"] == alert.candidate_id and raw["object_id"] == alert.object_id and raw["survey"] == survey
        scores["raw"] = raw["score"]
        # Each request is one batch of one stamp, like the direct call: identical, not just close.
        assert set(scores.values()) == {expected}, (path.name, scores, expected)


def test_rubin_wire_format_body_scores_like_the_container(client):
    """The live Rubin framing (Confluent wire format, official lsst-alert-packet schema), as replayed into Kafka."""
    from service.tools.replay import messages_of_file

    for path in rubin_files():
        (message,) = messages_of_file(path, wire_format=True)
        assert message.value[:1] == b"\0"  # magic byte: really the wire format
        (wire,) = _score(client, None, content=message.value,
                         headers={"content-type": "application/octet-stream"})["results"]
        (container,) = _score(client, None, content=path.read_bytes(),
                              headers={"content-type": "application/avro"})["results"]
        assert wire == container, path.name


def test_raw_body_scores_equal_the_consumer_pipeline(client):
    """Kafka and /classify share `service.decode.stamps.decode_stamps`: the same alert gets the same score."""
    from service.decode.stamps import decode_stamps

    scorers = real_scorers()
    paths = ztf_fits_files() + rubin_files()
    batches, failures = decode_stamps([p.read_bytes() for p in paths], {s: sc.contract for s, sc in scorers.items()})
    assert failures == []
    for survey, batch in batches.items():
        expected = scorers[survey].score(batch.stamps)  # the consumer's whole-batch call
        for index, alert, score in zip(batch.indices, batch.alerts, expected):
            (result,) = _score(client, None, content=paths[index].read_bytes(),
                               headers={"content-type": "application/avro"})["results"]
            assert result["id"] == alert.candidate_id
            assert abs(result["score"] - float(score)) <= 1e-6, (paths[index].name, result["score"], score)


def test_result_fields_follow_the_model_card(client):
    card = real_scorers()["ztf"].card
    (result,) = _score(client, good_request("ztf"))["results"]
    assert result["model"] == card.name and result["model_version"] == card.version
    assert result["threshold"] == card.threshold
    assert result["label"] == label_for(result["score"], card.threshold)


def test_missing_pixels_as_null_nan_or_infinity_are_masked_alike(client):
    """null (strict JSON), NaN and Infinity (JSON extensions) all mean "no data" and give one score."""
    alert = decoded(ztf_fits_files()[0])
    candidate = candidate_json(alert, "array")
    scores = []
    for missing in ("null", "NaN", "Infinity", "-Infinity"):
        body = json.loads(json.dumps({"candidates": [candidate]}))
        for name in ("science", "template", "difference"):
            rows = body["candidates"][0][name]
            for row in rows[len(rows) // 2 - 8: len(rows) // 2 - 2]:  # a band of missing rows the model sees
                row[:] = [None] * len(row)
        text = json.dumps(body).replace("null", missing)
        scores.append(_score(client, None, content=text.encode(),
                             headers={"content-type": "application/json"})["results"][0]["score"])
    assert len(set(scores)) == 1
    assert scores[0] != _score(client, {"candidates": [candidate]})["results"][0]["score"]


def test_many_candidates_keep_their_order_and_ids(client):
    alerts = [decoded(p) for p in ztf_fits_files()[:6]]
    body = {"candidates": [candidate_json(a, "fits_gz") for a in alerts]}  # no survey: the default, ztf
    results = _score(client, body)["results"]
    assert [r["id"] for r in results] == [str(a.candidate_id) for a in alerts]
    scorer = real_scorers()["ztf"]
    expected = scorer.score(np.stack([assemble(a.images, scorer.contract, a.centre) for a in alerts]))
    np.testing.assert_allclose([r["score"] for r in results], expected, atol=1e-6)


def test_candidates_of_both_surveys_in_one_request(client):
    ztf, rubin = decoded(ztf_fits_files()[0]), decoded(rubin_files()[0])
    rubin_candidate = {**candidate_json(rubin, "fits"), "survey": "rubin"}
    rubin_candidate.pop("id")
    results = _score(client, {"survey": "ztf", "candidates": [candidate_json(ztf, "array"), rubin_candidate]})["results"]
    assert [r["survey"] for r in results] == ["ztf", "rubin"]
    assert results[1]["id"] == 1  # no id given: the candidate's position
    assert results[1]["model"] == real_scorers()["rubin"].card.name


def test_a_single_candidate_object_and_a_bare_list_are_accepted(client):
    candidate = good_request()["candidates"][0]
    single = _score(client, candidate)["results"]
    listed = _score(client, [candidate])["results"]
    assert single == listed and len(single) == 1


def test_model_needing_two_channels_does_not_require_the_third(tmp_path):
    """A template+science model (a real ONNX graph) scores candidates without a difference stamp."""
    scorer = two_channel_model(tmp_path)
    with make_client({"ztf": scorer}) as c:
        alert = decoded(ztf_fits_files()[0])
        body = {"candidates": [candidate_json(alert, "fits_gz", names=("template", "science"))]}
        (result,) = _score(c, body)["results"]
        assert result["score"] == pytest.approx(float(scorer.score(assemble(alert.images, scorer.contract)[None])[0]))
        # ...and still refuses one without the template, naming it.
        body["candidates"][0].pop("template")
        response = c.post("/classify", json=body)
        assert response.status_code == 422 and "template" in response.json()["detail"]


# ---- probes, model cards, metrics, docs ------------------------------------------------------------

def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_reports_models_and_extra_checks():
    broker_up = threading.Event()

    def broker_reachable():
        return broker_up.is_set(), "broker up" if broker_up.is_set() else "no broker at 127.0.0.1:1"

    def explodes():
        raise RuntimeError("check crashed")

    with make_client(readiness_checks=[broker_reachable]) as c:
        response = c.get("/readyz")
        assert response.status_code == 503
        checks = {check["name"]: check for check in response.json()["checks"]}
        assert checks["models"]["ok"] and real_scorers()["ztf"].card.name in checks["models"]["detail"]
        assert not checks["broker_reachable"]["ok"] and "no broker" in checks["broker_reachable"]["detail"]
        broker_up.set()
        assert c.get("/readyz").status_code == 200
        c.app.state.readiness_checks.append(explodes)  # checks may be added after creation
        response = c.get("/readyz")
        assert response.status_code == 503 and "check crashed" in response.text


def test_readyz_without_models_is_503():
    with make_client(scorers={}) as c:
        assert c.get("/healthz").status_code == 200
        response = c.get("/readyz")
        assert response.status_code == 503 and "no model loaded" in response.text
        response = c.post("/classify", json=good_request())
        assert response.status_code == 422 and "no model loaded for survey 'ztf'" in response.json()["detail"]


def test_model_route_returns_the_whole_cards(client):
    body = client.get("/model").json()
    for survey, scorer in real_scorers().items():
        assert body["models"][survey] == json.loads((scorer.path.parent / "model_card.json").read_text())
        assert body["providers"][survey] == scorer.provider


def test_metrics_count_requests_by_route_template(client):
    client.post("/classify", json=good_request())
    client.post("/classify", content=b"{", headers={"content-type": "application/json"})
    client.get("/no/such/path/12345")
    text = client.get("/metrics").text
    assert 'rbstream_http_requests_total{route="/classify",status="200"}' in text
    assert 'rbstream_http_requests_total{route="/classify",status="400"}' in text
    assert 'route="unmatched",status="404"' in text and "/no/such/path" not in text
    assert 'rbstream_http_request_seconds_count{route="/classify"}' in text
    assert 'rbstream_score_count{survey="ztf"}' in text
    assert "rbstream_model_info{" in text and "rbstream_batch_size_count" in text


def test_openapi_documents_the_request_and_error_models(client):
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/classify"]["post"]
    content = operation["requestBody"]["content"]
    assert {"application/json", "application/avro", "application/octet-stream"} <= set(content)
    components = schema["components"]["schemas"]
    for name in ("ClassifyRequest", "Candidate", "ClassifyResponse", "ScoreResult", "ErrorResponse"):
        assert name in components, name
    assert components["Candidate"]["properties"]["science"]["description"]
    assert {"400", "413", "415", "422"} <= set(operation["responses"])
    assert client.get("/docs").status_code == 200


# ---- request batching ------------------------------------------------------------------------------

class CountingScorer:
    """A real scorer that records the size of every inference call."""

    def __init__(self, scorer):
        self.scorer, self.card, self.provider, self.contract = scorer, scorer.card, scorer.provider, scorer.contract
        self.threshold, self.threshold_rule, self.label = scorer.threshold, scorer.threshold_rule, scorer.label
        self.calls: list[int] = []

    def score(self, stamps):
        self.calls.append(len(stamps))
        return self.scorer.score(stamps)


def test_concurrent_requests_share_one_inference_call():
    counting = CountingScorer(real_scorers()["ztf"])
    requests = 8
    # The batch closes when it is full (8 stamps), long before the (huge) wait bound: no timing involved.
    app = create_app({"ztf": counting}, ApiSettings(max_batch=requests, max_wait_ms=60_000), auth=TokenAuth())
    body = good_request()

    async def fire():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            return await asyncio.gather(*(http.post("/classify", json=body) for _ in range(requests)))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * requests
    assert counting.calls == [requests]
    assert len({r.json()["results"][0]["score"] for r in responses}) == 1


def test_inference_runs_off_the_event_loop():
    """While a batch is being scored (here: held inside the model call), the app still answers."""
    entered, release = threading.Event(), threading.Event()
    scorer = real_scorers()["ztf"]

    class HeldScorer(CountingScorer):
        def score(self, stamps):
            entered.set()
            release.wait(30)
            return super().score(stamps)

    app = create_app({"ztf": HeldScorer(scorer)}, ApiSettings(max_wait_ms=0), auth=TokenAuth())

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            pending = asyncio.create_task(http.post("/classify", json=good_request()))
            assert await asyncio.to_thread(entered.wait, 30)
            health = await http.get("/healthz")  # would hang if inference blocked the loop
            still_pending = not pending.done()
            release.set()
            return health.status_code, still_pending, (await pending).status_code

    assert asyncio.run(scenario()) == (200, True, 200)


def test_batcher_splits_large_requests_and_bounds_batches():
    calls = []

    def score(stamps):
        calls.append(len(stamps))
        return stamps.reshape(len(stamps), -1)[:, 0]

    async def run():
        batcher = RequestCoalescer(score, max_batch=4, max_wait_s=0.0)
        first = np.arange(10, dtype=np.float32).reshape(10, 1)
        second = np.arange(100, 103, dtype=np.float32).reshape(3, 1)
        results = await asyncio.gather(batcher.score(first), batcher.score(second))
        await batcher.aclose()
        return results

    first, second = asyncio.run(run())
    np.testing.assert_array_equal(first, np.arange(10))  # each request gets its own slice back, in order
    np.testing.assert_array_equal(second, np.arange(100, 103))
    assert max(calls) <= 4 and sum(calls) == 13


def test_batcher_failure_fails_only_that_batch():
    def score(stamps):
        if (stamps < 0).any():
            raise RuntimeError("inference failed")
        return stamps[:, 0]

    async def run():
        batcher = RequestCoalescer(score, max_batch=1, max_wait_s=0.0)
        bad, good = await asyncio.gather(batcher.score(np.array([[-1.0]])), batcher.score(np.array([[2.0]])),
                                         return_exceptions=True)
        again = await batcher.score(np.array([[3.0]]))
        await batcher.aclose()
        return bad, good, again

    bad, good, again = asyncio.run(run())
    assert isinstance(bad, RuntimeError)
    assert list(good) == [2.0] and list(again) == [3.0]


# ---- bearer token ----------------------------------------------------------------------------------

def test_token_required_when_configured(tmp_path):
    with make_client(auth=TokenAuth(token="s3cret-token")) as c:
        response = c.post("/classify", json=good_request())
        assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
        assert "missing Authorization" in response.json()["detail"]
        assert c.post("/classify", json=good_request(), headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/classify", json=good_request(), headers={"Authorization": "Basic s3cret-token"}).status_code == 401
        assert c.get("/model").status_code == 401
        ok = c.post("/classify", json=good_request(), headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert c.get(open_path).status_code == 200, open_path
        metrics_text = c.get("/metrics").text
        assert 'rbstream_http_requests_total{route="/classify",status="401"}' in metrics_text
        security = c.get("/openapi.json").json()["paths"]["/classify"]["post"]["security"]
        assert security == [{"bearer": []}]


def test_open_paths_are_configurable():
    with make_client(auth=TokenAuth(token="t", open_paths=["/healthz"])) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer t"}).status_code == 200


def test_token_file_from_environment_is_reread_when_rotated(tmp_path):
    secret = tmp_path / "api-token"
    secret.write_text("first-token\n")
    auth = TokenAuth.from_env({"RBSTREAM_API_TOKEN_FILE": str(secret)})
    with make_client(auth=auth) as c:
        assert c.get("/model", headers={"Authorization": "Bearer first-token"}).status_code == 200
        secret.write_text("second-token-longer\n")  # a rotated Kubernetes Secret
        assert c.get("/model", headers={"Authorization": "Bearer first-token"}).status_code == 401
        assert c.get("/model", headers={"Authorization": "Bearer second-token-longer"}).status_code == 200
        assert_still_serving_with_token(c, "second-token-longer")


def assert_still_serving_with_token(client, token):
    response = client.post("/classify", json=good_request(), headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


def test_no_token_configured_means_open(client):
    assert TokenAuth.from_env({}).enabled is False
    assert_still_serving(client)
