"""A shard killed with SIGKILL resumes at its first incomplete row and ends equal to an uninterrupted run."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import faults
from helpers.score import REPO, make_run_dir, score_args
from hvae_dist.cli import main as hvae
from hvae_dist.score.reader import read_scores

FIELDS = ("elbo", "elbo_1", "lk", "llr", "kl", "bpd")
GROUP = "FashionMNIST/test"


def _traced(path):
    """Rows computed by a run, from its trace file (helpers.faults): set of dataset indices."""
    if not path.exists():
        return []
    return [int(line.split()[1]) for line in path.read_text().splitlines() if line.startswith(GROUP)]


@pytest.mark.slow
def test_score_shard_resume_after_sigkill(tmp_path, monkeypatch):
    run = make_run_dir(tmp_path / "run")
    batch, rows = 2, 24
    args = score_args(run, tmp_path / "out", "--batch-size", str(batch), "--sample-chunk", "20",
                      datasets=("FashionMNIST:test",), samples=40, max_examples=rows)
    first = tmp_path / "trace-killed.txt"
    env = faults.subprocess_env(HVAE_SCORE_TRACE=str(first), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-m", "hvae_dist", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(_traced(first)) < 3 * batch and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, f"the shard finished or failed before it could be killed: {proc.stderr.read()!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = set(_traced(first))

    shard = tmp_path / "out" / "shard-00000-of-00001.h5"
    s = read_scores(shard).groups[GROUP]
    complete = set(s["index"][s["complete"].astype(bool)].tolist())
    assert 0 < len(complete) < rows and complete <= killed        # killed mid-way; flags only for computed rows
    for key in FIELDS:                                             # every complete row holds finite values
        assert np.isfinite(s[key][s["complete"].astype(bool)]).all()

    second = tmp_path / "trace-resumed.txt"
    faults.trace_scored_rows(monkeypatch, second)
    assert hvae(args) == 0
    resumed = _traced(second)
    assert len(resumed) == len(set(resumed))                       # nothing computed twice in the re-run
    assert not set(resumed) & complete                             # no complete row recomputed
    assert set(resumed) | complete == set(range(rows))             # ... and nothing left out
    assert len(set(resumed) & killed) <= batch                     # at most the batch in flight at the kill
    assert min(resumed) == min(set(range(rows)) - complete)        # resumed at the first incomplete row

    monkeypatch.undo()                                             # no more tracing
    assert hvae(score_args(run, tmp_path / "ref", "--batch-size", "8", "--sample-chunk", "40",
                           datasets=("FashionMNIST:test",), samples=40, max_examples=rows)) == 0
    got = read_scores(shard).groups[GROUP]
    ref = read_scores(tmp_path / "ref" / "shard-00000-of-00001.h5").groups[GROUP]
    assert got["complete"].all() and np.array_equal(got["index"], ref["index"])
    for key in FIELDS:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-4, err_msg=key)
