"""Config validation of issue 15: every float field refuses Infinity / NaN (from --set and from JSON files),
and impossible combinations are refused when the config is read, naming the key and the value."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing

import pytest

from hvae_dist.config import SECTIONS, config_from_dict, load_config, read_config_source
from hvae_dist.errors import ConfigError


def _float_fields() -> list[str]:
    keys = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is float or float in typing.get_args(hints[f.name]):
                keys.append(f"{section}.{f.name}")
    return keys


def test_the_float_fields_are_found():
    assert {"train.lr", "train.grad_clip", "train.max_minutes", "train.skip_threshold", "model.min_scale",
            "data.perturb_rate"} <= set(_float_fields())


@pytest.mark.parametrize("key", _float_fields())
@pytest.mark.parametrize("raw", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_every_float_field_refuses_non_finite_values_from_set(key, raw):
    # Before: lr=Infinity trained to all-NaN weights; lr=NaN passed `lr > 0` (NaN compares False) and crashed later.
    with pytest.raises(ConfigError, match=rf"config key '{key}': .* is not allowed; give a finite number"):
        load_config("tiny", [f"{key}={raw}"])


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_floats_in_a_json_file_are_refused(tmp_path, value):
    data = copy.deepcopy(read_config_source("tiny"))
    data["train"]["grad_clip"] = value
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))          # json writes Infinity / NaN, and reads them back
    with pytest.raises(ConfigError, match=r"config key 'train.grad_clip'"):
        load_config(str(path))


def test_an_int_too_large_for_a_float_is_refused():
    with pytest.raises(ConfigError, match=r"config key 'train.lr'"):
        load_config("tiny", ["train.lr=" + "9" * 400])


@pytest.mark.parametrize("overrides, fragment", [
    (['data.val_datasets=["MNIST:test", "MNIST:test"]'], "MNIST:test appears more than once"),
    (["data.val_datasets=[]"], "'data.val_datasets' is empty but train.eval_every=1000"),
    (["data.max_train_examples=10"], "'data.max_train_examples': 10 is smaller than train.batch_size=64"),
    (["train.seed=-1"], "'train.seed': -1 is out of range; give an integer in [0, 2^63 - 1]"),
])
def test_impossible_settings_are_refused_up_front(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert fragment in str(e.value)


def test_no_validation_sets_are_fine_without_evaluation():
    assert load_config("tiny", ["data.val_datasets=[]", "train.eval_every=0"]).data.val_datasets == []


@pytest.mark.parametrize("name", ["fashionmnist", "cifar10"])
def test_paper_presets_evaluate_in_well_under_the_time_between_evaluations(name):
    """One evaluation costs sets x examples x bounds (ELBO and L>k, k = 1..L-1) x samples forward passes of one
    example; the training between two of them eval_every x batch_size x (forward + backward, about 3 forwards)."""
    cfg = config_from_dict(read_config_source(name))
    t = cfg.train
    bounds = len(cfg.model.config_stochastic)
    evaluation = len(cfg.data.val_datasets) * t.eval_examples * bounds * t.eval_iw_samples
    training = t.eval_every * t.batch_size * 3
    assert evaluation < 0.05 * training, (evaluation, training)


@pytest.mark.parametrize("overrides, fragment", [
    (["train.lr_schedule=linear"], "'train.lr_schedule': 'linear' is not allowed; choose one of constant, cosine"),
    (["train.optimizer=sgd"], "'train.optimizer': 'sgd' is not allowed; choose one of adam, adamax, adamw"),
    (["train.lr_warmup_steps=-1"], "'train.lr_warmup_steps': -1 must be >= 0"),
    (["train.lr_min=1e-6"], "'train.lr_min': 1e-06 is only used by train.lr_schedule='cosine'"),
    (["train.lr_schedule=cosine", "train.lr_min=1.0"], "'train.lr_min': 1.0 is above train.lr=0.001"),
    (["train.lr_schedule=cosine", "train.lr_warmup_steps=20000"],
     "'train.lr_warmup_steps': 20000 is not below train.max_steps=20000"),
    (["train.weight_decay=0.01"], "'train.weight_decay': 0.01 is only applied by train.optimizer='adamw'"),
    (["train.optimizer=adamax", "train.weight_decay=0.01"], "not by 'adamax'"),
    (["train.weight_decay=-0.1", "train.optimizer=adamw"], "'train.weight_decay': -0.1 must be >= 0"),
    (["train.accumulation_steps=0"], "'train.accumulation_steps': 0 must be > 0"),
    (["train.accumulation_steps=3"], "'train.accumulation_steps': 3 does not divide train.batch_size=64"),
    (["train.accumulation_steps=1.5"], "'train.accumulation_steps': expected int"),
])
def test_bad_lr_schedule_optimizer_and_accumulation_settings_are_refused_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert fragment in str(e.value)


def test_the_recipe_defaults_are_the_plain_adam_run():
    t = load_config("tiny").train
    assert (t.optimizer, t.lr_schedule, t.lr_warmup_steps, t.lr_min, t.weight_decay, t.accumulation_steps) == \
        ("adam", "constant", 0, 0.0, 0.0, 1)
    good = load_config("tiny", ["train.lr_schedule=cosine", "train.lr_warmup_steps=100", "train.lr_min=1e-5",
                                "train.optimizer=adamw", "train.weight_decay=0.01", "train.accumulation_steps=4"]).train
    assert good.accumulation_steps == 4 and good.optimizer == "adamw"
