"""`deepspeed --module hvae_dist train ...` (DeepSpeed's own launcher, issue 24 item 6): it puts
`--local_rank=N` before the command, which `hvae` takes (checked against LOCAL_RANK). Runs on CPU: the
launcher starts 2 processes, DeepSpeed picks its CPU accelerator, and the ranks form one world of 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


@pytest.mark.slow
@pytest.mark.skipif(not DEEPSPEED.exists(), reason="no deepspeed launcher script beside the python")
def test_the_deepspeed_launcher_starts_a_two_rank_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000), "--module",
           "hvae_dist", "train", "--config", "tiny", "--run-dir", str(run), "--backend", "deepspeed", "--max-steps",
           "2", "--no-progress", "--set", "data.max_train_examples=64", "--set", "train.eval_every=0",
           "--set", "train.log_every=1", "--set", "train.batch_size=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "'--local_rank=0', 'train'" in output and "'--local_rank=1', 'train'" in output   # what the launcher ran
    log = (run / "train.log").read_text()
    assert "backend=deepspeed precision=fp32 world=2" in log, log
    assert "stopped at step 2 (finished)" in log
    assert (run / "checkpoints" / "step-2.pt").exists()
