"""Config: presets load, every bad input raises ConfigError naming the key and the value, overrides parse."""
from __future__ import annotations

import copy

import pytest

from hvae_dist.config import (
    Config,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    preset_names,
    read_config_source,
)
from hvae_dist.errors import ConfigError


def _preset(name: str = "tiny") -> dict:
    return copy.deepcopy(read_config_source(name))


def _raises(data: dict, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in error message {msg!r}"
    return msg


def test_shipped_presets_are_the_documented_ones():
    assert {"fashionmnist", "cifar10", "tiny"} <= set(preset_names())


@pytest.mark.parametrize("name, likelihood, channels, stages", [
    ("fashionmnist", "bernoulli", 64, 3),
    ("cifar10", "dmol", 256, 3),
    ("tiny", "bernoulli", 32, 3),
])
def test_preset_loads_with_its_architecture(name, likelihood, channels, stages):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.model.likelihood == likelihood
    assert len(cfg.model.config_deterministic) == len(cfg.model.config_stochastic) == stages
    assert {b["out_channels"] for stage in cfg.model.config_deterministic for b in stage} == {channels}


@pytest.mark.parametrize("name", ["fashionmnist", "cifar10", "tiny"])
def test_to_dict_then_config_from_dict_round_trips(name):
    cfg = load_config(name, ["model.input_shape=[1, 28, 28]", "train.max_minutes=5"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_unknown_config_file_or_preset_raises():
    with pytest.raises(ConfigError, match="no-such-preset"):
        load_config("no-such-preset")


def test_unknown_key_raises_naming_the_key():
    data = _preset()
    data["train"]["lrr"] = 1e-3
    msg = _raises(data, "train.lrr")
    assert "lr" in msg.split("allowed", 1)[1]  # the allowed keys are listed


def test_unknown_section_raises_naming_it():
    _raises({**_preset(), "optim": {}}, "optim")


@pytest.mark.parametrize("key, value", [
    ("lr", "fast"),
    ("batch_size", 1.5),
    ("batch_size", True),      # a bool is not an int here
    ("max_steps", "100"),
])
def test_wrong_type_raises_naming_key_and_value(key, value):
    data = _preset()
    data["train"][key] = value
    _raises(data, f"train.{key}", repr(value))


def test_int_is_accepted_for_a_float_field():
    data = _preset()
    data["train"]["lr"] = 1
    assert config_from_dict(data).train.lr == 1.0


@pytest.mark.parametrize("section, key, value", [
    ("train", "lr", -1e-3),
    ("train", "lr", 0.0),
    ("train", "batch_size", 0),
    ("train", "free_nats", -2.0),
    ("train", "ema_decay", 1.0),
    ("train", "backend", "horovod"),
    ("train", "precision", "fp8"),
    ("model", "likelihood", "poisson"),
    ("model", "type", "nvae"),
    ("model", "activation", "gelu"),
    ("data", "binarize", "sometimes"),
    ("data", "perturb_rate", 1.5),
])
def test_impossible_value_raises_naming_key_and_value(section, key, value):
    data = _preset()
    data[section][key] = value
    _raises(data, f"{section}.{key}", repr(value))


def test_mismatched_stage_counts_raise_naming_both_keys_and_lengths():
    data = _preset()
    data["model"]["config_stochastic"] = data["model"]["config_stochastic"][:2]
    _raises(data, "config_deterministic", "config_stochastic", "3", "2")


def test_empty_architecture_raises():
    data = _preset()
    data["model"]["config_deterministic"] = []
    data["model"]["config_stochastic"] = []
    _raises(data, "config_deterministic")


@pytest.mark.parametrize("where, field, value, fragments", [
    ("det", "out_channels", -3, ("config_deterministic[0][1].out_channels", "-3")),
    ("det", "kernel_size", 4, ("config_deterministic[0][1].kernel_size", "4")),
    ("det", "stride", "2", ("config_deterministic[0][1].stride", "'2'")),
    ("det", "block", "DenseBlock", ("config_deterministic[0][1].block", "'DenseBlock'")),
    ("det", "chanels", 32, ("config_deterministic[0][1].chanels",)),
    ("sto", "latent_features", 0, ("config_stochastic[1].latent_features", "0")),
    ("sto", "block", "BernoulliDense", ("config_stochastic[1].block", "'BernoulliDense'")),
])
def test_bad_block_field_raises_naming_the_block_field_and_value(where, field, value, fragments):
    data = _preset()
    block = data["model"]["config_deterministic"][0][1] if where == "det" else data["model"]["config_stochastic"][1]
    block[field] = value
    _raises(data, *fragments)


def test_block_missing_required_field_raises():
    data = _preset()
    del data["model"]["config_stochastic"][0]["latent_features"]
    _raises(data, "config_stochastic[0]", "latent_features")


def test_bernoulli_likelihood_on_non_binarized_data_raises():
    data = _preset()
    data["data"]["binarize"] = "none"
    _raises(data, "bernoulli", "none")


def test_bad_val_dataset_spec_raises():
    data = _preset()
    data["data"]["val_datasets"] = ["FashionMNIST"]
    _raises(data, "data.val_datasets", "'FashionMNIST'")


@pytest.mark.parametrize("item, key, value", [
    ("train.lr=1e-3", ["train", "lr"], 1e-3),
    ("train.batch_size=32", ["train", "batch_size"], 32),
    ("train.max_minutes=null", ["train", "max_minutes"], None),
    ("data.download=true", ["data", "download"], True),
    ('data.val_datasets=["MNIST:test"]', ["data", "val_datasets"], ["MNIST:test"]),
    ("data.dataset=MNIST", ["data", "dataset"], "MNIST"),           # not JSON: stays a string
    ('data.dataset="KMNIST"', ["data", "dataset"], "KMNIST"),       # a JSON string
    ("data.root=/tmp/a=b", ["data", "root"], "/tmp/a=b"),           # only the first '=' splits
])
def test_set_override_parses_json_values_and_plain_strings(item, key, value):
    assert parse_override(item) == (key, value)


def test_overrides_apply_to_a_preset_and_validate():
    cfg = load_config("tiny", ["train.lr=1e-3", 'data.val_datasets=["MNIST:test"]', "data.dataset=MNIST",
                               "model.type=lvae"])
    assert cfg.train.lr == 1e-3
    assert cfg.data.val_datasets == ["MNIST:test"]
    assert cfg.data.dataset == "MNIST"
    assert cfg.model.type == "lvae"
    base = load_config("tiny")
    assert cfg.model.config_deterministic == base.model.config_deterministic  # untouched siblings survive


def test_override_does_not_mutate_the_source_dict():
    data = _preset()
    before = copy.deepcopy(data)
    apply_overrides(data, ["train.lr=0.5"])
    assert data == before


@pytest.mark.parametrize("item, fragment", [
    ("train.lr", "train.lr"),                 # no '='
    ("lr=1e-3", "lr"),                        # no section
    ("optim.lr=1e-3", "optim.lr"),            # unknown section
])
def test_malformed_override_raises(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_override(item)


def test_override_with_bad_value_raises_naming_key_and_value():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.lr=-1"])
    assert "train.lr" in str(info.value) and "-1" in str(info.value)
