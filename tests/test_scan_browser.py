"""The scanning page in a real headless browser: Debian's chromium driven by Playwright.

The test loads the queue of real ZTF alerts, labels with the keyboard, reloads the page,
restarts the server, and finds the labels kept; a second labeller's label of the same
alert is kept beside the first. No browser is downloaded: without /usr/bin/chromium the
test skips and says so (``apt-get install chromium``, as ``.ci/run`` does).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from processes import wait_until_healthy
from conftest import REPO, ztf_fits_files
from service.tools.broker import free_port

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
TOKEN = "scan-test-token"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium (Debian's package; "
                                                          "no downloaded browser builds)")


def start_server(port: int, alerts: Path, labels: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--scan-alerts", str(alerts), "--scan-labels-dir", str(labels)]
    process = subprocess.Popen(command, cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "RBSTREAM_API_TOKEN": TOKEN})
    wait_until_healthy(f"http://127.0.0.1:{port}", process, log, timeout=90)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture()
def scan_folders(tmp_path):
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    for path in ztf_fits_files()[:3]:
        shutil.copy(path, alerts / path.name)
    return alerts, tmp_path / "labels", tmp_path / "serve.log"


def test_labels_made_with_the_keyboard_survive_a_reload_and_a_restart(scan_folders):
    from playwright.sync_api import expect, sync_playwright

    alerts, labels, log = scan_folders
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, alerts, labels, log)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"{url}/scan")
            page.fill("#labeller", "ann")
            page.fill("#token", TOKEN)
            page.click("#load")
            expect(page.locator("#meta")).to_contain_text("1 / 3")
            expect(page.locator("#labels")).to_have_text("not labelled yet")
            first = page.locator("#meta").inner_text()
            page.keyboard.press("r")                           # candidate 1: real
            expect(page.locator("#meta")).to_contain_text("2 / 3")
            page.keyboard.press("3")                           # family 3 (cosmic ray), then bogus
            page.keyboard.press("b")
            expect(page.locator("#meta")).to_contain_text("3 / 3")
            page.keyboard.press("o")                           # the occlusion map on demand
            expect(page.locator("#status")).to_contain_text("occlusion")

            page.reload()                                      # name and token are remembered by the browser
            page.click("#load")
            expect(page.locator("#meta")).to_contain_text("3 / 3")  # resumes at the first unlabelled one
            page.keyboard.press("ArrowLeft")
            expect(page.locator("#meta")).to_contain_text("2 / 3")
            expect(page.locator("#labels")).to_have_text("labels: ann: bogus (cosmic ray)")
            page.keyboard.press("ArrowLeft")
            expect(page.locator("#labels")).to_have_text("labels: ann: real")
            assert page.locator("#meta").inner_text() == first

            stop(server)
            server = start_server(port, alerts, labels, log)
            page.reload()
            page.click("#load")
            expect(page.locator("#meta")).to_contain_text("3 / 3")
            page.keyboard.press("ArrowLeft")
            expect(page.locator("#meta")).to_contain_text("2 / 3")
            page.keyboard.press("ArrowLeft")
            expect(page.locator("#labels")).to_have_text("labels: ann: real")

            # A second labeller on another page: her label is added, ann's is kept.
            other = browser.new_page()
            other.goto(f"{url}/scan")
            other.fill("#labeller", "bob")
            other.fill("#token", TOKEN)
            other.click("#load")
            expect(other.locator("#meta")).to_contain_text("1 / 3")
            other.keyboard.press("b")
            expect(other.locator("#status")).to_contain_text("saved")
            browser.close()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        every = httpx.get(f"{url}/scan/api/labels.csv?every_labeller=true", headers=headers).text
        rows = list(csv.DictReader(io.StringIO(every)))
        assert sorted((r["labeller"], r["label"], r["family"]) for r in rows) == [
            ("ann", "bogus", "cosmic ray"), ("ann", "real", ""), ("bob", "bogus", "")]
        assert httpx.get(f"{url}/scan/api/queue").status_code == 401  # the data needs the token
    finally:
        stop(server)
    assert (labels / "labels.csv").is_file()
