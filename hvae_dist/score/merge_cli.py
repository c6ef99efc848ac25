"""`hvae merge OUT`: validate the shard files in OUT and write OUT/scores.h5 (atomically)."""
from __future__ import annotations

import argparse

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder holding shard-IIIII-of-NNNNN.h5 files (the --out of hvae score)")

def run(args: argparse.Namespace) -> int:
    from hvae_dist.score.merge import merge_shards

    path = merge_shards(args.out)
    print(path)
    return 0
