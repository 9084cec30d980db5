"""The model reload's parts on real files and the real models (no broker): when the watcher loads
new files (changed, and the same over two polls), what refuses a model, and how the API's set of
models is swapped while requests keep theirs. The consumer and the API as wholes:
tests/test_consumer_reload.py, tests/test_api_reload.py."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

from conftest import MODELS_DIR
from reload_support import copy_model, counter, models_folder, nan_onnx, publish, truncated_onnx
from service.score.card import ModelCard, ModelError
from service.score.model import CARD_FILE, MODEL_FILE, Scorer
from service.score.reload import ChangeDetector, Fingerprint, ModelReloader, fingerprint, load_checked
from service.score.thresholds import parse_threshold, resolve_threshold

A, B, C = (Fingerprint("1", 100, 1), Fingerprint("2", 100, 2), Fingerprint("3", 300, 3))


# ---- change detection ----------------------------------------------------------------------------------

def test_a_change_is_loaded_once_it_has_stayed_the_same_over_two_polls():
    detector = ChangeDetector(A)
    assert [detector.poll(f) for f in (A, A, B, B, B)] == [False, False, False, True, True]
    detector.loaded(B)
    assert [detector.poll(f) for f in (B, B, C, C)] == [False, False, False, True]


def test_files_still_being_written_are_not_loaded():
    detector = ChangeDetector(A)
    growing = [Fingerprint("2", size, 10 + size) for size in (10, 20, 30)]
    assert [detector.poll(f) for f in growing] == [False, False, False]
    assert detector.poll(growing[-1]) is True


def test_refused_files_are_not_tried_again_until_they_change_or_a_sighup():
    detector = ChangeDetector(A)
    assert [detector.poll(f) for f in (B, B)] == [False, True]
    detector.refused(B)
    assert [detector.poll(B) for _ in range(5)] == [False] * 5
    assert detector.forced(B) is True, "SIGHUP tries the refused files again"
    assert [detector.poll(f) for f in (C, C)] == [False, True]


def test_a_missing_model_is_no_change_and_sighup_on_unchanged_files_does_nothing():
    detector = ChangeDetector(A)
    assert [detector.poll(f) for f in (None, None, A, A)] == [False] * 4
    assert detector.forced(None) is False and detector.forced(A) is False


def test_fingerprint_of_real_files_follows_the_card_version_and_the_onnx_file(tmp_path):
    folder = copy_model(MODELS_DIR / "ztf", tmp_path / "ztf")
    first = fingerprint(folder)
    assert first.version == ModelCard.read(folder / CARD_FILE).version
    assert fingerprint(folder / MODEL_FILE) == first, "a folder or its ONNX file: the same model"
    card = json.loads((folder / CARD_FILE).read_text())
    (folder / CARD_FILE).write_text(json.dumps({**card, "version": "9.9.9"}))
    assert fingerprint(folder).version == "9.9.9" and fingerprint(folder) != first
    stat = (folder / MODEL_FILE).stat()
    os.utime(folder / MODEL_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint(folder).mtime_ns == stat.st_mtime_ns + 1_000_000
    (folder / CARD_FILE).write_text('{"version": "9.9')  # a card cut short
    assert fingerprint(folder).version is None
    (folder / MODEL_FILE).unlink()
    assert fingerprint(folder) is None


# ---- the watcher on real files ---------------------------------------------------------------------------

def watcher(models, threshold=None):
    """A reloader of the copy of models/ztf under ``models``, with the switches it makes."""
    serving = {"ztf": Scorer(models / "ztf", device="cpu")}
    switched = []

    def switch(survey, scorer):
        switched.append((survey, scorer))
        serving[survey] = scorer

    return ModelReloader(lambda: serving, switch, interval=0, threshold=threshold), serving, switched


def test_a_half_written_model_is_not_taken_and_the_finished_one_is(tmp_path):
    models = models_folder(tmp_path)
    reloader, serving, switched = watcher(models)
    refused = counter("rbstream_model_reloads_total", survey="ztf", result="refused")
    data = (MODELS_DIR / "ztf" / MODEL_FILE).read_bytes()
    card = json.loads((MODELS_DIR / "ztf" / CARD_FILE).read_text())
    target = models / "ztf" / MODEL_FILE
    # Copied in place (the unsafe way), a chunk between polls: never tried while it grows.
    (models / "ztf" / CARD_FILE).write_text(json.dumps({**card, "version": "2.1.0"}))
    with open(target, "wb") as out:
        for chunk in range(4):
            out.write(data[chunk * len(data) // 4:(chunk + 1) * len(data) // 4])
            out.flush()
            assert reloader.check() == {}, f"tried after {chunk + 1}/4 of the file"
    assert reloader.check() == {"ztf": "loaded"}, "the same over two polls: loaded"
    assert [(s, sc.card.version) for s, sc in switched] == [("ztf", "2.1.0")]
    assert counter("rbstream_model_reloads_total", survey="ztf", result="refused") == refused
    assert reloader.check() == {} and len(switched) == 1, "loaded once"


def test_a_stalled_copy_is_refused_then_the_finished_files_load(tmp_path):
    models = models_folder(tmp_path)
    reloader, serving, switched = watcher(models)
    publish(models, "ztf", version="2.2.0", onnx=truncated_onnx())
    assert reloader.check() == {} and reloader.check() == {"ztf": "refused"}
    assert [reloader.check() for _ in range(3)] == [{}] * 3, "the same broken files: not tried every poll"
    assert serving["ztf"].card.version == ModelCard.read(MODELS_DIR / "ztf" / CARD_FILE).version
    assert reloader.check(forced=True) == {"ztf": "refused"}, "SIGHUP tries them again"
    publish(models, "ztf", version="2.2.0")
    assert reloader.check() == {} and reloader.check() == {"ztf": "loaded"}
    assert serving["ztf"].card.version == "2.2.0"


def test_sighup_loads_new_files_at_once_and_ignores_unchanged_ones(tmp_path):
    models = models_folder(tmp_path)
    reloader, serving, switched = watcher(models)
    assert reloader.check(forced=True) == {}
    publish(models, "ztf", version="2.3.0")
    assert reloader.check(forced=True) == {"ztf": "loaded"} and serving["ztf"].card.version == "2.3.0"


def test_the_reloader_thread_polls_and_wakes_on_request(tmp_path):
    from streaming import wait_for

    models = models_folder(tmp_path)
    reloader, serving, switched = watcher(models)
    reloader.interval = 0.1
    reloader.start()
    try:
        publish(models, "ztf", version="2.4.0")
        wait_for(lambda: switched, timeout=30, what="the poll to load the new version")
        reloader.interval = 0  # from its next wait on: only on request
        publish(models, "ztf", version="2.5.0")
        reloader.request()
        wait_for(lambda: len(switched) == 2, timeout=30, what="the requested check")
    finally:
        reloader.stop()
    assert [sc.card.version for _, sc in switched] == ["2.4.0", "2.5.0"]


# ---- what refuses a model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def running():
    return Scorer(MODELS_DIR / "ztf", device="cpu")


def test_a_truncated_onnx_file_is_refused(tmp_path, running):
    folder = copy_model(MODELS_DIR / "ztf", tmp_path / "ztf", version="3.0.0")
    (folder / MODEL_FILE).write_bytes(truncated_onnx())
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        load_checked(folder, running, "ztf")


def test_a_model_of_another_input_contract_is_refused(running):
    with pytest.raises(ModelError, match=r"its input \(channels \['template', 'science'.*differs from that of the "
                                         r"model in service.*needs a restart"):
        load_checked(MODELS_DIR / "ztf-nodiff", running, "ztf")


def test_a_model_of_another_survey_is_refused(running):
    with pytest.raises(ModelError, match="it is a rubin model, not a ztf one"):
        load_checked(MODELS_DIR / "rubin", running, "ztf")


def test_a_model_scoring_nan_on_the_test_batch_is_refused(tmp_path, running):
    folder = copy_model(MODELS_DIR / "ztf", tmp_path / "ztf", version="3.1.0")
    (folder / MODEL_FILE).write_bytes(nan_onnx())
    assert np.isnan(Scorer(folder, device="cpu").score(np.zeros((1, 3, 31, 31), np.float32))).all()
    with pytest.raises(ModelError, match=r"64 of the 64 scores of a test batch are not numbers in \[0, 1\]"):
        load_checked(folder, running, "ztf")


def test_the_threshold_rule_is_resolved_again_on_the_new_card(tmp_path, running):
    card = json.loads((MODELS_DIR / "ztf" / CARD_FILE).read_text())
    roc = card["real_validation"]["roc"]
    # Another model: the same ROC at lower thresholds (a model that scores everything lower).
    moved = {**card["real_validation"], "roc": {**roc, "thresholds": [t / 2 for t in roc["thresholds"]]}}
    folder = copy_model(MODELS_DIR / "ztf", tmp_path / "ztf", version="3.2.0", real_validation=moved)
    rule = parse_threshold("fpr=0.01")
    new = load_checked(folder, running, "ztf", threshold=rule)
    expected = resolve_threshold(ModelCard.read(folder / CARD_FILE), rule.rule_for("ztf"))
    assert new.threshold == pytest.approx(expected) and new.threshold_rule == "fpr=0.01"
    assert new.threshold != pytest.approx(resolve_threshold(running.card, rule.rule_for("ztf")))


def test_a_rule_the_new_card_cannot_resolve_refuses_it(tmp_path, running):
    folder = copy_model(MODELS_DIR / "ztf", tmp_path / "ztf", version="3.3.0", real_validation=None)
    with pytest.raises(ModelError, match="has no real validation ROC"):
        load_checked(folder, running, "ztf", threshold="fpr=0.01")
    assert load_checked(folder, running, "ztf", threshold="0.7").threshold == 0.7


# ---- the API's swap -------------------------------------------------------------------------------------

def test_a_request_keeps_the_models_it_started_with_and_their_coalescers_close_after_it(tmp_path, running):
    from fastapi.testclient import TestClient

    from service.api.app import ApiSettings, create_app
    from service.api.auth import TokenAuth
    from service.score.acceleration import check_stamps

    new = Scorer(copy_model(MODELS_DIR / "ztf", tmp_path / "ztf", version="4.0.0"), device="cpu")
    app = create_app({"ztf": running}, ApiSettings(), auth=TokenAuth(), fallbacks={})
    holder = app.state.models
    stamps = check_stamps(running.contract, count=8)

    async def scenario():
        async with holder.using() as before:
            await before.coalescers["ztf"].score(stamps)  # its worker is started
            holder.replace("ztf", new)
            assert holder.current.scorers["ztf"] is new and before.scorers["ztf"] is running
            old = before.coalescers["ztf"]
            async with holder.using() as after:
                assert after.coalescers["ztf"] is not old
                np.testing.assert_array_equal(await after.coalescers["ztf"].score(stamps), new.score(stamps))
            # Replaced while in use: it still answers the request that holds it.
            np.testing.assert_array_equal(await old.score(stamps), running.score(stamps))
            assert not old.closed
        assert old.closed, "closed once the last request holding it is done"
        await asyncio.sleep(0.05)
        assert old._worker.done()

    asyncio.run(scenario())
    with TestClient(app) as client:
        answer = client.get("/model").json()
        assert answer["models"]["ztf"]["version"] == "4.0.0"
        assert answer["loaded_at"]["ztf"] == holder.current.loaded_at["ztf"].isoformat().replace("+00:00", "Z")
        assert client.get("/readyz").json()["checks"][0]["detail"].startswith("ztf: rbstream-ztf 4.0.0")
