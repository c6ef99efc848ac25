"""`make gpu-check`: what needs a GPU, checked in one run on the day one is lent (under 5 minutes on one
H100/H200-class GPU), ending with one table. Exits 2 at once, saying so, where CUDA is not available.

    .venv/bin/python benchmarks/gpu_check.py [--log gpu_check.log] [--skip-pytest]

Checks, in order (each a row: PASS / FAIL / SKIP, the numbers, the seconds it took):
  1. the fused DMoL CUDA extension builds (nvcc, cached in $TORCH_EXTENSIONS_DIR);
  2. fused CUDA DMoL against the PyTorch reference at CIFAR shape (B=8, M=10, fp32): values, gradients,
     the one-pass training gradient against the two-pass one;
  3. pytest on the CUDA cases of the device-parametrized tests (tests/kernels/test_dmol_kernel.py:
     float64 gradcheck on CUDA through every branch, half precision, NaN; tests/train/test_backend_speed.py:
     training steps, skips, channels_last on CUDA);
  4. training steps of the fashionmnist preset, batch 128, fp32 / bf16 / fp16 (the Trainer against the
     plain loop; benchmarks/train_presets.py on cuda), every loss finite;
  5. DDP over NCCL, 2 ranks, bf16 (tests/helpers/train.py under torchrun: both ranks end bitwise equal),
     or SKIP with one GPU;
  6. scoring, fashionmnist preset, S=1000, ELBO + L>1, IWScorer defaults (batch 128 on a GPU) against the
     sequential method (benchmarks/score_presets.py on cuda);
  7. the DMoL benchmark on the GPU (benchmarks/dmol.py --device cuda --batch 128).
The sub-benchmarks' own tables go to --log; only the summary table is printed. --dry-run-on-cpu runs the
same code paths on the CPU with tiny sizes (to test this script without a GPU; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

ROWS: list[tuple[str, str, str, float]] = []


class Skip(Exception):
    """A check that cannot run here (e.g. DDP with one GPU)."""


def check(name: str, log):
    """Decorator: run the check, record PASS (its detail string) / SKIP / FAIL (the error), its time."""
    def wrap(fn):
        t0 = time.perf_counter()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                detail = fn()
            status = "PASS"
        except Skip as e:
            status, detail = "SKIP", str(e)
        except Exception as e:  # a failed check is a row of the table, not the end of the run
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            out.write(traceback.format_exc())
        seconds = time.perf_counter() - t0
        log.write(f"\n===== {name}: {status} ({seconds:.0f} s)\n{out.getvalue()}")
        log.flush()
        ROWS.append((name, status, detail, seconds))
        print(f"{status:4s} {name} ({seconds:.0f} s)", file=sys.stderr)
        return fn
    return wrap


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", default="gpu_check.log", help="the sub-benchmarks' output")
    p.add_argument("--skip-pytest", action="store_true")
    p.add_argument("--dry-run-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    dry = args.dry_run_on_cpu
    if not torch.cuda.is_available() and not dry:
        print("gpu-check: error: CUDA is not available here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}): run `make gpu-check` on a machine with a GPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    kind = device.type
    gpus = 0 if dry else torch.cuda.device_count()
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name(0)
    log = open(args.log, "w")
    t_start = time.perf_counter()

    from hvae_dist.kernels import dmol_fused, dmol_reference, dmol_split_params
    from hvae_dist.kernels.fused import load_extension

    @check("fused DMoL CUDA extension builds", log)
    def _build():
        t0 = time.perf_counter()
        load_extension(kind, verbose=True)
        return f"built / loaded in {time.perf_counter() - t0:.0f} s"

    @check("fused DMoL vs reference (CIFAR B=8, fp32)", log)
    def _dmol_values():
        g = torch.Generator().manual_seed(0)
        x = (torch.randint(0, 256, (8, 3, 32, 32), generator=g).float() / 255).to(device)
        params = torch.randn(8, 100, 32, 32, generator=g)
        logits, _, log_scales, _ = dmol_split_params(params, 3)
        log_scales.mul_(1.5).sub_(2.5)
        logits.mul_(2.0)
        params = params.to(device)
        pr, pf = params.clone().requires_grad_(), params.clone().requires_grad_()
        ref, fused = dmol_reference(x, pr), dmol_fused(x, pf)
        w = torch.randn(8, generator=g).to(device)
        (ref * w).sum().backward()
        (fused * w).sum().backward()
        ev, eg = rel_err(fused, ref), rel_err(pf.grad, pr.grad)
        ext = load_extension(kind)
        xf, prm = x.reshape(8, 3, -1).contiguous(), params.reshape(8, 100, -1).contiguous()
        lp = ext.forward(xf, prm, 10, 8)
        two = ext.backward(xf, prm, lp, w.contiguous(), 10, 8)
        one = ext.forward_grad(xf, prm, 10, 8)[1] * w.view(-1, 1, 1)
        eo = rel_err(one, two)
        assert ev < 1e-6 and eg < 1e-5 and eo < 1e-6, (ev, eg, eo)
        return f"rel. error: values {ev:.1e}, gradients {eg:.1e}, one-pass vs two-pass gradient {eo:.1e}"

    @check("pytest: CUDA cases of the device-parametrized tests", log)
    def _pytest():
        if args.skip_pytest:
            raise Skip("--skip-pytest")
        files = ["tests/kernels/test_dmol_kernel.py", "tests/train/test_backend_speed.py"]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
               "-k", "cpu" if dry else "cuda", "-m", "not slow and not cuda_build"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
        print(proc.stdout[-6000:], proc.stderr[-3000:])
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        assert proc.returncode == 0, summary
        return summary.strip("= ")

    @check("training steps fp32 / bf16 / fp16 (fashionmnist, batch 128)", log)
    def _train():
        import train_presets
        a = train_presets.parser().parse_args(
            ["--device", kind, "--precisions", "fp32,bf16" if dry else "fp32,bf16,fp16", "--steps",
             "1" if dry else "5", "--repeats", "1" if dry else "3", "--batch-size", "8" if dry else "128",
             "--examples", "256" if dry else "4096"])
        rows = train_presets.run(a)
        assert all(math.isfinite(r["images_per_s"]) for r in rows)
        return "; ".join(f"{r['case']} {r['images_per_s']:.0f} img/s ({r['ratio']:.2f}x)" for r in rows)

    @check("DDP over NCCL (2 ranks, bf16)", log)
    def _ddp():
        if gpus < 2 and not dry:                      # the dry run takes the same path over gloo on the CPU
            raise Skip(f"{gpus} GPU(s) here: DDP over NCCL needs 2")
        from helpers import train as th
        with tempfile.TemporaryDirectory() as tmp:
            dumps = Path(tmp) / "dumps"
            cmd = th.dump_command(dumps, th.train_args(Path(tmp) / "run", 20, "ddp", "bf16"), nproc=2)
            t0 = time.perf_counter()
            th.run(cmd, timeout=240)
            seconds = time.perf_counter() - t0
            r0, r1 = th.rank_dumps(dumps, 2)
            th.assert_bitwise_equal(r0["model"], r1["model"], "rank 0 vs rank 1")
        return f"20 steps of the tiny preset in {seconds:.0f} s (incl. start-up); both ranks bitwise equal"

    @check("scoring S=1000, ELBO + L>1 vs sequential (fashionmnist)", log)
    def _score():
        import score_presets
        a = score_presets.parser().parse_args(
            ["--device", kind, "--iw-samples", "8" if dry else "1000", "--baseline-samples", "2" if dry else "100",
             *(["--examples", "4", "--baseline-batch", "4"] if dry else []), "--nhwc"])
        rows = score_presets.run(a)
        return "; ".join(f"{r['method']} {r['examples_per_s']:.1f} ex/s ({r['ratio']:.2f}x)" for r in rows)

    @check("DMoL benchmark (B=128, 3x32x32, M=10)", log)
    def _dmol_bench():
        cmd = [sys.executable, str(REPO / "benchmarks" / "dmol.py"), "--device", kind, "--batch",
               "8" if dry else "128", "--repeats", "2" if dry else "10"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        print(proc.stdout, proc.stderr[-3000:])
        assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]
        return proc.stdout.strip().splitlines()[-1]

    total = time.perf_counter() - t_start
    print(f"# gpu-check on {name} ({gpus} GPU(s)), torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"{total:.0f} s in all; details in {args.log}")
    print()
    print("| check | result | detail | s |")
    print("|---|---|---|---|")
    for check_name, status, detail, seconds in ROWS:
        print(f"| {check_name} | {status} | {detail.replace('|', '/')} | {seconds:.0f} |")
    log.close()
    return 1 if any(status == "FAIL" for _, status, _, _ in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
