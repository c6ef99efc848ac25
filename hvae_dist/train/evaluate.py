"""Validation during training: IW ELBO and L>1 on the validation sets, LLR>1 AUROC, active units.

The bounds come from the scorer of `hvae score` (same deterministic noise), on the first
`train.eval_examples` examples of each set with `train.eval_iw_samples` samples, in batches of 128
examples whose samples are streamed so that at most ROWS_PER_PASS[device] rows (examples x samples) go
through one forward pass: memory stays flat in the number of samples, and the values do not depend on
the batch or the chunk.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hvae_dist.config import Config
from hvae_dist.data import get_dataset, group_name, parse_dataset_spec
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import HierarchicalVAE
from hvae_dist.objectives import bits_per_dim

ROWS_PER_PASS = {"cpu": 1024, "cuda": 8192}
"""Rows per forward pass of an evaluation, by device type (others: the CPU's). It was 128 x eval_iw_samples:
the fashionmnist preset's 12,800 rows took 15 GB. Measured for that model on 2 busy cores (2 x 128 examples,
10 samples): 64 rows per pass (batch 16, the scorer's CPU default) 184 s, 128 rows 130 s, 512 rows 112 s,
1,280 rows 94 s, so the CPU budget is large enough to stay fast and bounds the memory at about 2 GB."""
BATCH_SIZE = 128


def sample_chunk_for(batch_size: int, iw_samples: int, device: torch.device) -> int:
    """Samples per example in one pass: batch_size x chunk <= ROWS_PER_PASS of the device (at least 1)."""
    rows = ROWS_PER_PASS.get(torch.device(device).type, ROWS_PER_PASS["cpu"])
    return max(1, min(iw_samples, rows // max(1, batch_size)))


def active_units(posterior_means: list[torch.Tensor], threshold: float = 0.01) -> list[int]:
    """Per layer, the number of latent dimensions whose posterior mean varies over x (Cov_x E_q[z] > threshold)."""
    return [int((m.double().var(0) > threshold).sum()) for m in posterior_means]


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    return float(roc_auc_score(y, np.r_[neg, pos]))


@torch.inference_mode()
def evaluate(model: HierarchicalVAE, cfg: Config, device: torch.device, batch_size: int = BATCH_SIZE,
             sample_chunk: int | None = None) -> dict:
    """Scalars for TensorBoard: per validation set ELBO / bpd / LLR>k for every k, and the AUROCs of -ELBO and of
    LLR>k for every k of each OOD set against the first set, on equal-size subsamples (the first n rows of
    both, n the smaller size: an AUROC does not depend on the class balance, but its noise does).

    `batch_size` and `sample_chunk` (default: sample_chunk_for the device) change memory and speed, not the
    values.
    """
    sample_chunk = sample_chunk or sample_chunk_for(batch_size, cfg.train.eval_iw_samples, device)
    t = cfg.train
    ks = list(range(1, model.num_layers))
    num_dims = math.prod(model.input_shape)
    results: dict = {}
    per_set: dict = {}
    was_training = model.training
    model.eval()
    scorer = IWScorer(model, ScoreSettings(iw_samples=t.eval_iw_samples, ks=ks, seed=t.seed,
                                           binarize=cfg.data.binarize, sample_chunk=sample_chunk), device)
    for spec in cfg.data.val_datasets:
        name, split = parse_dataset_spec(spec)
        group = group_name(f"{name}:{split}")
        ds = get_dataset(name, split, cfg.data.root, cfg.data.download, t.eval_examples)
        images = torch.from_numpy(np.array(ds.images))
        parts = [scorer.score_batch(images[a:a + batch_size], torch.arange(a, min(a + batch_size, len(ds))),
                                    group) for a in range(0, len(ds), batch_size)]
        elbo = np.concatenate([p["elbo"] for p in parts])
        tag = spec.replace(":", "_")
        results[f"val/{tag}/elbo"] = float(elbo.mean())
        results[f"val/{tag}/bpd"] = float(bits_per_dim(-elbo.mean(), num_dims))
        entry = {"elbo": elbo}
        for j, k in enumerate(ks):
            entry[f"llr{k}"] = np.concatenate([p["llr"][:, j] for p in parts])
            results[f"val/{tag}/llr{k}"] = float(entry[f"llr{k}"].mean())
        per_set[spec] = entry
        if spec == cfg.data.val_datasets[0]:
            # One posterior-sample pass for the posterior means (active units). Its noise comes from a generator
            # seeded with train.seed, forked off the global one: the same numbers at every evaluation, and the
            # training's RNG state (saved in checkpoints) is left as it was.
            means = [[] for _ in range(model.num_layers)]
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(t.seed)
                for a in range(0, len(ds), batch_size):
                    x = scorer.preprocess(images[a:a + batch_size].to(device), group,
                                          torch.arange(a, min(a + batch_size, len(ds)), device=device))
                    for i, m in enumerate(model(x).posterior_means):
                        means[i].append(m)
            for i, n in enumerate(active_units([torch.cat(m) for m in means])):
                results[f"val/active_units/layer{i + 1}"] = float(n)
    in_dist = per_set[cfg.data.val_datasets[0]]
    for spec in cfg.data.val_datasets[1:]:
        tag = spec.replace(":", "_")
        n = min(len(in_dist["elbo"]), len(per_set[spec]["elbo"]))
        results[f"val/auroc/{tag}/neg_elbo"] = auroc(-in_dist["elbo"][:n], -per_set[spec]["elbo"][:n])
        for k in ks:
            results[f"val/auroc/{tag}/llr{k}"] = auroc(in_dist[f"llr{k}"][:n], per_set[spec][f"llr{k}"][:n])
    model.train(was_training)
    return results
