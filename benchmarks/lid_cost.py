"""Cost of the LID fields (`hvae score --lid`) per example against one importance-weighted sample, measured in
one process on the `tiny` and `fashionmnist` presets (random weights: the cost does not depend on training).

    .venv/bin/python benchmarks/lid_cost.py [--presets tiny fashionmnist] [--examples 8] [--repeats 3]
                                            [--threads 1] [--lid-ks 0] [--rank R] [--chunk 32]

Cases, interleaved (bench_common.interleaved: each round runs every case once, medians compared):
  * one IW sample -- THE BASELINE: `IWScorer.score_batch` with S = 1 and ks = [] (one ELBO forward pass
    and its precompute per example) on a batch of --examples;
  * LID -- `LidEstimator.score_batch` on the same batch (the latent point, the Jacobian of the decoder mean
    with respect to z>k for each --lid-ks, its SVD), full Jacobian unless --rank R.
Printed per preset: seconds per example of each, the latent dimension d_k, and the ratio LID / one IW
sample; the last line gives the ratios of every preset (what the README quotes). Never gates tests.
"""
from __future__ import annotations

import argparse
import math

import torch
from bench_common import header, interleaved

from hvae_dist.config import load_config
from hvae_dist.estimators.lid import LidEstimator, LidSettings
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import build_model


def measure(preset: str, examples: int, repeats: int, ks: list[int], rank: int | None, chunk: int) -> dict:
    cfg = load_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28)).eval()
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(examples, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    idx = torch.arange(examples)
    scorer = IWScorer(model, ScoreSettings(iw_samples=1, ks=[], binarize=cfg.data.binarize, sample_chunk=1))
    lid = LidEstimator(model, LidSettings(ks=ks, rank=rank, chunk=chunk))
    x = scorer.preprocess(images, "FashionMNIST/test", idx)
    cases = {"one IW sample": lambda: scorer.score_batch(images, idx, "FashionMNIST/test"),
             "LID": lambda: lid.score_batch(x, idx, "FashionMNIST/test")}
    t = interleaved(cases, repeats=repeats, warmup=1)
    dims = [sum(math.prod(s) for s in model.latent_shapes[k:]) for k in ks]
    base, cost = t["one IW sample"]["wall"] / examples, t["LID"]["wall"] / examples
    print(f"{preset}: one IW sample {base * 1e3:.2f} ms/example, LID (ks {ks}, d_k {dims}, "
          f"{'full' if rank is None else f'rank {rank}'}) {cost * 1e3:.1f} ms/example: {cost / base:.0f}x", flush=True)
    return {"preset": preset, "ratio": cost / base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "fashionmnist"])
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lid-ks", nargs="+", type=int, default=[0])
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--chunk", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(header("LID cost per example vs one IW sample (benchmarks/lid_cost.py)", args.threads))
    results = [measure(pr, args.examples, args.repeats, args.lid_ks, args.rank, args.chunk) for pr in args.presets]
    print("LID / one IW sample per example: " + ", ".join(f"{r['preset']} {r['ratio']:.0f}x" for r in results))


if __name__ == "__main__":
    main()
