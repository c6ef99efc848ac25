"""Faults a training run must survive without losing data (issue 15): deleted, truncated, random or
malicious checkpoints, a `--max-steps` below the run's step, two trainers on one run dir, non-finite or
impossible settings, a bad validation set, a full disk; and what a run without a terminal shows.

Each test reproduces the fault as it was reported and asserts the new behaviour: the newest checkpoint
that loads is used (with a warning), nothing is overwritten or deleted, and a user's mistake is one line
`hvae train: error: ...` with exit status 2. The runs are the tests' small 8-channel tiny model, in this
process through `hvae_dist.cli.main` unless a second process is the point.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from helpers import train as th
from hvae_dist import checkpoint as ck
from hvae_dist.cli import main
from hvae_dist.errors import CheckpointError

CKPT_EVERY = 2


one_thread = th.one_thread   # autouse: one intra-op thread in every test of this file


def _train(run_dir, max_steps: int, *extra: str, **settings) -> int:
    """`hvae train` in this process (the small tiny model, a checkpoint every 2 steps, all kept)."""
    settings = {"train__checkpoint_every": CKPT_EVERY, **settings}
    return main(th.train_args(run_dir, max_steps, **settings) + list(extra))


def _files(run_dir) -> dict[str, bytes]:
    d = ck.checkpoint_dir(run_dir)
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.pt"))}


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("hvae train: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A finished 6-step run (step-2/4/6.pt and latest.pt) to copy, and the uninterrupted 8-step run."""
    base = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)   # as in every test: bitwise comparisons need the same thread count
    assert _train(base / "six", 6) == 0
    assert _train(base / "eight", 8) == 0
    return base / "six", th.latest(base / "eight")


@pytest.fixture
def run6(six_steps, tmp_path):
    return th.copy_run(six_steps[0], tmp_path / "run")


# ----- 1. checkpoint recovery -----
def test_deleted_latest_resumes_from_the_newest_numbered_checkpoint_with_a_warning(run6, six_steps, caplog):
    (run6 / "checkpoints" / "latest.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="hvae_dist"):
        assert _train(run6, 8) == 0
    # Before: "starting run ... step=0", all compute redone. Now step-6.pt, named with the reason.
    assert "resuming from" in caplog.text and "step-6.pt (step 6)" in caplog.text
    assert "latest.pt: missing" in caplog.text
    th.assert_bitwise_equal(th.latest(run6), six_steps[1], "resumed from step-6.pt vs uninterrupted")


def test_truncated_latest_resumes_from_the_newest_numbered_checkpoint(run6, six_steps, caplog):
    latest = run6 / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="hvae_dist"):
        assert _train(run6, 8) == 0
    assert "step-6.pt (step 6)" in caplog.text and "latest.pt: truncated" in caplog.text
    assert "weights_only" not in caplog.text
    th.assert_bitwise_equal(th.latest(run6), six_steps[1], "resumed past a truncated latest.pt")
    # The broken file is kept for inspection, out of the way of later resumes.
    (aside,) = (run6 / "checkpoints").glob("superseded-*")
    assert (aside / "latest.pt").stat().st_size < (run6 / "checkpoints" / "latest.pt").stat().st_size


def test_a_numbered_checkpoint_newer_than_latest_is_preferred(run6):
    # A crash between writing step-6.pt and latest.pt leaves latest.pt one checkpoint behind.
    shutil.copy(run6 / "checkpoints" / "step-4.pt", run6 / "checkpoints" / "latest.pt")
    found = ck.load_newest(run6)
    assert found.path.name == "step-6.pt" and found.state["step"] == 6


def test_deleted_latest_and_a_lower_max_steps_overwrite_and_delete_nothing(run6, caplog):
    """The reported data loss: latest.pt deleted, re-run with --max-steps below the run's step and keep_last 1
    wrote a 3-step model as latest.pt, pruned its own new step-3.pt, and `hvae score` scored that model."""
    (run6 / "checkpoints" / "latest.pt").unlink()
    before = _files(run6)
    config_before = (run6 / "config.json").read_text()
    with caplog.at_level(logging.WARNING, logger="hvae_dist"):
        assert _train(run6, 3, train__keep_last=1) == 0
    assert "the run is at step 6 and max_steps is 3: nothing to train, no checkpoint written" in caplog.text
    assert _files(run6) == before          # no latest.pt from a smaller model, nothing pruned
    assert (run6 / "config.json").read_text() == config_before
    assert not list((run6 / "checkpoints").glob("superseded-*"))
    # Scoring does not fall back silently: its scores would come from another model. It names the choice.
    with pytest.raises(CheckpointError, match=r"latest\.pt does not exist; numbered checkpoints of this run, newest "
                                              r"first: step-6\.pt, step-4\.pt, step-2\.pt; pick one with --checkpoint"):
        ck.load_model_for_eval(run6)


def test_scoring_with_a_broken_latest_names_the_numbered_checkpoints_and_checkpoint_flag(run6):
    latest = run6 / "checkpoints" / "latest.pt"
    latest.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        ck.load_model_for_eval(run6)
    msg = str(e.value)
    assert "cannot be loaded: empty file" in msg and "step-6.pt, step-4.pt" in msg and "--checkpoint" in msg
    model, cfg, path = ck.load_model_for_eval(run6, run6 / "checkpoints" / "step-6.pt")
    assert path.name == "step-6.pt"


def test_a_run_from_before_the_counter_based_noise_is_refused_on_resume_but_still_scores(run6, capsys):
    # Schema 1 checkpoints drew the training noise per global batch from a seeded generator: resuming one
    # now would silently change its data and noise mid-run.
    for p in (run6 / "checkpoints").glob("*.pt"):
        state = torch.load(p, weights_only=True)
        state["schema_version"] = 1
        torch.save(state, p)
    before = _files(run6)
    assert _train(run6, 8) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "schema_version 1" in line and "counter-based" in line and "--restart" in line and "hvae score" in line
    assert _files(run6) == before
    model, _, path = ck.load_model_for_eval(run6)
    assert path.name == "latest.pt" and sum(p.numel() for p in model.parameters()) > 0


def test_random_bytes_in_every_checkpoint_is_one_error_listing_them(run6, capsys):
    for p in (run6 / "checkpoints").glob("*.pt"):
        p.write_bytes(b"" if p.name == "step-2.pt" else os.urandom(4096))
    before = _files(run6)
    # Before: torch's UnpicklingError text, which advises weights_only=False. Now one line listing them.
    assert _train(run6, 8) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "no checkpoint in" in line and "can be loaded" in line
    for name in ("latest.pt: not a checkpoint", "step-6.pt: not a checkpoint", "step-4.pt: not a checkpoint",
                 "step-2.pt: empty file"):
        assert name in line, line
    assert "--checkpoint FILE" in line and "--restart" in line
    assert "weights_only" not in line
    assert _files(run6) == before            # refused: never a fresh run over them

    # The explicit way out: start over, with the old files kept aside.
    assert _train(run6, 2, "--restart") == 0
    assert th.latest(run6)["step"] == 2
    (aside,) = (run6 / "checkpoints").glob("superseded-*")
    assert {p.name: p.read_bytes() for p in aside.glob("*.pt")} == before


def test_a_refused_pickle_gets_our_reason_never_weights_only_false(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(path)
    assert "refused pickle" in str(e.value) and "system" in str(e.value)
    assert "weights_only" not in str(e.value)


def test_checkpoint_flag_resumes_from_the_chosen_file_and_sets_newer_ones_aside(six_steps, tmp_path, caplog):
    run = th.copy_run(six_steps[0], tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="hvae_dist"):
        assert _train(run, 4, "--checkpoint", str(run / "checkpoints" / "step-2.pt")) == 0
    assert th.latest(run)["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["latest.pt", "step-2.pt", "step-4.pt"]
    (aside,) = (run / "checkpoints").glob("superseded-*")
    assert sorted(p.name for p in aside.glob("*.pt")) == ["latest.pt", "step-4.pt", "step-6.pt"]
    assert "continuing from step 2" in caplog.text
    ref = tmp_path / "ref"
    assert _train(ref, 4) == 0
    th.assert_bitwise_equal(th.latest(run), th.latest(ref), "resumed from --checkpoint step-2.pt vs uninterrupted")


def test_pruning_never_deletes_the_file_it_just_wrote_nor_a_newer_one(tmp_path):
    for step in (10, 5):
        ck.save_checkpoint({"step": step}, tmp_path, keep_last=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-5.pt", "step-10.pt"]
    ck.save_checkpoint({"step": 7}, tmp_path, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-5.pt", "step-7.pt", "step-10.pt"]
    ck.save_checkpoint({"step": 8}, tmp_path, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-7.pt", "step-8.pt", "step-10.pt"]


# ----- 2. the run-dir lock -----
def test_a_second_trainer_on_the_same_run_dir_refuses_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    cmd = th.command(th.train_args(run, 100_000, train__checkpoint_every=100_000))
    first = th.start(cmd, tmp_path / "first.log")
    try:
        th.wait_for_text(run / "train.log", " step 2 loss ", first)
        second = subprocess.run(cmd, env=th.env(), cwd=th.REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        line = _one_line_error(second.stderr)
        assert f"run dir {run} is in use by process {first.pid} on host {socket.gethostname()}" in line
        assert second.stderr.count("\n") == 1, second.stderr[-3000:]
        log = (run / "train.log").read_text()
        assert log.count("starting run") == 1 and "resuming run" not in log   # the second wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    assert th.latest(run)["step"] > 2       # the first one's checkpoint on SIGTERM is intact


HOLD_LOCK = """
import sys, time
from hvae_dist.locking import FileLock
FileLock(sys.argv[1], "run dir").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_ddp_ranks_all_stop_when_rank_0_cannot_lock_the_run_dir(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE,
                              text=True, env=th.env())
    try:
        assert holder.stdout.readline().strip() == "held"
        # Rank 1 must not wait for rank 0 in a collective forever: the whole world ends well within the timeout.
        proc = subprocess.run(th.command(th.train_args(run, 4, "ddp"), nproc=2), env=th.env(), cwd=th.REPO,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode != 0
        assert f"is in use by process {holder.pid} on host" in proc.stderr, proc.stderr[-3000:]
        assert not (run / "checkpoints").exists() and not (run / "train.log").exists()
    finally:
        holder.kill()
        holder.wait()


# ----- 3. config checked when the run starts -----
@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_lr_is_refused_before_anything_is_written(tmp_path, capsys, value):
    # Before: lr=Infinity "finished" with every weight NaN; lr=NaN crashed with a traceback, leaving an empty run dir.
    assert _train(tmp_path / "run", 3, "--set", f"train.lr={value}") == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "config key 'train.lr'" in line and "finite" in line
    assert not (tmp_path / "run").exists()


def test_zero_3_in_a_deepspeed_json_is_refused_before_deepspeed_is_set_up(tmp_path, capsys):
    # Before: refused after ~45 s of DeepSpeed set-up (its import, the process group, the engine).
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert _train(tmp_path / "run", 3, "--backend", "deepspeed", "--set", f"train.deepspeed_config={ds}") == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "config key 'train.deepspeed_config'" in line and "zero_optimization.stage=3" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, fragment", [
    ("MNIST:valid", "unknown split 'valid'"),
    ("KMNIST:test", "not available on this machine"),
    ("Digits:test", "has images of shape (1, 8, 8)"),
])
def test_a_bad_validation_set_is_refused_before_training(tmp_path, capsys, spec, fragment):
    # Before: found at the first evaluation, after the training it was meant to follow.
    sets = json.dumps(["FashionMNIST:validation", spec])
    assert _train(tmp_path / "run", 3, "--set", f"data.val_datasets={sets}", train__eval_every=1000) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "config key 'data.val_datasets'" in line and spec in line and fragment in line, line
    assert "may change on resume" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_validation_sets_may_change_on_resume(run6, capsys):
    sets = json.dumps(["FashionMNIST:validation", "Digits:test"])
    assert _train(run6, 8, "--set", f"data.val_datasets={sets}", train__eval_every=1000) == 2   # checked on resume too
    assert "Digits:test" in _one_line_error(capsys.readouterr().err)
    sets = json.dumps(["FashionMNIST:validation", "AnimalMNIST:test"])
    assert _train(run6, 8, "--set", f"data.val_datasets={sets}") == 0
    assert json.loads((run6 / "config.json").read_text())["data"]["val_datasets"] == json.loads(sets)
    assert th.latest(run6)["step"] == 8
    # What does change the training computation still may not.
    assert _train(run6, 9, "--set", "data.perturb_rate=0.1") == 2
    assert "cannot change data.perturb_rate" in _one_line_error(capsys.readouterr().err)


# ----- 4. evaluation memory -----
def _small_model(**settings):
    from hvae_dist.model import build_model
    cfg = th.small_config(model__input_shape=[1, 28, 28], **settings)
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


def test_evaluation_bounds_the_rows_per_pass(monkeypatch):
    """Before: sample_chunk = eval_iw_samples, so a pass held batch x S rows (the fashionmnist preset: 128 x 100 =
    12,800 rows, 15 GB). Now at most the one rows-per-pass policy's rows of the device, whatever S."""
    from hvae_dist.estimators.rows import ROWS_PER_PASS, default_batch_size
    from hvae_dist.train.evaluate import validation_scalars
    model, cfg = _small_model(train__eval_examples=64, train__eval_iw_samples=100)
    rows: list[int] = []
    forward = model.forward

    def counting(*a, **k):
        out = forward(*a, **k)
        rows.append(out.elbo.shape[0])
        return out

    monkeypatch.setattr(model, "forward", counting)
    validation_scalars(model, cfg, torch.device("cpu"))
    cpu_batch = default_batch_size("cpu")
    assert rows and max(rows) <= max(ROWS_PER_PASS["cpu"], cpu_batch) < cpu_batch * 100


def test_evaluation_values_do_not_depend_on_the_rows_per_pass():
    from hvae_dist.train.evaluate import validation_scalars
    model, cfg = _small_model(train__eval_examples=12, train__eval_iw_samples=6)
    one_pass = validation_scalars(model, cfg, torch.device("cpu"), batch_size=4, sample_chunk=6)   # all 6 samples
    chunked = validation_scalars(model, cfg, torch.device("cpu"), batch_size=4, sample_chunk=2)    # 2 per pass
    assert one_pass.keys() == chunked.keys()
    for key in one_pass:
        assert chunked[key] == pytest.approx(one_pass[key], rel=1e-6, abs=1e-6), key


# ----- 5. evaluation in train.log -----
def test_evaluation_logs_its_start_and_results_to_train_log(tmp_path):
    run = tmp_path / "run"
    assert _train(run, 2, train__eval_every=2, train__eval_examples=16, train__eval_iw_samples=2) == 0
    log = (run / "train.log").read_text()
    assert "step 2: evaluating FashionMNIST:validation, MNIST:validation (16 examples each, 2 importance samples)" in log
    (line,) = [line for line in log.splitlines() if "step 2: validation (" in line]
    for key in ("FashionMNIST_validation/elbo", "MNIST_validation/llr1", "auroc/MNIST_validation/llr1",
                "active_units/layer1"):
        assert key in line, line


# ----- 6. help -----
def test_train_help_has_an_example_every_default_set_syntax_and_what_may_change_on_resume(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "hvae train --config tiny --run-dir" in out
    assert "--set KEY=VALUE overrides one config field" in out and "train.lr=1e-3" in out
    assert "may change on resume" in out and "data.{val_datasets,root,download}" in out
    helps: dict[str, str] = {}
    for line in out.split("options:")[1].split("examples:")[0].splitlines():
        if line.startswith("  -"):
            option = line.split()[0].rstrip(",")
            helps[option] = line
        elif line.strip():
            helps[option] += " " + line.strip()
    assert list(helps) == ["-h", "--config", "--run-dir", "--backend", "--precision", "--max-steps", "--set",
                           "--progress", "--checkpoint", "--restart"]
    no_default = [o for o, text in helps.items() if "default" not in text and o not in ("-h", "--run-dir")]
    assert not no_default, no_default         # --run-dir is required, -h is argparse's


# ----- 7. a full disk while saving -----
def test_disk_full_while_saving_leaves_no_temp_file_and_one_line_naming_path_and_free_space(run6, capsys, monkeypatch):
    real_save = torch.save

    def save_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)          # the bytes go out, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    before = _files(run6)
    monkeypatch.setattr(ck.torch, "save", save_then_fail)
    assert _train(run6, 8) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"cannot write checkpoint {run6 / 'checkpoints' / 'step-8.pt'}: No space left on device" in line
    assert " free of " in line and "free some space" in line
    assert not [p for p in (run6 / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert _files(run6) == before
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert _train(run6, 8) == 0 and th.latest(run6)["step"] == 8   # the same command works once there is space


@pytest.fixture
def small_fs(tmp_path):
    """A 512 KiB tmpfs: room for a run dir's config, log and events, not for the small model's ~700 KiB checkpoint."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {mount.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk_while_saving_is_one_line_and_leaves_no_temp_file(small_fs, capsys):
    # torch's zip writer reports ENOSPC as "RuntimeError: unexpected pos ...": before, a raw traceback and rc 1.
    run = small_fs / "run"
    assert _train(run, 2) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"cannot write checkpoint {run / 'checkpoints' / 'step-2.pt'}: No space left on device (" in line, line
    assert " KiB free of " in line
    assert not [p.name for p in (run / "checkpoints").iterdir()]      # no temp file, no torn checkpoint
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    assert _train(run, 2) == 0 and th.latest(run)["step"] == 2          # the same command, once there is space

