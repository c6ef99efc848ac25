"""Shard plan: which examples of which dataset a shard scores, and which shard this process is.

The plan is explicit, never a DistributedSampler (which pads by repeating examples): for a dataset of
N examples (after --max-examples) and n shards, shard i scores the contiguous range

    [floor(i * N / n), floor((i + 1) * N / n))

so the ranges are balanced (sizes differ by at most 1), disjoint, cover 0 .. N-1 exactly, and a shard
may be empty when n > N. Every dataset is split this way independently.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hvae_dist.errors import ConfigError

SHARD_NAME = "shard-{shard:05d}-of-{num_shards:05d}.h5"
SHARD_PATTERN = r"shard-(\d{5})-of-(\d{5})\.h5"


def shard_filename(shard: int, num_shards: int) -> str:
    """'shard-00003-of-00008.h5'."""
    return SHARD_NAME.format(shard=shard, num_shards=num_shards)


def shard_lock_path(shard_path: str | Path) -> Path:
    """OUT/.shard-IIIII-of-NNNNN.lock: the lock every writer of OUT/shard-IIIII-of-NNNNN.h5 holds (hidden, kept)."""
    shard_path = Path(shard_path)
    return shard_path.with_name(f".{shard_path.stem}.lock")


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of shard `shard` of `num_shards` over n examples (balanced, contiguous)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(f"shard {shard} of {num_shards}: need num_shards >= 1 and 0 <= shard < num_shards")
    return shard * n // num_shards, (shard + 1) * n // num_shards


@dataclass(frozen=True)
class ShardPlan:
    """Rows of every dataset that one shard scores. `sizes` maps group name -> examples in the whole job."""

    shard: int
    num_shards: int
    sizes: dict

    def range(self, group: str) -> tuple[int, int]:
        return shard_range(self.sizes[group], self.shard, self.num_shards)

    @property
    def filename(self) -> str:
        return shard_filename(self.shard, self.num_shards)


def _int_env(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def resolve_shard(shard: int | None, num_shards: int | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(shard, num_shards) from the flags, else the environment, else (0, 1).

    Environment: a SLURM job array (shard = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, since array
    indices need not start at 0; count SLURM_ARRAY_TASK_COUNT), else torchrun's RANK / WORLD_SIZE.
    A flag given on the command line wins over the environment for that value.
    """
    env = os.environ if env is None else env
    env_shard = env_count = None
    task_id = _int_env(env, "SLURM_ARRAY_TASK_ID")
    if task_id is not None and _int_env(env, "SLURM_ARRAY_TASK_COUNT") is not None:
        task_min = _int_env(env, "SLURM_ARRAY_TASK_MIN") or 0
        env_shard, env_count = task_id - task_min, _int_env(env, "SLURM_ARRAY_TASK_COUNT")
    elif _int_env(env, "RANK") is not None and _int_env(env, "WORLD_SIZE") is not None:
        env_shard, env_count = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
    num = num_shards if num_shards is not None else (env_count if env_count is not None else 1)
    idx = shard if shard is not None else (env_shard if env_shard is not None else 0)
    if num < 1:
        raise ConfigError(f"--num-shards must be >= 1, got {num}")
    if not 0 <= idx < num:
        raise ConfigError(f"shard index {idx} is outside 0..{num - 1} (num_shards={num}); "
                          "with a SLURM array whose ids are not 0..N-1, SLURM_ARRAY_TASK_MIN must be set")
    return idx, num
