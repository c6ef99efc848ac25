"""Sharded scoring jobs to HDF5 (the estimators live in `hvae_dist.estimators`), and merging.

    plan.py        balanced contiguous shard ranges; shard index from SLURM arrays / torchrun
    layout.py      the HDF5 score-file layout: fields, attributes, group names, checksummed chunks
    writer.py      the resumable, crash-safe shard writer and the shard lock
    reader.py      read_scores(path) -> ScoreFile(groups, attrs): the one reader, validated
    runner.py      one `hvae score` job (model + data + plan + writer + progress)
    merge.py       `hvae merge`: validate the shards, write scores.h5 atomically
    cli.py         the `hvae score` and `hvae merge` commands
    arrays.py      score_arrays(run_dir, {"NAME/SPLIT": images}, out): in-memory images into a normal scores.h5
"""
from hvae_dist.score.arrays import score_arrays
from hvae_dist.score.merge import merge_shards
from hvae_dist.score.plan import ShardPlan, resolve_shard, shard_filename, shard_range
from hvae_dist.score.reader import ScoreFile, read_scores, to_dataframe

__all__ = ["ScoreFile", "ShardPlan", "merge_shards", "read_scores", "resolve_shard", "score_arrays", "shard_filename",
           "shard_range", "to_dataframe"]
