"""`hvae score` and `hvae merge`.

score: importance-weighted ELBO, L>k and LLR>k per example into OUT/shard-IIIII-of-NNNNN.h5. Shard
index / count default from a SLURM job array (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN,
SLURM_ARRAY_TASK_COUNT), else torchrun (RANK, WORLD_SIZE), else 0 of 1. Re-running a shard resumes it.
merge: validate the shard files in OUT and write OUT/scores.h5 (streamed into a temp file, then renamed).
SIGTERM / Ctrl-C unwind either (`hvae_dist.signals`): the shard file is closed, or merge's temp file removed;
one line, exit 143 / 130.
"""
from __future__ import annotations

import argparse

from hvae_dist.config import SCORE_PRECISIONS
from hvae_dist.errors import ConfigError
from hvae_dist.signals import stop_note


def _ks(values: list[str] | None):
    if values is None or values == ["all"]:
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ConfigError(f"--ks {' '.join(values)}: give integers (e.g. --ks 1 2) or 'all'") from None


SCORE_EXAMPLES = """examples:
  hvae score --run-dir runs/fm --datasets FashionMNIST:test MNIST:test --iw-samples 1000 --out scores/fm
  hvae score --run-dir runs/fm --datasets FashionMNIST:test KMNIST:test --data-root ~/data --out scores/fm \\
      --shard 3 --num-shards 8          # one of 8 shards; then: hvae merge scores/fm
Re-running the same command resumes its shard. Between runs --batch-size, --sample-chunk, --device,
--data-root and the progress options may change; the rest is checked against the shard file."""

MERGE_EXAMPLES = """example:
  hvae merge scores/fm                 # scores/fm/shard-*.h5 -> scores/fm/scores.h5
A scores.h5 of another job (other model or settings) is refused; --force replaces it and keeps the old
file as scores.replaced-<UTC time>.h5. Memory stays flat in the number of rows; the disk needs about the
shard files' total size free."""


def _sample_chunk(value: str) -> int | str:
    """argparse type of --sample-chunk: 'auto' or a positive integer."""
    if value == "auto":
        return value
    try:
        chunk = int(value)
    except ValueError:
        chunk = 0
    if chunk < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give 'auto' or an integer >= 1")
    return chunk


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = SCORE_EXAMPLES
    p.add_argument("--run-dir", required=True, help="training run dir (config.json, checkpoints/)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file; its model must match RUN_DIR/config.json (default: RUN_DIR/checkpoints/latest.pt)")
    p.add_argument("--datasets", nargs="+", required=True, metavar="NAME:SPLIT",
                   help="datasets to score, e.g. FashionMNIST:test MNIST:test")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder with torchvision's dataset files, e.g. for KMNIST and SVHN (default: the run's "
                        "data.root; else the offline copies)")
    p.add_argument("--iw-samples", type=int, default=1000, help="importance samples S of the ELBO bound")
    p.add_argument("--iw-samples-lk", type=int, default=None,
                   help="importance samples of each L>k bound (default: --iw-samples)")
    p.add_argument("--ks", nargs="+", default=None, metavar="K",
                   help="k of the L>k bounds, each in 0..L-1, or 'all'; stored in increasing order (default: all = 1..L-1)")
    p.add_argument("--out", required=True, help="output folder for the shard files")
    p.add_argument("--shard", type=int, default=None, help="this shard's index (default: from SLURM / torchrun, else 0)")
    p.add_argument("--num-shards", type=int, default=None, help="number of shards (default: from SLURM / torchrun, else 1)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="score only the first N examples of each dataset (default: all)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per batch; does not change the scores (default: 16 on a CPU, 128 on a GPU)")
    p.add_argument("--sample-chunk", type=_sample_chunk, default="auto", metavar="auto|C",
                   help="samples per example per forward pass (rows per pass = batch x chunk); does not change the "
                        "scores. auto: about 64 rows per pass on a CPU, 4096 on a GPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior noise and dynamic binarization, 0 .. 2^63-1")
    p.add_argument("--no-ema", action="store_true", help="score the raw weights even when the checkpoint has EMA weights")
    p.add_argument("--precision", choices=SCORE_PRECISIONS, default="fp32",
                   help="network precision (bf16: autocast; log-densities fp32, reductions fp64)")
    p.add_argument("--complexity", action="store_true",
                   help="also store complexity_png / complexity_zlib (compressed size, nats) per example")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda or cuda:N (refused when not here)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show the progress bar even when stderr is not a terminal (default: bar on a terminal, "
                          "else progress lines)")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="never show the progress bar; log progress lines instead")
    p.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between progress lines (rows done / total, rows/s, ETA) when there is no bar")


def run_score(args: argparse.Namespace) -> int:
    from hvae_dist.estimators.scorer import ScoreSettings
    from hvae_dist.score.plan import resolve_shard
    from hvae_dist.score.runner import ScoreJob, run_score_job

    shard, num_shards = resolve_shard(args.shard, args.num_shards)
    settings = ScoreSettings(iw_samples=args.iw_samples, iw_samples_lk=args.iw_samples_lk, ks=_ks(args.ks),
                             seed=args.seed, precision=args.precision, sample_chunk=args.sample_chunk)
    job = ScoreJob(run_dir=args.run_dir, datasets=list(args.datasets), out=args.out, settings=settings,
                   checkpoint=args.checkpoint, shard=shard, num_shards=num_shards, max_examples=args.max_examples,
                   batch_size=args.batch_size, use_ema=not args.no_ema, complexity=args.complexity,
                   device=args.device, progress=args.progress, data_root=args.data_root, log_every=args.log_every)
    # SLURM preemption / scancel / requeue send SIGTERM: it unwinds (hvae_dist.signals), so the shard's HDF5
    # file is closed cleanly (rows are marked complete only after they are written; a re-run resumes there).
    with stop_note("the shard file is closed; re-running the same command resumes it"):
        path = run_score_job(job)
    print(path)
    return 0


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = MERGE_EXAMPLES
    p.add_argument("out", help="folder holding shard-IIIII-of-NNNNN.h5 files (the --out of hvae score)")
    p.add_argument("--force", action="store_true",
                   help="replace a scores.h5 of another job (kept as scores.replaced-<UTC time>.h5)")


def run_merge(args: argparse.Namespace) -> int:
    from hvae_dist.files import require_folder
    from hvae_dist.score.merge import merge_shards

    # SIGTERM (scancel, preemption) and Ctrl-C unwind (hvae_dist.signals); while the temp file is written
    # they wait for the next block (files.write_hdf5_atomic), which removes it first.
    with stop_note("no temp file is left; scores.h5 is the previous one (or none) unless the new one was "
                   "complete; re-run to merge"):
        print(merge_shards(require_folder(args.out, "OUT"), force=args.force))
    return 0
