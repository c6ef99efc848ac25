"""Training throughput (images/s) of the engine on this machine: single process fp32 (the baseline),
single process bf16 autocast, and 2-process DDP (torchrun, gloo on CPU / NCCL on GPU), measured in
the same run and printed as a table with ratios to single fp32.

Each configuration runs in a fresh process (torchrun for DDP) that builds `hvae_dist.train.engine.Trainer`
from the `tiny` preset (global batch --batch-size, split over the ranks), runs --warmup updates, then
times --steps updates of `Trainer.train_step()` (data order, binarization, noise, forward, backward,
optimizer; no checkpoints or TensorBoard), one at a time. Throughput is the global batch over the
median step time (a shared machine stalls single steps; the mean over all steps is printed too).
Threads follow `hvae train`: a single process uses torch's default, each DDP rank cpu_count // ranks;
--threads N pins every process to N. With --repeats R the configurations are interleaved R times and
the median is reported (compare ratios from one run, not across runs).

Usage: python benchmarks/train_throughput.py [--steps 10] [--warmup 3] [--batch-size 64] [--repeats 1]
                                            [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [  # (name, ranks, precision)
    ("single fp32", 1, "fp32"),
    ("single bf16", 1, "bf16"),
    ("DDP x2 fp32", 2, "fp32"),
]


def worker(args: argparse.Namespace) -> None:
    """One configuration, in this process (one rank of it under torchrun)."""
    import torch

    from hvae_dist.config import load_config
    from hvae_dist.distributed import detect_world, device_for, init_distributed, shutdown
    from hvae_dist.train.engine import Trainer

    world = detect_world()
    init_distributed(world)
    device = device_for(world)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and world.distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.world_size))   # as `hvae train` does
    backend = "ddp" if world.distributed else "single"
    cfg = load_config("tiny", [f"train.batch_size={args.batch_size}", f"train.precision={args.precision}",
                               f"train.backend={backend}", "data.max_train_examples=4096"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, world, device)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if world.distributed:
                torch.distributed.barrier()

        for _ in range(args.warmup):
            trainer.train_step()
        times = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            trainer.train_step()   # ends with float() of the stats: the update is done (DDP: all-reduced)
            sync()
            times.append(time.perf_counter() - t0)
    if world.is_main:
        result = {"images_per_s": args.batch_size / statistics.median(times),
                  "images_per_s_mean": args.steps * args.batch_size / sum(times),
                  "threads": torch.get_num_threads(), "ranks": world.world_size, "device": str(device)}
        Path(args.result).write_text(json.dumps(result))
    shutdown(world)


def measure(ranks: int, precision: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        inner = [__file__, "--worker", "--precision", precision, "--result", str(result),
                 "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        if ranks == 1:
            cmd = [sys.executable, *inner]
        else:
            cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nnodes", "1",
                   "--nproc_per_node", str(ranks), *inner]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if ranks > 1 or args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // ranks))
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0 or not result.exists():
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed updates per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (the tiny preset's is 64)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; the median is reported")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads of every process (0: as hvae train)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
    for _ in range(args.repeats):
        for name, ranks, precision in CONFIGS:
            runs[name].append(measure(ranks, precision, args))
    ips = {name: statistics.median(r["images_per_s"] for r in rs) for name, rs in runs.items()}
    ips_mean = {name: statistics.median(r["images_per_s_mean"] for r in rs) for name, rs in runs.items()}
    base = ips[CONFIGS[0][0]]
    first = runs[CONFIGS[0][0]][0]
    print(f"tiny preset, global batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed updates, "
          f"threads {'as hvae train' if not args.threads else args.threads}, "
          f"median of {args.repeats}; device {first['device']}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print()
    print(f"| {'configuration':<14} | ranks | threads/rank | images/s | images/s (mean) | vs single fp32 |")
    print(f"|{'-' * 16}|-------|--------------|----------|-----------------|----------------|")
    for name, ranks, _ in CONFIGS:
        r = runs[name][0]
        print(f"| {name:<14} | {ranks:>5} | {r['threads']:>12} | {ips[name]:>8.1f} | {ips_mean[name]:>15.1f} "
              f"| {ips[name] / base:>13.2f}x |")
    print()
    print("images/s: global batch / median step time (robust to stalls from other processes); "
          "mean: over all timed steps; ratio of the medians.")


if __name__ == "__main__":
    main()
