"""The decoding limits are settings: command line, environment and config file for the consumer
and ``rbstream serve``; each has a documented default."""

from __future__ import annotations

import argparse
import re

import pytest

from conftest import REPO
from service.cli import build_parser
from service.stream.consumer import CONSUME_OPTIONS, schema_store
from service.limits import DEFAULT_LIMITS, LIMIT_OPTIONS, DecodeLimits
from service.settings import SettingsError, add_options, resolve

REQUIRED = ["--input-topic", "a", "--output-topic", "s", "--dlq-topic", "d"]


def consume_settings(argv, environ=None):
    parser = argparse.ArgumentParser()
    add_options(parser, CONSUME_OPTIONS)
    return resolve(parser.parse_args(REQUIRED + argv), CONSUME_OPTIONS, environ or {})


def test_consumer_limits_from_command_line_environment_and_file(tmp_path):
    config = tmp_path / "consumer.toml"
    config.write_text("max_cutout_bytes = 123456\nmax-records = 3\n")
    settings = consume_settings(["--config", str(config), "--max-records", "5"],
                                {"RBSTREAM_MAX_BLOCK_BYTES": "2048", "RBSTREAM_DECODE_ISOLATION": "true"})
    limits = schema_store(settings).limits
    assert (limits.max_records, limits.max_block_bytes, limits.max_cutout_bytes) == (5, 2048, 123456)
    assert limits.min_stamp_side == DEFAULT_LIMITS.min_stamp_side and settings["decode_isolation"] is True


def test_a_bad_limit_names_its_setting():
    with pytest.raises(SettingsError, match="max_records"):
        consume_settings(["--max-records", "0"])
    assert consume_settings(["--max-schema-depth", "0"])["max_schema_depth"] == 0  # off, for --decode-isolation


def test_serve_takes_the_same_limits_and_its_timeouts():
    from service.api.app import SERVE_OPTIONS, ApiSettings

    args = build_parser(only="serve").parse_args(["serve", "--max-records", "7", "--header-timeout-s", "2.5",
                                                  "--max-concurrent-decodes", "2"])
    api = ApiSettings.from_settings(resolve(args, SERVE_OPTIONS, {}))
    assert api.limits.max_records == 7 and api.header_timeout_s == 2.5 and api.max_concurrent_decodes == 2
    assert api.limits == DecodeLimits(max_records=7)


def test_every_limit_is_documented_with_its_default():
    readme = (REPO / "README.md").read_text()
    for opt in LIMIT_OPTIONS:
        row = re.search(rf"^\| `{opt.name}` \| ([^|]+) \|", readme, re.MULTILINE)
        assert row, f"{opt.name} is not in the README's table of limits"
        default = row.group(1).strip()
        number = float(default.split()[0]) * (1024 ** 2 if "MiB" in default else 1)
        assert number == opt.default, (opt.name, default, opt.default)
