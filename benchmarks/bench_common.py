"""Helpers shared by the preset benchmarks (train_presets.py, score_presets.py): interleaved timing, the conv
peak of this machine measured in the same run, model FLOPs, the header line.

Every benchmark here compares candidates with a baseline measured in the same process: each repetition runs
every case once, in turn, so that all of them see the same machine load, and the medians are compared. On a
shared machine the absolute numbers move from run to run; the ratios are what to read.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

# The reference conv of the issue: 64 -> 64 channels, 5x5, 28x28 (the fashionmnist preset's first stage), batch 16.
PEAK_CONV = dict(batch=16, channels=64, kernel=5, size=28)
PEAK_CALLS = 16   # back-to-back calls per timing (one bf16 call takes ~1 ms: too short to time alone)


def setup(threads: int, device: str) -> tuple[torch.device, Callable[[], None]]:
    """torch.set_num_threads(threads); returns (device, sync), sync waiting for the device's queued work (a no-op
    on CPU), to be called before each clock read."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    return dev, (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def header(title: str, threads: int) -> str:
    load = os.getloadavg()[0]
    return (f"# {title}; torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, load average "
            f"{load:.1f} at the start")


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """{name: {"wall", "cpu", "min_wall"}} seconds per call: medians over `repeats` rounds, each round calling
    every case once in turn (after `warmup` untimed rounds). cpu is the process CPU time (all threads)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    walls: dict[str, list[float]] = {k: [] for k in cases}
    cpus: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    return {k: {"wall": statistics.median(walls[k]), "cpu": statistics.median(cpus[k]), "min_wall": min(walls[k])}
            for k in cases}


def peak_conv_cases(device: torch.device) -> tuple[dict[str, Callable[[], object]], float]:
    """Forward calls of the reference conv, fp32 / bf16 x NCHW / NHWC (the peak of a precision is the faster
    layout), each timed over PEAK_CALLS back-to-back calls; and its FLOPs per timed case."""
    p = PEAK_CONV
    b, c, k, s = p["batch"], p["channels"], p["kernel"], p["size"]
    cases = {}
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(b, c, s, s, device=device).to(dtype).contiguous(memory_format=fmt)
            w = (torch.randn(c, c, k, k, device=device) * 0.02).to(dtype).contiguous(memory_format=fmt)
            name = f"peak {'fp32' if dtype == torch.float32 else 'bf16'} {'nhwc' if fmt == torch.channels_last else 'nchw'}"

            def run(x=x, w=w):
                with torch.no_grad():
                    for _ in range(PEAK_CALLS):
                        F.conv2d(x, w, padding=k // 2)
            cases[name] = run
    flops = PEAK_CALLS * 2 * b * c * c * k * k * s * s
    return cases, flops


def peak_gflops(times: dict[str, dict[str, float]], flops: float) -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s}: the faster layout's median."""
    out = {}
    for prec in ("fp32", "bf16"):
        best = min(v["wall"] for k, v in times.items() if k.startswith(f"peak {prec} "))
        out[prec] = flops / best / 1e9
    return out


class _FlopSum(TorchDispatchMode):
    """FlopCounterMode's formulas without its module tracker, which fails under torch.inference_mode (the
    scorer's mode) with weight-normed layers ("no attribute 'weight'")."""

    def __init__(self):
        super().__init__()
        self.registry, self.total = FlopCounterMode(display=False).flop_registry, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten.conv2d.default:             # inference mode dispatches it undecomposed
            w = args[1]
            self.total += 2 * out.numel() * w[0].numel()       # per output element: C_in/groups x kh x kw MACs
        elif func is torch.ops.aten.linear.default:
            self.total += 2 * out.numel() * args[1].shape[1]
        else:
            formula = self.registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> float:
    """Matmul / conv FLOPs (torch.utils.flop_counter's formulas) of one call of `fn` (forward and, if fn runs
    it, backward)."""
    counter = _FlopSum()
    with counter:
        fn()
    return float(counter.total)
