"""Training configuration: a TOML file, or a Deep-HiTS ``input.txt`` read as it is.

The top level holds Deep-HiTS's parameters with their meanings (``base_lr``, ``gamma``,
``stepsize``, ``N_train``, ``ini_patience``...), plus rbstream's own (``survey``,
``optimizer``, ``lr_policy``...). Tables hold the rest: ``[input]`` (the stamp contract),
``[model]`` (architecture), ``[data]`` (data source), ``[simulator]``, ``[augment]``,
``[finetune]``, ``[export]``. Every key is checked: an unknown key or a bad value raises
`ConfigError` with the key and what it accepts.

A Deep-HiTS ``input.txt`` is an INI file with one ``[vars]`` section whose lines use
``:`` or ``=``; its keys are the top-level keys here.
"""

from __future__ import annotations

import configparser
import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from service.contract import CHANNELS, StampContract
from service.surveys import SURVEY_CHOICES
from training.model import ACTIVATIONS, ARCHITECTURES, ArchConfig, canonical_activation
from training.profiles import PROFILES, get_profile
from training.real import DEFAULT_HOLDOUT, WEAK_LABELS
from training.simulate import BOGUS_KINDS, SimulatorConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what it accepts."""


@dataclass(frozen=True)
class Key:
    """One configuration key: how to check it, its default, and what it means."""

    kind: str  # str | int | float | bool | choice | int_list | float_list | str_list | table | optional_str | freeze
    default: Any
    help: str
    choices: tuple = ()
    check: Callable[[Any], bool] | None = None
    accepted: str = ""  # human description of accepted values when `check` is used


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


#: Top-level keys. The first group are Deep-HiTS's, with Deep-HiTS's meanings.
TOP_KEYS: dict[str, Key] = {
    # --- Deep-HiTS parameters
    "arch": Key("choice", "small", "named architecture, refined by the [model] table", tuple(ARCHITECTURES)),
    "arch_py": Key("optional_str", None, "Deep-HiTS's architecture file; arch7.py means arch = \"deephits\""),
    "path_to_chunks": Key("optional_str", None, "folder of .npz chunks (data source `chunks`)"),
    "n_cand_chunk": Key("int", 5000, "candidates per chunk (when rbstream writes chunks)", check=_positive,
                        accepted="an integer > 0"),
    "base_lr": Key("float", 1e-3, "initial learning rate", check=_positive, accepted="a number > 0"),
    "gamma": Key("float", 0.5, "learning-rate decay factor (step: every `stepsize` iterations; exp: every "
                 "iteration; inv: lr = base_lr * (1 + gamma * iter) ** -power)", check=_positive,
                 accepted="a number > 0"),
    "stepsize": Key("int", 2000, "iterations between learning-rate steps (lr_policy = step)", check=_positive,
                    accepted="an integer > 0"),
    "momentum": Key("float", 0.9, "SGD momentum (optimizer = sgd); Adam's beta1", check=lambda v: 0 <= v < 1,
                    accepted="a number in [0, 1)"),
    "n_epochs": Key("int", 20, "maximum number of passes over the training set", check=_positive,
                    accepted="an integer > 0"),
    "batch_size": Key("int", 64, "mini-batch size", check=_positive, accepted="an integer > 0"),
    "N_train": Key("int", 20000, "training samples (simulator: drawn; other sources: at most)", check=_positive,
                   accepted="an integer > 0"),
    "N_valid": Key("int", 2000, "validation samples", check=_positive, accepted="an integer > 0"),
    "N_test": Key("int", 4000, "test samples", check=_positive, accepted="an integer > 0"),
    "validate_every_batches": Key("int", 250, "iterations between validations (and early-stopping checks)",
                                  check=_positive, accepted="an integer > 0"),
    "activation_function": Key("activation", "leaky_relu", "activation of every hidden layer", ACTIVATIONS),
    "tiny_train": Key("bool", False, "Deep-HiTS flag, always false", check=lambda v: v is False,
                      accepted="false"),
    "resume": Key("optional_str", None, "checkpoint file or run folder to resume from (None: from scratch)"),
    "savestep": Key("int", 500, "iterations between checkpoints", check=_positive, accepted="an integer > 0"),
    "improvement_threshold": Key("float", 0.995, "a validation loss below best * this extends the patience",
                                 check=lambda v: 0 < v <= 1, accepted="a number in (0, 1]"),
    "ini_patience": Key("int", 3000, "iterations to train before early stopping may stop the run",
                        check=_positive, accepted="an integer > 0"),
    "data_interface": Key("choice", "directory", "chunk layout: train/validate/test folders, or one pool split "
                          "at random", ("directory", "random")),
    # --- rbstream parameters
    "name": Key("str", "rbstream", "model name (model card, run folder)"),
    "version": Key("str", "1.0.0", "model version (model card)"),
    "survey": Key("choice", "ztf", "survey profile: simulator settings and the card's survey", tuple(PROFILES)),
    "seed": Key("int", 1234, "seed of data, initialisation, order and augmentation", check=_non_negative,
                accepted="an integer >= 0"),
    "optimizer": Key("choice", "adam", "optimiser", ("sgd", "adam")),
    "lr_policy": Key("choice", "step", "learning-rate decay", ("step", "exp", "inv", "fixed")),
    "power": Key("float", 0.75, "exponent of the `inv` policy", check=_positive, accepted="a number > 0"),
    "weight_decay": Key("float", 0.0, "L2 penalty", check=_non_negative, accepted="a number >= 0"),
    "patience_increase": Key("float", 2.0, "patience becomes iteration * this on a clear improvement",
                             check=lambda v: v >= 1, accepted="a number >= 1"),
    "threads": Key("int", 2, "torch CPU threads", check=_positive, accepted="an integer > 0"),
    "device": Key("choice", "cpu", "torch device for training", ("cpu", "cuda", "auto")),
    "progress": Key("bool", True, "show a progress bar on the terminal"),
}

TABLES: dict[str, dict[str, Key]] = {
    "input": {
        "channels": Key("str_list", ["template", "science", "difference", "snr_difference"],
                        "model channels, in order", CHANNELS),
        "size": Key("int", 0, "stamp side in pixels (0: the survey profile's)", check=lambda v: v == 0 or v >= 8,
                    accepted="0 or an integer >= 8"),
    },
    "model": {
        "conv_channels": Key("int_list", None, "output channels of each convolution", check=lambda v: all(
            x > 0 for x in v) and len(v) > 0, accepted="a non-empty list of integers > 0"),
        "kernel_sizes": Key("int_list", None, "kernel size of each convolution",
                            check=lambda v: all(x > 0 for x in v), accepted="a list of integers > 0"),
        "pool_after": Key("int_list", None, "2x2 max-pool after these convolutions (1-based)",
                          check=lambda v: all(x > 0 for x in v), accepted="a list of integers > 0"),
        "fc_units": Key("int_list", None, "hidden fully connected layers",
                        check=lambda v: all(x > 0 for x in v), accepted="a list of integers > 0"),
        "dropout": Key("float", None, "dropout probability", check=lambda v: 0 <= v < 1,
                       accepted="a number in [0, 1)"),
        "dihedral": Key("bool", False, "pool over the 8 rotations and flips instead of the 4 rotations"),
    },
    "data": {
        "source": Key("choice", "simulator", "where the stamps come from", ("simulator", "chunks", "alerts", "braai")),
        "alerts": Key("optional_str", None, "folder (or glob) of Avro alert files (source = alerts)"),
        "labels": Key("optional_str", None, "CSV of labels (source = alerts: candid or diaSourceId, label; "
                      "source = braai: label per row)"),
        "triplets": Key("optional_str", None, ".npy of triplets (source = braai)"),
        "triplet_channels": Key("str_list", ["science", "template", "difference"],
                                "image order inside braai triplets / chunks without a `channels` entry",
                                ("science", "template", "difference")),
        "survey_format": Key("choice", "auto", "alert format for source = alerts", SURVEY_CHOICES),
        "label_from": Key("str_list", [], "source = alerts: survey scores that label the alerts `labels` does not "
                          "(first present first)", check=lambda v: all(x in WEAK_LABELS for x in v),
                          accepted="a list of " + ", ".join(WEAK_LABELS)),
        "weak_label_bands": Key("float_list", [0.2, 0.8], "source = alerts: a survey score >= high is real, < low "
                                "bogus, in between left out", check=lambda v: len(v) == 2 and 0 <= v[0] <= v[1] <= 1,
                                accepted="[low, high], 0 <= low <= high <= 1"),
        "weak_targets": Key("choice", "hard", "source = alerts: a weak label trains towards 0 or 1 inside the bands "
                            "(hard), or towards the survey score itself, every scored alert labelled real at >= 0.5 "
                            "(soft)", ("hard", "soft")),
        "split": Key("choice", "object", "source = alerts: hold out whole objects (object) or alerts at random "
                     "(random, by N_valid/N_test)", ("object", "random")),
        "holdout": Key("float_list", list(DEFAULT_HOLDOUT), "source = alerts, split = object: share of objects held out for "
                       "validation and test", check=lambda v: len(v) == 2 and all(x > 0 for x in v) and sum(v) < 1,
                       accepted="[valid, test], each > 0, sum < 1"),
        "fold": Key("int_list", [], "source = alerts, split = object: [k, n] makes fold k of n of the objects "
                    "outside the test split the validation split (cross-validation: rbstream train --folds)",
                    check=lambda v: v == [] or (len(v) == 2 and 0 <= v[0] < v[1] and v[1] >= 2),
                    accepted="[] or [k, n], 0 <= k < n, n >= 2"),
        "rehearsal": Key("int", 0, "source = alerts: simulated stamps ([simulator]) mixed into the training split, "
                         "so that fine-tuning does not forget what simulations teach", check=lambda v: v >= 0,
                         accepted="an integer >= 0"),
        "rehearsal_valid": Key("int", 0, "source = alerts: simulated stamps added to the validation split (early "
                               "stopping and calibration), when the labelled alerts there lack a class",
                               check=lambda v: v >= 0, accepted="an integer >= 0"),
        "balance": Key("bool", False, "source = alerts: repeat the rarer class of real training alerts until both "
                       "are as frequent"),
        "real_repeat": Key("int", 1, "source = alerts: how many times each real training alert is shown per epoch",
                           check=_positive, accepted="an integer > 0"),
    },
    "simulator": {
        "real_fraction": Key("float", 0.5, "share of real stamps", check=lambda v: 0 < v < 1,
                             accepted="a number in (0, 1)"),
        "snr_range": Key("float_list", [3.0, 5000.0], "SNR range of real sources (log-uniform)",
                         check=lambda v: len(v) == 2 and 0 < v[0] < v[1], accepted="[low, high], 0 < low < high"),
        "host_fraction": Key("float", 0.4, "share of real sources on a host galaxy", check=lambda v: 0 <= v <= 1,
                             accepted="a number in [0, 1]"),
        "negative_fraction": Key("float", 0.25, "share of fading (negative) real sources",
                                 check=lambda v: 0 <= v <= 1, accepted="a number in [0, 1]"),
        "edge_fraction": Key("float", 0.06, "share of other stamps also cut at the CCD edge",
                             check=lambda v: 0 <= v <= 1, accepted="a number in [0, 1]"),
        "glint_fraction": Key("float", 0.25, "share of trails broken into glints (a tumbling satellite)",
                              check=lambda v: 0 <= v <= 1, accepted="a number in [0, 1]"),
        "bogus_weights": Key("table", None, "relative frequency of each bogus kind", BOGUS_KINDS),
    },
    "augment": {
        "rot90": Key("bool", True, "random 90-degree rotations"),
        "flip": Key("bool", True, "random flips"),
        "shift": Key("int", 0, "random shifts of up to this many pixels (NaN fill, masked in the graph)",
                     check=_non_negative, accepted="an integer >= 0"),
        "noise": Key("float", 0.0, "added Gaussian noise, in units of each image's own noise",
                     check=_non_negative, accepted="a number >= 0"),
    },
    "finetune": {
        "from": Key("optional_str", None, "checkpoint (.pt) or run folder whose weights start the training"),
        "freeze": Key("freeze", 0, "layers to freeze: an integer (first N conv/fc layers) or \"all_but_head\""),
    },
    "export": {
        "threshold": Key("float", 0.5, "score above which a detection is called real",
                         check=lambda v: 0 < v < 1, accepted="a number in (0, 1)"),
        "opset": Key("int", 18, "ONNX opset", check=lambda v: v >= 17, accepted="an integer >= 17"),
        "max_mb": Key("float", 5.0, "refuse to export a model larger than this (MB)", check=_positive,
                      accepted="a number > 0"),
        "calibration": Key("choice", "none", "fit a temperature on the validation split and put it in the graph "
                           "(temperature), or export raw sigmoid scores (none)", ("none", "temperature")),
    },
}


def _coerce(name: str, key: Key, value: Any) -> Any:
    """Check (and for strings from input.txt, convert) one value."""
    def fail(accepted: str) -> ConfigError:
        return ConfigError(f"{name}: bad value {value!r}; accepted: {accepted}")

    kind = key.kind
    if kind == "optional_str":
        if value is None or (isinstance(value, str) and value.strip() in ("", "None", "none")):
            return None
        if not isinstance(value, str):
            raise fail("a string or None")
        return value
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise fail("a non-empty string")
        out = value
    elif kind in ("choice", "activation"):
        if not isinstance(value, str):
            raise fail(", ".join(key.choices))
        if kind == "activation":
            try:
                return canonical_activation(value)
            except ValueError:
                raise fail(", ".join(key.choices)) from None
        if value not in key.choices:
            raise fail(", ".join(key.choices))
        out = value
    elif kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            value = value.strip().lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise fail(key.accepted or "true or false")
        out = value
    elif kind == "int":
        if isinstance(value, str):
            try:
                value = int(float(value)) if float(value).is_integer() else value
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(key.accepted or "an integer")
        out = value
    elif kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(key.accepted or "a number")
        out = float(value)
    elif kind in ("int_list", "float_list", "str_list"):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise fail(key.accepted or "a list")
        item = {"int_list": int, "float_list": float, "str_list": str}[kind]
        try:
            out = [item(v) if not isinstance(v, bool) else _raise() for v in value]
        except (TypeError, ValueError):
            raise fail(key.accepted or f"a list of {item.__name__}") from None
        if kind == "str_list" and key.choices:
            unknown = [v for v in out if v not in key.choices]
            if unknown or not out:
                raise fail("a non-empty list of " + ", ".join(key.choices))
    elif kind == "freeze":
        if value == "all_but_head":
            return value
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail("an integer >= 0 or \"all_but_head\"")
        return value
    elif kind == "table":
        if not isinstance(value, dict):
            raise fail("a table of " + ", ".join(key.choices))
        unknown = [k for k in value if k not in key.choices]
        if unknown:
            raise ConfigError(f"{name}.{unknown[0]}: unknown key; accepted: {', '.join(key.choices)}")
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{name}.{k}: bad value {v!r}; accepted: a number >= 0")
        return {k: float(v) for k, v in value.items()}
    else:  # pragma: no cover - a programming error, not a user one
        raise AssertionError(kind)
    if key.check is not None and not key.check(out):
        raise fail(key.accepted)
    return out


def _raise():
    raise TypeError


class TrainConfig:
    """A validated configuration: attributes for top-level keys, dicts for tables.

    Use `load_config` (a file) or `from_dict` (a mapping shaped like the TOML file).
    """

    def __init__(self, values: dict[str, Any], tables: dict[str, dict[str, Any]], source: str = "<dict>"):
        self.values = values
        self.tables = tables
        self.source = source

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def table(self, name: str) -> dict[str, Any]:
        return self.tables[name]

    # --- derived objects
    @property
    def profile(self):
        return get_profile(self.survey)

    @property
    def contract(self) -> StampContract:
        size = self.tables["input"]["size"] or self.profile.stamp_size
        try:
            return StampContract(channels=tuple(self.tables["input"]["channels"]), size=size)
        except ValueError as exc:
            raise ConfigError(f"input.{exc}") from None

    @property
    def arch(self) -> ArchConfig:
        arch_name = self.values["arch"]
        if self.values.get("arch_py"):
            arch_name = "deephits"
        values = dict(ARCHITECTURES[arch_name])
        for k, v in self.tables["model"].items():
            if v is not None:
                values[k] = v
        values["activation_function"] = self.values["activation_function"]
        return ArchConfig(**values)

    @property
    def simulator(self) -> SimulatorConfig:
        t = dict(self.tables["simulator"])
        weights = t.pop("bogus_weights")
        kwargs = dict(t, snr_range=tuple(t["snr_range"]))
        if weights is not None:
            kwargs["bogus_weights"] = weights
        try:
            return SimulatorConfig(**kwargs)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def to_dict(self) -> dict:
        """The full configuration (defaults filled in), TOML-shaped, for the model card."""
        out = {k: v for k, v in self.values.items()}
        out.update({name: dict(t) for name, t in self.tables.items()})
        return copy.deepcopy(out)

    def replace(self, **values) -> "TrainConfig":
        """A copy with top-level values replaced (validated)."""
        d = self.to_dict()
        d.update(values)
        return from_dict(d, source=self.source)


def from_dict(raw: dict, source: str = "<dict>") -> TrainConfig:
    """Validate a TOML-shaped mapping; raises `ConfigError`."""
    values: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {name: {} for name in TABLES}
    for k, v in raw.items():
        if k in TABLES:
            if not isinstance(v, dict):
                raise ConfigError(f"{k}: must be a table; accepted keys: {', '.join(TABLES[k])}")
            for tk, tv in v.items():
                spec = TABLES[k].get(tk)
                if spec is None:
                    raise ConfigError(f"{k}.{tk}: unknown key; accepted: {', '.join(TABLES[k])}")
                tables[k][tk] = _coerce(f"{k}.{tk}", spec, tv)
        elif k in TOP_KEYS:
            values[k] = _coerce(k, TOP_KEYS[k], v)
        else:
            raise ConfigError(f"{k}: unknown key; accepted: {', '.join(list(TOP_KEYS) + list(TABLES))}")
    for k, spec in TOP_KEYS.items():
        values.setdefault(k, copy.deepcopy(spec.default))
    for name, keys in TABLES.items():
        for k, spec in keys.items():
            tables[name].setdefault(k, copy.deepcopy(spec.default))
    if values.get("arch_py") and Path(values["arch_py"]).stem != "arch7":
        raise ConfigError(f"arch_py: unknown {values['arch_py']!r}; accepted: arch7.py (Deep-HiTS), or use "
                          f"arch = {' | '.join(ARCHITECTURES)}")
    config = TrainConfig(values, tables, source)
    _cross_checks(config)
    return config


def _cross_checks(config: TrainConfig) -> None:
    """Checks that involve more than one key."""
    config.contract  # raises ConfigError on a bad [input]
    arch = config.arch
    if len(arch.kernel_sizes) != len(arch.conv_channels):
        raise ConfigError(f"model.kernel_sizes: needs {len(arch.conv_channels)} entries (one per conv_channels), "
                          f"got {len(arch.kernel_sizes)}")
    bad = [p for p in arch.pool_after if p > len(arch.conv_channels)]
    if bad:
        raise ConfigError(f"model.pool_after: {bad} out of range; accepted: 1..{len(arch.conv_channels)}")
    side = config.contract.size // (2 ** len(arch.pool_after))
    if side < 1:
        raise ConfigError(f"model.pool_after: {len(arch.pool_after)} poolings shrink a {config.contract.size}-pixel "
                          "stamp to nothing; accepted: fewer poolings or a larger input.size")
    source = config.table("data")["source"]
    if source == "chunks" and not config.path_to_chunks:
        raise ConfigError("path_to_chunks: required when data.source = \"chunks\"; accepted: a folder of .npz chunks")
    data = config.table("data")
    if source == "alerts" and not (data["alerts"] and (data["labels"] or data["label_from"])):
        raise ConfigError("data.alerts and data.labels (or data.label_from): both required when "
                          "data.source = \"alerts\"")
    if source == "braai" and not (config.table("data")["triplets"] and config.table("data")["labels"]):
        raise ConfigError("data.triplets and data.labels: both required when data.source = \"braai\"")
    config.simulator  # raises ConfigError on a bad [simulator]


def read_deephits_input(path: Path) -> dict:
    """A Deep-HiTS ``input.txt`` (``[vars]``, ``key: value`` or ``key = value``) as a raw mapping."""
    parser = configparser.ConfigParser(delimiters=(":", "="), interpolation=None, inline_comment_prefixes=("#",))
    parser.optionxform = str  # keys are case-sensitive (N_train)
    try:
        parser.read_string(Path(path).read_text())
    except configparser.Error as exc:
        raise ConfigError(f"{path}: not a Deep-HiTS input file: {exc}") from None
    if "vars" not in parser:
        raise ConfigError(f"{path}: no [vars] section; accepted: a Deep-HiTS input.txt with [vars]")
    raw: dict[str, Any] = {}
    for k, v in parser["vars"].items():
        if "." in k:  # table.key, for rbstream's own extras
            table, sub = k.split(".", 1)
            raw.setdefault(table, {})[sub] = v
        else:
            raw[k] = v
    if raw.get("path_to_chunks"):
        raw.setdefault("data", {})["source"] = "chunks"
    return raw


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a ``.toml`` file or a Deep-HiTS ``input.txt``.

    A TOML file may name a ``base`` config (relative to itself): the file's keys and
    tables are laid over the base's, key by key. ``overrides`` are laid over the result
    the same way.
    """
    raw = _merge(read_raw(path), overrides or {})
    return from_dict(raw, source=str(path))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_raw(path: str | Path) -> dict:
    """A config file as a raw mapping: its ``base`` chain merged, relative paths resolved."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config: no such file {path}")
    if path.suffix == ".toml":
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    else:
        raw = read_deephits_input(path)
    # relative data paths are relative to the config file
    for key in ("path_to_chunks", "resume"):
        if isinstance(raw.get(key), str) and raw[key] not in ("None", "none", "") and not Path(raw[key]).is_absolute():
            raw[key] = str((path.parent / raw[key]).resolve())
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("alerts", "labels", "triplets"):
            if isinstance(data.get(key), str) and data[key] not in ("None", "none", "") \
                    and not Path(data[key]).is_absolute():
                data[key] = str((path.parent / data[key]).resolve())
    finetune = raw.get("finetune")
    if isinstance(finetune, dict) and isinstance(finetune.get("from"), str) and not Path(finetune["from"]).is_absolute():
        finetune["from"] = str((path.parent / finetune["from"]).resolve())
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: bad value {base!r}; accepted: the path of a config file")
        raw = _merge(read_raw(path.parent / base), raw)
    return raw


#: The configs shipped with the package.
CONFIG_DIR = Path(__file__).parent / "configs"


def builtin_config(name: str) -> Path:
    """Path of a config shipped in ``training/configs`` (``ztf``, ``rubin``, ``hits``, ``tiny``)."""
    path = CONFIG_DIR / f"{name}.toml"
    if not path.exists():
        names = sorted(p.stem for p in path.parent.glob("*.toml"))
        raise ConfigError(f"config: no built-in {name!r}; accepted: {', '.join(names)}")
    return path


def adaptation_config(survey: str) -> Path | None:
    """The second-stage config of a survey's default model (``<survey>-adapt.toml``), if it has one."""
    path = CONFIG_DIR / f"{survey}-adapt.toml"
    return path if path.exists() else None
