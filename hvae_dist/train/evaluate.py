"""The evaluator of a training run: it computes, and returns, everything a validation shows; the monitor
(train/monitor.py) only writes what it returns.

`evaluate` gives an `Evaluation`:
  * scalars: per validation set the IW ELBO, bits/dim and LLR>k for every k; the AUROCs of -ELBO and of
    LLR>k of each OOD set against the first set; the active units per latent layer of the first set;
  * images: prior samples, reconstructions of a training batch, and the `hvae visualize` grid (L>k decodes
    and prior samples) of the first examples of every validation set.

The bounds come from the scorer of `hvae score` (same deterministic noise, `hvae_dist.estimators`), on the
first `train.eval_examples` examples of each set with `train.eval_iw_samples` samples, in batches whose
samples are streamed under the one rows-per-pass policy of `hvae_dist.estimators.rows` (the same as
`hvae score`'s): memory stays flat in the number of samples, and the values do not depend on the batch or
the chunk. The AUROC is `hvae_dist.estimators.detection.auroc`, the one `hvae analyze` uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hvae_dist.config import Config
from hvae_dist.data import open_dataset, parse_spec
from hvae_dist.estimators import names
from hvae_dist.estimators.detection import auroc
from hvae_dist.estimators.reconstructions import reconstruction_grid
from hvae_dist.estimators.rows import default_batch_size, resolve_sample_chunk
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings
from hvae_dist.model import HierarchicalModel
from hvae_dist.objectives import bits_per_dim

GRID_EXAMPLES = 4
"""Examples of each validation set in the `visualize/reconstructions` grid."""


@dataclass
class Evaluation:
    """What one validation computed: TensorBoard scalars ("val/...") and images (tag -> (C, H, W) in [0, 1])."""

    scalars: dict[str, float] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)


def active_units(posterior_means: list[torch.Tensor], threshold: float = 0.01) -> list[int]:
    """Per layer, the number of latent dimensions whose posterior mean varies over x (Cov_x E_q[z] > threshold)."""
    return [int((m.double().var(0) > threshold).sum()) for m in posterior_means]


def evaluate(model: HierarchicalModel, cfg: Config, device: torch.device, batch: torch.Tensor | None = None, *,
             batch_size: int | None = None, sample_chunk: int | None = None) -> Evaluation:
    """The validation of `model` (in eval mode; its training mode is restored): `validation_scalars`, and
    the image grids (`batch`: model input (B, C, H, W) for the reconstructions; None: no images).

    `batch_size` (default: `estimators.rows.default_batch_size` of the device) and `sample_chunk`
    (default: the rows-per-pass policy) change memory and speed, not the values.
    """
    scalars = validation_scalars(model, cfg, device, batch_size=batch_size, sample_chunk=sample_chunk)
    images = image_grids(model, cfg, device, batch) if batch is not None else {}
    return Evaluation(scalars, images)


@torch.inference_mode()
def validation_scalars(model: HierarchicalModel, cfg: Config, device: torch.device, *, batch_size: int | None = None,
                       sample_chunk: int | None = None) -> dict[str, float]:
    """Per validation set ELBO / bpd / LLR>k for every k, and the AUROCs of -ELBO and of LLR>k for every k of
    each OOD set against the first set, on equal-size subsamples (the first n rows of both, n the smaller
    size: an AUROC does not depend on the class balance, but its noise does); active units of the first set.
    """
    t = cfg.train
    batch_size = batch_size or default_batch_size(device, t.eval_iw_samples)
    sample_chunk = sample_chunk or resolve_sample_chunk("auto", batch_size, device, t.eval_iw_samples)
    ks = list(range(1, model.num_layers))
    num_dims = math.prod(model.input_shape)
    results: dict[str, float] = {}
    per_set: dict = {}
    was_training = model.training
    model.eval()
    scorer = IWScorer(model, ScoreSettings(iw_samples=t.eval_iw_samples, ks=ks, seed=t.seed,
                                           binarize=cfg.data.binarize, sample_chunk=sample_chunk), device)
    for spec in cfg.data.val_datasets:
        parsed = parse_spec(spec)
        group = parsed.group
        ds = open_dataset(parsed, cfg.data.root, cfg.data.download, max_examples=t.eval_examples)
        images = torch.from_numpy(np.array(ds.images))
        parts = [scorer.score_batch(images[a:a + batch_size], torch.arange(a, min(a + batch_size, len(ds))),
                                    group) for a in range(0, len(ds), batch_size)]
        elbo = np.concatenate([p["elbo"] for p in parts])
        tag = _tag(spec)
        results[f"val/{tag}/elbo"] = float(elbo.mean())
        results[f"val/{tag}/bpd"] = float(bits_per_dim(-elbo.mean(), num_dims))
        entry = {"elbo": elbo}
        for j, k in enumerate(ks):
            entry[names.llr(k)] = np.concatenate([p["llr"][:, j] for p in parts])
            results[f"val/{tag}/{names.llr(k)}"] = float(entry[names.llr(k)].mean())
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
        tag = _tag(spec)
        n = min(len(in_dist["elbo"]), len(per_set[spec]["elbo"]))
        results[names.metric_key("val", "auroc", tag, names.NLL)] = auroc(-in_dist["elbo"][:n], -per_set[spec]["elbo"][:n])
        for k in ks:
            score = names.llr(k)
            results[names.metric_key("val", "auroc", tag, score)] = auroc(in_dist[score][:n], per_set[spec][score][:n])
    model.train(was_training)
    return results


@torch.no_grad()
def image_grids(model: HierarchicalModel, cfg: Config, device: torch.device, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """TensorBoard images (CPU float, (C, H, W)): `samples/prior` (64 prior samples, seeded with train.seed),
    `samples/reconstructions` (the first 32 rows of `batch`, model input, beside their reconstructions) and
    `visualize/reconstructions` (the `hvae visualize` grid of the first GRID_EXAMPLES of every validation set)."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    g = torch.Generator(device=device).manual_seed(cfg.train.seed)
    samples = model.sample_prior(64, device=device, generator=g)
    x = batch[:32]
    recon = model.reconstruct(x)
    pairs = torch.stack([x.float(), recon.float()], dim=1).flatten(0, 1)
    images = {}
    for spec in cfg.data.val_datasets:
        parsed = parse_spec(spec)
        images[parsed.group] = open_dataset(parsed, cfg.data.root, False, max_examples=GRID_EXAMPLES).images
    grid = reconstruction_grid(model, images, cfg.data.binarize, cfg.train.seed, device=device)
    model.train(was_training)
    return {"samples/prior": make_grid(samples.float().cpu(), nrow=8),
            "samples/reconstructions": make_grid(pairs.cpu(), nrow=8),
            "visualize/reconstructions": grid.image}


def _tag(spec: str) -> str:
    """The TensorBoard tag of a validation set: NAME_SPLIT as given for a registry set ("MNIST:validation" ->
    "MNIST_validation"), the group name for a file dataset ("./x.npy:validation" -> "x.npy_validation")."""
    parsed = parse_spec(spec)
    return parsed.group.replace("/", "_") if parsed.is_file else spec.replace(":", "_")
