"""Sharded importance-weighted scoring (ELBO_S, L>k_S, LLR>k per example) to HDF5, and merging.

    plan.py     balanced contiguous shard ranges; shard index from SLURM arrays / torchrun
    noise.py    counter-based (splitmix64) noise: a function of (seed, dataset, index, bound, sample)
    scorer.py   IWScorer: precompute once per example, stream samples in chunks, online log-sum-exp
    writer.py   the HDF5 layout and the resumable, crash-safe shard writer
    runner.py   one `hvae score` job (model + data + plan + writer + progress bar)
    merge.py    `hvae merge`: validate the shards, write scores.h5 atomically
    reader.py   read_scores(path) -> numpy dicts
"""
from hvae_dist.score.merge import merge_shards
from hvae_dist.score.plan import ShardPlan, resolve_shard, shard_filename, shard_range
from hvae_dist.score.reader import read_scores
from hvae_dist.score.scorer import IWScorer, ScoreSettings, score_arrays

__all__ = ["IWScorer", "ScoreSettings", "ShardPlan", "merge_shards", "read_scores", "resolve_shard",
           "score_arrays", "shard_filename", "shard_range"]
