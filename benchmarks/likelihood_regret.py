"""Likelihood Regret, batched vs the original's one-example-at-a-time refit: examples/s, same run.

    .venv/bin/python benchmarks/likelihood_regret.py [--preset tiny] [--examples 16] [--steps 100]
                                                     [--iw-samples 16] [--threads 2] [--repeats 2] [--device cpu]

Both cases refit every example's encoder for --steps Adam steps (the original's settings otherwise) and compute
the IW bound after it with S = --iw-samples: `LikelihoodRegret(batched=True)` does the --examples at once
with per-example parameters (torch.func.vmap), `batched=False` loops over them as compute_LR.py does. The cases
run interleaved (`bench_common.interleaved`); the last line is the ratio of examples/s. Parameters are random
(throughput does not depend on training). The two results agree (printed: the largest difference, nats).
Never gates tests.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from bench_common import header, interleaved, setup

from hvae_dist.config import load_config
from hvae_dist.data import get_dataset
from hvae_dist.estimators.likelihood_regret import LikelihoodRegret, RegretSettings
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import build_model


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "fashionmnist"])
    p.add_argument("--examples", type=int, default=16, help="examples refit by each case (the batch)")
    p.add_argument("--steps", type=int, default=100, help="Adam steps per example (the original's 100)")
    p.add_argument("--iw-samples", type=int, default=16, help="S of the bound after the refit")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    return p


def main() -> None:
    args = parser().parse_args()
    device, sync = setup(args.threads, args.device)
    cfg = load_config(args.preset)
    images = torch.from_numpy(np.array(get_dataset("FashionMNIST", "test", max_examples=args.examples).images))
    idx = torch.arange(len(images))
    torch.manual_seed(0)
    model = build_model(cfg.model, tuple(images.shape[1:])).eval().to(device)
    scorer = IWScorer(model, ScoreSettings(iw_samples=args.iw_samples, ks=[1]), device)
    st = RegretSettings(steps=args.steps)
    print(header(f"{args.preset} preset on {device}, Likelihood Regret: {len(images)} examples, {args.steps} Adam "
                 f"steps, S = {args.iw_samples}, fp32", args.threads))
    out = {}

    def run(batched: bool):
        lr = LikelihoodRegret(scorer, st, batched)
        return lambda: out.__setitem__(batched, lr.elbo_refit(images, idx, "FashionMNIST/test"))

    times = interleaved({"batched": run(True), "per-example loop": run(False)}, args.repeats, sync=sync)
    for name, t in times.items():
        print(f"{name:<18} {t['wall']:8.3f} s  {len(images) / t['wall']:8.2f} examples/s")
    print(f"largest difference between the two: {float((out[True] - out[False]).abs().max()):.2e} nats")
    ratio = times["per-example loop"]["wall"] / times["batched"]["wall"]
    print(f"batched vs per-example loop: {ratio:.2f}x")


if __name__ == "__main__":
    main()
