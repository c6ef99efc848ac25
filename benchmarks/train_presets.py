"""Training throughput on the paper's presets: the package's Trainer against a plain loop of the same model,
and the achieved GFLOP/s against a conv peak, all measured in one process.

    .venv/bin/python benchmarks/train_presets.py [--preset fashionmnist] [--batch-size 128] [--threads 2]
                                                 [--steps 2] [--repeats 3] [--compile] [--device cpu]

Cases (all the same model, initialised alike, and the same objective):
  * plain fp32 -- THE BASELINE, the paper's loop written here: a random batch of the training images,
    dynamic binarization (torch.bernoulli) where the preset binarizes, model(x) (its own torch.randn noise),
    `elbo_loss` with the preset's free nats, zero_grad / backward / Adam step; NCHW, default torch Adam.
  * plain bf16 -- the same loop under bf16 autocast.
  * Trainer fp32 / Trainer bf16 -- `hvae_dist.train.engine.Trainer.train_step()` as `hvae train` runs it
    (data order, binarization and noise drawn per step, forward, loss, backward, grad-norm clip and skip
    check, Adam, stats), with the package defaults (train.channels_last: NHWC on a CPU).
  * Trainer fp32 NCHW / bf16 NCHW -- train.channels_last=false: the path before channels_last existed.
  * with --compile, Trainer fp32 / bf16 with train.compile=true too (their compile time is printed).
Every ratio is images/s over the plain fp32 loop's images/s (the issue's targets: Trainer fp32 >= 1.0x,
Trainer bf16 >= 2.2x). Each repetition runs --steps updates of every case in turn (interleaved, after one
warm-up round); images/s = batch / median step time.

FLOPs: the matmul / conv FLOPs of one forward + backward (torch.utils.flop_counter.FlopCounterMode), over
the step time; the peak is a 64->64 5x5 conv forward at 28x28, batch 16 (the faster of NCHW / NHWC), timed
in the same interleaved rounds. Data: fashionmnist trains on the FashionMNIST images of the offline
package; cifar10 (no offline training split) on UniformNoise-32x32-rgb, the same shapes: throughput does not
depend on the pixel values. Parameters are random (throughput does not depend on training). Never gates tests.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch
from bench_common import count_flops, header, interleaved, peak_conv_cases, peak_gflops, setup

from hvae_dist.config import load_config
from hvae_dist.distributed import detect_world
from hvae_dist.model import build_model
from hvae_dist.nn.precision import autocast_context
from hvae_dist.objectives import elbo_loss, free_nats_at, kl_warmup_beta
from hvae_dist.train.engine import Trainer

DATASETS = {"fashionmnist": "FashionMNIST", "cifar10": "UniformNoise-32x32-rgb", "tiny": "FashionMNIST"}


def overrides(args, precision: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"train.batch_size={args.batch_size}", f"train.precision={precision}", "train.eval_every=0",
            f"data.dataset={DATASETS[args.preset]}", f"data.max_train_examples={args.examples}", *extra]


class PlainLoop:
    """The baseline: what the paper's training script does per step, nothing more."""

    def __init__(self, args, precision: str, images: torch.Tensor, state: dict, device: torch.device):
        self.cfg = load_config(args.preset, overrides(args, precision))
        self.model = build_model(self.cfg.model, images.shape[1:]).to(device)
        self.model.load_state_dict(state)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.train.lr)
        self.images, self.precision, self.batch, self.step_count = images.to(device), precision, args.batch_size, 0
        self.device = device
        self.gen = torch.Generator(device).manual_seed(0)

    def data(self) -> torch.Tensor:
        idx = torch.randint(0, len(self.images), (self.batch,), generator=self.gen, device=self.device)
        x = self.images[idx].float() / 255
        return torch.bernoulli(x, generator=self.gen) if self.cfg.data.binarize == "dynamic" else x

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        t = self.cfg.train
        with autocast_context(self.precision, self.device):
            out = self.model(x)
        return elbo_loss(out, beta=kl_warmup_beta(self.step_count, t.kl_warmup_steps),
                         free_nats=free_nats_at(self.step_count, t.free_nats, t.free_nats_steps,
                                                t.free_nats_cooldown_steps)).loss

    def step(self) -> None:
        loss = self.loss(self.data())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_count += 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fashionmnist", choices=sorted(DATASETS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed updates per case per repetition")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--examples", type=int, default=4096, help="training images loaded")
    p.add_argument("--precisions", default="fp32,bf16", help="Trainer precisions (fp16: Trainer only, GradScaler)")
    p.add_argument("--compile", action="store_true", help="also Trainer with train.compile=true (slow to compile)")
    p.add_argument("--device", default="cpu")
    return p


def run(args) -> list[dict]:
    """The measurement; prints the table and returns its rows."""
    device, sync = setup(args.threads, args.device)
    world = detect_world()
    precisions = args.precisions.split(",")

    tmp = tempfile.TemporaryDirectory()
    configs = {f"Trainer {p}": (p, ()) for p in precisions}
    for p in ("fp32", "bf16"):                               # the path before train.channels_last existed
        if p in precisions:
            configs[f"Trainer {p} NCHW"] = (p, ("train.channels_last=false",))
    if args.compile:
        configs |= {f"Trainer {p} compiled": (p, ("train.compile=true",)) for p in precisions}
    trainers: dict[str, Trainer] = {}
    for i, (name, (precision, extra)) in enumerate(configs.items()):
        cfg = load_config(args.preset, overrides(args, precision, extra))
        trainers[name] = Trainer(cfg, f"{tmp.name}/{i}", world, device)
    first = next(iter(trainers.values()))
    state = {k: v.clone() for k, v in first.model.state_dict().items()}   # the same initial weights for all
    for tr in trainers.values():
        tr.model.load_state_dict(state)
    images = first.images                                                 # N, C, H, W uint8
    plain = {f"plain {p}": PlainLoop(args, p, images, state, device) for p in ("fp32", "bf16")
             if p == "fp32" or p in precisions}

    compile_s = {}
    for name, tr in trainers.items():
        if tr.cfg.train.compile:
            t0 = time.perf_counter()
            tr.train_step()                                # the first step compiles forward and backward
            sync()
            compile_s[name] = time.perf_counter() - t0

    def repeat(fn, n=args.steps):
        def run_n():
            for _ in range(n):
                fn()
        return run_n

    cases = {name: repeat(pl.step) for name, pl in plain.items()}
    cases |= {name: repeat(tr.train_step) for name, tr in trainers.items()}
    cases["data prep (Trainer.next_batch)"] = repeat(first.next_batch)
    peak_cases, peak_flops = peak_conv_cases(device)
    cases |= peak_cases
    print(header(f"{args.preset} preset, batch {args.batch_size}, device {device}, {args.steps} updates x "
                 f"{args.repeats} interleaved rounds per case (medians)", args.threads))
    times = interleaved(cases, args.repeats, sync=sync)
    peak = peak_gflops(times, peak_flops)

    pl = plain["plain fp32"]
    x = pl.data()
    flops = count_flops(lambda: pl.loss(x).backward())                # forward + backward of one batch
    pl.opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        fwd_flops = count_flops(lambda: pl.loss(x))
    base = args.batch_size * args.steps / times["plain fp32"]["wall"]
    print(f"# model: {fwd_flops / args.batch_size / 1e9:.2f} GFLOP per example forward, {flops / 1e9:.0f} GFLOP per "
          f"update (forward + backward); conv peak (64->64 5x5 28x28 b16, best layout): fp32 {peak['fp32']:.0f} "
          f"GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    print()
    print("| case | images/s | vs plain fp32 | step s (median) | CPU s / step | GFLOP/s | of conv peak |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in [*plain, *trainers]:
        t = times[name]
        step_s = t["wall"] / args.steps
        ips = args.batch_size / step_s
        prec = "fp32" if "fp32" in name else "bf16"               # fp16's peak: the bf16 conv's
        gf = flops / step_s / 1e9
        rows.append({"case": name, "images_per_s": ips, "ratio": ips / base, "gflops": gf})
        print(f"| {name} | {ips:.1f} | **{ips / base:.2f}x** | {step_s:.2f} | {t['cpu'] / args.steps:.2f} "
              f"| {gf:.0f} | {gf / peak[prec]:.0%} ({prec}) |")
    dp = times["data prep (Trainer.next_batch)"]["wall"] / args.steps
    print()
    print(f"data preparation (Trainer.next_batch: indexing, binarization, latent noise): {dp * 1e3:.1f} ms per step "
          f"= {dp / (times[next(iter(trainers))]['wall'] / args.steps):.1%} of the {next(iter(trainers))} step")
    for name, s in compile_s.items():
        print(f"{name}: first step (compilation) {s:.0f} s")
    with contextlib.suppress(Exception):
        tmp.cleanup()
    return rows


def main() -> None:
    run(parser().parse_args())


if __name__ == "__main__":
    main()
