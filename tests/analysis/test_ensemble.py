"""`hvae ensemble`: N seeds trained one after another, scored on the same examples, -WAIC in the report."""
from __future__ import annotations

import json

from hvae_dist.cli import main as hvae

SMALL = ["--steps", "2", "--iw-samples", "2", "--max-examples", "6", "--set", "data.max_train_examples=64",
         "--set", "train.batch_size=32", "--set", "train.eval_every=0"]


def test_ensemble_trains_each_seed_and_reports_waic(tmp_path, capsys):
    assert hvae(["ensemble", "--seeds", "2", "--out", str(tmp_path), *SMALL]) == 0
    seeds = [json.loads((tmp_path / f"seed-{i}" / "run" / "config.json").read_text())["train"]["seed"] for i in (0, 1)]
    assert seeds == [0, 1]
    rows = json.loads((tmp_path / "analysis" / "metrics.json").read_text())["rows"]
    assert any(r["score"] == "waic" and r["ood"] == "MNIST/test" for r in rows)
    # the intervals of `hvae analyze`'s defaults, as the printed command promises
    assert all(r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"] for r in rows)
    out = capsys.readouterr().out
    assert "--ensemble" in out and "AUROC 95% [" in out            # the printed analyze command shows it
    assert hvae(["ensemble", "--seeds", "1", "--out", str(tmp_path / "one"), *SMALL]) == 2
