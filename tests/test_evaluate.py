"""`rbstream evaluate` and the labelled real alerts it reads (`training.real`), on the shared real alerts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import EYE_LABELS, MODELS_DIR, REAL_DATA, REPO, strict_json
from service.score.card import ModelCard
from training import real
from training.evaluate import REFERENCE_BINS

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

RBSTREAM = [sys.executable, "-m", "service.cli"]


@pytest.fixture(scope="module")
def rubin_alerts():
    alerts, failures = real.read_alerts(real.alert_files(REAL_DATA / "rubin"))
    assert not failures
    return alerts


def test_object_split_is_stable_and_keeps_each_object_in_one_split(rubin_alerts):
    splits = real.by_split(rubin_alerts)
    objects = {name: {a.object_id for a in group} for name, group in splits.items()}
    assert not objects["train"] & objects["test"] and not objects["valid"] & objects["test"]
    assert not objects["train"] & objects["valid"]
    assert sum(len(g) for g in splits.values()) == len(rubin_alerts)
    # a hash of the id alone: the same answer whatever else is in the set
    assert real.by_split(rubin_alerts[::-1])["test"] == splits["test"][::-1]
    shares = [real.object_split("ztf", f"ZTF{i:08d}") for i in range(4000)]
    assert abs(shares.count("test") / 4000 - 0.15) < 0.03


def test_csv_labels_take_precedence_over_survey_scores_and_unsure_is_no_label(tmp_path, rubin_alerts):
    a, b, c = rubin_alerts[:3]
    (tmp_path / "labels.csv").write_text(f"diaSourceId,label,family\n{a.candidate_id},bogus,ghost\n"
                                         f"{b.candidate_id},unsure,\n")
    table = real.read_label_table(tmp_path / "labels.csv")
    real.assign_labels([a, b, c], [table], ["reliability"], (0.5, 0.5))
    assert (a.label, a.label_source, a.family) == (0, "labels.csv", "ghost")
    for alert in (b, c):  # unsure in the CSV, or not in it: the survey's score decides
        assert alert.label == int(alert.survey_scores["reliability"] >= 0.5) and alert.label_source == "reliability"
    real.assign_labels([b], [table])
    assert b.label is None and b.label_source is None


def test_a_labels_csv_can_name_files_instead_of_ids(tmp_path, rubin_alerts):
    alert = rubin_alerts[0]
    (tmp_path / "labels.csv").write_text(f"file,label\nrubin/{alert.file.name},real\n")
    real.assign_labels([alert], [real.read_label_table(tmp_path / "labels.csv")])
    assert alert.label == 1


def test_bad_labels_are_refused_with_the_line(tmp_path):
    (tmp_path / "labels.csv").write_text("candid,label\n1,real\n2,maybe\n")
    with pytest.raises(real.LabelError, match="labels.csv:3: label 'maybe'"):
        real.read_label_table(tmp_path / "labels.csv")


def ztf_alert_folder(folder: Path, n: int) -> list[Path]:
    """``folder`` holding copies of the first ``n`` shared real ZTF alerts; returns the originals."""
    folder.mkdir(exist_ok=True)
    files = sorted((REAL_DATA / "ztf").glob("*.avro"))[:n]
    for path in files:
        (folder / path.name).write_bytes(path.read_bytes())
    return files


def test_evaluate_writes_the_report_and_plots_with_the_survey_score_beside_ours(tmp_path):
    """ZTF alerts labelled by drb, plus an undecodable file that is counted with its reason."""
    folder = tmp_path / "alerts"
    files = ztf_alert_folder(folder, 120)
    (folder / "broken.avro").write_bytes(b"Obj\x01 not an alert")
    out = tmp_path / "report"
    result = subprocess.run(RBSTREAM + ["evaluate", str(folder), "--labels", "none", "--label-from", "drb",
                                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = strict_json((out / "report.json").read_text())
    assert report["files"] == len(files) + 1 and report["undecodable"] == 1
    assert report["undecodable_examples"][0][0] == "broken.avro"
    ztf = report["surveys"]["ztf"]
    assert ztf["model"]["name"] == ModelCard.read(MODELS_DIR / "ztf" / "model_card.json").name
    # the numbers are those of scikit-learn on the same scores and drb labels
    from sklearn.metrics import brier_score_loss, roc_auc_score

    from service.score.model import Scorer

    alerts, _ = real.read_alerts(files)
    labelled = [a for a in alerts if "drb" in a.survey_scores]
    labels = np.array([a.survey_scores["drb"] >= 0.5 for a in labelled])
    scorer = Scorer(MODELS_DIR / "ztf", device="cpu")
    scores = scorer.score(real.stamps(labelled, scorer.contract)[0])
    assert ztf["n_labelled"] == len(labelled)
    assert ztf["ours"]["roc_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert ztf["ours"]["brier"] == pytest.approx(brier_score_loss(labels, scores), abs=1e-6)
    low, high = ztf["ours"]["roc_auc_interval"]
    assert low < ztf["ours"]["roc_auc"] < high, "a real-alert AUC comes with its bootstrap interval"
    low, high = ztf["ours"]["ece_interval"]
    assert 0 <= low < high <= 1, "and so does its ECE"
    assert f"{ztf['ours']['ece']:.3f} ({low:.2f}–{high:.2f})" in (out / "report.md").read_text()
    assert ztf["survey_scores"]["rb"]["theirs"]["n"] == len(labelled)
    assert ztf["survey_scores"]["rb"]["ours_on_same"]["accuracy"] == pytest.approx(
        np.mean((scores >= scorer.threshold) == labels), abs=1e-9)
    assert "drb" not in ztf["survey_scores"], "drb gave every label: judging it by itself means nothing"
    for name in ("roc_ztf.png", "reliability_ztf.png", "histogram_ztf.png", "disagreements_ztf.png", "report.md"):
        assert (out / name).stat().st_size > 1000, name
    assert "rb (survey)" in (out / "report.md").read_text()


def test_metrics_that_one_class_leaves_undefined_are_null_in_the_report(tmp_path):
    from training.evaluate import evaluate

    folder = tmp_path / "alerts"
    files = ztf_alert_folder(folder, 6)
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{p.name},real\n" for p in files))
    evaluate([folder], tmp_path / "report", label_tables=[tmp_path / "labels.csv"], label_from=())
    ours = strict_json((tmp_path / "report" / "report.json").read_text())["surveys"]["ztf"]["ours"]
    assert ours["n_bogus"] == 0 and ours["roc_auc"] is None and ours["fpr"] is None
    assert ours["accuracy"] is not None


def test_evaluate_on_the_held_out_rubin_split_uses_the_eye_labels(tmp_path, rubin_alerts):
    from training.evaluate import evaluate, held_out

    report = evaluate([REAL_DATA / "rubin"], tmp_path, label_tables=[EYE_LABELS], label_from=(), split="test")
    rubin = report["surveys"]["rubin"]
    holdout = held_out(MODELS_DIR / "rubin", None)  # the shares the shipped model was trained with
    assert rubin["holdout"] == list(holdout)
    test = real.by_split(rubin_alerts, holdout)["test"]
    table = real.read_label_table(EYE_LABELS)
    expected = [table.get(a) for a in test]
    assert rubin["n_alerts"] == len(test)
    assert rubin["n_labelled"] == sum(1 for e in expected if e is not None and e[0] is not None)
    assert set(rubin["label_sources"]) == {"eye_labels.csv"}
    bogus = sum(1 for e in expected if e is not None and e[0] == 0)
    assert sum(v["n"] for v in rubin["scored_real_by_family"].values()) == bogus


ZTF_MODELS = ("ztf", "ztf-nodiff")
SYNTHETIC = 48


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    """One run of the command: the triplet and the no-diff ZTF model on 60 real ZTF alerts labelled
    by drb, and on SYNTHETIC simulated triplets."""
    folder = tmp_path_factory.mktemp("side-by-side")
    files = ztf_alert_folder(folder, 60)
    out = folder / "report"
    models = [arg for name in ZTF_MODELS for arg in ("--model", str(MODELS_DIR / name))]
    result = subprocess.run(RBSTREAM + ["evaluate", str(folder), "--labels", "none", "--label-from", "drb", *models,
                                        "--synthetic", str(SYNTHETIC), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return files, out, strict_json((out / "report.json").read_text())["surveys"]["ztf"]


def test_two_models_of_one_survey_are_judged_on_the_same_alerts(side_by_side):
    from sklearn.metrics import brier_score_loss, roc_auc_score

    from service.score.model import Scorer

    files, out, ztf = side_by_side
    assert list(ztf["models"]) == list(ZTF_MODELS)
    alerts, _ = real.read_alerts(files)
    labelled = [a for a in alerts if "drb" in a.survey_scores]
    labels = np.array([a.survey_scores["drb"] >= 0.5 for a in labelled])
    for name in ZTF_MODELS:
        entry = ztf["models"][name]
        assert entry["model"]["name"] == json.loads((MODELS_DIR / name / "model_card.json").read_text())["name"]
        assert entry["n_alerts"] == ztf["n_alerts"] and entry["ours"]["n"] == ztf["n_labelled"] == len(labelled)
        assert entry["survey_scores"]["rb"]["ours_on_same"]["n"] == ztf["survey_scores"]["rb"]["theirs"]["n"]
        scorer = Scorer(MODELS_DIR / name, device="cpu")
        scores = scorer.score(real.stamps(labelled, scorer.contract)[0])
        assert entry["ours"]["roc_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6), name
        assert entry["ours"]["brier"] == pytest.approx(brier_score_loss(labels, scores), abs=1e-6), name
    # one-model readers find the first model where they always did
    assert ztf["model"] == ztf["models"]["ztf"]["model"] and ztf["ours"] == ztf["models"]["ztf"]["ours"]
    # two good models can rank 60 alerts alike, but their scores (and so their Brier) still differ
    assert ztf["models"]["ztf"]["ours"]["brier"] != ztf["models"]["ztf-nodiff"]["ours"]["brier"]
    summary = (out / "report.md").read_text()
    for row in ("| `ztf` (rbstream-ztf ", "| `ztf-nodiff` (rbstream-ztf-nodiff ", "| rb (survey)"):
        assert row in summary, row
    assert (out / "roc_ztf.png").stat().st_size > 1000


def test_models_sharing_a_folder_name_and_card_are_numbered_each(tmp_path):
    from types import SimpleNamespace

    from training.evaluate import model_labels

    old, new, other = (SimpleNamespace(name="rbstream-ztf", version=v) for v in ("2.0.0", "2.0.0", "2.1.0"))
    paths = [Path("models/ztf"), tmp_path / "ztf", tmp_path / "b" / "ztf", Path("models/rubin")]
    assert model_labels(paths, [old, new, other, old]) == [
        "ztf (rbstream-ztf 2.0.0) #1", "ztf (rbstream-ztf 2.0.0) #2", "ztf (rbstream-ztf 2.1.0)", "rubin"]


def test_synthetic_triplets_are_the_cards_test_set_and_each_model_gets_only_its_channels(side_by_side):
    """The simulated stamps are those training draws for the test split (its config and seed), and
    the no-diff model was given their template and science alone: its scores are those of its
    own Scorer on exactly those images."""
    pytest.importorskip("torch")
    from service.score.model import Scorer
    from training.config import from_dict
    from training.data import SPLITS, _simulate
    from training.report import metrics

    _, out, ztf = side_by_side
    assert ztf["synthetic"]["n"] == SYNTHETIC and ztf["synthetic"]["survey_scores"] is None
    saved = np.load(out / "synthetic_scores_ztf.npz")
    assert list(saved["models"]) == list(ZTF_MODELS)
    for k, name in enumerate(ZTF_MODELS):
        scorer = Scorer(MODELS_DIR / name, device="cpu")
        config = from_dict(_without_unset(scorer.card.config))
        drawn = _simulate(config, scorer.contract, SYNTHETIC, seed=config.seed * 10 + SPLITS.index("test"))
        assert drawn.stamps.shape[1] == len(scorer.contract.raw_inputs)
        np.testing.assert_array_equal(saved["labels"], drawn.labels)
        np.testing.assert_allclose(saved["scores"][k], scorer.score(drawn.stamps), atol=1e-6)
        expected = metrics(drawn.labels, saved["scores"][k], scorer.threshold, drawn.kinds)
        for key in ("n", "roc_auc", "accuracy", "fpr", "fnr", "fpr_at_fnr_5pct", "ece", "accuracy_by_kind"):
            assert ztf["models"][name]["synthetic"][key] == pytest.approx(expected[key]), (name, key)
    assert scorer.contract.raw_inputs == ("template", "science")
    summary = (out / "report.md").read_text()
    assert "no score on simulated alerts" in summary and (out / "roc_synthetic_ztf.png").stat().st_size > 1000


def _without_unset(raw: dict) -> dict:
    """A card's config as a config file would give it: unset (None) keys left out, so defaults apply."""
    return {k: _without_unset(v) if isinstance(v, dict) else v for k, v in raw.items() if v is not None}


def test_models_trained_on_different_splits_are_refused(tmp_path):
    """Their held-out objects differ, so no one test split is fair to both."""
    from training.evaluate import EvaluateError, evaluate

    other = tmp_path / "ztf-other-split"
    other.mkdir()
    (other / "model.onnx").write_bytes((MODELS_DIR / "ztf-nodiff" / "model.onnx").read_bytes())
    card = json.loads((MODELS_DIR / "ztf-nodiff" / "model_card.json").read_text())
    card["data"]["holdout"] = [0.3, 0.3]
    (other / "model_card.json").write_text(json.dumps(card))
    files = sorted((REAL_DATA / "ztf").glob("*.avro"))[:5]
    with pytest.raises(EvaluateError, match="different holdouts"):
        evaluate(files, models={"ztf": [MODELS_DIR / "ztf", other]}, label_from=("drb",), split="test")
    evaluate(files, models={"ztf": [MODELS_DIR / "ztf", other]}, label_from=("drb",), split="test",
             holdout=(0.15, 0.15))


def test_write_reference_puts_the_models_scores_on_the_alerts_into_its_card(tmp_path):
    """``--write-reference``: a card without ``real_validation`` gets one, made of this model's scores
    on the evaluated alerts (histogram of all, ROC of the labelled); the rest of the card is kept."""
    import shutil

    from service.score.card import CARD_FILE
    from service.score.model import Scorer

    model = tmp_path / "ztf"
    shutil.copytree(MODELS_DIR / "ztf", model)
    card = json.loads((model / CARD_FILE).read_text())
    del card["real_validation"]
    (model / CARD_FILE).write_text(json.dumps(card, indent=2))
    assert ModelCard.read(model / CARD_FILE).real_validation is None
    files = sorted(real.alert_files(REAL_DATA / "ztf"))[:40]
    listing = tmp_path / "alerts.csv"
    listing.write_text("file\n" + "\n".join(str(f) for f in files) + "\n")
    done = subprocess.run([*RBSTREAM, "evaluate", str(listing), "--model", str(model), "--labels", "none",
                           "--write-reference", "--out", str(tmp_path / "report")],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    written = ModelCard.read(model / CARD_FILE)
    reference = written.real_validation
    alerts, _ = real.read_alerts(files)
    scorer = Scorer(MODELS_DIR / "ztf", device="cpu")
    scores = scorer.score(real.stamps(alerts, scorer.contract)[0])
    assert reference.n == len(scores) and sum(reference.score_histogram.counts) == len(scores)
    assert reference.score_histogram.edges == np.linspace(0, 1, REFERENCE_BINS + 1).tolist()
    assert reference.score_histogram.counts == np.histogram(scores, bins=REFERENCE_BINS, range=(0, 1))[0].tolist()
    assert reference.roc is not None and reference.n_labelled == sum("drb" in a.survey_scores for a in alerts)
    original = ModelCard.read(MODELS_DIR / "ztf" / CARD_FILE).to_dict()
    restored = written.extended({"real_validation": original["real_validation"]}).to_dict()
    assert restored == original  # nothing but real_validation changed
