"""Training runs end to end on tiny configs: artefacts, resume after SIGKILL, early
stopping, fine-tuning, and every data source (simulator, chunks, braai, alert files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import EYE_LABELS, REAL_DATA, REPO, ztf_fits_files  # noqa: E402
from service.decode.alerts import decode_message  # noqa: E402
from service.contract import StampContract, assemble  # noqa: E402
from service.score.card import ModelCard  # noqa: E402
from service.score.model import Scorer  # noqa: E402
from training import real  # noqa: E402
from training.calibrate import sigmoid  # noqa: E402
from training.config import from_dict  # noqa: E402
from training.data import DataError, read_alerts, read_chunk, write_chunks  # noqa: E402
from training.evaluate import REFERENCE_BINS  # noqa: E402
from training.model import load_weights  # noqa: E402
from training.profiles import ZTF  # noqa: E402
from training.simulate import simulate  # noqa: E402
from training.train import augment, lr_factor, train  # noqa: E402

RBSTREAM = [sys.executable, "-m", "service.cli"]

TINY = {
    "name": "tiny", "survey": "ztf", "seed": 7, "arch": "tiny", "base_lr": 0.01, "n_epochs": 2,
    "batch_size": 32, "N_train": 256, "N_valid": 64, "N_test": 128, "validate_every_batches": 4,
    "savestep": 4, "ini_patience": 1000, "threads": 1, "progress": False, "input": {"size": 16},
}



def tiny(**changes):
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return from_dict(raw)


def write_toml(path: Path, raw: dict) -> Path:
    lines, tables = [], []
    for k, v in raw.items():
        (tables if isinstance(v, dict) else lines).append((k, v))
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in lines) + "\n"
    for name, table in tables:
        text += f"\n[{name}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + "\n"
    path.write_text(text)
    return path


def test_lr_policies_and_augmentation():
    c = tiny(gamma=0.5, stepsize=10, lr_policy="step")
    assert [lr_factor(c, i) for i in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    assert lr_factor(tiny(gamma=0.9, lr_policy="exp"), 2) == pytest.approx(0.81)
    assert lr_factor(tiny(gamma=0.1, power=1.0, lr_policy="inv"), 10) == pytest.approx(0.5)
    c = tiny(augment={"rot90": True, "flip": True, "shift": 2, "noise": 0.5})
    x = torch.from_numpy(simulate(ZTF, 8, seed=1)["stamps"][:, :, :16, :16].copy())
    g = torch.Generator().manual_seed(0)
    y = augment(x, c, g)
    assert y.shape == x.shape
    assert torch.isnan(y).any() and not torch.equal(torch.nan_to_num(y), torch.nan_to_num(x))
    same = augment(x, c, torch.Generator().manual_seed(0))
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(same))  # deterministic by generator


def test_end_to_end_cli_produces_every_artefact(tmp_path):
    config = write_toml(tmp_path / "tiny.toml", TINY)
    out = tmp_path / "run"
    result = subprocess.run(RBSTREAM + ["train", "--config", str(config), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout
    assert "iter" in result.stderr  # one log line per validation
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*.pt"))
    for name in ("model.onnx", "model_card.json", "history.png", "roc.png", "det.png", "history.json"):
        assert (out / name).stat().st_size > 0, name
    for png in ("history.png", "roc.png", "det.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard.read(out / "model_card.json")  # every section a run writes, each field typed
    assert None not in (card.data, card.training, card.test_metrics, card.verification, card.inference)
    assert card.data.source == "simulator" and card.data.size == {"train": 256, "valid": 64, "test": 128}
    assert card.contract.channels == ("template", "science", "difference", "snr_difference")
    # TensorBoard scalars
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "valid/loss", "valid/accuracy", "test/accuracy"} <= set(acc.Tags()["scalars"])
    # the service loads it
    scorer = Scorer(out, device="cpu")
    x = simulate(ZTF, 4, seed=99)["stamps"][:, [1, 0, 2], 8:24, 8:24]
    x = np.ascontiguousarray(x)
    assert scorer.score(x).shape == (4,)
    with torch.no_grad():
        np.testing.assert_allclose(load_weights(out / "weights.pt")(torch.from_numpy(x)).numpy(), scorer.score(x),
                                   atol=1e-5)


def test_bad_config_exits_with_a_message(tmp_path):
    config = write_toml(tmp_path / "bad.toml", {**TINY, "base_lr": -1})
    result = subprocess.run(RBSTREAM + ["train", "--config", str(config), "--out", str(tmp_path / "r")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "base_lr: bad value -1; accepted: a number > 0" in result.stderr


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    raw = {**TINY, "n_epochs": 4, "N_train": 256, "batch_size": 16, "savestep": 10, "validate_every_batches": 8,
           "augment": {"shift": 1, "noise": 0.2}, "model": {"dropout": 0.3}}
    config = write_toml(tmp_path / "resume.toml", raw)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cmd = RBSTREAM + ["train", "--config", str(config), "--no-progress"]
    done = subprocess.run(cmd + ["--out", str(whole)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]

    # the same run, killed with SIGKILL right after its second checkpoint
    proc = subprocess.Popen(cmd + ["--out", str(broken)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 200

    def saved() -> list[int]:
        return [int(p.stem.split("_")[1]) for p in (broken / "checkpoints").glob("checkpoint_*.pt")]

    while not any(i >= 20 for i in saved()):
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (broken / "model_card.json").exists()
    killed_at = max(saved())
    total = 4 * (256 // 16)
    assert 20 <= killed_at < total

    resumed = subprocess.run(cmd + ["--out", str(broken), "--resume"], cwd=REPO, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr

    a = torch.load(sorted((whole / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    b = torch.load(sorted((broken / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert a["iteration"] == b["iteration"] == total
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"] == b["history"]
    assert ModelCard.read(whole / "model_card.json").test_metrics == ModelCard.read(broken / "model_card.json").test_metrics


def test_early_stopping_stops(tmp_path):
    # patience of 8 iterations that no improvement can extend (it would need a 99% lower loss)
    config = tiny(n_epochs=50, ini_patience=8, improvement_threshold=0.01, validate_every_batches=4)
    card = train(config, tmp_path / "run")
    t = card.training
    assert t.stopped_early is True
    assert t.iterations == 8 < t.max_iterations == 50 * 8
    # a generous patience does not stop
    card = train(tiny(n_epochs=1, ini_patience=1000), tmp_path / "run2")
    assert card.training.stopped_early is False and card.training.iterations == 8


def test_fine_tuning_from_a_checkpoint_with_frozen_layers(tmp_path):
    train(tiny(n_epochs=1), tmp_path / "base")
    base = torch.load(sorted((tmp_path / "base" / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    config = tiny(n_epochs=1, seed=8, finetune={"from": str(tmp_path / "base"), "freeze": 1})
    card = train(config, tmp_path / "tuned")
    assert card.training.frozen_layers == 1 and card.training.finetuned_from
    tuned = torch.load(sorted((tmp_path / "tuned" / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    start = base["best"]["model"]
    first = [k for k in start if k.startswith("trunk.0.")]
    assert first and all(torch.equal(start[k], tuned["model"][k]) for k in first)  # frozen
    assert not torch.equal(start["output.1.weight"], tuned["model"]["output.1.weight"])  # trained


def _simulated_arrays(n, seed):
    d = simulate(ZTF, n, seed=seed)
    return d["stamps"], d["labels"], list(d["channels"])


def test_chunk_directory_and_random_sources(tmp_path):
    for split, n, seed in (("train", 96, 1), ("validate", 32, 2), ("test", 40, 3)):
        stamps, labels, channels = _simulated_arrays(n, seed)
        write_chunks(tmp_path / "chunks" / split, stamps, labels, channels, n_cand_chunk=30)
    assert len(list((tmp_path / "chunks" / "train").glob("*.npz"))) == 4
    config = tiny(n_epochs=1, path_to_chunks=str(tmp_path / "chunks"), data_interface="directory",
                  data={"source": "chunks"})
    card = train(config, tmp_path / "dir_run")
    assert card.data.source == "chunks" and card.data.size == {"train": 96, "valid": 32, "test": 40}

    stamps, labels, channels = _simulated_arrays(120, 4)
    # chunks may hold their images in any order: `channels` names axis 1
    paths = write_chunks(tmp_path / "pool", stamps[:, ::-1], labels, channels[::-1], n_cand_chunk=50)
    contract = from_dict(TINY).contract
    first = read_chunk(paths[0], contract, ["science", "template", "difference"])
    index = [channels.index(c) for c in contract.raw_inputs]
    np.testing.assert_array_equal(first.stamps[:, :, 0], stamps[:50, index, 8, 8:24])
    config = tiny(n_epochs=1, path_to_chunks=str(tmp_path / "pool"), data_interface="random", N_valid=20,
                  N_test=30, data={"source": "chunks"})
    card = train(config, tmp_path / "random_run")
    assert card.data.size == {"train": 70, "valid": 20, "test": 30}

    np.savez(tmp_path / "pool" / "broken.npz", stamps=stamps[:3])
    with pytest.raises(DataError, match="'stamps' and 'labels'"):
        train(config, tmp_path / "broken_run")


def test_braai_source(tmp_path):
    stamps, labels, channels = _simulated_arrays(90, 5)
    # braai layout: [n, 63, 63, 3] channels last (science, reference, difference); pad 31 -> 63 with noise
    big = np.random.default_rng(0).normal(0, 1, (90, 63, 63, 3)).astype(np.float32)
    big[:, 16:47, 16:47, :] = np.moveaxis(stamps, 1, -1)
    np.save(tmp_path / "triplets.npy", big)
    (tmp_path / "labels.csv").write_text("candid,label\n" + "".join(f"{i},{l}\n" for i, l in enumerate(labels)))
    config = tiny(n_epochs=1, N_valid=20, N_test=20, data={"source": "braai", "triplets": str(tmp_path / "triplets.npy"),
                                                           "labels": str(tmp_path / "labels.csv")})
    card = train(config, tmp_path / "run")
    assert card.data.source == "braai" and card.data.size["train"] == 50


def test_alert_files_source_uses_the_service_decoder(tmp_path):
    """Decoding smoke test only: real alerts are never training data for the default models."""
    files = ztf_fits_files()
    labels_csv = tmp_path / "labels.csv"
    rows, ids = [], []
    for i, path in enumerate(files):
        candid = decode_message(path.read_bytes(), "ztf")[0].candidate_id
        ids.append(candid)
        rows.append(f"{candid},{'real' if i % 2 else 'bogus'}\n")
    labels_csv.write_text("candid,label\n" + "".join(rows))
    contract = StampContract(size=16)
    data = read_alerts(files, labels_csv, contract, "ztf")
    assert len(data) == len(files) and list(data.labels) == [i % 2 for i in range(len(files))]
    first = decode_message(files[0].read_bytes(), "ztf")[0]
    np.testing.assert_array_equal(data.stamps[0], assemble(first.images, contract, first.centre))
    config = tiny(n_epochs=1, N_valid=3, N_test=4, batch_size=4,
                  data={"source": "alerts", "alerts": str(files[0].parent), "labels": str(labels_csv),
                        "split": "random"})
    card = train(config, tmp_path / "run")  # the JPEG prototypes are skipped with a warning
    assert card.data.source == "alerts" and sum(card.data.size.values()) == len(files)


def test_defaults_trains_both_stages_and_publishes_each_survey(tmp_path, monkeypatch):
    """`rbstream train --defaults` (make train): per survey, a simulation run, a run fine-tuned on
    the shared real alerts, and the adapted model published with both judged side by side. The
    built-in configs are swapped for tiny ones so that this takes seconds."""
    import argparse

    import training.cli
    import training.config

    def tiny_builtin(survey):
        raw = {**TINY, "survey": survey, "name": f"tiny-{survey}", "input": {"size": 16}}
        return write_toml(tmp_path / f"{survey}.toml", raw)

    def tiny_adaptation(survey):
        data = {"source": "alerts", "alerts": str(REAL_DATA / survey), "labels": str(EYE_LABELS),
                "label_from": ["drb"] if survey == "ztf" else [], "rehearsal": 64, "balance": True}
        raw = {"base": f"{survey}.toml", "n_epochs": 1, "data": data, "export": {"calibration": "temperature"}}
        return write_toml(tmp_path / f"{survey}-adapt.toml", raw)

    monkeypatch.setattr(training.config, "builtin_config", tiny_builtin)
    monkeypatch.setattr(training.config, "adaptation_config", tiny_adaptation)
    parser = argparse.ArgumentParser()
    training.cli.add_arguments(parser)
    args = parser.parse_args(["--defaults", "--surveys", "ztf", "rubin", "--models-dir", str(tmp_path / "models"),
                              "--out", str(tmp_path / "runs")])
    assert training.cli.main(args) == 0
    for survey in ("ztf", "rubin"):
        for stage in ("simulation", "adapted"):
            assert (tmp_path / "runs" / f"default-{survey}" / stage / "checkpoints").is_dir()
        folder = tmp_path / "models" / survey
        assert {p.name for p in folder.iterdir()} == {"model.onnx", "weights.pt", "model_card.json", "history.png",
                                                       "roc.png", "det.png", "real_roc.png"}
        scorer = Scorer(folder, device="cpu")
        # the shipped torch weights give the ONNX file's scores (gradient explanations use them)
        stamps = np.random.default_rng(0).normal(size=(4, *scorer.contract.input_shape)).astype(np.float32)
        graph = load_weights(folder / "weights.pt")
        with torch.no_grad():
            torch_scores = graph(torch.from_numpy(stamps)).numpy()
            logits = graph.net(torch.from_numpy(stamps)).numpy()
        np.testing.assert_allclose(torch_scores, scorer.score(stamps), atol=1e-5)
        card = scorer.card
        assert card.survey == survey and card.data.source == "alerts"
        assert card.training.finetuned_from.endswith("simulation")
        # the graph divides its logits by the temperature the card states
        np.testing.assert_allclose(scorer.score(stamps), sigmoid(logits, card.calibration.temperature), atol=1e-5)
        # the test split is whole objects that training never saw
        train_objects = {a.object_id for a in real_split(survey, "train")}
        assert not train_objects & {a.object_id for a in real_split(survey, "test")}
        # the validation reference is the published model's scores on the real validation split
        valid, _, _ = real.stamps(real_split(survey, "valid"), scorer.contract)
        assert len(valid) == card.real_validation.n
        assert card.real_validation.score_histogram.counts == np.histogram(scorer.score(valid).astype(np.float64),
                                                                            bins=REFERENCE_BINS, range=(0, 1))[0].tolist()
        for stage in ("simulation_only", "adapted"):
            assert getattr(card.real_test, stage).n_labelled > 0
            assert getattr(card.synthetic_test, stage).n == TINY["N_test"]
        if survey == "ztf":
            assert "drb" in card.real_test.adapted.survey_scores
            # on real alerts an AUC comes with its interval (ZTF's test split holds both classes)
            low, high = card.test_metrics.roc_auc_interval
            assert low <= card.test_metrics.roc_auc <= high
            assert card.real_test.adapted.ours.roc_auc_interval is not None


def real_split(survey: str, split: str):
    from training import real

    alerts, _ = real.read_alerts(real.alert_files(REAL_DATA / survey))
    return real.by_split(alerts)[split]


def test_deephits_input_txt_trains_on_chunks(tmp_path):
    """A Deep-HiTS parameter file, as it is (':' and '=' lines), drives a run on a chunk folder."""
    for split, n, seed in (("chunks_train", 64, 1), ("chunks_validate", 32, 2), ("chunks_test", 32, 3)):
        stamps, labels, channels = _simulated_arrays(n, seed)
        write_chunks(tmp_path / "chunks" / split, stamps, labels, channels, n_cand_chunk=32)
    (tmp_path / "input.txt").write_text(
        "[vars]\narch_py: arch7.py\npath_to_chunks: chunks\nn_cand_chunk: 32\nbase_lr: 0.04\ngamma: 0.5\n"
        "stepsize: 100000\nmomentum: 0.0\nn_epochs: 1\nbatch_size: 16\nN_train = 64\nN_valid = 32\nN_test = 32\n"
        "validate_every_batches = 2\nactivation_function: PReLU\ntiny_train: False\nresume: None\nsavestep: 2\n"
        "improvement_threshold: 0.99\nini_patience: 100000\ndata_interface: directory\n"
        "optimizer = sgd\nthreads = 1\nprogress = false\ninput.size = 16\n")
    out = tmp_path / "run"
    result = subprocess.run(RBSTREAM + ["train", "--config", str(tmp_path / "input.txt"), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    card = ModelCard.read(out / "model_card.json")
    assert card.architecture.conv_channels == [32, 32, 64, 64, 64]
    assert card.architecture.activation_function == "prelu"
    assert card.data.source == "chunks" and card.data.size == {"train": 64, "valid": 32, "test": 32}
    assert card.config["base_lr"] == 0.04 and card.config["optimizer"] == "sgd"


def test_soft_weak_targets_train_towards_the_survey_score(tmp_path):
    """weak_targets = "soft": every alert with a drb is used, labelled at 0.5, and its training target is drb
    itself; human labels and simulated rehearsal stamps keep 0/1 targets."""
    from training.data import load_datasets

    alerts, _ = real.read_alerts(real.alert_files(REAL_DATA / "ztf"))
    middle = [a for a in alerts if 0.2 <= a.survey_scores.get("drb", -1) < 0.8][:12]
    confident = [a for a in alerts if a.survey_scores.get("drb", -1) >= 0.8][:12]
    folder = tmp_path / "alerts"
    folder.mkdir()
    for alert in middle + confident:
        (folder / alert.file.name).symlink_to(alert.file)
    human = confident[0]
    (tmp_path / "labels.csv").write_text(f"candid,label\n{human.candidate_id},bogus\n")
    data = {"source": "alerts", "alerts": str(folder), "labels": str(tmp_path / "labels.csv"), "label_from": ["drb"],
            "split": "object", "holdout": [0.2, 0.2], "weak_targets": "soft", "rehearsal": 8}
    splits, info = load_datasets(tiny(N_valid=4, N_test=4, data=data), StampContract(size=16))
    assert info["weak_targets"] == "soft" and sum(len(s) for s in splits.values()) == 24 + 8
    train_split = splits["train"]
    targets = train_split.training_targets()
    real_rows = np.flatnonzero(train_split.kinds == "drb")
    expected = {a.survey_scores["drb"] for a in middle + confident if a is not human}
    assert set(np.round(targets[real_rows], 5)) <= set(np.round(np.float32(sorted(expected)), 5))
    # middle-band alerts (left out by hard bands) are trained on, between 0 and 1
    assert ((targets[real_rows] > 0.2) & (targets[real_rows] < 0.8)).any()
    np.testing.assert_array_equal(train_split.labels[real_rows], targets[real_rows] >= 0.5)
    others = np.setdiff1d(np.arange(len(train_split)), real_rows)  # the human label and the simulated stamps
    np.testing.assert_array_equal(targets[others], train_split.labels[others])
    hard, _ = load_datasets(tiny(N_valid=4, N_test=4, data={**data, "weak_targets": "hard", "rehearsal": 0}),
                            StampContract(size=16))
    assert sum(len(s) for s in hard.values()) == 12  # the confident ones (the human label one of them) only


def test_folds_cut_the_objects_outside_the_test_split_and_leave_the_test_split_alone():
    ids = [str(i) for i in range(3000)]
    plain = [real.object_split("ztf", i) for i in ids]
    valid_in = {i: [] for i in ids}
    for k in range(5):
        folded = [real.object_split("ztf", i, fold=(k, 5)) for i in ids]
        assert [s == "test" for s in folded] == [s == "test" for s in plain]
        for i, s in zip(ids, folded):
            if s == "valid":
                valid_in[i].append(k)
    outside = [i for i, s in zip(ids, plain) if s != "test"]
    assert all(len(valid_in[i]) == 1 for i in outside), "every object outside the test split is validated once"
    sizes = np.bincount([valid_in[i][0] for i in outside], minlength=5)
    assert sizes.min() > 0.8 * sizes.mean()


def test_cross_validation_scores_every_alert_outside_the_test_split_once_by_a_run_that_did_not_train_on_it(
        tmp_path):
    """`rbstream train --config --folds 2`: two runs, each validated on one fold; the out-of-fold
    scores of the two are judged together with scikit-learn's numbers, and the test split is untouched."""
    from sklearn.metrics import roc_auc_score

    from conftest import strict_json

    alerts, _ = real.read_alerts(real.alert_files(REAL_DATA / "ztf"))
    bogus = [a for a in alerts if a.survey_scores.get("drb", 1) < 0.2][:16]
    reals = [a for a in alerts if a.survey_scores.get("drb", 0) >= 0.8][:32]
    folder = tmp_path / "alerts"
    folder.mkdir()
    for alert in bogus + reals:
        (folder / alert.file.name).symlink_to(alert.file)
    data = {"source": "alerts", "alerts": str(folder), "labels": "none", "label_from": ["drb"],
            "split": "object", "holdout": [0.2, 0.2], "rehearsal": 16, "balance": True}
    config = write_toml(tmp_path / "cv.toml", {**TINY, "n_epochs": 1, "N_valid": 4, "N_test": 4, "data": data})
    out = tmp_path / "cv"
    result = subprocess.run(RBSTREAM + ["train", "--config", str(config), "--folds", "2", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cross-validation" in result.stdout and "drb >= 0.5 alone" in result.stdout
    import csv

    rows = list(csv.DictReader((out / "out_of_fold.csv").open()))
    by_file = {a.file.name: a for a in bogus + reals}
    outside = {name for name, a in by_file.items() if real.object_split("ztf", a.object_id, (0.2, 0.2)) != "test"}
    assert sorted(r["file"] for r in rows) == sorted(outside), "each alert outside the test split, once"
    for r in rows:
        assert real.object_split("ztf", by_file[r["file"]].object_id, (0.2, 0.2), (int(r["fold"]), 2)) == "valid"
    for k in range(2):
        assert ModelCard.read(out / f"fold{k}" / "model_card.json").data.fold == [k, 2]
    report = strict_json((out / "crossval.json").read_text())
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    ours = report["out_of_fold"]["ours"]
    assert ours["n"] == len(rows) and ours["roc_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    drb = report["by_survey_score"]["drb"]
    assert drb["n"] == len(rows) and drb["roc_auc"] == pytest.approx(ours["roc_auc"], abs=1e-6)
    assert drb["roc_auc_interval"][0] <= drb["roc_auc"] <= drb["roc_auc_interval"][1]


@pytest.mark.parametrize("extra, message", [
    (["--defaults", "--folds", "3"], "--folds and --finetune-from go with --config"),
    (["--config", "SIMULATOR", "--folds", "3"], "cross-validation needs data.source = \"alerts\""),
    (["--config", "ALERTS", "--folds", "1"], "--folds: bad value 1"),
])
def test_cross_validation_asked_of_what_cannot_be_cross_validated_is_refused(tmp_path, capsys, extra, message):
    import argparse

    import training.cli

    simulator = write_toml(tmp_path / "sim.toml", TINY)
    alerts = write_toml(tmp_path / "alerts.toml", {**TINY, "data": {"source": "alerts", "alerts": str(tmp_path)}})
    extra = [str({"SIMULATOR": simulator, "ALERTS": alerts}.get(x, x)) for x in extra]
    parser = argparse.ArgumentParser()
    training.cli.add_arguments(parser)
    assert training.cli.main(parser.parse_args(extra)) == 2
    assert message in capsys.readouterr().err
