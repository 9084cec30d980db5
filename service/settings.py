"""Settings of the commands, from command line, environment and a TOML file.

Every option of ``rbstream consume`` (and of ``replay``, ``tail``, ``run``, ``serve``) can be given

1. on the command line (``--batch-size 64``),
2. as an environment variable ``RBSTREAM_<NAME>`` (``RBSTREAM_BATCH_SIZE=64``; a few options
   keep an older name, e.g. ``rbstream serve --max-batch`` is ``RBSTREAM_API_MAX_BATCH``),
3. in a TOML file given by ``--config FILE`` (or ``RBSTREAM_CONFIG``), top-level keys named
   like the options (``batch_size = 64``; dashes or underscores),

in this order of precedence, else the option's default.

Kafka client settings pass through to librdkafka unchanged, which is how the consumer is
pointed at a survey's real stream (SASL PLAIN/SCRAM/OAUTHBEARER, TLS CA and client
certificate; see https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md):

* ``--kafka-option security.protocol=SASL_SSL`` (repeatable),
* ``RBSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL`` (the name after ``RBSTREAM_KAFKA_``,
  lower-cased, with ``_`` read as ``.``: every librdkafka property is dotted),
* a ``[kafka]`` table in the config file (``"sasl.mechanism" = "SCRAM-SHA-512"``).

Later sources override earlier ones key by key (file < environment < command line).
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

ENV_PREFIX = "RBSTREAM_"
KAFKA_ENV_PREFIX = "RBSTREAM_KAFKA_"
#: The environment form of ``--kafka-option`` (comma-separated KEY=VALUE), not a librdkafka key.
KAFKA_OPTION_ENV = "RBSTREAM_KAFKA_OPTION"

#: Words that mark a Kafka setting as secret: never logged.
_SECRET_WORDS = ("password", "secret", "token", "key.pem", "jaas")


class SettingsError(ValueError):
    """A setting with a wrong value, or a config file that cannot be used."""


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def _parse_list(value: str | list) -> list[str]:
    """A repeatable option from the environment (comma-separated) or a file (a TOML array or string)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


@dataclass(frozen=True)
class Option:
    """One setting: its name (``batch_size``), how to parse it, its default and help.

    ``kind`` is ``value`` (parsed with ``type``), ``flag`` (boolean switch; ``--no-NAME``
    turns it off again) or ``list`` (repeatable; with ``nargs="+"`` one flag also takes
    several values, ``--samples a b``). ``env_var`` replaces the environment variable's
    usual name ``RBSTREAM_<NAME>`` where an option had another before.
    """

    name: str
    default: Any = None
    help: str = ""
    type: Callable[[str], Any] = str
    kind: str = "value"
    choices: tuple | None = None
    required: bool = False
    metavar: str | None = None
    env_var: str | None = None
    nargs: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return self.env_var or ENV_PREFIX + self.name.upper()

    def parse(self, raw: Any, source: str) -> Any:
        try:
            if self.kind == "flag":
                value = _parse_bool(raw)
            elif self.kind == "list":
                value = [self.type(v) for v in _parse_list(raw)]
            else:
                value = self.type(raw)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{self.name} ({source}): {exc}") from None
        if self.choices is not None and value not in self.choices:
            raise SettingsError(f"{self.name} ({source}): {value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


#: Options every Kafka command shares.
COMMON_OPTIONS: tuple[Option, ...] = (
    Option("bootstrap_servers", "127.0.0.1:9092", "Kafka bootstrap servers, HOST:PORT[,HOST:PORT]",
           metavar="HOST:PORT"),
    Option("kafka_option", [], "librdkafka client setting KEY=VALUE passed through unchanged (repeatable), "
           "e.g. security.protocol=SASL_SSL, sasl.mechanism=SCRAM-SHA-512, ssl.ca.location=/path/ca.pem; "
           "env RBSTREAM_KAFKA_<KEY> with _ for ., config table [kafka]", kind="list", metavar="KEY=VALUE"),
)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add ``options`` and ``--config`` to ``parser``; defaults are resolved later by `resolve`."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML file with settings (top-level keys named like the options, "
                             "[kafka] table for librdkafka settings); env RBSTREAM_CONFIG")
    for opt in options:
        env_note = f"env {opt.env}"
        default_note = "" if opt.default in (None, [], False) else f"; default {opt.default}"
        help_text = f"{opt.help} ({env_note}{default_note})"
        if opt.kind == "flag":
            parser.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif opt.kind == "list":
            parser.add_argument(opt.flag, dest=opt.name, action="extend" if opt.nargs else "append",
                                nargs=opt.nargs, default=None, metavar=opt.metavar, help=help_text)
        else:
            parser.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.metavar,
                                choices=None, help=help_text)


def read_config_file(path: str | os.PathLike | None) -> dict:
    """The TOML config file as a dict with ``-`` in top-level keys read as ``_`` ({} when no path)."""
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: not valid TOML: {exc}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def kafka_settings_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """librdkafka settings from ``RBSTREAM_KAFKA_*`` (``RBSTREAM_KAFKA_SASL_USERNAME`` -> ``sasl.username``)."""
    return {key[len(KAFKA_ENV_PREFIX):].lower().replace("_", "."): value
            for key, value in environ.items()
            if key.startswith(KAFKA_ENV_PREFIX) and len(key) > len(KAFKA_ENV_PREFIX) and key != KAFKA_OPTION_ENV}


def _kafka_pairs(items: Iterable[str], source: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"kafka_option ({source}): expected KEY=VALUE, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def resolve(args: argparse.Namespace, options: Iterable[Option],
            environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Each option's value from the command line, else the environment, else the file, else its default.

    Returns
    -------
    dict
        ``name -> value`` for every option, plus ``kafka``: the merged librdkafka settings.

    Raises
    ------
    SettingsError
        A value that does not parse, an unknown key in the config file, a required option missing.
    """
    environ = os.environ if environ is None else environ
    options = list(options)
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    config = read_config_file(config_path)
    known = {opt.name for opt in options} | {"kafka"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SettingsError(f"config file {config_path}: unknown setting(s) {unknown}; "
                            f"known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for opt in options:
        cli = getattr(args, opt.name, None)
        if cli is not None:
            values[opt.name] = opt.parse(cli, "command line") if opt.kind != "list" else \
                [opt.type(v) for v in cli]
        elif opt.env in environ:
            values[opt.name] = opt.parse(environ[opt.env], f"env {opt.env}")
        elif opt.name in config:
            values[opt.name] = opt.parse(config[opt.name], f"config file {config_path}")
        else:
            values[opt.name] = list(opt.default) if isinstance(opt.default, list) else opt.default
        if opt.required and values[opt.name] in (None, ""):
            raise SettingsError(f"{opt.name} is required: give {opt.flag}, env {opt.env} or "
                                f"'{opt.name}' in the config file")
    kafka: dict[str, str] = {}
    file_kafka = config.get("kafka", {})
    if not isinstance(file_kafka, dict):
        raise SettingsError(f"config file {config_path}: [kafka] must be a table of librdkafka settings")
    # Key by key, later sources win: the file's [kafka] table and kafka_option list, the
    # environment's RBSTREAM_KAFKA_<KEY> and RBSTREAM_KAFKA_OPTION, the command line.
    kafka.update({str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in file_kafka.items()})
    if any(opt.name == "kafka_option" for opt in options):
        values.pop("kafka_option", None)
        kafka.update(_kafka_pairs(_parse_list(config.get("kafka_option", [])), f"config file {config_path}"))
        kafka.update(kafka_settings_from_env(environ))
        kafka.update(_kafka_pairs(_parse_list(environ.get(KAFKA_OPTION_ENV, "")), f"env {KAFKA_OPTION_ENV}"))
        kafka.update(_kafka_pairs(getattr(args, "kafka_option", None) or [], "command line"))
    else:
        kafka.update(kafka_settings_from_env(environ))
    values["kafka"] = kafka
    return values


def redact(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a librdkafka config fit for logs: secrets replaced by ``***``."""
    return {k: ("***" if any(word in k.lower() for word in _SECRET_WORDS) else v)
            for k, v in conf.items() if not callable(v)}


#: Prefixes that restrict a pass-through setting to one client (no librdkafka property starts with them).
CLIENT_ROLES = ("consumer", "producer", "admin")


def kafka_client_config(settings: Mapping[str, Any], role: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka config of one client: ``bootstrap.servers``, the command's ``overrides``, the user's settings.

    Parameters
    ----------
    settings : mapping
        Resolved settings (`resolve`): ``bootstrap_servers`` and ``kafka``.
    role : str
        ``consumer``, ``producer`` or ``admin``. A user setting prefixed with a role
        (``consumer.session.timeout.ms=6000``) applies to that client only, without
        the prefix; unprefixed settings (security, SASL, TLS) apply to every client.

    Notes
    -----
    The user's settings come last so that an operator can tune anything (timeouts,
    ``client.id``, security); settings that at-least-once relies on are re-asserted
    by the caller (see `service.stream.consumer`).
    """
    if role not in CLIENT_ROLES:
        raise ValueError(f"role: unknown {role!r}; accepted: {', '.join(CLIENT_ROLES)}")
    conf: dict[str, Any] = {"bootstrap.servers": settings["bootstrap_servers"]}
    conf.update(overrides)
    scoped: dict[str, Any] = {}
    for key, value in settings.get("kafka", {}).items():
        prefix, _, rest = key.partition(".")
        if prefix in CLIENT_ROLES:
            if prefix == role:
                scoped[rest] = value
        else:
            conf[key] = value
    conf.update(scoped)
    return conf


def _integer(value: Any) -> int:
    """``value`` as an int; a TOML float with a fraction or a boolean is refused, not truncated."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"not an integer: {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"not an integer: {value!r}") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _finite_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {value!r}")
    return number


def positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise ValueError(f"must be a positive number, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value:g}")
    return value


def comma_separated(value: str | list) -> list[str]:
    """A list given as one comma-separated string (command line, environment) or a TOML array."""
    return _parse_list(value)

