"""``rbstream bench``: each benchmark runs in --quick mode and writes a well-formed report.

These tests check the reports' shape and content (machine described, every figure a
median with its min and max, all alerts accounted for); they never assert a time —
performance lives in the benchmarks themselves (README, Performance).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import MODELS_DIR
from service.cli import main as rbstream

FIGURE_KEYS = {"median", "min", "max", "runs"}


@pytest.fixture(scope="module")
def models():
    root = Path(os.environ.get("RBSTREAM_MODELS_DIR", MODELS_DIR))
    if not (root / "ztf" / "model.onnx").exists():
        pytest.fail(f"the default models are missing under {root}; run `make train`")
    return root


def run_bench(name: str, out, models, *extra: str) -> dict:
    code = rbstream(["bench", name, "--quick", "--out", str(out), "--models", str(models), *extra])
    document = json.loads((out / f"{name}.json").read_text())
    assert code == 0, document["notes"]
    return document


def figures(row: dict) -> list[dict]:
    return [v for v in row.values() if isinstance(v, dict) and "median" in v]


def assert_well_formed(document: dict, name: str, out) -> None:
    assert document["benchmark"] == name
    machine = document["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["python"]
    assert machine["gpu"] == "none" or isinstance(machine["gpu"], list)
    for library in ("numpy", "onnxruntime", "fastavro", "confluent-kafka"):
        assert machine["libraries"].get(library), f"{library} version missing"
    assert "CPUExecutionProvider" in machine["onnxruntime_providers"]
    assert document["started"] <= document["finished"]
    assert document["rows"], "no measurement"
    for row in document["rows"]:
        for figure in figures(row):
            assert set(figure) == FIGURE_KEYS
            assert figure["min"] <= figure["median"] <= figure["max"]
            assert figure["runs"] >= 1
    assert not any(str(note).startswith("FAILED") for note in document["notes"])
    table = (out / f"{name}.md").read_text()
    assert table.startswith(f"### bench {name}") and "| --- " not in table and "|---|" in table
    assert machine["cpu"] in table


def test_decode_reports_decode_stamps_workers_and_the_naive_baseline_of_the_same_run(tmp_path, models, sample_data):
    document = run_bench("decode", tmp_path, models, "--survey", "ztf")
    assert_well_formed(document, "decode", tmp_path)
    modes = [row["mode"] for row in document["rows"]]
    assert modes[0].startswith("naive") and modes[1] == "decode_stamps" and "worker processes" in modes[2]
    assert document["rows"][1]["speedup"]["median"] > 0
    assert set(document["targets"]) == {"ztf_per_core", "ztf_speedup"}
    assert any("bit-identical to astropy's on 16 of 16" in note for note in document["notes"])


def test_infer_reports_each_batch_size_and_says_when_no_gpu_was_there(tmp_path, models):
    import onnxruntime as ort

    document = run_bench("infer", tmp_path, models, "--batch-sizes", "1,4")
    assert_well_formed(document, "infer", tmp_path)
    cpu = [r for r in document["rows"] if r["provider"] == "CPUExecutionProvider"]
    assert sorted({r["batch"] for r in cpu}) == [1, 4]
    assert {r["io_binding"] for r in cpu} == {True, False}
    for row in cpu:  # throughput and latency are two views of the same runs: the fastest run gives both extremes
        assert row["stamps_per_s"]["max"] == pytest.approx(row["batch"] / row["latency_ms"]["min"] * 1e3, rel=1e-3)
    assert any(note.startswith("ztf: CPU scores through IO binding bit-identical") and note.endswith(": True")
               for note in document["notes"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert any(note.startswith("no GPU available for this run") for note in document["notes"])


@pytest.mark.kafka
def test_e2e_gets_every_alert_through_the_real_consumer(tmp_path, models, sample_data):
    document = run_bench("e2e", tmp_path, models, "--alerts", "60")
    assert_well_formed(document, "e2e", tmp_path)
    kafka_rows, in_process_rows = document["rows"][:2], document["rows"][2:]
    assert [row["missing"] for row in kafka_rows] == [0, 0]
    assert [row["mode"].split(":")[0] for row in in_process_rows] == ["in-process, no Kafka"] * 2
    # every alert of the warm-up and of both runs came out as a score (all sample alerts used decode)
    assert document["settings"]["scores_seen"] == 16 + 2 * 60
    assert document["settings"]["dead_letters_seen"] == 0
    assert set(document["targets"]) == {"throughput", "p99_at_half_rate"}


@pytest.mark.kafka
def test_shadow_compares_the_consumer_alone_and_with_a_shadow_that_accounts_for_every_alert(tmp_path, models,
                                                                                            sample_data):
    document = run_bench("shadow", tmp_path, models, "--alerts", "40")
    assert_well_formed(document, "shadow", tmp_path)
    assert [row["mode"] for row in document["rows"]] == [
        "primary only, offered 500 alerts/s", "primary only, full speed",
        "with shadow (same model), offered 500 alerts/s", "with shadow (same model), full speed"]
    assert all(row["missing"] == 0 for row in document["rows"])
    alone, shadowed = document["rows"][:2], document["rows"][2:]
    assert all("shadowed_share" not in row for row in alone)
    for row in shadowed:
        # Every alert of the run was shadowed or counted as skipped (never held up), none failed.
        for run in row["runs_detail"]:
            assert run["shadowed_share"] * run["came_out"] + run["shadow_skipped"] == pytest.approx(run["came_out"])
        assert row["shadow_failed"] == 0
    stopped = document["settings"]["counters_at_stop"]
    assert stopped["primary only"]["rbstream_shadow_alerts_scored_total"] == 0
    assert stopped["with shadow (same model)"]["rbstream_shadow_alerts_scored_total"] > 0
    assert set(document["settings"]["cost"]) == {"full_speed_throughput_ratio", "p99_ms_difference_at_offered_rate",
                                                 "p50_ms_difference_at_offered_rate"}


def test_api_answers_every_request_of_every_concurrency(tmp_path, models, sample_data):
    from service.bench.api import BAD_SHARE

    document = run_bench("api", tmp_path, models, "--clients", "1,3", "--requests", "8")
    assert_well_formed(document, "api", tmp_path)
    assert {(row["candidates"], row["clients"], row["bad_share"]) for row in document["rows"]} == {
        (1, 1, 0), (1, 3, 0), (64, 1, 0), (64, 3, 0), (1, 3, BAD_SHARE)}
    # Good and bad requests alike get their answer (200, or the bad one's 4xx) on their connection.
    assert all(row["errors"] == 0 and row["dropped"] == 0 for row in document["rows"]), document["notes"]
    assert document["settings"]["server_closes"] == {}, "the server closed connections during the runs"


def test_json_flag_prints_the_report_and_a_failed_benchmark_is_reported_not_raised(tmp_path, capsys):
    code = rbstream(["bench", "infer", "--quick", "--json", "--out", str(tmp_path), "--models", str(tmp_path / "none")])
    assert code == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["benchmark"] == "infer"
    assert printed["notes"][0].startswith("FAILED: FileNotFoundError") and "make train" in printed["notes"][0]
    assert json.loads((tmp_path / "infer.json").read_text())["notes"] == printed["notes"]
