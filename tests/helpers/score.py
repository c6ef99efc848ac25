"""Helpers of the scoring tests: tiny models, run dirs with a checkpoint (no training engine needed),
and the exact log p(x) of a model with a 2-dim latent by numerical integration on a grid."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hvae_dist.checkpoint import save_checkpoint
from hvae_dist.config import config_from_dict
from hvae_dist.model import build_model

REPO = Path(__file__).resolve().parents[2]


def _block(ch: int, stride: int) -> dict:
    return {"block": "ResBlockConv2d", "out_channels": ch, "kernel_size": 3, "stride": stride,
            "weightnorm": True, "gated": False}


def small_config(channels: int = 8, binarize: str = "dynamic") -> dict:
    """Three latent layers on 1x28x28 (conv 2x14x14, dense 4, dense 2): fast on CPU, L>1 and L>2 defined."""
    return {
        "model": {"type": "vae", "likelihood": "bernoulli", "input_shape": [1, 28, 28],
                  "config_deterministic": [[_block(channels, 2)], [_block(channels, 2)], [_block(channels, 2)]],
                  "config_stochastic": [{"block": "GaussianConv2d", "latent_features": 2, "weightnorm": True},
                                        {"block": "GaussianDense", "latent_features": 4, "weightnorm": True},
                                        {"block": "GaussianDense", "latent_features": 2, "weightnorm": True}]},
        "data": {"dataset": "FashionMNIST", "binarize": binarize},
        "train": {"seed": 0},
    }


def exact_config(latent: int = 2) -> dict:
    """One stage, one dense latent of `latent` dims, 1x4x4 Bernoulli images: log p(x) is a 2-d integral."""
    return {
        "model": {"type": "vae", "likelihood": "bernoulli", "input_shape": [1, 4, 4],
                  "config_deterministic": [[_block(4, 1)]],
                  "config_stochastic": [{"block": "GaussianDense", "latent_features": latent, "weightnorm": True}]},
        "data": {"dataset": "FashionMNIST", "binarize": "static"},
        "train": {"seed": 0},
    }


def build(config: dict, seed: int = 0):
    """(model in eval mode, Config) with weights from torch.manual_seed(seed)."""
    cfg = config_from_dict(config)
    torch.manual_seed(seed)
    return build_model(cfg.model).eval(), cfg


def make_run_dir(run_dir: str | Path, config: dict | None = None, seed: int = 0, step: int = 1) -> Path:
    """A run dir as the trainer leaves it: config.json and checkpoints/{step-N,latest}.pt of a random-init model."""
    run_dir = Path(run_dir)
    model, cfg = build(config or small_config(), seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    state = {"step": step, "epoch": 0, "batch_in_epoch": 0, "model": model.state_dict(), "ema": None,
             "optimizer": {}, "scaler": None, "rng": [], "counters": {}, "config": cfg.to_dict()}
    save_checkpoint(state, run_dir)
    return run_dir


@torch.no_grad()
def exact_log_px(model, x: torch.Tensor, radius: float = 7.0, points: int = 401) -> torch.Tensor:
    """log p(x) = log of the integral of p(x|z) N(z; 0, I) dz over a 2-d grid, float64. x: (B, 1, H, W) in {0, 1}.

    Uses the model's own generative path for one dense latent: u = down(z), logits = head(dec_1(u)).
    """
    assert model.num_layers == 1 and model.latent_shapes[0] == (2,)
    m = model.double()
    g = torch.linspace(-radius, radius, points, dtype=torch.float64)
    z = torch.cartesian_prod(g, g)                                            # G, 2
    logits = m.likelihood.head(m.decoders[0](m.latents[0].down(z))).flatten(1)  # G, D
    log_prior = -0.5 * (z ** 2).sum(1) - math.log(2 * math.pi)               # G
    dz2 = math.log((g[1] - g[0]).item()) * 2
    out = []
    for xb in x.double().flatten(1):                                          # D
        log_lik = (xb * F.logsigmoid(logits) + (1 - xb) * F.logsigmoid(-logits)).sum(1)  # G
        out.append(torch.logsumexp(log_lik + log_prior, 0) + dz2)
    model.float()
    return torch.stack(out)


def hvae_cli(*args: str, env: dict | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """`python -m hvae_dist ARGS` in a subprocess (CPU, 1 thread)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "hvae_dist", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"hvae {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def small_tmpfs(folder: str | Path, size: str = "300k"):
    """A tmpfs of `size` mounted on `folder` (needs root; pytest.skip with the reason otherwise), unmounted after."""
    import pytest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small file system")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs (needs root): {proc.stderr.strip() or proc.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder: str | Path, leave: int = 0) -> Path:
    """Fill the file system of `folder` with a new file (filler, filler-1, ...), then give back `leave` bytes."""
    filler = Path(folder) / "filler"
    n = 0
    while filler.exists():
        n += 1
        filler = Path(folder) / f"filler-{n}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError:
                break
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def read_groups(path: str | Path) -> dict:
    from hvae_dist.score.reader import read_scores

    return read_scores(path)


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def score_args(run_dir, out, *extra: str, datasets=("FashionMNIST:test", "MNIST:test"), samples: int = 12,
               max_examples: int = 7) -> list[str]:
    return ["score", "--run-dir", str(run_dir), "--datasets", *datasets, "--iw-samples", str(samples),
            "--out", str(out), *([] if "--max-examples" in extra else ["--first", str(max_examples)]), "--no-progress",
            *extra]


__all__ = [
    "REPO",
    "build",
    "exact_config",
    "exact_log_px",
    "fill_disk",
    "hvae_cli",
    "make_run_dir",
    "np",
    "read_groups",
    "score_args",
    "small_config",
    "small_tmpfs",
    "write_synthetic_shards",
]


def write_synthetic_shards(out: str | Path, rows: int, shards: int, groups: tuple[str, ...] = ("InDist/test", "OOD/test"),
                           ks: tuple[int, ...] = (1, 2), num_layers: int = 3, seed: int = 0,
                           batch: int = 1 << 16) -> dict:
    """`shards` finished shard files of one synthetic job in `out`, written by the package's ShardWriter.

    `rows` rows in all, split evenly over `groups` and over the shards by the real plan (`ShardPlan`), written
    in batches of `batch` rows; every row complete. Values come from a seeded generator (per shard and group,
    so a shard's values do not depend on the others): elbo ~ N(-100, 3) nats, 15 nats lower in the groups
    after the first (the OOD sets), L>k below it, llr = elbo - L>k, kl ~ |N(1, 0.1)|. Returns the job's
    attributes (without shard / num_shards).
    """
    from hvae_dist.score.layout import FORMAT_VERSION
    from hvae_dist.score.plan import ShardPlan
    from hvae_dist.score.writer import GroupSpec, ShardWriter, lock_shard

    out = Path(out)
    sizes = {g: rows // len(groups) + (i < rows % len(groups)) for i, g in enumerate(groups)}
    attrs = {"format_version": FORMAT_VERSION, "model_checkpoint": "synthetic", "model_sha256": "0" * 64,
             "iw_samples": 16, "iw_samples_lk": 16, "ks": list(ks), "seed": seed, "dtype": "fp32", "ema": False,
             "binarize": "dynamic", "num_layers": num_layers, "datasets": list(groups), "dataset_sizes": sizes,
             "complexity": [], "package_version": "synthetic", "config": "{}", "created": "2026-12-05T00:00:00Z"}
    for shard in range(shards):
        plan = ShardPlan(shard, shards, sizes)
        specs = [GroupSpec(g, np.arange(*plan.range(g), dtype=np.int64), num_layers, len(ks)) for g in groups]
        path = out / plan.filename
        lock = lock_shard(path)
        try:
            with ShardWriter.open(path, {**attrs, "shard": shard, "num_shards": shards}, specs) as writer:
                for i, spec in enumerate(specs):
                    rng = np.random.default_rng([seed, shard, i])
                    for a in range(0, len(spec.index), batch):
                        n = min(batch, len(spec.index) - a)
                        elbo = rng.normal(-100.0 - 15.0 * (i > 0), 3.0, n)
                        lk = elbo[:, None] - np.abs(rng.normal(2.0 + 3.0 * (i > 0), 1.0, (n, len(ks))))
                        writer.write(spec.name, np.arange(a, a + n), {
                            "elbo": elbo, "elbo_1": elbo - 1.0, "lk": lk, "llr": elbo[:, None] - lk,
                            "kl": np.abs(rng.normal(1.0, 0.1, (n, num_layers))), "bpd": -elbo / (784 * math.log(2))})
        finally:
            lock.release()
    return attrs
