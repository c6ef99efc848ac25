"""DMoL likelihood: the fused kernel against the PyTorch reference, measured in the same run.

For B in (32, 128), x (B, 3, 32, 32), M = 10, float32 params, torch.set_num_threads(2) (override with
--threads / --batch):
  * time of forward (no grad) and forward + backward: wall-clock and process CPU time (all threads), the
    median of --repeats after a warm-up, the reference and the fused kernel interleaved repetition by
    repetition so that both see the same machine load (on a loaded machine the CPU time is the steadier
    measure of the work; speed-ups are given for both). With a gradient the fused kernel runs its one-pass
    forward + gradient and the backward only scales the gradient (hvae_dist/kernels/fused.py);
  * peak extra memory of one forward + backward: each measurement runs in a fresh subprocess with glibc's
    mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=65536, so every tensor buffer is its own mapping and
    freeing it returns it to the OS); after a warm-up call, the kernel's peak-RSS counter is reset
    (/proc/self/clear_refs = 5) and the peak RSS (VmHWM) of the measured call minus the RSS before it is
    reported, next to the size of the gradient tensor it must at least hold;
  * achieved memory bandwidth of the fused kernel (the least bytes it must move: params read once forward;
    params read + grad written + grad scaled in place for forward + backward) as a fraction of a large
    tensor copy's bandwidth measured in this run.

With --device cuda the CUDA kernel is measured the same way (timings synchronised; peak extra memory from
torch.cuda.max_memory_allocated; bandwidth against a device copy).

Usage: python benchmarks/dmol.py [--batch 32 128] [--threads 2] [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from hvae_dist.kernels import dmol_fused, dmol_reference
from hvae_dist.kernels.fused import load_extension

C, M, H, W = 3, 10, 32, 32
IMPLS = {"reference": dmol_reference, "fused": dmol_fused}


def make_inputs(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, C, H, W), generator=g).float() / 255
    params = torch.randn(b, M * (3 * C + 1), H, W, generator=g)
    params[:, M + C * M:M + 2 * C * M].mul_(1.5).sub_(2.5)          # log-scales around e^-2.5
    return x, params


def run_once(fn, x: torch.Tensor, params: torch.Tensor, backward: bool) -> None:
    if backward:
        params.grad = None
        fn(x, params).sum().backward()
    else:
        with torch.no_grad():
            fn(x, params)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(x, params, repeats: int) -> dict:
    """{(impl, backward): (wall seconds, CPU seconds of all threads)}, medians over the repeats; every
    repetition runs each (impl, backward) once, in turn, so that the implementations share the load."""
    cases = [(impl, bwd) for impl in IMPLS for bwd in (False, True)]
    for impl, bwd in cases:
        run_once(IMPLS[impl], x, params, bwd)                          # warm-up
    walls: dict = {c: [] for c in cases}
    cpus: dict = {c: [] for c in cases}
    for _ in range(repeats):
        for impl, bwd in cases:
            _sync(params.device)
            t0, c0 = time.perf_counter(), time.process_time()
            run_once(IMPLS[impl], x, params, bwd)
            _sync(params.device)
            walls[(impl, bwd)].append(time.perf_counter() - t0)
            cpus[(impl, bwd)].append(time.process_time() - c0)
    return {c: (statistics.median(walls[c]), statistics.median(cpus[c])) for c in cases}


def copy_bandwidth(repeats: int, device: torch.device | str = "cpu") -> float:
    """Bytes/s of dst.copy_(src) on 256 MiB float32 tensors (read + write counted)."""
    device = torch.device(device)
    src = torch.randn(64 * 2 ** 20, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / min(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_child(impl: str, b: int, threads: int) -> dict:
    """Runs in a fresh process: peak RSS above the pre-call RSS of one forward + backward."""
    torch.set_num_threads(threads)
    x, params = make_inputs(b)
    params.requires_grad_()
    fn = IMPLS[impl]
    run_once(fn, x, params, True)                                      # warm-up (builds caches, thread pool)
    params.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                   # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    run_once(fn, x, params, True)
    peak = _status_kb("VmHWM")
    return {"peak_extra_bytes": (peak - before) * 1024, "grad_bytes": params.grad.numel() * 4}


def measure_memory_cuda(impl: str, x: torch.Tensor, params: torch.Tensor) -> dict:
    """On a GPU: the allocator's peak above what was allocated before one forward + backward."""
    fn = IMPLS[impl]
    run_once(fn, x, params, True)
    params.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_once(fn, x, params, True)
    torch.cuda.synchronize()
    return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - before, "grad_bytes": params.grad.numel() * 4}


def measure_memory(impl: str, b: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, __file__, "--memory-child", impl, str(b), "--threads", str(threads)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the CUDA kernel; memory from torch.cuda)")
    ap.add_argument("--memory-child", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory_child(args.memory_child[0], int(args.memory_child[1]), args.threads)))
        return

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_extension(device.type)
    bw = copy_bandwidth(args.repeats, device)
    print(f"# torch {torch.__version__}, device {device}, {args.threads} threads, x (B, {C}, {H}, {W}), M = {M}, "
          f"float32; medians of {args.repeats} interleaved repeats; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"# large-copy bandwidth: {bw / 1e9:.1f} GB/s")
    print("| B | impl | fwd ms | fwd+bwd ms | fwd CPU ms | fwd+bwd CPU ms | peak extra MiB (fwd+bwd) | grad MiB "
          "| peak / grad |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for b in args.batch:
        x, params = (t.to(device) for t in make_inputs(b))
        params.requires_grad_()
        res = {}
        times = interleaved_times(x, params, args.repeats)
        for impl in IMPLS:
            fwd, fb = times[(impl, False)], times[(impl, True)]
            if device.type == "cuda":
                mem = measure_memory_cuda(impl, x, params)
            else:
                mem = measure_memory(impl, b, args.threads)
            res[impl] = (fwd, fb, mem)
            mib = 2 ** 20
            print(f"| {b} | {impl} | {fwd[0] * 1e3:.1f} | {fb[0] * 1e3:.1f} | {fwd[1] * 1e3:.1f} | {fb[1] * 1e3:.1f} | "
                  f"{mem['peak_extra_bytes'] / mib:.1f} | "
                  f"{mem['grad_bytes'] / mib:.1f} | {mem['peak_extra_bytes'] / mem['grad_bytes']:.2f} |")
        pbytes = params.numel() * 4
        (rf, rfb, rm), (ff, ffb, fm) = res["reference"], res["fused"]
        fwd_bw, fb_bw = pbytes / ff[0], 4 * pbytes / ffb[0]              # bytes the kernel must move
        summary.append(f"B={b}: fused speed-up wall fwd {rf[0] / ff[0]:.1f}x, fwd+bwd {rfb[0] / ffb[0]:.1f}x "
                       f"(CPU time: fwd {rf[1] / ff[1]:.1f}x, fwd+bwd {rfb[1] / ffb[1]:.1f}x); peak extra memory "
                       f"reference/fused {rm['peak_extra_bytes'] / fm['peak_extra_bytes']:.1f}x; fused bandwidth "
                       f"fwd {fwd_bw / 1e9:.1f} GB/s ({fwd_bw / bw:.0%} of copy), fwd+bwd {fb_bw / 1e9:.1f} GB/s "
                       f"({fb_bw / bw:.0%} of copy)")
    print()
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
