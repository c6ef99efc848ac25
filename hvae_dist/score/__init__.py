"""Sharded importance-weighted scoring (ELBO_S, L>k_S, LLR>k per example) to HDF5, and merging.

    plan.py        balanced contiguous shard ranges; shard index from SLURM arrays / torchrun
    noise.py       counter-based (splitmix64) noise: a function of (seed, dataset, index, bound, sample)
    scorer.py      IWScorer: precompute once per example, stream samples in chunks, online log-sum-exp
    complexity.py  compressed sizes (PNG / zlib, nats) for the complexity-corrected score
    layout.py      the HDF5 score-file layout: fields, attributes, group names, checksummed chunks
    atomic.py      atomic file writes (temp, fsync, rename) for every file score / merge / analyze write
    writer.py      the resumable, crash-safe shard writer and the shard lock
    reader.py      read_scores(path) -> ScoreFile(groups, attrs): the one reader, validated
    runner.py      one `hvae score` job (model + data + plan + writer + progress)
    merge.py       `hvae merge`: validate the shards, write scores.h5 atomically
    cli.py         the `hvae score` and `hvae merge` commands
"""
from hvae_dist.score.merge import merge_shards
from hvae_dist.score.plan import ShardPlan, resolve_shard, shard_filename, shard_range
from hvae_dist.score.reader import ScoreFile, read_scores, to_dataframe
from hvae_dist.score.scorer import IWScorer, ScoreSettings

__all__ = ["IWScorer", "ScoreFile", "ScoreSettings", "ShardPlan", "merge_shards", "read_scores", "resolve_shard",
           "shard_filename", "shard_range", "to_dataframe"]
