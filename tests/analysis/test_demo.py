"""`hvae demo`: the whole chain on a tiny budget, trained with the measured recipe of experiments/recipe.py
(which the user's --set overrides), scored, merged and analyzed."""
from __future__ import annotations

import json

import h5py

from hvae_dist.checkpoint import load_checkpoint
from hvae_dist.cli import main as hvae
from hvae_dist.experiments.recipe import RECIPE

SMALL = ["--minutes", "0.02", "--iw-samples", "2", "--max-examples", "8", "--datasets", "FashionMNIST:test",
         "MNIST:test", "--set", "data.max_train_examples=128", "--set", "train.batch_size=32",
         "--set", "train.eval_every=0"]


def _train_config(out) -> dict:
    return json.loads((out / "run" / "config.json").read_text())["train"]


def test_demo_trains_with_the_recipe_and_writes_the_report(tmp_path, capsys):
    assert RECIPE == ("train.ema_decay=0.999",)
    assert hvae(["demo", "--out", str(tmp_path), *SMALL]) == 0
    assert _train_config(tmp_path)["ema_decay"] == 0.999
    out = capsys.readouterr().out
    assert "--set train.ema_decay=0.999" in out                             # the printed command shows it
    report = tmp_path / "scores" / "analysis"                               # where hvae analyze writes it too
    assert out.rstrip().splitlines()[-1] == f"Report: open {report / 'report.html'}"
    metrics = json.loads((report / "metrics.json").read_text())
    assert {r["score"] for r in metrics["rows"]} >= {"nll", "llr1"}
    # The checkpoint holds EMA weights and the scorer was asked for them (the attribute records the request).
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["ema"] is not None
    with h5py.File(tmp_path / "scores" / "scores.h5") as f:
        assert f.attrs["ema"]


def test_a_users_set_overrides_the_recipe(tmp_path):
    assert hvae(["demo", "--out", str(tmp_path), *SMALL, "--set", "train.ema_decay=0"]) == 0
    assert _train_config(tmp_path)["ema_decay"] == 0.0
