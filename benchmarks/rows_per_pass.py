"""Rows per forward pass of the IW scorer: examples/s and activation memory on the paper's preset, one run.

    .venv/bin/python benchmarks/rows_per_pass.py [--preset fashionmnist] [--threads 2] [--examples 128]
                                                 [--iw-samples 16] [--repeats 2] [--device cpu]

Measures what `hvae_dist.estimators.rows.ROWS_PER_PASS` is chosen from: the same work (the first --examples
test images, ELBO_S and L>1_S with S = --iw-samples, fp32, `IWScorer.score_batch` as `hvae score` and the
training's evaluation run it) split into forward passes of R = batch x sample_chunk rows, for several R and two
batch sizes (16: `hvae score`'s CPU batch; 128: the evaluation's). Every case does the same rows; the cases run
interleaved (`bench_common.interleaved`), so they share the machine's load, and the table gives each case's
median seconds, examples/s, and its ratio to the fastest. The activation estimate is the largest activation of
one pass (R x 64 x 28 x 28 fp32 for the fashionmnist preset's first stage). Parameters are random (throughput
does not depend on training). Never gates tests.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from bench_common import header, interleaved, setup

from hvae_dist.config import load_config
from hvae_dist.data import get_dataset
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import build_model

DATASETS = {"fashionmnist": ("FashionMNIST", "test"), "tiny": ("FashionMNIST", "test")}
CASES = ((16, 1), (16, 4), (16, 16), (128, 1), (128, 2), (128, 4), (128, 8), (128, 16))
"""(batch, sample_chunk) pairs: rows per pass 16 .. 2,048."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fashionmnist", choices=sorted(DATASETS))
    p.add_argument("--examples", type=int, default=128, help="examples scored by every case")
    p.add_argument("--iw-samples", type=int, default=16, help="S of each bound (ELBO and L>1)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    return p


def main() -> None:
    args = parser().parse_args()
    device, sync = setup(args.threads, args.device)
    cfg = load_config(args.preset)
    name, split = DATASETS[args.preset]
    images = torch.from_numpy(np.array(get_dataset(name, split, max_examples=args.examples).images))
    n, S = len(images), args.iw_samples
    torch.manual_seed(0)
    model = build_model(cfg.model, tuple(images.shape[1:])).eval().to(device)
    channels = cfg.model.config_deterministic[0][0]["out_channels"]
    print(header(f"{args.preset} preset on {device}, ELBO + L>1, S = {S}, {n} examples of {name}:{split}, fp32",
                 args.threads))

    def case(batch: int, chunk: int):
        sc = IWScorer(model, ScoreSettings(iw_samples=S, ks=[1], binarize=cfg.data.binarize, sample_chunk=chunk),
                      device)

        def run() -> None:
            for a in range(0, n, batch):
                sc.score_batch(images[a:a + batch], torch.arange(a, min(a + batch, n)), f"{name}/{split}")
        return run

    cases = {f"batch {b:4d} x chunk {c:3d} = {b * c:5d} rows": case(b, c) for b, c in CASES if c <= S}
    times = interleaved(cases, repeats=args.repeats, sync=sync)
    best = min(t["wall"] for t in times.values())
    print(f"{'case':40s} {'s':>8s} {'examples/s':>11s} {'vs best':>8s} {'activation MB':>14s}")
    for label, t in times.items():
        rows = int(label.split("=")[1].split()[0])
        mb = rows * channels * math.prod(images.shape[2:]) * 4 / 2**20
        print(f"{label:40s} {t['wall']:8.2f} {n / t['wall']:11.2f} {best / t['wall']:8.2f} {mb:14.0f}")


if __name__ == "__main__":
    main()
