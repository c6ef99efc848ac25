"""Validation during training: IW ELBO and L>k on the validation sets, LLR>k AUROC, active units.

Monitoring only (fresh random noise); the reproducible per-example scores come from `hvae score`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hvae_dist.config import Config
from hvae_dist.data import get_dataset, parse_dataset_spec, preprocess_batch
from hvae_dist.model import HierarchicalVAE, lk_modes
from hvae_dist.objectives import StreamingLogMeanExp


@torch.inference_mode()
def iw_bounds(model: HierarchicalVAE, x: torch.Tensor, ks: list[int], iw_samples: int,
              sample_chunk: int = 16) -> dict:
    """{"elbo": (B,), "lk": (B, K), "kl": (B, L), "posterior_means": list (B, D_i)} with random noise, float64 nats."""
    out: dict = {}
    for key, k in [("elbo", 0)] + [(f"lk{k}", k) for k in ks]:
        modes = lk_modes(k, model.num_layers)
        pre = model.precompute(x, modes)
        red, kl_sum = StreamingLogMeanExp(), 0.0
        for start in range(0, iw_samples, sample_chunk):
            n = min(sample_chunk, iw_samples - start)
            o = model(modes=modes, precomputed=pre.repeat(n))
            red.update(o.elbo.view(x.shape[0], n))
            if k == 0:
                kl_sum = kl_sum + o.kl.view(x.shape[0], n, -1).double().sum(1)
                if start == 0:
                    out["posterior_means"] = [m.view(x.shape[0], n, -1)[:, 0] for m in o.posterior_means]
        out[key] = red.result()
        if k == 0:
            out["kl"] = kl_sum / iw_samples
    out["lk"] = torch.stack([out.pop(f"lk{k}") for k in ks], dim=1) if ks else None
    return out


def active_units(posterior_means: list[torch.Tensor], threshold: float = 0.01) -> list[int]:
    """Per layer, the number of latent dimensions whose posterior mean varies over x (Cov_x E_q[z] > threshold)."""
    return [int((m.double().var(0) > threshold).sum()) for m in posterior_means]


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    return float(roc_auc_score(y, np.r_[neg, pos]))


@torch.inference_mode()
def evaluate(model: HierarchicalVAE, cfg: Config, device: torch.device, batch_size: int = 128) -> dict:
    """Scalars for TensorBoard: per validation set ELBO / bpd / LLR>1, AUROCs of the OOD sets vs the first set."""
    t = cfg.train
    ks = [1] if model.num_layers > 1 else []
    num_dims = math.prod(model.input_shape)
    results: dict = {}
    per_set: dict = {}
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(t.seed)
    for spec in cfg.data.val_datasets:
        name, split = parse_dataset_spec(spec)
        ds = get_dataset(name, split, cfg.data.root, cfg.data.download, t.eval_examples)
        images = torch.from_numpy(np.array(ds.images))
        chunks = []
        for start in range(0, len(ds), batch_size):
            x = preprocess_batch(images[start:start + batch_size], cfg.data.binarize, g).to(device)
            chunks.append(iw_bounds(model, x, ks, t.eval_iw_samples))
        elbo = torch.cat([c["elbo"] for c in chunks]).cpu().numpy()
        tag = spec.replace(":", "_")
        results[f"val/{tag}/elbo"] = float(elbo.mean())
        results[f"val/{tag}/bpd"] = float(-elbo.mean() / (num_dims * math.log(2)))
        entry = {"elbo": elbo}
        if ks:
            llr = elbo - torch.cat([c["lk"][:, 0] for c in chunks]).cpu().numpy()
            results[f"val/{tag}/llr1"] = float(llr.mean())
            entry["llr1"] = llr
        per_set[spec] = entry
        if spec == cfg.data.val_datasets[0]:
            means = [torch.cat([c["posterior_means"][i] for c in chunks]) for i in range(model.num_layers)]
            for i, n in enumerate(active_units(means)):
                results[f"val/active_units/layer{i + 1}"] = float(n)
    in_dist = per_set[cfg.data.val_datasets[0]]
    for spec in cfg.data.val_datasets[1:]:
        tag = spec.replace(":", "_")
        results[f"val/auroc/{tag}/neg_elbo"] = auroc(-in_dist["elbo"], -per_set[spec]["elbo"])
        if ks:
            results[f"val/auroc/{tag}/llr1"] = auroc(in_dist["llr1"], per_set[spec]["llr1"])
    model.train(was_training)
    return results
