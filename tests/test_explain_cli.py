"""``rbstream explain``: a PNG and an .npz per real alert, an index page for a folder, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import ztf_fits_files
from explain_support import tiny_model
from service.cli import main

pytest.importorskip("matplotlib", reason="the pictures need the explain extra (matplotlib)")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model") / "ztf")


def test_a_folder_gets_pictures_arrays_and_an_index(tmp_path, model):
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    for path in ztf_fits_files()[:2]:
        shutil.copy(path, alerts / path.name)
    out = tmp_path / "out"
    code = main(["explain", str(alerts), "--method", "all", "--out", str(out), "--model-ztf", str(model.path.parent)])
    assert code == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    index = (out / "index.html").read_text()
    assert all(p.name in index for p in pngs)
    with np.load(sorted(out.glob("*.npz"))[0]) as arrays:
        assert list(arrays["channels"]) == ["template", "science", "difference"]
        for key in ("occlusion", "saliency", "integrated_gradients"):
            assert arrays[key].shape == arrays["stamp"].shape == (3, 21, 21)
        assert abs(float(arrays["integrated_gradients_completeness_error"])) < 1.0
        meta = json.loads(str(arrays["meta"]))
        assert meta["survey_score_name"] in ("drb", "rb") and meta["score"] is not None
        assert str(arrays["model"]) == model.card.name


def test_gradient_methods_without_weights_stop_with_the_reason(tmp_path, model, caplog):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for name in ("model.onnx", "model_card.json"):
        shutil.copy(model.path.parent / name, folder / name)
    code = main(["explain", str(ztf_fits_files()[0]), "--method", "saliency", "--out", str(tmp_path / "out"),
                 "--model-ztf", str(folder)])
    assert code == 2
    assert "weights.pt" in caplog.text
    assert not list((tmp_path / "out").glob("*.png"))


def test_an_undecodable_file_is_reported_and_the_rest_explained(tmp_path, model, caplog):
    bad = tmp_path / "bad.avro"
    bad.write_bytes(b"not an alert")
    out = tmp_path / "out"
    code = main(["explain", str(bad), str(ztf_fits_files()[0]), "--out", str(out), "--model-ztf",
                 str(model.path.parent)])
    assert code == 1
    assert "bad.avro" in caplog.text
    assert len(list(out.glob("*.png"))) == 1
