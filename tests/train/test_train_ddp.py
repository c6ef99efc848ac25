"""DDP on CPU (torchrun, 2 processes, gloo): the ranks stay identical, match a single process with the
same global batch, and skip a NaN step together."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import train as th
from hvae_dist.distributed import World
from hvae_dist.train.engine import Trainer

STEPS = 6


@pytest.mark.parametrize("model_type", ["vae", pytest.param("biva", marks=pytest.mark.slow)])
def test_ddp_ranks_end_with_identical_weights_that_match_a_single_process_run(tmp_path, model_type):
    # train.free_nats=0: the free-nats clamp acts on each rank's local-batch mean KL, so with a budget a
    # 2-rank step is not the 1-rank step of the same global batch (with free_nats 0 it is, up to rounding).
    settings = {"train__free_nats": 0.0, "train__checkpoint_every": 1000, "model__type": model_type}
    dumps = tmp_path / "dumps"
    th.run(th.dump_command(dumps, th.train_args(tmp_path / "ddp", STEPS, "ddp", **settings), nproc=2))
    rank0, rank1 = th.rank_dumps(dumps, 2)
    assert rank0["step"] == rank1["step"] == STEPS
    # Every rank applied the same all-reduced updates: bitwise equal weights and Adam moments.
    th.assert_bitwise_equal(rank0["model"], rank1["model"], "rank 0 vs rank 1 model")
    th.assert_bitwise_equal(rank0["optimizer"], rank1["optimizer"], "rank 0 vs rank 1 optimizer")
    th.assert_bitwise_equal(th.latest(tmp_path / "ddp")["model"], rank0["model"], "checkpoint vs rank 0")

    torch.manual_seed(1234)  # the engine must not depend on the caller's RNG
    single = Trainer(th.small_config(**settings), tmp_path / "single", World(), torch.device("cpu"))
    init = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.fit(STEPS)
    want = single.model.state_dict()
    # Same data order, binarization and latent noise for the global batch; only the reduction order of
    # the gradient mean differs (two local means of 4, averaged, vs one mean of 8). Adam turns that
    # rounding into O(lr) steps where a gradient is *only* rounding: the direction v of a weight-normed
    # 1x1 conv with one input channel (w = g v / |v|, so dL/dv = 0 exactly). Those raw tensors are
    # compared through the function below instead; every tensor with a real gradient is compared here.
    names = [n for n, _ in single.model.named_parameters()]
    state = single.backend.optimizer.state_dict()["state"]
    noise_only = {n for i, n in enumerate(names) if float(state[i]["exp_avg_sq"].max().sqrt()) < 1e-6}
    assert len(noise_only) <= 2, f"unexpectedly many parameters without a gradient: {sorted(noise_only)}"
    compared = {k for k in want if k not in noise_only}
    th.assert_close({k: rank0["model"][k] for k in compared}, {k: want[k] for k in compared},
                    rtol=1e-4, atol=1e-5, what="DDP vs single-process weights")
    assert max(float((want[k] - init[k]).abs().max()) for k in compared) > 1e-3, "the weights did not move"
    # The trained functions agree too: ELBO of both models on one fixed batch and fixed noise.
    ddp_model = Trainer(th.small_config(**settings), tmp_path / "check", World(), torch.device("cpu")).model
    ddp_model.load_state_dict(rank0["model"])
    x, noise = single.next_batch()
    with torch.no_grad():
        got, ref = ddp_model.eval()(x, noise=noise).elbo, single.model.eval()(x, noise=noise).elbo
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)

def test_nan_loss_on_one_step_is_skipped_and_logged_on_every_ddp_rank(tmp_path):
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    args = th.train_args(run_dir, STEPS, "ddp", train__checkpoint_every=1000)
    proc = th.run(th.dump_command(dumps, args, nproc=2), HVAE_DEBUG_NAN_AT_STEP="2")
    output = proc.stdout + proc.stderr
    assert output.count("step 2: skipped update (grad norm nan)") == 2, output[-4000:]   # rank 0 and rank 1
    ranks = th.rank_dumps(dumps, 2)
    for r in ranks:
        assert r["step"] == STEPS and r["counters"]["skipped_total"] == 1
        assert r["result"]["reason"] == "finished"
        assert all(torch.isfinite(v).all() for v in r["model"].values() if v.is_floating_point())
    th.assert_bitwise_equal(ranks[0]["model"], ranks[1]["model"], "rank 0 vs rank 1 after the skipped step")
    ck = th.latest(run_dir)
    assert ck["step"] == STEPS and ck["counters"]["skipped_total"] == 1
    skipped_total = th.tb_values(run_dir, "train/skipped_total")
    assert [s for s, _ in skipped_total] == list(range(1, STEPS + 1))
    # Step index 2 is the third update; the monitor logs it at trainer.step == 3 (after the update).
    assert [v for _, v in skipped_total] == [0, 0, 1, 1, 1, 1]
    assert [v for _, v in th.tb_values(run_dir, "train/skipped")] == [0, 0, 1, 0, 0, 0]
    assert math.isnan(dict(th.tb_values(run_dir, "train/loss"))[3])


def test_each_ddp_rank_draws_exactly_its_rows_of_the_single_process_batch_and_no_others(tmp_path):
    # Perturbation, dynamic binarization and 2 samples per example: every kind of training noise is drawn.
    settings = {"data__perturb_rate": 0.1, "train__train_samples": 2, "train__checkpoint_every": 1000}
    steps, dumps = 3, tmp_path / "dumps"
    th.run(th.dump_command(dumps, th.train_args(tmp_path / "ddp", steps, "ddp", **settings), nproc=2))
    ranks = th.rank_dumps(dumps, 2)

    single = Trainer(th.small_config(**settings), tmp_path / "single", World(), torch.device("cpu"))
    batch, samples = single.cfg.train.batch_size, 2
    local = batch // 2
    for step in range(steps):
        x, noise = single.next_batch()       # the whole global batch, drawn by one process
        assert x.shape[0] == batch * samples
        for r, dump in enumerate(ranks):
            got = dump["batches"][step]
            assert got["step"] == step
            own = slice(r * local * samples, (r + 1) * local * samples)
            assert torch.equal(got["x"], x[own]), f"rank {r} step {step}: inputs differ from the single-process rows"
            assert len(got["noise"]) == len(noise)
            for i, (a, b) in enumerate(zip(got["noise"], noise)):
                assert torch.equal(a, b[own]), f"rank {r} step {step}: latent layer {i} noise differs"
            # Every key the rank computed (binarization, perturbation, latents) was for one of its own rows.
            assert len(got["keyed_rows"]) == 3
            for rows in got["keyed_rows"]:
                assert rows.tolist() == list(range(r * local, (r + 1) * local)), (r, step, rows.tolist())
        single._advance()
