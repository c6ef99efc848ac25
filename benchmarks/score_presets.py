"""Scoring throughput on the paper's presets: `hvae score`'s IWScorer with its defaults against the paper's
method, and the achieved GFLOP/s against a conv peak, all measured in one process.

    .venv/bin/python benchmarks/score_presets.py [--preset fashionmnist] [--iw-samples 1000]
                                                 [--baseline-samples 20] [--threads 2] [--nhwc] [--device cpu]

Both methods compute ELBO_S and L>1_S (the issue's "ELBO + L>1") for the first examples of the test split
(FashionMNIST; cifar10: the 20 offline CIFAR10 test images) under torch.inference_mode:

  * sequential -- THE BASELINE, the paper's method written here: for each bound, S full forward passes
    of a batch of --baseline-batch (16) examples (model(x, modes), its own torch.randn noise), all S
    log-weights kept, then logsumexp; fp32. Its cost is linear in S, so it is timed over
    --baseline-samples per bound and its examples/s scaled by baseline-samples / S (printed as "timed
    at ..."; pass --baseline-samples S to time it in full). It runs before the first IWScorer case and
    after each one; the median of these runs is the baseline.
  * IWScorer fp32 / bf16 -- `hvae_dist.estimators.IWScorer` exactly as `hvae score` builds it without tuning
    flags: ScoreSettings defaults (sample_chunk "auto") on a batch of the device's default size (16 on a
    CPU, 128 on a GPU; --examples overrides); only --precision differs. Timed at the full S.
  * with --nhwc, IWScorer bf16 on the model converted to channels_last (not what `hvae score` does: a
    measurement for the scorer's owner).

Ratios are examples/s over the sequential fp32 examples/s (the issue's targets: >= 1.4x fp32, >= 3.5x bf16).
FLOPs (matmul / conv, torch.utils.flop_counter): the sequential method's from one pass per bound times S;
the IWScorer's from two short runs (S = 2 and 4 chunks) extrapolated linearly to S (the precompute is
the intercept). The conv peak is a 64->64 5x5 conv forward at 28x28, batch 16 (faster of NCHW / NHWC),
timed before and after. Parameters are random (throughput does not depend on training). Never gates tests.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from bench_common import count_flops, header, interleaved, peak_conv_cases, peak_gflops, setup

from hvae_dist.config import load_config
from hvae_dist.data import get_dataset, preprocess_batch
from hvae_dist.estimators.rows import default_batch_size, resolve_sample_chunk
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import build_model, lk_modes

DATASETS = {"fashionmnist": ("FashionMNIST", "test"), "cifar10": ("CIFAR10", "test")}
KS = [1]


def sequential(model, x_uint8: torch.Tensor, binarize: str, samples: int) -> dict[int, torch.Tensor]:
    """The paper's loop: S separate forward passes of the whole batch per bound."""
    x = preprocess_batch(x_uint8, binarize)
    out = {}
    with torch.inference_mode():
        for k in [0, *KS]:
            modes = lk_modes(k, model.num_layers)
            w = torch.stack([model(x, modes).elbo.double() for _ in range(samples)], 1)     # B, S
            out[k] = torch.logsumexp(w, 1) - math.log(samples)
    return out


def scorer(model, binarize: str, samples: int, precision: str) -> IWScorer:
    return IWScorer(model, ScoreSettings(iw_samples=samples, ks=KS, seed=0, binarize=binarize, precision=precision))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fashionmnist", choices=sorted(DATASETS))
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--baseline-samples", type=int, default=20, help="samples per bound the baseline is timed over")
    p.add_argument("--baseline-batch", type=int, default=16, help="examples per pass of the paper's method")
    p.add_argument("--examples", type=int, default=None, help="IWScorer's batch (default: hvae score's for the device)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nhwc", action="store_true", help="also IWScorer bf16 on a channels_last model")
    return p


def run(args) -> list[dict]:
    """The measurement; prints the table and returns its rows."""
    device, sync = setup(args.threads, args.device)
    S, SB = args.iw_samples, min(args.baseline_samples, args.iw_samples)
    n = args.examples or default_batch_size(device)

    torch.manual_seed(0)
    cfg = load_config(args.preset)
    name, split = DATASETS[args.preset]
    ds = get_dataset(name, split, max_examples=max(n, args.baseline_batch))
    all_images = torch.from_numpy(np.array(ds.images)).to(device)       # N, C, H, W uint8
    images, seq_images = all_images[:n], all_images[:args.baseline_batch]
    n, nb = len(images), len(seq_images)
    model = build_model(cfg.model, tuple(images.shape[1:])).eval().to(device)
    binarize, indices = cfg.data.binarize, torch.arange(n, device=device)
    ours = {"IWScorer fp32": (model, "fp32"), "IWScorer bf16": (model, "bf16")}
    if args.nhwc:
        nhwc = build_model(cfg.model, tuple(images.shape[1:])).eval().to(device)
        nhwc.load_state_dict(model.state_dict())
        ours["IWScorer bf16 NHWC model"] = (nhwc.to(memory_format=torch.channels_last), "bf16")
    chunk = resolve_sample_chunk(ScoreSettings().sample_chunk, n, device, S)
    print(header(f"{args.preset} preset on {device}, ELBO + L>1, S = {S}; IWScorer: {n} examples of {name}:{split}, "
                 f"defaults (sample_chunk auto = {chunk}: {n * chunk} rows per pass); sequential: {nb} examples per "
                 f"pass, timed at S = {SB} per bound and scaled", args.threads))

    peak_cases, peak_flops = peak_conv_cases(device)
    t_peak = [interleaved(peak_cases, repeats=3, sync=sync)]
    seq_s, seconds, elbo = [], {}, {}

    def run_sequential():
        sync()
        t0 = time.perf_counter()
        r = sequential(model, seq_images, binarize, SB)
        sync()
        seq_s.append(time.perf_counter() - t0)
        elbo["sequential"] = float(r[0].mean())

    run_sequential()
    for label, (m, precision) in ours.items():
        sc = scorer(m, binarize, S, precision)
        sync()
        t0 = time.perf_counter()
        res = sc.score_batch(images, indices, f"{name}/{split}")
        sync()
        seconds[label] = time.perf_counter() - t0
        elbo[label] = float(res["elbo"].mean())
        run_sequential()
    t_peak.append(interleaved(peak_cases, repeats=3, sync=sync))
    peak = {k: max(peak_gflops(t, peak_flops)[k] for t in t_peak) for k in ("fp32", "bf16")}

    # FLOPs
    x = preprocess_batch(seq_images, binarize)
    with torch.inference_mode():
        seq_flops = S * sum(count_flops(lambda k=k: model(x, lk_modes(k, model.num_layers))) for k in [0, *KS])
    ours_flops = {}
    for label, (m, precision) in ours.items():
        def short_run(chunks: int, m=m, precision=precision) -> None:
            scorer(m, binarize, chunks * chunk, precision).score_batch(images, indices, f"{name}/{split}")
        f2, f4 = count_flops(lambda: short_run(2)), count_flops(lambda: short_run(4))
        ours_flops[label] = f2 + (f4 - f2) / (2 * chunk) * (S - 2 * chunk)

    base_s = statistics.median(seq_s) * S / SB
    base = nb / base_s
    print(f"# model: {seq_flops / S / nb / (1 + len(KS)) / 1e9:.2f} GFLOP per example per forward; conv peak "
          f"(64->64 5x5 28x28 b16, best layout): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    print()
    print(f"| method | examples/s | vs sequential fp32 | seconds (S = {S}) | GFLOP / example | GFLOP/s | of conv peak |")
    print("|---|---|---|---|---|---|---|")
    print(f"| sequential fp32 (paper; timed at S = {SB}, x{S / SB:g}) | {base:.3f} | **1.00x** | {base_s:.1f} "
          f"| {seq_flops / nb / 1e9:.0f} | {seq_flops / base_s / 1e9:.0f} | {seq_flops / base_s / 1e9 / peak['fp32']:.0%} "
          "(fp32) |")
    rows = [{"method": "sequential fp32", "examples_per_s": base, "ratio": 1.0}]
    for label, (_, precision) in ours.items():
        s = seconds[label]
        gf = ours_flops[label] / s / 1e9
        rows.append({"method": label, "examples_per_s": n / s, "ratio": n / s / base})
        print(f"| {label} | {n / s:.3f} | **{n / s / base:.2f}x** | {s:.1f} | {ours_flops[label] / n / 1e9:.0f} "
              f"| {gf:.0f} | {gf / peak[precision]:.0%} ({precision}) |")
    print()
    print(f"sequential runs (s, at S = {SB}): {', '.join(f'{s:.1f}' for s in seq_s)}; mean ELBO (nats): "
          + ", ".join(f"{k} {v:.1f}" for k, v in elbo.items())
          + f"; FLOP ratio sequential / IWScorer fp32 per example: "
          f"{seq_flops / nb / (ours_flops['IWScorer fp32'] / n):.2f}")
    return rows


def main() -> None:
    run(parser().parse_args())


if __name__ == "__main__":
    main()
