"""Per-example estimators on a trained model: every score a score file can hold is computed here.

    scorer.py           IWScorer: importance-weighted ELBO_S and L>k_S bounds, precompute once per example,
                        samples streamed in chunks with an online log-sum-exp
    rows.py             the one rows-per-pass policy (examples x samples per forward pass), measured on a CPU
    noise.py            counter-based (splitmix64) noise: a function of (seed, dataset, index, bound, sample)
    reconstructions.py  the paper's reconstruction grid (L>k decodes and prior samples per latent layer)
    complexity.py       compressed sizes (PNG / zlib, nats) for the complexity-corrected score
    lid.py              local intrinsic dimension from the decoder Jacobian (Kamkari et al. 2024)
    detection.py        AUROC / AUPRC / FPR80 of a score (hvae analyze and the training evaluation)

`train` (validation) and `score` (the HDF5 jobs) both build on this package and never import each other.
"""
from hvae_dist.estimators.scorer import IWScorer, ScoreSettings

__all__ = ["IWScorer", "ScoreSettings"]
