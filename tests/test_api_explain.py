"""POST /explain: answers on real alerts, and its error table, which is /classify's: the same bad
body gets the same status and message from both routes (one parser), plus the explain-only refusals."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from api_support import (
    SMALL_LIMITS, assert_still_serving, candidate_json, decoded, good_request, make_client, science_array)
from conftest import rubin_files, ztf_fits_files, ztf_jpeg_files
from service.api.explain import MAX_EXPLAIN_CANDIDATES
from service.api.auth import TokenAuth


@pytest.fixture(scope="module")
def client():
    with make_client(**SMALL_LIMITS) as c:
        yield c


@pytest.fixture(scope="module")
def stamp():
    return science_array()


def post(client, path, json_body=None, content=None, content_type="application/json", **kwargs):
    if json_body is not None:
        content = json.dumps(json_body, allow_nan=True).encode()
    return client.post(path, content=content, headers={"content-type": content_type, **kwargs.pop("headers", {})},
                       **kwargs)


def one(stamp, **overrides) -> dict:
    candidate = {"id": "c0", "science": stamp, "template": stamp, "difference": stamp, **overrides}
    return {"survey": "ztf", "candidates": [{k: v for k, v in candidate.items() if v is not None}]}


def bad_bodies(stamp) -> dict:
    """A bad body of each kind /classify refuses: (content, content type)."""
    jpeg = base64.b64encode(decoded_jpeg_bytes()).decode() if ztf_jpeg_files() else None
    bodies = {
        "malformed JSON": (b'{"candidates": [}', "application/json"),
        "not UTF-8": (b'{"candidates": "\xff\xfe\xfa"}', "application/json"),
        "empty": (b"", "application/json"),
        "nested": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        "not an object": (b"42", "application/json"),
        "no candidates": (json.dumps({"survey": "ztf", "candidates": []}).encode(), "application/json"),
        "content type": (b"a,b\n1,2", "text/csv"),
        "missing stamp": (json.dumps(one(stamp, difference=None)).encode(), "application/json"),
        "ragged stamp": (json.dumps(one(stamp, science=stamp[:5] + [stamp[5][:-1]] + stamp[6:])).encode(),
                         "application/json"),
        "not base64": (json.dumps(one(stamp, science="not base64!")).encode(), "application/json"),
        "unknown field": (json.dumps(one(stamp, mask=stamp)).encode(), "application/json"),
        "too many candidates": (json.dumps({"candidates": [one(stamp)["candidates"][0]] * 6}).encode(),
                                "application/json"),
        "too large": (b" " * 600_001, "application/json"),
        "raw random bytes": (b"\x13\x37" * 500, "application/avro"),
        "raw empty": (b"", "application/octet-stream"),
        "raw truncated": (ztf_fits_files()[0].read_bytes()[:2000], "application/avro"),
    }
    if jpeg is not None:
        bodies["jpeg stamp"] = (json.dumps(one(stamp, science=jpeg)).encode(), "application/json")
    return bodies


def decoded_jpeg_bytes() -> bytes:
    from service.decode.alerts import read_full_records

    record = read_full_records(ztf_jpeg_files()[0].read_bytes())[0]
    return record["cutoutScience"]["stampData"]


def test_every_bad_body_gets_the_answer_classify_gives(client, stamp):
    for name, (content, content_type) in bad_bodies(stamp).items():
        classified = post(client, "/classify", content=content, content_type=content_type)
        explained = post(client, "/explain", content=content, content_type=content_type)
        assert 400 <= classified.status_code < 500, (name, classified.text)
        assert (explained.status_code, explained.json()) == (classified.status_code, classified.json()), name
    assert_still_serving(client)


def test_a_raw_alert_is_explained_with_its_ids_and_scores(client):
    path = ztf_fits_files()[0]
    alert = decoded(path)
    answer = post(client, "/explain", content=path.read_bytes(), content_type="application/avro")
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"]
    classified = post(client, "/classify", content=path.read_bytes(), content_type="application/avro").json()
    assert result["id"] == alert.candidate_id and result["object_id"] == alert.object_id
    assert result["survey_score"] == pytest.approx(alert.survey_score)
    assert result["score"] == pytest.approx(classified["results"][0]["score"], abs=1e-6)
    assert result["model"] == classified["results"][0]["model"]
    (occlusion,) = result["methods"]
    assert occlusion["method"] == "occlusion" and occlusion["parameters"]["window"] == 5
    maps = {name: np.array(m) for name, m in occlusion["attributions"].items()}
    assert set(maps) == {"template", "science", "difference"}
    assert all(m.shape == (31, 31) and np.isfinite(m).all() for m in maps.values())
    assert any(np.abs(m).max() > 0 for m in maps.values())


def test_json_stamps_of_several_surveys_are_explained_in_order(client):
    body = good_request("ztf")
    body["candidates"].append({**candidate_json(decoded(rubin_files()[0]), "fits"), "survey": "rubin"})
    answer = post(client, "/explain?window=3&stride=3", json_body=body)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["survey"] for r in results] == ["ztf", "rubin"]
    assert results[1]["methods"][0]["parameters"] == {"window": 3, "stride": 3, "baseline": "median"}


def test_a_png_is_answered_for_one_candidate(client):
    pytest.importorskip("matplotlib", reason="PNG pictures need the explain extra (matplotlib)")
    answer = post(client, "/explain", json_body=good_request(), headers={"accept": "image/png"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png" and answer.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_png_of_several_candidates_is_refused(client):
    body = good_request()
    body["candidates"] *= 2
    answer = post(client, "/explain", json_body=body, headers={"accept": "image/png"})
    assert answer.status_code == 422 and "one candidate" in answer.json()["detail"]


def test_more_candidates_than_explained_at_once_are_refused():
    body = good_request()
    body["candidates"] *= MAX_EXPLAIN_CANDIDATES + 1
    with make_client(max_candidates=MAX_EXPLAIN_CANDIDATES + 5, max_body_bytes=32_000_000) as c:
        answer = post(c, "/explain", json_body=body)
    assert answer.status_code == 413 and f"at most {MAX_EXPLAIN_CANDIDATES}" in answer.json()["detail"]


@pytest.mark.parametrize("query, needle", [("method=lime", "method"), ("window=0", "window"),
                                           ("steps=1", "steps"), ("occlusion_baseline=mean", "occlusion_baseline")])
def test_bad_parameters_are_refused(client, query, needle):
    answer = post(client, f"/explain?{query}", json_body=good_request())
    assert answer.status_code == 422 and needle in answer.json()["detail"], answer.text


def test_a_window_larger_than_the_stamp_is_refused(client):
    answer = post(client, "/explain?window=40", json_body=good_request())
    assert answer.status_code == 422 and "larger than the 31-pixel stamp" in answer.json()["detail"], answer.text


def test_gradient_methods_without_weights_say_so(tmp_path):
    """A model shipped without its torch weights: a clear 422, never another method's answer."""
    from service.score.model import Scorer, models_dir

    folder = tmp_path / "ztf"
    folder.mkdir()
    for name in ("model.onnx", "model_card.json"):
        (folder / name).write_bytes((models_dir() / "ztf" / name).read_bytes())
    with make_client({"ztf": Scorer(folder, device="cpu")}) as c:
        answer = post(c, "/explain?method=saliency", json_body=good_request())
    assert answer.status_code == 422, answer.text
    assert "weights.pt" in answer.json()["detail"] or "torch" in answer.json()["detail"]


def test_the_token_protects_explain():
    with make_client(auth=TokenAuth(token="s3cret")) as c:
        assert post(c, "/explain", json_body=good_request()).status_code == 401
        answer = post(c, "/explain", json_body=good_request(), headers={"authorization": "Bearer s3cret"})
        assert answer.status_code == 200, answer.text


def test_classify_is_answered_while_an_explanation_runs():
    """An explanation runs off the event loop: a /classify sent after a long /explain is answered
    while the explanation is still running (were it on the loop, /classify would wait for it)."""
    import asyncio

    import httpx

    from api_support import real_scorers
    from service.api.app import ApiSettings, create_app

    app = create_app(real_scorers(), ApiSettings(), auth=TokenAuth())
    body = good_request()
    body["candidates"] *= 4  # window 3, stride 1: ~10,000 occluded stamps

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
            explaining = asyncio.create_task(client.post("/explain?window=3&stride=1", json=body))
            await asyncio.sleep(0.2)  # let the explanation start
            classified = await client.post("/classify", json=good_request())
            still_running = not explaining.done()
            explained = await explaining
        return classified, still_running, explained

    classified, still_running, explained = asyncio.run(scenario())
    assert classified.status_code == 200 and still_running
    assert explained.status_code == 200 and len(explained.json()["results"]) == 4
