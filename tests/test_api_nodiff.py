"""``POST /classify`` and ``GET /model`` with a fallback model without the difference image."""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("torch")

from api_support import candidate_json, decoded, make_client, real_scorers  # noqa: E402
from conftest import ztf_fits_files  # noqa: E402
from nodiff_support import WAYS, all_nan_fits_gz, nodiff_model, ztf_without_difference  # noqa: E402

RAW = {"content-type": "application/avro"}


@pytest.fixture(scope="module")
def nodiff_path(tmp_path_factory):
    return nodiff_model(tmp_path_factory.mktemp("nodiff") / "ztf-nodiff")


@pytest.fixture(scope="module")
def with_fallback(nodiff_path):
    with make_client(nodiff_model_paths={"ztf": str(nodiff_path)}) as client:
        yield client


@pytest.fixture(scope="module")
def without_fallback():
    with make_client() as client:
        yield client


@pytest.mark.parametrize("how", WAYS)
def test_a_raw_alert_without_a_usable_difference_is_scored_by_the_fallback(with_fallback, how):
    response = with_fallback.post("/classify", content=ztf_without_difference(how), headers=RAW)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["model"] == "nodiff-test" and result["model_inputs"] == ["template", "science"]
    assert result["id"] == decoded(ztf_fits_files()[0]).candidate_id and 0.0 <= result["score"] <= 1.0
    whole = with_fallback.post("/classify", content=ztf_fits_files()[0].read_bytes(), headers=RAW).json()
    assert whole["results"][0]["model"] == real_scorers()["ztf"].card.name
    assert whole["results"][0]["model_inputs"] == ["template", "science", "difference"]


@pytest.mark.parametrize("how", WAYS)
def test_without_a_fallback_a_raw_alert_without_a_difference_is_refused(without_fallback, how):
    response = without_fallback.post("/classify", content=ztf_without_difference(how), headers=RAW)
    assert response.status_code == 422
    assert "cutoutDifference" in response.json()["detail"] or "'difference'" in response.json()["detail"]


def test_a_json_candidate_without_a_difference_is_scored_by_the_fallback(with_fallback, without_fallback):
    alert = decoded(ztf_fits_files()[0])
    body = {"candidates": [candidate_json(alert, "fits_gz", names=("template", "science"))]}
    response = with_fallback.post("/classify", json=body)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["model"] == "nodiff-test" and result["model_inputs"] == ["template", "science"]
    refused = without_fallback.post("/classify", json=body)
    assert refused.status_code == 422 and "difference" in refused.json()["detail"]
    # An all-masked difference: the same fallback, the same score.
    body["candidates"][0]["difference"] = base64.b64encode(all_nan_fits_gz()).decode()
    masked = with_fallback.post("/classify", json=body)
    assert masked.status_code == 200, masked.text
    assert masked.json()["results"][0]["score"] == pytest.approx(result["score"], abs=1e-6)
    assert without_fallback.post("/classify", json=body).status_code == 422


def test_model_says_which_inputs_each_model_takes(with_fallback, without_fallback):
    body = with_fallback.get("/model").json()
    assert body["inputs"]["ztf"] == ["template", "science", "difference"]
    assert body["fallbacks"]["ztf"]["name"] == "nodiff-test"
    assert body["fallback_inputs"] == {"ztf": ["template", "science"]}
    assert without_fallback.get("/model").json()["fallbacks"] == {}


def test_a_fallback_that_takes_the_difference_stops_the_api_from_starting(default_models_dir):
    from service.score.model import ModelError

    with pytest.raises(ModelError, match="takes the difference image"):
        make_client(nodiff_model_paths={"ztf": str(default_models_dir / "ztf")})


@pytest.fixture
def default_models_dir():
    from service.score.model import models_dir

    return models_dir()
