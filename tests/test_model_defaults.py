"""The committed default models (models/ztf, models/rubin): loadable by the service,
complete cards, within size, rotation invariant and NaN-safe, on random and real stamps."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EYE_LABELS, MODELS_DIR, REAL_DATA, rubin_files, strict_json, ztf_fits_files
from service.decode.alerts import decode_message
from service.contract import ONNX_INPUT, StampContract, assemble
from service.score.model import Scorer

SURVEYS = ("ztf", "rubin")
#: What training writes into a default model's card besides identity, threshold and contract.
CARD_SECTIONS = ("created", "git_commit", "output", "architecture", "data", "training", "test_metrics",
                 "verification", "inference", "calibration", "config", "real_test", "synthetic_test",
                 "real_validation")


#: The shipped model folders: each survey's triplet model and its no-difference-image model.
DEFAULT_MODELS = SURVEYS + tuple(f"{s}-nodiff" for s in SURVEYS)


@pytest.fixture(scope="module", params=DEFAULT_MODELS)
def scorer(request):
    return Scorer(MODELS_DIR / request.param, device="cpu")


def real_stamps(survey: str, contract: StampContract) -> np.ndarray:
    files = ztf_fits_files() if survey == "ztf" else rubin_files()
    stamps = [assemble(a.images, contract, a.centre) for f in files for a in decode_message(f.read_bytes(), survey)]
    return np.stack(stamps)


def random_stamps(n, contract, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(300.0, 15.0, (n, *contract.input_shape)).astype(np.float32)
    c = contract.size // 2
    x[:, :, c - 1:c + 2, c:c + 3] += rng.uniform(0, 400, (n, 1, 1, 1)).astype(np.float32)
    x[::3, :, :, :5] = np.nan
    return x


def test_card_and_files(scorer):
    """The card is complete, any JSON reader reads it, and the graph takes the input its contract names."""
    folder = scorer.path.parent
    strict_json((folder / "model_card.json").read_text())
    card = scorer.card
    for section in CARD_SECTIONS:
        assert getattr(card, section) is not None, section
    assert folder.name in (card.survey, f"{card.survey}-nodiff")
    (graph_input,) = scorer.session.get_inputs()
    assert graph_input.name == ONNX_INPUT and graph_input.shape[1:] == list(card.contract.input_shape)
    assert folder.name.endswith("-nodiff") == ("difference" not in card.contract.raw_inputs)
    assert (folder / "model.onnx").stat().st_size <= 5_000_000
    for png in ("history.png", "roc.png", "det.png", "real_roc.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    assert scorer.contract.size in (29, 31)


def test_the_card_states_the_calibration_and_size_of_the_shipped_graph(scorer):
    """Measured on the shipped weights: the ONNX scores are the torch logits divided by the
    card's temperature, and the network has as many parameters as the card says."""
    torch = pytest.importorskip("torch")
    from training.calibrate import sigmoid
    from training.model import count_parameters, load_weights

    graph = load_weights(scorer.path.parent / "weights.pt")
    stamps = real_stamps(scorer.card.survey, scorer.contract)
    with torch.no_grad():
        logits = graph.net(torch.from_numpy(stamps)).numpy()
    assert scorer.card.calibration.method == "temperature"
    np.testing.assert_allclose(scorer.score(stamps), sigmoid(logits, scorer.card.calibration.temperature), atol=1e-5)
    assert count_parameters(graph.net) == scorer.card.training.parameters


def test_the_default_models_are_trained_without_rubins_reliability_as_a_label():
    """Rubin's reliability is not a label: the shipped adaptation configs do not use it."""
    from training.config import adaptation_config, load_config

    for name in DEFAULT_MODELS:
        assert "reliability" not in load_config(adaptation_config(name)).table("data")["label_from"], name


def test_the_card_states_what_the_model_does_on_the_real_test_split(scorer):
    """The card's real-test numbers are measured again here, on the shared real alerts: a card
    that no longer describes its model (retrained, relabelled) fails."""
    pytest.importorskip("sklearn")
    from training import real
    from training.adapt import EVALUATION_THRESHOLD
    from training.evaluate import compare

    card = scorer.card
    alerts, _ = real.read_alerts(real.alert_files(REAL_DATA / card.survey))
    real.assign_labels(alerts, [real.read_label_table(EYE_LABELS)], card.data.label_from,
                       (EVALUATION_THRESHOLD, EVALUATION_THRESHOLD))
    test = real.by_split(alerts, card.holdout)["test"]
    stamps, kept, _ = real.stamps(test, scorer.contract)
    measured = compare(kept, scorer.score(stamps).astype(np.float64), scorer.threshold)
    stated = card.real_test.adapted
    assert measured["n_labelled"] == stated.n_labelled
    for key in ("roc_auc", "accuracy", "fpr", "ece"):
        assert measured["ours"][key] == pytest.approx(getattr(stated.ours, key), abs=1e-4), key


def test_rotation_invariant_and_nan_safe_on_random_stamps(scorer):
    x = random_stamps(64, scorer.contract)
    base = scorer.score(x)
    assert np.isfinite(base).all() and np.all((base >= 0) & (base <= 1))
    for k in (1, 2, 3):
        assert np.max(np.abs(scorer.score(np.rot90(x, k, (2, 3)).copy()) - base)) <= 1e-5
    x[0] = np.nan
    x[1, -1] = np.inf
    assert np.isfinite(scorer.score(x)).all()


@pytest.mark.parametrize("survey", SURVEYS)
def test_rotation_invariant_on_real_stamps(survey):
    scorer = Scorer(MODELS_DIR / survey, device="cpu")
    x = real_stamps(survey, scorer.contract)
    base = scorer.score(x)
    assert np.isfinite(base).all()
    for k in (1, 2, 3):
        assert np.max(np.abs(scorer.score(np.rot90(x, k, (2, 3)).copy()) - base)) <= 1e-5
