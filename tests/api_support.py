"""Helpers of the API tests: the real models, an app around them, candidates from real alerts."""

from __future__ import annotations

import base64
import functools
import gzip
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from conftest import rubin_files, ztf_fits_files
from service.decode.alerts import NEGATIVE_DETECTION, decode_message
from service.surveys import CUTOUT_FIELDS
from service.api.app import ApiSettings, create_app
from service.api.auth import TokenAuth
from service.score.model import load_scorers


@functools.lru_cache(maxsize=None)
def real_scorers() -> dict:
    """The default models (models/ztf, models/rubin, or $RBSTREAM_MODELS_DIR), on CPU, loaded once."""
    return load_scorers(device="cpu")


#: Limits small enough for the error tables to reach with a few real alerts.
SMALL_LIMITS = {"max_candidates": 5, "max_body_bytes": 600_000}


def make_client(scorers=None, auth: TokenAuth | None = None, readiness_checks=(), **settings) -> TestClient:
    """A TestClient of a fresh app; ``settings`` are `ApiSettings` fields. No token unless ``auth`` says so."""
    app = create_app(scorers if scorers is not None else real_scorers(), ApiSettings(**settings),
                     readiness_checks=readiness_checks, auth=auth or TokenAuth())
    return TestClient(app)


def decoded(path: Path):
    """The one alert of a sample file."""
    (alert,) = decode_message(path.read_bytes())
    return alert


def cutout_bytes(alert, name: str) -> bytes:
    """The cutout's bytes exactly as the alert carries them (gzip FITS for ZTF, FITS for Rubin)."""
    value = alert.record[CUTOUT_FIELDS[name]]
    return value["stampData"] if isinstance(value, dict) else value


def candidate_json(alert, form: str, names=("science", "template", "difference")) -> dict:
    """A JSON candidate holding the alert's cutouts as ``array``, ``fits`` (plain) or ``fits_gz``."""
    candidate = {"id": str(alert.candidate_id)}
    for name in names:
        if form == "array":
            # NaN is not JSON; null is the API's missing pixel.
            image = alert.images[name]
            candidate[name] = [[None if not np.isfinite(v) else float(v) for v in row] for row in image]
        else:
            data = cutout_bytes(alert, name)
            plain = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
            data = gzip.compress(plain) if form == "fits_gz" else plain
            candidate[name] = base64.b64encode(data).decode()
    if alert.centre is not None:
        candidate["centre"] = list(alert.centre)
    if form != "array" and alert.survey == "ztf" and str(alert.record["candidate"]["isdiffpos"]) in NEGATIVE_DETECTION:
        candidate["negative_difference"] = True  # the cutout's own pixels: template - science
    return candidate


def science_array() -> list:
    """A real 63x63 ZTF science cutout as a JSON array (null for missing pixels)."""
    return candidate_json(decoded(ztf_fits_files()[0]), "array")["science"]


def good_request(survey: str = "ztf") -> dict:
    """A valid request made from the first sample alert of ``survey``."""
    path = (ztf_fits_files() if survey == "ztf" else rubin_files())[0]
    return {"survey": survey, "candidates": [candidate_json(decoded(path), "fits_gz")]}


def assert_still_serving(client: TestClient) -> None:
    """The server answers a valid request after a refused one."""
    response = client.post("/classify", json=good_request())
    assert response.status_code == 200, response.text
    assert 0.0 <= response.json()["results"][0]["score"] <= 1.0


def two_channel_model(folder: Path, size: int = 31):
    """A real ONNX model of two channels (template, science), with its card, loaded as a Scorer.

    The graph is small on purpose (mean of tanh-compressed finite pixels, through a
    sigmoid): what matters here is its input, ``[N, 2, size, size]``.
    """
    import json

    import onnx
    from onnx import TensorProto, helper

    from service.contract import NORMALISATION, ONNX_INPUT, ONNX_OUTPUT
    from service.score.model import Scorer

    stamps = helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["N", 2, size, size])
    score = helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["N"])
    constants = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                 helper.make_tensor("scale", TensorProto.FLOAT, [], [0.01]),
                 helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])]
    nodes = [helper.make_node("IsNaN", [ONNX_INPUT], ["nan"]),
             helper.make_node("IsInf", [ONNX_INPUT], ["infinite"]),
             helper.make_node("Or", ["nan", "infinite"], ["masked"]),
             helper.make_node("Where", ["masked", "zero", ONNX_INPUT], ["clean"]),
             helper.make_node("Mul", ["clean", "scale"], ["scaled"]),
             helper.make_node("Tanh", ["scaled"], ["squashed"]),
             helper.make_node("ReduceMean", ["squashed", "axes"], ["mean"], keepdims=0),
             helper.make_node("Sigmoid", ["mean"], [ONNX_OUTPUT])]
    graph = helper.make_graph(nodes, "two_channel", [stamps], [score], initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    card = {"name": "two-channel-test", "version": "0", "survey": "ztf", "threshold": 0.5,
            "input": {"channels": ["template", "science"], "size": size, "normalisation": NORMALISATION}}
    (folder / "model_card.json").write_text(json.dumps(card))
    return Scorer(folder, device="cpu")
