"""``rbstream run`` (what ``make run`` runs), as a process: broker, API, consumer, replay, Ctrl-C.

Whether stopped (SIGINT) or killed (SIGKILL), ``run`` leaves no broker behind: its tansu
child is gone and the broker port is free.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import REPO, rubin_files, ztf_fits_files, ztf_jpeg_files
from processes import Command, children, command_line, kill_leftovers, listening, running, wait_until
from service.lifecycle import PARENT_DEATH_SIGNAL_SUPPORTED
from streaming import default_models, expected_ids  # noqa: F401  (fixture)

pytestmark = pytest.mark.kafka


def test_run_scores_the_samples_serves_the_api_and_stops_on_ctrl_c(tmp_path, default_models):
    samples = tmp_path / "data"
    chosen = {"ztf": ztf_fits_files()[:2] + ztf_jpeg_files()[:1], "rubin": rubin_files()[:1]}
    for survey, paths in chosen.items():
        (samples / survey).mkdir(parents=True)
        for path in paths:
            shutil.copy(path, samples / survey / path.name)
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "run", "--samples", str(samples),
         "--port", "0", "--broker-port", "0", "--device", "cpu"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in process.stdout], daemon=True).start()
    seen: list[str] = []

    def until(pattern: str, timeout: float = 90) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert process.poll() is None, "rbstream run exited early:\n" + "\n".join(seen)
                continue
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n" + "\n".join(seen))

    brokers: list[int] = []
    try:
        broker_port = int(until(r"broker 127\.0\.0\.1:(\d+) \(tansu").group(1))
        brokers = [pid for pid in children(process.pid) if "tansu" in command_line(pid)]
        assert len(brokers) == 1
        api = until(r"API\s+(http://\S+)").group(1)
        until(r"metrics\s+http://\S+/metrics")
        done = until(r"done: (\d+) alerts replayed, (\d+) scored .*, (\d+) rejected")
        assert tuple(map(int, done.groups())) == (4, 3, 1)
        until(r"Ctrl-C stops")
        text = "\n".join(seen)
        # One line per scored alert: survey, object id, candidate id, score, label, model, and the
        # survey's own score (these samples carry ZTF drb, ZTF rb and Rubin reliability).
        for path, theirs in zip(chosen["ztf"][:2] + chosen["rubin"], ("drb", "rb", "reliability")):
            survey, candidate, obj = expected_ids(path)
            name = {"ztf": "ZTF", "rubin": "Rubin"}[survey]
            assert re.search(rf"{name}\s+object {obj}\s+candidate {candidate}\s+score [01]\.\d{{3}}\s+(real|bogus)\s+\S+"
                             rf".*\s+survey {theirs} [01]\.\d{{3}}$", text, re.MULTILINE), path.name
        jpeg = chosen["ztf"][2].name
        assert re.search(rf"REJECTED\s+ztf/{jpeg} \(alerts/0@\d+\): \[cutout\] .*JPEG", text)

        ready = httpx.get(f"{api}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert any("broker" in check["name"] and check["ok"] for check in ready.json()["checks"])
        exported = httpx.get(f"{api}/metrics", timeout=10).text
        assert re.search(r'rbstream_alerts_scored_total\{survey="ztf"\} 2\.0', exported)
        assert re.search(r'rbstream_alerts_failed_total\{reason="cutout",survey="ztf"\} 1\.0', exported)

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, "\n".join(seen)
        until(r"stopped cleanly", timeout=5)
        assert not running(brokers[0]), "the broker outlived rbstream run"
        assert not listening(broker_port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        kill_leftovers(brokers)


def test_run_killed_with_sigkill_takes_its_broker_down(tmp_path, default_models):
    if not PARENT_DEATH_SIGNAL_SUPPORTED:
        pytest.skip("no parent-death signal on this platform")
    samples = tmp_path / "data" / "ztf"
    samples.mkdir(parents=True)
    shutil.copy(ztf_fits_files()[0], samples)
    command = Command("--log-level", "WARNING", "run", "--samples", str(samples.parent), "--port", "0",
                      "--broker-port", "0", "--device", "cpu")
    brokers: list[int] = []
    try:
        broker_port = int(command.until(r"broker 127\.0\.0\.1:(\d+) \(tansu").group(1))
        brokers = [pid for pid in children(command.pid) if "tansu" in command_line(pid)]
        assert len(brokers) == 1, command.output()
        command.until(r"Ctrl-C stops")
        command.process.send_signal(signal.SIGKILL)
        assert command.wait(timeout=10) == -signal.SIGKILL
        assert wait_until(lambda: not running(brokers[0]), timeout=10), "the broker outlived a killed rbstream run"
        assert not listening(broker_port)
    finally:
        command.kill()
        kill_leftovers(brokers)


def test_run_scores_alerts_without_a_difference_with_the_nodiff_model(tmp_path, default_models):
    """``--nodiff-model-ztf``: the alert whose difference cutout is null is scored by the no-diff
    model instead of being rejected; the whole alert by the triplet model, as before."""
    from nodiff_support import ztf_without_difference

    samples = tmp_path / "data" / "ztf"
    samples.mkdir(parents=True)
    whole = ztf_fits_files()[0]
    shutil.copy(whole, samples / whole.name)
    (samples / "no-difference.avro").write_bytes(ztf_without_difference("null", whole))
    run = Command("--log-level", "WARNING", "run", "--samples", str(samples.parent), "--port", "0",
                  "--broker-port", "0", "--device", "cpu", "--exit-after-replay",
                  "--nodiff-model-ztf", str(REPO / "models" / "ztf-nodiff"))
    try:
        run.until(r"model\s+ZTF\s+rbstream-ztf-nodiff .*no difference image")
        done = run.until(r"done: (\d+) alerts replayed, (\d+) scored .*, (\d+) rejected")
        assert tuple(map(int, done.groups())) == (2, 2, 0), run.output()
        assert run.wait(timeout=60) == 0, run.output()
        _, candidate, _ = expected_ids(whole)
        scored_by = re.findall(rf"candidate {candidate}\s+score [01]\.\d{{3}}\s+(?:real|bogus)\s+(\S+)", run.output())
        assert sorted(scored_by) == sorted(["rbstream-ztf", "rbstream-ztf-nodiff"]), run.output()
    finally:
        run.kill()


def test_run_labels_by_the_threshold_rule_it_is_given(tmp_path, default_models):
    """``--threshold ztf:fpr=0.01``: resolved on the ZTF card's validation curve, printed at the
    start, and every ZTF score line labelled by it."""
    from service.score.card import ModelCard, is_real
    from service.score.thresholds import parse_rule, resolve_threshold

    expected = resolve_threshold(ModelCard.read(REPO / "models" / "ztf" / "model_card.json"), parse_rule("fpr=0.01"))
    samples = tmp_path / "data" / "ztf"
    samples.mkdir(parents=True)
    for path in ztf_fits_files()[:6]:
        shutil.copy(path, samples / path.name)
    run = Command("--log-level", "WARNING", "run", "--samples", str(samples.parent), "--port", "0",
                  "--broker-port", "0", "--device", "cpu", "--exit-after-replay", "--threshold", "ztf:fpr=0.01")
    try:
        shown = run.until(r"model\s+ZTF\s+rbstream-ztf \S+\s+threshold (\d\.\d{3}) \(fpr=0\.01\)")
        assert float(shown.group(1)) == pytest.approx(expected, abs=5e-4)
        run.until(r"done: 6 alerts replayed, 6 scored")
        assert run.wait(timeout=60) == 0, run.output()
        lines = re.findall(r"ZTF\s+object \S+\s+candidate \d+\s+score ([01]\.\d{3})\s+(real|bogus)", run.output())
        assert len(lines) == 6, run.output()
        for score, label in lines:
            assert label == ("real" if is_real(float(score), expected) else "bogus") or \
                abs(float(score) - expected) < 5e-4, (score, label)  # a printed score is rounded
    finally:
        run.kill()


def test_run_refuses_a_rate_the_card_cannot_resolve(tmp_path, default_models):
    """The shipped Rubin card has no validation ROC: a rate for Rubin is refused before anything starts."""
    shutil.copy(rubin_files()[0], tmp_path)
    run = Command("--log-level", "WARNING", "run", "--samples", str(tmp_path), "--port", "0",
                  "--broker-port", "0", "--device", "cpu", "--exit-after-replay", "--threshold", "rubin:fpr=0.01")
    try:
        assert run.wait(timeout=60) == 2, run.output()
        assert re.search(r"rbstream run: .*(ROC|curve)", run.output()), run.output()
        assert "broker 127.0.0.1" not in run.output()
    finally:
        run.kill()
