"""Helpers of the training-engine tests: a small CPU config, CLI / torchrun commands, checkpoint and
TensorBoard readers, bitwise state comparison.

Also a script: `torchrun --nproc_per_node 2 tests/helpers/train.py --config-json CFG --run-dir DIR
--steps N --out OUT` trains with `hvae_dist.train.engine.Trainer` and has *every* rank save its own
model and optimizer state to OUT/rank-R.pt, so that a test can compare the ranks with each other (a
checkpoint only holds rank 0's copy).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
INJECT_DIR = Path(__file__).resolve().parent / "inject"   # = helpers.faults.INJECT_DIR
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# The tiny preset's 3 stages and 3 latent layers, with 8 channels instead of 32: a step takes tens of
# milliseconds on one core, so that end-to-end runs fit in a test suite.
SMALL_CHANNELS = 8
SMALL_SETTINGS = {
    "data.max_train_examples": 256,
    "train.batch_size": 8,
    "train.eval_every": 0,
    "train.log_every": 1,
    "train.keep_last": 1000,
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (autouse where a test module binds it): the runs are tiny, the machine is shared,
    and bitwise comparisons need the same thread count in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_deterministic_config(channels: int = SMALL_CHANNELS) -> list:
    from hvae_dist.config import read_config_source
    stages = copy.deepcopy(read_config_source("tiny")["model"]["config_deterministic"])
    for stage in stages:
        for block in stage:
            block["out_channels"] = channels
    return stages


def overrides(**settings) -> list[str]:
    """`--set` items for SMALL_SETTINGS updated with `settings` (keys with '__' for '.': train__lr=1e-3)."""
    merged = {"model.config_deterministic": small_deterministic_config(), **SMALL_SETTINGS}
    merged.update({k.replace("__", "."): v for k, v in settings.items()})
    return [f"{k}={json.dumps(v)}" for k, v in merged.items()]


def small_config(**settings):
    """The validated Config of `hvae train --config tiny` with `overrides(**settings)`."""
    from hvae_dist.config import load_config
    return load_config("tiny", overrides(**settings))


def train_args(run_dir: Path, max_steps: int, backend: str = "single", precision: str | None = None,
               **settings) -> list[str]:
    args = ["train", "--config", "tiny", "--run-dir", str(run_dir), "--max-steps", str(max_steps),
            "--backend", backend, "--no-progress"]
    if precision:
        args += ["--precision", precision]
    for item in overrides(**settings):
        args += ["--set", item]
    return args


def command(args: list[str], nproc: int = 1, script: str | None = None) -> list[str]:
    """`python -m hvae_dist ARGS` (nproc 1) or `torchrun --nproc_per_node N -m hvae_dist ARGS` (DDP, gloo)."""
    target = [script] if script else ["-m", "hvae_dist"]
    if nproc == 1:
        return [PYTHON, *target, *args]
    return [TORCHRUN, "--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc), *target, *args]


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e.pop("HVAE_DEBUG_NAN_AT_STEP", None)
    # PYTHONPATH: the repository, and the fault-injection hooks (helpers.faults: HVAE_DEBUG_NAN_AT_STEP); not
    # `from helpers import faults`: this file also runs as a script (torchrun), where `helpers` is not a package.
    e.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(INJECT_DIR), str(REPO)]),
              "PYTHONUNBUFFERED": "1"})
    e.update(extra)
    return e


def run(cmd: list[str], timeout: float = 240, **env_extra: str) -> subprocess.CompletedProcess:
    """Run to completion; fails the test with the output when the exit status is not 0."""
    proc = subprocess.run(cmd, env=env(**env_extra), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def start(cmd: list[str], log_path: Path, **env_extra: str) -> subprocess.Popen:
    """Start in a new process group (so that a torchrun tree can be killed as one), output to `log_path`."""
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=env(**env_extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 180, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(poll)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {path} showed {text!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not show {text!r} within {timeout} s")
        time.sleep(0.01)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process below it, as a machine failure would.

    torchrun starts each worker in a session of its own, so killing torchrun's process group would
    leave the workers training; collect the whole tree first and kill it until nothing is left.
    """
    for _ in range(10):
        pids = [proc.pid, *_descendants(proc.pid)] if proc.poll() is None else _descendants(proc.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=60)


def load(path: Path) -> dict:
    from hvae_dist.checkpoint import load_checkpoint
    return load_checkpoint(path)


def latest(run_dir: Path) -> dict:
    return load(Path(run_dir) / "checkpoints" / "latest.pt")


def _flatten(obj, prefix: str = ""):
    if isinstance(obj, dict):
        for k in obj:
            yield from _flatten(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def assert_bitwise_equal(a, b, what: str = "state") -> None:
    """Every tensor equal (torch.equal) and every other leaf ==, over nested dicts/lists."""
    fa, fb = dict(_flatten(a)), dict(_flatten(b))
    assert fa.keys() == fb.keys(), f"{what}: different keys {sorted(fa.keys() ^ fb.keys())[:10]}"
    bad = []
    for k, va in fa.items():
        vb = fb[k]
        if isinstance(va, torch.Tensor):
            if not (isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and torch.equal(va, vb)):
                bad.append(k)
        elif va != vb:
            bad.append(k)
    assert not bad, f"{what}: {len(bad)} entries differ, e.g. {bad[:8]}"


def assert_close(a: dict, b: dict, rtol: float, atol: float, what: str = "state") -> None:
    assert a.keys() == b.keys()
    worst = max(((k, float((a[k].double() - b[k].double()).abs().max())) for k in a), key=lambda kv: kv[1])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{what}[{k}]: {m}")
    return worst


def tb_accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / "tb"),
                           size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0,
                                          "compressedHistograms": 0, "audio": 0})
    acc.Reload()
    return acc


def tb_steps(run_dir: Path) -> dict[str, list[int]]:
    """Per scalar tag, the list of steps in the event files (after TensorBoard's purge of orphaned events)."""
    acc = tb_accumulator(run_dir)
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_values(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in tb_accumulator(run_dir).Scalars(tag)]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----- the per-rank script (run under torchrun) -----
def _rank_main(argv: list[str]) -> int:
    """`tests/helpers/train.py DUMP_DIR train ARGS...`: the real `hvae train ARGS...`, after which every rank
    also saves its own model / optimizer state and counters to DUMP_DIR/rank-R.pt, with "batches": per
    training step, the inputs and latent noise this rank drew and the global-batch rows of every key it
    computed for them (`rng.row_keys`)."""
    from hvae_dist import rng
    from hvae_dist.cli import main
    from hvae_dist.distributed import detect_world
    from hvae_dist.train import engine

    dump_dir, args = Path(argv[0]), argv[1:]
    fit, next_batch, row_keys = engine.Trainer.fit, engine.Trainer.next_batch, rng.row_keys
    batches: list[dict] = []
    keyed_rows: list[torch.Tensor] | None = None

    def recording_row_keys(key, rows):
        if keyed_rows is not None:
            keyed_rows.append(rows.detach().cpu().clone())
        return row_keys(key, rows)

    def recording_next_batch(self, *a, **k):
        nonlocal keyed_rows
        keyed_rows = []
        try:
            x, noise = next_batch(self, *a, **k)
        finally:
            rows, keyed_rows = keyed_rows, None
        batches.append({"step": self.step, "x": x.cpu().clone(), "noise": [n.cpu().clone() for n in noise],
                        "keyed_rows": rows})
        return x, noise

    def fit_and_dump(self, *a, **k):
        result = fit(self, *a, **k)
        dump_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.backend.optimizer.state_dict(),
                    "counters": {"skipped_total": self.counters.skipped_total,
                                 "images_seen": self.counters.images_seen},
                    "step": self.step, "result": result, "batches": batches},
                   dump_dir / f"rank-{detect_world().rank}.pt")
        return result

    engine.Trainer.fit = fit_and_dump
    engine.Trainer.next_batch = recording_next_batch
    rng.row_keys = recording_row_keys
    return main(args)


def dump_command(dump_dir: Path, args: list[str], nproc: int) -> list[str]:
    return command([str(dump_dir), *args], nproc, script=str(Path(__file__).resolve()))


def rank_dumps(dump_dir: Path, nproc: int) -> list[dict]:
    return [torch.load(Path(dump_dir) / f"rank-{r}.pt", weights_only=True) for r in range(nproc)]


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
