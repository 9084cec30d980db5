"""``rbstream serve`` and ``rbstream run`` share the settings of the Kafka commands: command line
over ``RBSTREAM_*`` environment over ``--config`` TOML file over the defaults, with the names
(flags and variables) the Docker files, the compose stack and the chart use."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from processes import wait_until_healthy
from conftest import REPO
from service import settings
from service.api.app import SERVE_OPTIONS, ApiSettings
from service.cli import build_parser
from service.limits import DecodeLimits
from service.tools.run import RUN_OPTIONS
from service.tools.broker import free_port

#: The variables ``rbstream serve`` read before it used `service.settings`: deployments set them.
SERVE_ENV = {
    "RBSTREAM_API_HOST", "RBSTREAM_API_PORT", "RBSTREAM_MODELS_DIR", "RBSTREAM_MODEL_ZTF", "RBSTREAM_MODEL_RUBIN",
    "RBSTREAM_NODIFF_MODEL_ZTF", "RBSTREAM_NODIFF_MODEL_RUBIN", "RBSTREAM_DEVICE", "RBSTREAM_API_DEFAULT_SURVEY",
    "RBSTREAM_API_MAX_CANDIDATES", "RBSTREAM_API_MAX_BODY_BYTES", "RBSTREAM_API_MAX_BATCH",
    "RBSTREAM_API_MAX_WAIT_MS", "RBSTREAM_API_TOKEN_FILE", "RBSTREAM_API_OPEN_PATHS",
    "RBSTREAM_API_MAX_CONCURRENT_DECODES", "RBSTREAM_API_HEADER_TIMEOUT_S", "RBSTREAM_API_BODY_TIMEOUT_S",
    "RBSTREAM_API_KEEP_ALIVE_TIMEOUT_S", "RBSTREAM_API_MAX_HEADER_BYTES", "RBSTREAM_SCAN_ALERTS",
    "RBSTREAM_SCAN_TOPIC", "RBSTREAM_SCAN_BOOTSTRAP_SERVERS", "RBSTREAM_SCAN_RECENT", "RBSTREAM_SCAN_LABELS_DIR",
    "RBSTREAM_MAX_SCHEMA_BYTES", "RBSTREAM_MAX_SCHEMA_DEPTH", "RBSTREAM_MAX_SCHEMA_CACHE_BYTES",
    "RBSTREAM_MAX_RECORDS", "RBSTREAM_MAX_BLOCK_BYTES", "RBSTREAM_MAX_MESSAGE_BYTES", "RBSTREAM_MAX_CUTOUT_BYTES",
    "RBSTREAM_MIN_STAMP_SIDE", "RBSTREAM_THRESHOLD", "RBSTREAM_RELOAD_INTERVAL",
}
#: ... and those ``rbstream run`` read (``make run`` exports RBSTREAM_SAMPLE_DATA).
RUN_ENV = {"RBSTREAM_SAMPLE_DATA", "RBSTREAM_API_HOST", "RBSTREAM_API_PORT", "RBSTREAM_BROKER_PORT",
           "RBSTREAM_MODELS_DIR", "RBSTREAM_DEVICE"}


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without settings of serve or run, plus ``extra``."""
    names = {opt.env for opt in SERVE_OPTIONS + RUN_OPTIONS} | {"RBSTREAM_CONFIG"}
    return {**{k: v for k, v in os.environ.items() if k not in names}, **extra}


def resolved(command: str, options, argv: list[str], environ: dict[str, str]) -> dict:
    args = build_parser(only=command).parse_args([command, *argv])
    return settings.resolve(args, options, environ)


# ---- the small extensions of Option -----------------------------------------------------------------

def test_an_option_may_keep_its_older_environment_name():
    assert settings.Option("max_batch", env_var="RBSTREAM_API_MAX_BATCH").env == "RBSTREAM_API_MAX_BATCH"
    assert settings.Option("max_batch").env == "RBSTREAM_MAX_BATCH"


def test_a_list_option_with_nargs_takes_several_values_after_one_flag():
    options = (settings.Option("paths", ["a"], kind="list", nargs="+"),)
    parser = argparse.ArgumentParser()
    settings.add_options(parser, options)
    assert settings.resolve(parser.parse_args(["--paths", "x", "y", "--paths", "z"]), options, {})["paths"] == \
        ["x", "y", "z"]
    assert settings.resolve(parser.parse_args([]), options, {"RBSTREAM_PATHS": "p,q"})["paths"] == ["p", "q"]
    assert settings.resolve(parser.parse_args([]), options, {})["paths"] == ["a"]


@pytest.mark.parametrize("parse, good, bad", [
    (settings.positive_float, [("2.5", 2.5), (3, 3.0)], ["0", "-1", "nan", "inf", "x", True]),
    (settings.non_negative_float, [("0", 0.0), ("0.25", 0.25)], ["-0.5", "nan", "-inf", "", False]),
    (settings.positive_int, [("7", 7), (7, 7), (8.0, 8)], ["0", "2.5", 2.5, True, "x"]),
])
def test_number_types_refuse_what_is_not_such_a_number(parse, good, bad):
    for text, value in good:
        assert parse(text) == value
    for text in bad:
        with pytest.raises(ValueError):
            parse(text)


def test_comma_separated_takes_a_string_or_a_toml_array():
    assert settings.comma_separated("/healthz, /metrics,") == ["/healthz", "/metrics"]
    assert settings.comma_separated(["/healthz"]) == ["/healthz"]
    assert settings.comma_separated("") == []


# ---- rbstream serve ---------------------------------------------------------------------------------

def test_serve_keeps_every_variable_and_flag_it_had():
    assert {opt.env for opt in SERVE_OPTIONS} == SERVE_ENV
    help_text = build_parser(only="serve")._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--host", "--port", "--max-batch", "--max-wait-ms", "--token-file", "--open-paths",
                 "--header-timeout-s", "--scan-labels-dir", "--max-records", "--config"):
        assert flag in help_text, flag


def test_serve_defaults_are_the_api_defaults():
    values = resolved("serve", SERVE_OPTIONS, [], {})
    assert ApiSettings.from_settings(values) == ApiSettings(scan_bootstrap_servers="localhost:9092")
    assert (values["host"], values["port"], values["open_paths"], values["token_file"]) == \
        ("127.0.0.1", 8000, None, None)


def test_serve_command_line_over_environment_over_file(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text('max_batch = 8\nmax-wait-ms = 2\nmax_candidates = 10\nmodel_ztf = "file/ztf"\n'
                      'open_paths = ["/healthz"]\nmax_records = 9\nheader_timeout_s = 0\n')
    environ = {"RBSTREAM_API_MAX_BATCH": "16", "RBSTREAM_API_MAX_CANDIDATES": "20", "RBSTREAM_MAX_RECORDS": "5"}
    values = resolved("serve", SERVE_OPTIONS, ["--config", str(config), "--max-batch", "32"], environ)
    api = ApiSettings.from_settings(values)
    assert api.max_batch == 32  # command line over environment over file
    assert api.max_candidates == 20 and api.limits == DecodeLimits(max_records=5)  # environment over file
    assert api.max_wait_ms == 2.0 and api.header_timeout_s == 0.0  # file over default
    assert api.model_paths == {"ztf": "file/ztf"} and values["open_paths"] == ["/healthz"]


@pytest.mark.parametrize("argv, environ, message", [
    (["--max-batch", "0"], {}, "max_batch (command line): must be a positive integer"),
    ([], {"RBSTREAM_API_MAX_WAIT_MS": "soon"}, "max_wait_ms (env RBSTREAM_API_MAX_WAIT_MS): not a number"),
    (["--device", "gpu"], {}, "device (command line): 'gpu' is not one of auto, cpu, cuda, tensorrt"),
    ([], {"RBSTREAM_API_DEFAULT_SURVEY": "hits"}, "default_survey (env RBSTREAM_API_DEFAULT_SURVEY)"),
])
def test_serve_refuses_a_bad_value_naming_the_setting_and_its_source(argv, environ, message):
    with pytest.raises(settings.SettingsError, match="^" + re.escape(message)):
        resolved("serve", SERVE_OPTIONS, argv, environ)


def serve(*argv: str, environ: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", *argv], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("content, message", [
    ("max_batch = 0\n", "max_batch (config file"),
    ("batch_size = 64\n", "unknown setting(s) ['batch_size']"),
    ("max_batch = \n", "not valid TOML"),
])
def test_serve_with_a_bad_config_file_exits_2_and_says_why(tmp_path, content, message):
    config = tmp_path / "serve.toml"
    config.write_text(content)
    finished = serve("--config", str(config), "--device", "cpu", environ=clean_environ())
    assert finished.returncode == 2, finished.stderr
    assert message in finished.stderr


def test_serve_process_takes_its_settings_from_config_file_environment_and_command_line(tmp_path):
    """A real server: host and port from the file only; the body limit from the environment over the
    file's; the candidate limit from the command line over the environment over the file."""
    port = free_port("127.0.0.1")
    config = tmp_path / "serve.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {port}\ndevice = "cpu"\nmax_candidates = 1\n'
                      f'max_body_bytes = 100000\n')
    environ = clean_environ(PYTHONUNBUFFERED="1", RBSTREAM_API_MAX_CANDIDATES="2",
                            RBSTREAM_API_MAX_BODY_BYTES="150000")
    log = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve",
                                "--config", str(config), "--max-candidates", "3"], cwd=REPO, env=environ,
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log, what="the server did not start on the config file's port")

        def classify(candidates: int) -> httpx.Response:
            body = {"survey": "ztf", "candidates": [{"id": i} for i in range(candidates)]}
            return httpx.post(f"{url}/classify", content=json.dumps(body),
                              headers={"Content-Type": "application/json"}, timeout=10)

        too_many = classify(4)
        assert too_many.status_code == 413 and "at most 3 per request" in too_many.json()["detail"]
        assert classify(3).status_code == 422  # within the limit: refused only for its missing stamps
        too_big = httpx.post(f"{url}/classify", content=b" " * 150001, headers={"Content-Type": "application/json"},
                             timeout=10)
        assert too_big.status_code == 413 and "limit of 150000 bytes" in too_big.json()["detail"]
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---- rbstream run -----------------------------------------------------------------------------------

def test_run_keeps_every_variable_and_flag_it_had():
    assert RUN_ENV <= {opt.env for opt in RUN_OPTIONS}
    values = resolved("run", RUN_OPTIONS, ["--samples", "a", "b", "--no-wire-format", "--exit-after-replay",
                                           "--verbose", "--rate", "2.5"], {})
    assert values["samples"] == ["a", "b"] and values["wire_format"] is False
    assert values["exit_after_replay"] is True and values["verbose"] is True and values["rate"] == 2.5


def test_run_defaults():
    values = resolved("run", RUN_OPTIONS, [], {})
    assert {k: values[k] for k in ("samples", "host", "port", "broker_port", "device", "batch_size", "rate",
                                   "repeat", "wire_format", "exit_after_replay", "verbose")} == {
        "samples": ["../shared/data"], "host": "127.0.0.1", "port": 8000, "broker_port": 9092, "device": "auto",
        "batch_size": 64, "rate": None, "repeat": 1, "wire_format": True, "exit_after_replay": False,
        "verbose": False}


def test_run_command_line_over_environment_over_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('samples = ["file/ztf", "file/rubin"]\nbatch_size = 8\nbroker_port = 0\nport = 1\n'
                      'wire_format = false\nrate = 10\n')
    environ = {"RBSTREAM_BATCH_SIZE": "16", "RBSTREAM_API_PORT": "2", "RBSTREAM_RATE": "0.5"}
    values = resolved("run", RUN_OPTIONS, ["--config", str(config), "--batch-size", "32"], environ)
    assert values["batch_size"] == 32  # command line over environment over file
    assert values["port"] == 2 and values["rate"] == 0.5  # environment over file
    assert values["samples"] == ["file/ztf", "file/rubin"] and values["broker_port"] == 0  # file over default
    assert values["wire_format"] is False
    from_env_file = resolved("run", RUN_OPTIONS, [], {"RBSTREAM_CONFIG": str(config),
                                                      "RBSTREAM_SAMPLE_DATA": "env/data"})
    assert from_env_file["samples"] == ["env/data"] and from_env_file["batch_size"] == 8


def test_run_with_a_bad_setting_exits_2_before_starting_anything(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("repeat = 0\n")
    finished = subprocess.run([sys.executable, "-m", "service.cli", "run", "--config", str(config)], cwd=REPO,
                              env=clean_environ(), capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2
    assert "rbstream run: repeat (config file" in finished.stderr and "must be a positive integer" in finished.stderr
    assert "broker" not in finished.stdout
