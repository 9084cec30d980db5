"""Temperature calibration: the fit, and the temperature inside the exported ONNX graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.contract import StampContract  # noqa: E402
from service.score.model import Scorer  # noqa: E402
from training.calibrate import CalibrationError, calibrate, fit_temperature, sigmoid  # noqa: E402
from training.export import export_onnx  # noqa: E402
from training.model import ARCHITECTURES, ArchConfig, RealBogusNet  # noqa: E402


def test_the_fit_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 4.0, 20000)
    labels = rng.random(20000) < sigmoid(logits, 2.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_calibration_lowers_the_ece_of_overconfident_scores():
    rng = np.random.default_rng(4)
    logits = rng.normal(0.0, 4.0, 5000)
    labels = (rng.random(5000) < sigmoid(logits, 3.0)).astype(int)
    summary = calibrate(logits, labels, "a test population")
    assert summary["ece_after"] < summary["ece_before"] / 2 and summary["fitted_on"] == "a test population"


def test_one_class_or_a_backwards_model_cannot_be_calibrated():
    with pytest.raises(CalibrationError, match="one class"):
        fit_temperature(np.array([0.1, 2.0, 3.0]), np.array([1, 1, 1]))
    with pytest.raises(CalibrationError, match="backwards"):
        fit_temperature(np.array([-3.0, -2.0, 2.0, 3.0]), np.array([1, 1, 0, 0]))


def test_the_exported_graph_divides_the_logits_by_the_temperature(tmp_path):
    contract = StampContract(size=16)
    torch.manual_seed(0)
    net = RealBogusNet(contract, ArchConfig(**ARCHITECTURES["tiny"])).eval()
    stamps = np.random.default_rng(5).normal(0, 1, (8, *contract.input_shape)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(stamps)).numpy()
    (tmp_path / "model_card.json").write_text(
        '{"name": "t", "version": "1", "survey": "ztf", "threshold": 0.5, "input": %s}'
        % json.dumps(contract.to_dict()))
    export_onnx(net, tmp_path / "model.onnx", stamps, temperature=3.0)
    scores = Scorer(tmp_path, device="cpu").score(stamps)
    np.testing.assert_allclose(scores, sigmoid(logits, 3.0), atol=1e-5)
