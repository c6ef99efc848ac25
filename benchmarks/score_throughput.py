"""Throughput and peak memory of the IW scorer vs the sequential method, measured in the same run.

    .venv/bin/python benchmarks/score_throughput.py [--examples 16] [--iw-samples 1000] [--baseline-samples 100]

Model: the `tiny` preset (3 latent layers) on FashionMNIST 1x28x28, random init (throughput does not
depend on training). Both methods compute ELBO_S and L>k_S for k = 1, 2 (3 bounds x S samples) for the
same examples under torch.inference_mode, with the same thread count:

- sequential (the paper's script): for each bound, for s in range(S): out = model(x, modes) on the
  batch of examples; all S log-weights kept, then logsumexp. Its cost is linear in S, so with
  --baseline-samples B < S it is timed over B samples per bound and its examples/s scaled by B / S
  (printed as "extrapolated"); pass --baseline-samples S to time it in full.
- ours (`hvae_dist.estimators.IWScorer`): precompute once per example, samples streamed in chunks of
  --sample-chunk per example (rows per pass = examples * chunk), counter-based noise, online logsumexp.

Each measurement runs in a fresh process, so peak memory is that process's peak RSS above its RSS
before scoring (CPU) or torch.cuda.max_memory_allocated (CUDA). Ours is also run at S / 10 to show that
its peak memory does not grow with S. Never gates tests.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _setup(args):
    import numpy as np
    import torch

    from hvae_dist.config import load_config
    from hvae_dist.data import get_dataset
    from hvae_dist.model import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config("tiny")
    device = torch.device(args.device)
    model = build_model(cfg.model, (1, 28, 28)).eval().to(device)
    images = get_dataset("FashionMNIST", "test", max_examples=args.examples).images
    return model, cfg, torch.from_numpy(np.array(images)), device


def _sequential(model, x_uint8, samples, ks, device):
    """The paper's loop: S separate forward passes of the whole batch per bound."""
    import torch

    from hvae_dist.data import preprocess_batch
    from hvae_dist.model import lk_modes

    x = preprocess_batch(x_uint8.to(device), "dynamic")
    out = {}
    with torch.inference_mode():
        for k in [0, *ks]:
            modes = lk_modes(k, model.num_layers)
            w = torch.stack([model(x, modes).elbo.double() for _ in range(samples)], 1)   # B, S
            out[k] = (torch.logsumexp(w, 1) - math.log(samples)).cpu()
    return out


def _worker(method: str, samples: int, args, queue) -> None:
    import torch

    from hvae_dist.estimators.scorer import IWScorer, ScoreSettings

    model, cfg, x, device = _setup(args)
    ks = [1, 2]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    if method == "ours":
        scorer = IWScorer(model, ScoreSettings(iw_samples=samples, ks=ks, seed=0, binarize=cfg.data.binarize,
                                               sample_chunk=args.sample_chunk), device)
        res = scorer.score_batch(x, torch.arange(len(x)), "FashionMNIST/test")
        elbo = float(res["elbo"].mean())
    else:
        elbo = float(_sequential(model, x, samples, ks, device)[0].mean())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    queue.put({"seconds": seconds, "peak_mb": peak, "elbo": elbo})


def measure(method: str, samples: int, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(method, samples, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--baseline-samples", type=int, default=100, help="samples the sequential method is timed over")
    p.add_argument("--sample-chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    S, B = args.iw_samples, min(args.baseline_samples, args.iw_samples)
    print(f"tiny preset, FashionMNIST 1x28x28, {args.examples} examples, ELBO + L>1 + L>2, device={args.device}, "
          f"threads={args.threads}, sample chunk {args.sample_chunk}")
    base = measure("sequential", B, args)
    base_rate = args.examples / (base["seconds"] * S / B)
    ours = measure("ours", S, args)
    ours_rate = args.examples / ours["seconds"]
    small = measure("ours", max(1, S // 10), args)
    note = "" if B == S else f" (timed at S={B}, extrapolated linearly to S={S})"
    print(f"sequential  S={S:5d}: {base_rate:8.3f} examples/s  peak {base['peak_mb']:8.1f} MiB{note}")
    print(f"ours        S={S:5d}: {ours_rate:8.3f} examples/s  peak {ours['peak_mb']:8.1f} MiB  "
          f"mean ELBO {ours['elbo']:.2f} nats (sequential at S={B}: {base['elbo']:.2f})")
    print(f"ours        S={max(1, S // 10):5d}: {args.examples / small['seconds']:8.3f} examples/s  "
          f"peak {small['peak_mb']:8.1f} MiB")
    print(f"speed-up ours / sequential: {ours_rate / base_rate:.2f}x;  peak memory ours S={S} / S={S // 10}: "
          f"{ours['peak_mb'] / max(small['peak_mb'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
