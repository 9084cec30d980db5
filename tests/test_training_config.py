"""Training configuration: TOML and Deep-HiTS input.txt, and every error path."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from training.config import TABLES, TOP_KEYS, ConfigError, builtin_config, from_dict, load_config  # noqa: E402

DEEPHITS_INPUT = """\
[vars]
arch_py: arch7.py
path_to_chunks: {chunks}
n_cand_chunk: 5000
base_lr: 0.04
gamma: 0.5
stepsize: 100000
momentum: 0.0
n_epochs: 100
batch_size: 50
N_train = 1220000
N_valid = 100000
N_test = 100000
validate_every_batches = 5000
activation_function: PReLU
tiny_train: False
resume: None
savestep: 25000
improvement_threshold: 0.99
ini_patience: 100000
data_interface: directory
"""


def test_deephits_input_txt_reads_as_is_with_both_separators(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(DEEPHITS_INPUT.format(chunks=tmp_path))
    config = load_config(path)
    # ':' lines
    assert config.base_lr == 0.04 and config.stepsize == 100000 and config.momentum == 0.0
    assert config.activation_function == "prelu" and config.resume is None and config.tiny_train is False
    # '=' lines
    assert config.N_train == 1220000 and config.N_valid == 100000 and config.validate_every_batches == 5000
    # arch7.py is Deep-HiTS's architecture; path_to_chunks selects the chunk source
    assert config.arch.conv_channels == [32, 32, 64, 64, 64] and config.arch.kernel_sizes[0] == 4
    assert config.table("data")["source"] == "chunks" and config.data_interface == "directory"


def test_builtin_configs_are_valid():
    for name in ("ztf", "rubin", "hits", "tiny"):
        config = load_config(builtin_config(name))
        assert config.contract.size >= 8
    with pytest.raises(ConfigError, match="accepted: .*ztf"):
        builtin_config("nope")


def test_template_science_only_model_by_configuration():
    config = from_dict({"input": {"channels": ["template", "science"]}})
    assert config.contract.raw_inputs == ("template", "science")
    assert config.contract.input_shape[0] == 2


@pytest.mark.parametrize("raw, key, accepted", [
    ({"learning_rate": 0.1}, "learning_rate", "base_lr"),                      # unknown top-level key
    ({"model": {"layers": 3}}, "model.layers", "conv_channels"),              # unknown table key
    ({"simulator": {"bogus_weights": {"ufo": 1}}}, "simulator.bogus_weights.ufo", "cosmic_ray"),
    ({"base_lr": -1}, "base_lr", "a number > 0"),
    ({"base_lr": "fast"}, "base_lr", "a number > 0"),
    ({"batch_size": 0}, "batch_size", "an integer > 0"),
    ({"batch_size": 3.5}, "batch_size", "an integer > 0"),
    ({"momentum": 1.5}, "momentum", r"\[0, 1\)"),
    ({"optimizer": "rmsprop"}, "optimizer", "sgd, adam"),
    ({"lr_policy": "cosine"}, "lr_policy", "step, exp, inv"),
    ({"activation_function": "gelu"}, "activation_function", "tanh, relu, leaky_relu, prelu"),
    ({"data_interface": "stream"}, "data_interface", "directory, random"),
    ({"survey": "gaia"}, "survey", "hits, ztf, rubin"),
    ({"tiny_train": True}, "tiny_train", "false"),
    ({"improvement_threshold": 1.5}, "improvement_threshold", r"\(0, 1\]"),
    ({"input": {"channels": ["science", "psf"]}}, "input.channels", "science, template, difference, snr_difference"),
    ({"input": {"size": 4}}, "input.size", ">= 8"),
    ({"model": {"conv_channels": [8, -1]}}, "model.conv_channels", "integers > 0"),
    ({"model": {"conv_channels": [8, 8], "kernel_sizes": [3]}}, "model.kernel_sizes", "one per conv_channels"),
    ({"model": {"pool_after": [9]}}, "model.pool_after", "accepted: 1..4"),
    ({"model": {"dropout": 1.0}}, "model.dropout", r"\[0, 1\)"),
    ({"augment": {"shift": -1}}, "augment.shift", ">= 0"),
    ({"finetune": {"freeze": "most"}}, "finetune.freeze", "all_but_head"),
    ({"export": {"opset": 13}}, "export.opset", ">= 17"),
    ({"export": {"threshold": 1.0}}, "export.threshold", r"\(0, 1\)"),
    ({"simulator": {"snr_range": [10, 3]}}, "simulator.snr_range", "low < high"),
    ({"data": {"source": "chunks"}}, "path_to_chunks", "folder"),
    ({"data": {"source": "alerts"}}, "data.alerts", "required"),
    ({"data": {"source": "braai"}}, "data.triplets", "required"),
    ({"data": {"source": "kafka"}}, "data.source", "simulator, chunks, alerts, braai"),
    ({"arch_py": "arch3.py"}, "arch_py", "arch7.py"),
    ({"arch": "resnet"}, "arch", "small"),
])
def test_config_error_names_key_and_accepted_values(raw, key, accepted):
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    message = str(info.value)
    assert message.startswith(key), message
    assert __import__("re").search(accepted, message), message


def test_input_txt_errors(tmp_path):
    bad_key = tmp_path / "input.txt"
    bad_key.write_text("[vars]\nbase_lr: 0.1\nlearning_rat = 0.2\n")
    with pytest.raises(ConfigError, match="^learning_rat: unknown key; accepted: .*base_lr"):
        load_config(bad_key)
    bad_value = tmp_path / "input2.txt"
    bad_value.write_text("[vars]\nn_epochs = many\n")
    with pytest.raises(ConfigError, match="^n_epochs: bad value 'many'; accepted: an integer > 0"):
        load_config(bad_value)
    no_section = tmp_path / "input3.txt"
    no_section.write_text("base_lr: 0.1\n")
    with pytest.raises(ConfigError, match="Deep-HiTS"):
        load_config(no_section)
    missing = tmp_path / "nothing.toml"
    with pytest.raises(ConfigError, match="no such file"):
        load_config(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("base_lr = = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(broken)


def test_every_key_is_documented():
    for key in list(TOP_KEYS.values()) + [k for t in TABLES.values() for k in t.values()]:
        assert key.help


def test_simulator_table_defaults_are_the_simulators_own():
    from dataclasses import asdict

    from training.simulate import SimulatorConfig

    from_table = asdict(from_dict({}).simulator)
    assert from_table == asdict(SimulatorConfig())
    assert set(from_table) == set(TABLES["simulator"])
