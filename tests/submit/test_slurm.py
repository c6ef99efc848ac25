"""`hvae submit` and the sbatch templates against a real SLURM (../shared/tools/local-slurm).

Tests marked `slurm` skip with a reason where there is no cluster. They run the venv's python in the
jobs (sys.executable), tiny models and timeouts; each test has its own folders (submitit's included).
Reference runs outside SLURM: `torchrun --nproc_per_node 2` for training (the SLURM job is a 2-rank gloo
world too, so weights must be bitwise equal), one unsharded `hvae score` + `hvae merge` for scores.
Two virtual nodes (LOCAL_SLURM_NODES=2) make the training job span nodes; one node works as well.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import faults
from hvae_dist.config import read_config_source
from hvae_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _cluster_up() -> bool:
    if not os.environ.get("SLURM_CONF") or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_slurm = pytest.mark.skipif(not _cluster_up(),
                                 reason="no local SLURM cluster (run ../shared/tools/local-slurm/start.sh)")
slurm = [pytest.mark.slurm, needs_slurm]

TRAIN_SET = ["--set", "data.max_train_examples=512", "--set", "train.batch_size=32", "--set", "train.eval_every=0",
             "--set", "train.checkpoint_every=10"]
SCORE_ARGS = ["--datasets", "FashionMNIST:test", "MNIST:test", "--iw-samples", "8", "--first", "48",
              "--batch-size", "4"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED")


# ----- helpers -----
def hvae(*argv: str, env: dict | None = None, timeout: float = 600) -> str:
    p = subprocess.run([sys.executable, "-m", "hvae_dist", *argv], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})}, cwd=ROOT)
    assert p.returncode == 0, f"hvae {' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}"
    return p.stdout


def submit(*argv: str, env: dict | None = None) -> tuple[dict, str]:
    """Run `hvae submit ...`; returns ({"train"|"score"|"merge": job id}, stdout)."""
    out = hvae("submit", *argv, env=env, timeout=120)
    ids = {m.group(1): m.group(2) for m in re.finditer(r"^(train|score|merge) (?:job|array) (\d+)", out, re.M)}
    return ids, out


def sacct(job_id: str, duplicates: bool = False) -> list[str]:
    """States of the job's allocations (array: one per task; with duplicates: requeued records too)."""
    cmd = ["sacct", "-n", "-X", "-P", "-j", job_id, "--format=JobID,State"] + (["-D"] if duplicates else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return [line for line in p.stdout.splitlines() if line.strip()]


def wait_done(job_id: str, timeout: float, expect: int = 1) -> list[str]:
    """Poll sacct until the job (all `expect` array tasks) ended; returns their states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = sacct(job_id)
        states = [r.split("|")[1].split()[0] for r in rows]
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
        if len(states) >= expect and all(s in TERMINAL for s in states) and not queued:
            return states
        time.sleep(2)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not end within {timeout} s: {sacct(job_id)}")


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"weights differ: {diff}"


def read_groups(path: Path) -> dict:
    from hvae_dist.score.reader import read_scores

    return read_scores(path).groups


def assert_same_scores(a: Path, b: Path, rtol: float = 0.0) -> None:
    """Same groups, fields and values: bitwise (rtol 0) when both ran the same forward passes; with rtol
    (values only) when the passes held other rows, which changes the float rounding of the convolutions."""
    ga, gb = read_groups(a), read_groups(b)
    assert ga.keys() == gb.keys()
    for g in ga:
        assert ga[g].keys() == gb[g].keys(), g
        for k in ga[g]:
            if rtol and np.issubdtype(ga[g][k].dtype, np.floating):
                np.testing.assert_allclose(ga[g][k], gb[g][k], rtol=rtol, atol=1e-4, err_msg=f"{g}/{k}")
            else:
                np.testing.assert_array_equal(ga[g][k], gb[g][k], err_msg=f"{g}/{k}")


def slurm_world() -> tuple[int, int]:
    """(nodes, tasks per node) of a 2-rank job: across two nodes when the cluster has them."""
    p = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True)
    nodes = sum(int(x) for x in p.stdout.split() if x.isdigit())
    return (2, 1) if nodes >= 2 else (1, 2)


# ----- fixtures: small config and references made outside SLURM -----
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def small_config(work) -> str:
    """The tiny preset with 8 channels per block (fast on a shared 2-core machine)."""
    cfg = read_config_source("tiny")
    for stage in cfg["model"]["config_deterministic"]:
        for block in stage:
            block["out_channels"] = 8
    path = work / "small.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def reference_run(work, small_config):
    """reference_run(steps): run dir of the same training outside SLURM (torchrun, 2 gloo ranks), cached."""
    runs: dict[int, Path] = {}

    def get(steps: int) -> Path:
        if steps not in runs:
            run_dir = work / f"torchrun-{steps}"
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                "-m", "hvae_dist", "train", "--config", small_config, "--run-dir", str(run_dir),
                                "--backend", "ddp", "--max-steps", str(steps), "--no-progress", *TRAIN_SET],
                               capture_output=True, text=True, timeout=900, cwd=ROOT)
            assert p.returncode == 0, p.stderr[-4000:]
            runs[steps] = run_dir
        return runs[steps]

    return get


@pytest.fixture(scope="module")
def trained(work, small_config) -> Path:
    """A short local training run to score."""
    run_dir = work / "scored-run"
    hvae("train", "--config", small_config, "--run-dir", str(run_dir), "--max-steps", "10", "--no-progress", *TRAIN_SET)
    return run_dir


@pytest.fixture(scope="module")
def reference_scores(work, trained) -> Path:
    """scores.h5 of one unsharded local `hvae score` + `hvae merge` with SCORE_ARGS."""
    out = work / "scores-local"
    hvae("score", "--run-dir", str(trained), "--out", str(out), "--no-progress", *SCORE_ARGS)
    hvae("merge", str(out))
    return out / "scores.h5"


def _train_argv(small_config: str, run_dir: Path, steps: int) -> list[str]:
    nodes, tasks = slurm_world()
    return ["train", "--config", small_config, "--run-dir", str(run_dir), "--nodes", str(nodes),
            "--tasks-per-node", str(tasks), "--cpus-per-task", "1", "--time", "10", "--max-steps", str(steps),
            *TRAIN_SET]


# ----- tests without a cluster -----
def _parse(*argv: str) -> argparse.Namespace:
    from hvae_dist.cli import build_parser

    return build_parser("submit").parse_args(["submit", *argv])


def test_submit_score_takes_the_score_commands_own_options_and_hands_every_shard_its_job():
    """One definition of each flag: `hvae submit score` parses `hvae score`'s options into the same ScoreJob."""
    from hvae_dist.cli import build_parser
    from hvae_dist.score.cli import job_from_args

    common = ["--datasets", "FashionMNIST:test", "MNIST:test", "--iw-samples", "5", "--ks", "1", "2", "--batch-size",
              "7", "--seed", "3", "--precision", "bf16", "--complexity", "--data-root", "d", "--sample-chunk", "2"]
    args = _parse("score", "--run-dir", "r", "--out", "o", "--num-shards", "3", *common)
    direct = build_parser("score").parse_args(["score", "--run-dir", "r", "--out", "o", *common])
    assert job_from_args(args) == job_from_args(direct)
    assert job_from_args(args).settings.precision == "bf16" and job_from_args(args).batch_size == 7
    pipeline = _parse("pipeline", "--config", "tiny", "--run-dir", "r", "--num-shards", "2", "--precision", "bf16",
                      "--score-precision", "fp32", "--score-batch-size", "9", "--datasets", "MNIST:test")
    assert pipeline.precision == "bf16" and pipeline.score_precision == "fp32" and pipeline.batch_size == 9
    for per_task in (["--shard", "1"], ["--no-progress"], ["--score-args", "--precision bf16"]):
        with pytest.raises(SystemExit):     # set per array task, or gone (the --score-args string)
            _parse("score", "--run-dir", "r", "--out", "o", "--num-shards", "3", *common, *per_task)


def test_score_shard_and_merge_jobs_call_the_functions_and_equal_the_commands(tmp_path):
    """The submitit callables run in-process without SLURM: two ScoreShard tasks and MergeAnalyze give the
    scores.h5 and metrics of `hvae score` + `hvae merge` + `hvae analyze` on the same run."""
    from helpers.score import make_run_dir
    from hvae_dist.cli import main
    from hvae_dist.score.cli import job_from_args
    from hvae_dist.submit.jobs import MergeAnalyze, ScoreShard

    run = make_run_dir(tmp_path / "run")
    options = ["--run-dir", str(run), "--datasets", "FashionMNIST:test", "MNIST:test", "--iw-samples", "3",
               "--max-examples", "5"]
    assert main(["score", *options, "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert main(["merge", str(tmp_path / "cli")]) == 0
    job = job_from_args(_parse("score", *options, "--out", str(tmp_path / "jobs"), "--num-shards", "2"))
    assert [ScoreShard(job, i, 2)() for i in range(2)] == [str(tmp_path / "jobs")] * 2
    result = MergeAnalyze(str(tmp_path / "jobs"), "FashionMNIST:test", str(tmp_path / "analysis"))()
    assert result["scores"] == str(tmp_path / "jobs" / "scores.h5")
    # One shard scores each group's 5 rows in one pass, two shards in two: equal up to float rounding.
    assert_same_scores(tmp_path / "cli" / "scores.h5", tmp_path / "jobs" / "scores.h5", rtol=1e-5)
    assert (tmp_path / "analysis" / "metrics.json").exists()


def test_submit_train_uses_ddp_for_several_tasks_and_checks_batch_split(tmp_path, small_config):
    from hvae_dist.submit.cli import resolve_train_config

    args = _parse("train", "--config", small_config, "--run-dir", str(tmp_path / "r"), "--nodes", "2",
                  "--tasks-per-node", "2", *TRAIN_SET)
    assert resolve_train_config(args, 4)["train"]["backend"] == "ddp"
    args = _parse("train", "--config", small_config, "--run-dir", str(tmp_path / "r"), "--backend", "single",
                  *TRAIN_SET)
    with pytest.raises(ConfigError, match="--backend single"):
        resolve_train_config(args, 2)
    args = _parse("train", "--config", small_config, "--run-dir", str(tmp_path / "r"), "--set", "train.batch_size=30")
    with pytest.raises(ConfigError, match="divisible"):
        resolve_train_config(args, 4)


def test_submit_without_slurm_says_so(tmp_path, small_config, monkeypatch, capsys):
    from hvae_dist.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))           # no sbatch / srun
    rc = main(["submit", "train", "--config", small_config, "--run-dir", str(tmp_path / "r"), *TRAIN_SET])
    assert rc == 2
    assert "needs SLURM" in capsys.readouterr().err


# ----- tests on the cluster -----
@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(900)
def test_two_task_train_job_matches_the_same_run_outside_slurm(tmp_path, small_config, reference_run):
    run_dir = tmp_path / "run"
    ids, out = submit(*_train_argv(small_config, run_dir, 20))
    for where in ("logs:", "checkpoints:", "tensorboard --logdir", str(run_dir / "tb")):
        assert where in out
    assert wait_done(ids["train"], 600) == ["COMPLETED"]
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 20
    assert_same_weights(ckpt["model"], weights(reference_run(20)))
    assert "world=2" in (run_dir / "train.log").read_text()


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("how", ["submitit-preemption", "scontrol-requeue"])
def test_preempted_train_job_requeues_resumes_and_ends_with_uninterrupted_weights(tmp_path, small_config,
                                                                                 reference_run, how):
    """submitit-preemption: SIGTERM then SIGUSR2 to every task, as submitit's own tests preempt (and as a
    time-out arrives, minus the SIGTERM): the job saves, then requeues itself. scontrol-requeue: SLURM
    sends SIGTERM and requeues the job itself; the job only has to save."""
    run_dir, steps = tmp_path / "run", 120
    ids, _ = submit(*_train_argv(small_config, run_dir, steps))
    job = ids["train"]
    wait_for(lambda: (run_dir / "checkpoints" / "step-20.pt").exists(), 600, "the step-20 checkpoint")
    if how == "submitit-preemption":
        subprocess.run(["scancel", "--signal=TERM", job], check=True)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job], check=True)
    assert wait_done(job, 600) == ["COMPLETED"]
    records = [r.split("|")[1] for r in sacct(job, duplicates=True)]
    assert "REQUEUED" in records, records
    log = (run_dir / "train.log").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from .* at step (\d+)", log)]
    assert resumed and 20 <= resumed[0] < steps, log[-3000:]
    assert re.search(rf"saved checkpoint .*step-{resumed[0]}\.pt", log), "no checkpoint on the signal"
    assert_same_weights(weights(run_dir), weights(reference_run(steps)))


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(900)
def test_score_array_and_dependent_merge_equal_an_unsharded_local_run(tmp_path, trained, reference_scores):
    out = tmp_path / "scores"
    ids, text = submit("score", "--run-dir", str(trained), "--out", str(out), "--num-shards", "3",
                       "--max-concurrent", "3", "--cpus-per-task", "1", "--time", "10", *SCORE_ARGS)
    assert f"merge job {ids['merge']}" in text and str(out / "scores.h5") in text
    assert wait_done(ids["score"], 600, expect=3) == ["COMPLETED"] * 3
    assert wait_done(ids["merge"], 300) == ["COMPLETED"]
    assert sorted(p.name for p in out.glob("shard-*.h5")) == [f"shard-0000{i}-of-00003.h5" for i in range(3)]
    assert_same_scores(out / "scores.h5", reference_scores)
    assert (out / "analysis" / "metrics.md").exists()


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(900)
def test_preempted_score_shards_resume_their_files_without_loss_or_duplication(tmp_path, trained, reference_scores,
                                                                              monkeypatch):
    """Shard 0 gets submitit's preemption (TERM + USR2: it requeues itself), shard 2 an `scontrol requeue`."""
    from hvae_dist.score.plan import shard_range

    out, trace = tmp_path / "scores", tmp_path / "trace.txt"
    monkeypatch.setenv("HVAE_SCORE_TRACE", str(trace))   # every computed row, appended by every shard
    monkeypatch.setenv("PYTHONPATH", faults.subprocess_env()["PYTHONPATH"])   # the jobs get helpers.faults' hook
    ids, _ = submit("score", "--run-dir", str(trained), "--out", str(out), "--num-shards", "3", "--cpus-per-task",
                    "1", "--time", "10", "--no-analyze", *SCORE_ARGS, "--sample-chunk", "2")
    array = ids["score"]
    n = 48

    def shard_of(i: int) -> int:
        return next(s for s in range(3) if shard_range(n, s, 3)[0] <= i < shard_range(n, s, 3)[1])

    def rows() -> list[tuple[str, int]]:
        lines = trace.read_text().splitlines() if trace.exists() else []
        return [(g, int(i)) for g, i in (line.split() for line in lines)]

    def interrupt(shard: int, cmds: list[list[str]]) -> None:
        wait_for(lambda: sum(shard_of(i) == shard for _, i in rows()) >= 8, 600, f"shard {shard} to be under way")
        for cmd in cmds:
            subprocess.run(cmd + [f"{array}_{shard}"], check=True)

    interrupt(0, [["scancel", "--signal=TERM"], ["scancel", "--signal=USR2"]])
    interrupt(2, [["scontrol", "requeue"]])
    states = wait_done(array, 600, expect=3)
    assert states == ["COMPLETED"] * 3, (states, sacct(array, duplicates=True))   # every attempt's state, if not
    assert wait_done(ids["merge"], 300) == ["COMPLETED"]
    records = [r.split("|") for r in sacct(array, duplicates=True)]
    requeued = {jid for jid, state in records if state.startswith("REQUEUED")}
    assert {f"{array}_0", f"{array}_2"} <= requeued, records
    # The same passes as the shards (--sample-chunk 2), unsharded and uninterrupted: bitwise equal. (Against
    # `reference_scores`, whose passes hold more rows, the values agree only to float rounding.)
    local = tmp_path / "local"
    hvae("score", "--run-dir", str(trained), "--out", str(local), "--no-progress", *SCORE_ARGS, "--sample-chunk", "2",
         env={"HVAE_SCORE_TRACE": ""})
    hvae("merge", str(local))
    assert_same_scores(out / "scores.h5", local / "scores.h5")
    np.testing.assert_allclose(read_groups(out / "scores.h5")["MNIST/test"]["elbo"],
                               read_groups(reference_scores)["MNIST/test"]["elbo"], rtol=1e-6)
    counts = Counter(rows())
    assert set(counts) == {(g, i) for g in ("FashionMNIST/test", "MNIST/test") for i in range(n)}
    # At most the batch in flight when the signal came is computed twice (its rows were not yet complete).
    again = [r for r, c in counts.items() if c > 1]
    assert len(again) <= 2 * 4, again


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(1200)
def test_pipeline_chains_train_score_merge_and_analyze(tmp_path, small_config):
    run_dir = tmp_path / "run"
    ids, text = submit("pipeline", "--config", small_config, "--run-dir", str(run_dir), "--cpus-per-task", "1",
                       "--time", "10", "--max-steps", "10", *TRAIN_SET, "--datasets", "FashionMNIST:test",
                       "MNIST:test", "--iw-samples", "4", "--max-examples", "16", "--num-shards", "2",
                       "--score-cpus-per-task", "1", "--score-time", "10")
    assert set(ids) == {"train", "score", "merge"}, text
    assert f"after job {ids['train']}" in text
    assert wait_done(ids["train"], 600) == ["COMPLETED"]
    assert wait_done(ids["score"], 600, expect=2) == ["COMPLETED"] * 2
    assert wait_done(ids["merge"], 300) == ["COMPLETED"]
    groups = read_groups(run_dir / "scores" / "scores.h5")
    assert {g: len(v["index"]) for g, v in groups.items()} == {"FashionMNIST/test": 16, "MNIST/test": 16}
    assert "MNIST" in (run_dir / "scores" / "analysis" / "metrics.md").read_text()


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(1200)
def test_sbatch_templates_train_requeue_score_array_and_merge(tmp_path, small_config, reference_run):
    """slurm/*.sbatch as a user runs them; the train job gets USR1 (what --signal=B:USR1@120 sends) mid-run,
    checkpoints, requeues itself and ends with the weights of an uninterrupted run."""
    run_dir, out, steps = tmp_path / "run", tmp_path / "scores", 120
    nodes, tasks = slurm_world()
    env = {**os.environ, "HVAE_PYTHON": sys.executable}

    def sbatch(*argv: str) -> str:
        p = subprocess.run(["sbatch", "--parsable", "--chdir", str(ROOT), "--cpus-per-task", "1", "--time", "10",
                            *argv], capture_output=True, text=True, env=env, timeout=60, check=True)
        return p.stdout.strip().split(";")[0]

    train = sbatch("--nodes", str(nodes), "--ntasks-per-node", str(tasks), "--output", str(tmp_path / "train-%j.out"),
                   str(ROOT / "slurm" / "train.sbatch"), "--config", small_config, "--run-dir", str(run_dir),
                   "--max-steps", str(steps), *TRAIN_SET)
    score = sbatch("--array=0-2", f"--dependency=afterok:{train}", "--output", str(tmp_path / "score-%A_%a.out"),
                   str(ROOT / "slurm" / "score.sbatch"), "--run-dir", str(run_dir), "--out", str(out), *SCORE_ARGS)
    merge = sbatch(f"--dependency=afterok:{score}", "--output", str(tmp_path / "merge-%j.out"),
                   str(ROOT / "slurm" / "merge.sbatch"), str(out), "FashionMNIST:test")
    wait_for(lambda: (run_dir / "checkpoints" / "step-20.pt").exists(), 600, "the step-20 checkpoint")
    subprocess.run(["scancel", "--batch", "--signal=USR1", train], check=True)
    assert wait_done(train, 600) == ["COMPLETED"]
    assert "REQUEUED" in [r.split("|")[1] for r in sacct(train, duplicates=True)]
    assert_same_weights(weights(run_dir), weights(reference_run(steps)))
    assert wait_done(score, 600, expect=3) == ["COMPLETED"] * 3
    assert wait_done(merge, 300) == ["COMPLETED"]
    groups = read_groups(out / "scores.h5")
    assert {g: len(v["index"]) for g, v in groups.items()} == {"FashionMNIST/test": 48, "MNIST/test": 48}
    assert (out / "analysis" / "metrics.md").exists()


@pytest.mark.parametrize("launcher", ["fashionmnist_mnist.py", "cifar10_svhn.py"])
def test_launchers_submit_a_valid_pipeline(launcher, tmp_path):
    """The paper launchers' arguments parse, and their presets resolve for their world size."""
    import runpy

    from hvae_dist.submit.cli import _train_world, resolve_train_config

    defaults = runpy.run_path(str(ROOT / "launch" / launcher))["DEFAULTS"]
    args = _parse("pipeline", *defaults, "--run-dir", str(tmp_path / "run"), "--partition", "gpu")
    nodes, tasks = _train_world(args)
    cfg = resolve_train_config(args, nodes * tasks)
    assert cfg["train"]["backend"] in ("single", "ddp") and args.num_shards > 1 and args.iw_samples == 1000
