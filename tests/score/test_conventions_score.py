"""Score files and their reports for a user of TensorBoard, SLURM logs and pandas (issue 24): the checkpoint's
step carried to TensorBoard and the report, timestamped score lines in a log file."""
from __future__ import annotations

import re

import h5py
import pytest

from helpers.score import make_run_dir, score_args
from hvae_dist.cli import main as hvae
from hvae_dist.estimators import names

STEP = 222


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(run dir of a checkpoint at step 222, OUT with its merged scores.h5) scored on 7 + 7 examples."""
    tmp = tmp_path_factory.mktemp("conventions")
    run = make_run_dir(tmp / "run", step=STEP)
    out = tmp / "scores"
    assert hvae(score_args(run, out, "--log-every", "0")) == 0
    assert hvae(["merge", str(out)]) == 0
    return run, out


def test_the_score_file_holds_the_checkpoints_step(scored):
    _, out = scored
    with h5py.File(out / "scores.h5") as f:
        assert int(f.attrs["checkpoint_step"]) == STEP


def test_score_lines_are_timestamped_and_written_to_a_log_file_in_out(scored):
    _, out = scored
    (log,) = out.glob("score-shard-*.log")
    assert log.name == "score-shard-00000-of-00001.log"
    lines = log.read_text().splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d hvae score: shard 0 of 1: "
    assert re.match(stamp + r"14 of 14 rows to score", lines[0]), lines
    assert re.match(stamp + r"done, 14/14 rows", lines[-1]), lines


def test_analyze_tensorboard_writes_at_the_checkpoints_step_and_the_report_shows_it(scored, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = scored
    tb = tmp_path / "tb"
    tb.mkdir()
    assert hvae(["analyze", str(out / "scores.h5"), "--in-dist", "FashionMNIST:test", "--out", str(tmp_path / "a"),
                 "--tensorboard", str(tb), "--scores", "nll", "llr1"]) == 0
    assert f"at step {STEP}" in capsys.readouterr().out
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert tags and all(e.step == STEP for tag in tags for e in acc.Scalars(tag))
    assert names.metric_key("ood", "auroc", "MNIST_test", names.llr(1)) == "ood/auroc/MNIST_test/llr1"
    assert {"ood/auroc/MNIST_test/llr1", "ood/fpr80/MNIST_test/nll"} <= set(tags)
    assert f"(checkpoint step {STEP})</h1>" in (tmp_path / "a" / "report.html").read_text()
    assert f"- checkpoint_step: {STEP}" in (tmp_path / "a" / "metrics.md").read_text()


def test_to_dataframe_has_one_column_per_score_under_the_one_name(scored):
    import numpy as np
    import pandas as pd

    from hvae_dist.score.reader import read_scores, to_dataframe

    _, out = scored
    df = to_dataframe(out / "scores.h5")
    groups, attrs = read_scores(out / "scores.h5")
    assert isinstance(df, pd.DataFrame) and len(df) == 14
    assert {"group", "dataset", "split", "index", "elbo", "bpd", "llr1", "llr2", "lk1", "kl1", "kl3"} <= set(df.columns)
    mnist = df[df.group == "MNIST/test"].sort_values("index")
    np.testing.assert_array_equal(mnist["llr1"].to_numpy(), groups["MNIST/test"]["llr"][:, 0])
    np.testing.assert_array_equal(mnist["kl3"].to_numpy(), groups["MNIST/test"]["kl"][:, 2])
    assert list(attrs["ks"]) == [1, 2]


def test_every_dataset_has_units_and_a_description_and_precision_is_named_so(scored):
    from hvae_dist.score.layout import FIELD_DOCS

    run, out = scored
    with h5py.File(out / "scores.h5") as f:
        assert f.attrs["precision"] == "fp32" and "dtype" not in f.attrs
        seen = []
        f.visititems(lambda name, obj: seen.append((name, dict(obj.attrs))) if isinstance(obj, h5py.Dataset) else None)
    assert len(seen) == 2 * 8                                             # 2 groups x 8 fields (index, label, bounds)
    for name, attrs in seen:
        assert attrs["units"] == FIELD_DOCS[name.rsplit("/", 1)[1]][0] and attrs["description"], name
    assert {a["units"] for n, a in seen} >= {"row", "nats", "bits/dim"}


def test_a_file_with_the_old_dtype_attribute_reads_it_as_precision(tmp_path):
    from helpers.analysis import write_score_file
    from hvae_dist.score.reader import read_scores

    path = write_score_file(tmp_path / "old.h5", {"A/test": 5})                   # writes dtype, as before
    assert read_scores(path).attrs["precision"] == "float32"
