"""``rbstream serve`` as a process over a copy of the real ZTF model: a new version published into its
models folder is served without a restart (``/model``, ``/classify`` of JSON and of raw alerts name
it), a corrupt one is refused while the old one keeps serving, and SIGHUP reloads instead of stopping.
(How one request keeps the models it started with: tests/test_reload.py.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from datetime import datetime

import httpx
import pytest

from api_support import good_request
from conftest import MODELS_DIR, REPO, ztf_fits_files
from processes import kill_leftovers, wait_until_healthy
from reload_support import models_folder, publish, truncated_onnx
from service.score.card import ModelCard
from service.tools.broker import free_port
from streaming import wait_for

OLD_VERSION = ModelCard.read(MODELS_DIR / "ztf" / "model_card.json").version


class Serve:
    """``rbstream serve`` on a free port over its own copy of models/ztf; log in ``root/serve.log``."""

    def __init__(self, root, *extra: str):
        self.models = models_folder(root)
        self.log = root / "serve.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RBSTREAM_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--log-level", "INFO", "serve", "--host", "127.0.0.1",
             "--port", self.url.rsplit(":", 1)[1], "--models-dir", str(self.models), "--device", "cpu", *extra],
            cwd=REPO, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env={**environ, "PYTHONUNBUFFERED": "1"})

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def version(self) -> str:
        return self.get("/model").json()["models"]["ztf"]["version"]

    def classify(self) -> list[dict]:
        answer = httpx.post(self.url + "/classify", json=good_request("ztf"), timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["results"]

    def classify_alert(self) -> list[dict]:
        answer = httpx.post(self.url + "/classify", content=ztf_fits_files()[0].read_bytes(),
                            headers={"content-type": "application/avro"}, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["results"]

    def reloads(self, result: str) -> float:
        found = re.search(rf'rbstream_model_reloads_total\{{result="{result}",survey="ztf"\}} (\S+)',
                          self.get("/metrics").text)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One server polling its models folder every 0.3 s, one reloading on SIGHUP only (started together)."""
    polling = Serve(tmp_path_factory.mktemp("polling"), "--reload-interval", "0.3")
    on_sighup = Serve(tmp_path_factory.mktemp("sighup"), "--reload-interval", "0")
    try:
        for server in (polling, on_sighup):
            wait_until_healthy(server.url, server.process, server.log, timeout=120)
        yield polling, on_sighup
    finally:
        kill_leftovers([polling.process.pid, on_sighup.process.pid])


def test_a_new_version_in_the_models_folder_is_served_and_named_without_a_restart(servers):
    server, _ = servers
    assert server.version() == OLD_VERSION
    started = datetime.fromisoformat(server.get("/model").json()["loaded_at"]["ztf"])
    (before,) = server.classify()
    assert before["model_version"] == OLD_VERSION
    publish(server.models, "ztf", version="2.1.0-api")
    wait_for(lambda: server.version() == "2.1.0-api", timeout=60, what="/model to show the new version")
    assert datetime.fromisoformat(server.get("/model").json()["loaded_at"]["ztf"]) > started
    (after,) = server.classify()
    assert after["model_version"] == "2.1.0-api" and after["model"] == "rbstream-ztf"
    assert after["score"] == pytest.approx(before["score"], abs=1e-6), "the same weights, the same score"
    assert [r["model_version"] for r in server.classify_alert()] == ["2.1.0-api"]
    exported = server.get("/metrics").text
    assert server.reloads("loaded") == 1
    assert re.search(r'rbstream_model_info\{[^}]*version="2\.1\.0-api"[^}]*\} 1\.0', exported)
    assert f'version="{OLD_VERSION}"' not in exported, "the old version's series is gone"
    assert server.process.poll() is None


def test_a_corrupt_new_model_is_refused_and_the_one_in_service_keeps_serving(servers):
    server, _ = servers
    serving = server.version()
    publish(server.models, "ztf", version="2.2.0-corrupt", onnx=truncated_onnx())
    wait_for(lambda: server.reloads("refused") == 1, timeout=60, what="the corrupt model refused")
    assert server.version() == serving
    assert [r["model_version"] for r in server.classify()] == [serving]
    assert server.get("/readyz").status_code == 200
    log = server.log.read_text()
    assert re.search(rf"ztf: new model at \S+ refused, rbstream-ztf {re.escape(serving)} keeps serving: "
                     r"ONNX Runtime cannot load", log), log[-3000:]
    assert log.count("refused, rbstream-ztf") == 1, "not tried again at every poll"


def test_sighup_makes_serve_reload_and_keep_serving(servers):
    _, server = servers
    publish(server.models, "ztf", version="2.3.0-sighup")
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: server.version() == "2.3.0-sighup", timeout=60, what="the reload on SIGHUP")
    assert server.process.poll() is None, "SIGHUP must not stop serve"
    assert [r["model_version"] for r in server.classify()] == ["2.3.0-sighup"]
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    log = server.log.read_text()
    assert "SIGHUP received: checking the model files for a new version" in log
    assert "ztf: now answering with rbstream-ztf 2.3.0-sighup" in log
