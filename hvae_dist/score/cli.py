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
  hvae score --run-dir runs/fm --datasets FashionMNIST:test ./my_pngs ./x.npy:all-inverted --max-examples 500 \
      --out scores/mine                 # your own data (a folder of images, .npy / .npz / .h5); 500 rows each
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


SUBMIT_NOTE = """
`hvae score`'s options are given directly, e.g. --precision bf16 --complexity (in pipeline: --score-precision,
--score-batch-size); the --score-args string of earlier versions is gone."""
"""The epilog note of `hvae submit score|pipeline` (kept here, beside the options it speaks of)."""


def add_score_arguments(p, *, submit: str | None = None) -> None:
    """The options of `hvae score`: the one definition of each flag, which `hvae submit score` and `hvae submit
    pipeline` reuse (`submit` = "score" / "pipeline"; `p` a parser or an argument group). A submitted job
    sets the shard per array task (`hvae submit`'s own --num-shards) and shows no progress bar, so those
    options are left out there; in a pipeline the run dir is the training job's (no --run-dir /
    --checkpoint), --out defaults to RUN_DIR/scores, and the options `hvae train` has too are named
    --score-batch-size and --score-precision. `job_from_args` reads them back."""
    pipeline = submit == "pipeline"
    if submit is None:
        p.epilog = SCORE_EXAMPLES
    if not pipeline:
        p.add_argument("--run-dir", required=True, help="training run dir (config.json, checkpoints/)")
        p.add_argument("--checkpoint", default=None,
                       help="checkpoint file; its model must match RUN_DIR/config.json (default: "
                            "RUN_DIR/checkpoints/latest.pt)")
    p.add_argument("--datasets", nargs="+", required=True, metavar="NAME:SPLIT|PATH",
                   help="datasets to score, e.g. FashionMNIST:test MNIST:test, or your own data: an .npy / .npz / .h5 "
                        "file or a folder of images, PATH[#KEY][:all|train|validation[-VARIANT]]" + (
                       " (in-distribution first: the default of --in-dist)" if submit else ""))
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder with torchvision's dataset files, e.g. for KMNIST and SVHN (default: the run's "
                        "data.root; else the offline copies)")
    p.add_argument("--iw-samples", type=int, default=1000, help="importance samples S of the ELBO bound")
    p.add_argument("--iw-samples-lk", type=int, default=None,
                   help="importance samples of each L>k bound (default: --iw-samples)")
    p.add_argument("--ks", nargs="+", default=None, metavar="K",
                   help="k of the L>k bounds, each in 0..L-1, or 'all'; stored in increasing order (default: all = 1..L-1)")
    p.add_argument("--out", required=not pipeline,
                   help="output folder for the shard files" + (" and scores.h5 (default: RUN_DIR/scores)" if pipeline
                                                               else " and scores.h5" if submit else ""))
    if submit is None:
        p.add_argument("--shard", type=int, default=None,
                       help="this shard's index (default: from SLURM / torchrun, else 0)")
        p.add_argument("--num-shards", type=int, default=None,
                       help="number of shards (default: from SLURM / torchrun, else 1)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="score a seeded random subset of N examples of each dataset, stratified by class where labels "
                        "are known (the same rows for the same --seed and N; default: all)")
    p.add_argument("--first", type=int, default=None, metavar="N",
                   help="score only the first N examples of each dataset (the behaviour of --max-examples before "
                        "issue 21); excludes --max-examples (default: all, or the subset of --max-examples)")
    p.add_argument("--score-batch-size" if pipeline else "--batch-size", dest="batch_size", type=int, default=None,
                   metavar="B", help="examples per batch; does not change the scores (default: 16 on a CPU, 128 on a GPU, more "
                        "when S is small: hvae_dist.estimators.rows)")
    p.add_argument("--sample-chunk", type=_sample_chunk, default="auto", metavar="auto|C",
                   help="samples per example per forward pass (rows per pass = batch x chunk); does not change the "
                        "scores. auto: the rows per pass of hvae_dist.estimators.rows (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior noise and dynamic binarization, 0 .. 2^63-1")
    p.add_argument("--no-ema", action="store_true", help="score the raw weights even when the checkpoint has EMA weights")
    p.add_argument("--score-precision" if pipeline else "--precision", dest="score_precision",
                   choices=SCORE_PRECISIONS, default="fp32",
                   help="network precision (bf16: autocast; log-densities fp32, reductions fp64)")
    p.add_argument("--complexity", action="store_true",
                   help="also store complexity_png / complexity_zlib (compressed size, nats) per example")
    p.add_argument("--likelihood-regret", action="store_true",
                   help="also store elbo_refit and likelihood_regret: each example's encoder refit with Adam as in "
                        "Xiao et al.'s compute_LR.py, batched (slow: --lr-steps forward+backward passes per example)")
    p.add_argument("--lr-steps", type=int, default=100, metavar="N",
                   help="Adam steps of each Likelihood Regret refit (default: 100, as the original)")
    p.add_argument("--gradients", action="store_true",
                   help="also store grad_norm: per-layer norms of each example's ELBO gradient (Bergamin et al. 2022)")
    p.add_argument("--grad-samples", type=int, default=1, metavar="M",
                   help="posterior samples whose mean ELBO_1 --gradients differentiates (default: 1)")
    p.add_argument("--lid", action="store_true",
                   help="also store lid / lid_lin (N, K, S): local intrinsic dimension of the decoder at each example "
                        "(Kamkari et al. 2024; hvae_dist.estimators.lid); costs hundreds of IW samples per example")
    p.add_argument("--lid-scales", nargs="+", type=float, default=None, metavar="DELTA",
                   help="scales delta of the LID estimates, pixel units of the decoder mean (default: 0.1 1)")
    p.add_argument("--lid-ks", nargs="+", type=int, default=None, metavar="K",
                   help="Jacobians with respect to z>k, each k in 0..L-1 (default: 0 = all latents)")
    p.add_argument("--lid-rank", type=int, default=None, metavar="R",
                   help="top R singular values by randomized SVD instead of the full Jacobian (large models); default: the "
                        "full Jacobian")
    p.add_argument("--lid-chunk", type=int, default=32, metavar="C",
                   help="Jacobian columns per batched pass (memory: batch x C rows); does not change the values")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda or cuda:N (refused when not here)")
    if submit is None:
        bar = p.add_mutually_exclusive_group()
        bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                         help="show the progress bar even when stderr is not a terminal (default: bar on a terminal, "
                              "else progress lines)")
        bar.add_argument("--no-progress", dest="progress", action="store_false",
                         help="never show the progress bar; log progress lines instead")
    p.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between progress lines (rows done / total, rows/s, ETA) when there is no bar")


def job_from_args(args: argparse.Namespace, *, run_dir: str | None = None, out: str | None = None,
                  shard: int = 0, num_shards: int = 1, progress: bool | None = None):
    """The ScoreJob of the options of `add_score_arguments` (`run_dir` / `out`: instead of args.run_dir /
    args.out, e.g. absolute paths for a SLURM job)."""
    from hvae_dist.estimators.gradients import GradientSettings
    from hvae_dist.estimators.likelihood_regret import RegretSettings
    from hvae_dist.estimators.scorer import ScoreSettings
    from hvae_dist.score.runner import ScoreJob

    regret = RegretSettings(steps=args.lr_steps) if getattr(args, "likelihood_regret", False) else None
    gradients = GradientSettings(samples=args.grad_samples) if getattr(args, "gradients", False) else None
    settings = ScoreSettings(iw_samples=args.iw_samples, iw_samples_lk=args.iw_samples_lk, ks=_ks(args.ks),
                             seed=args.seed, precision=args.score_precision, sample_chunk=args.sample_chunk)
    lid = _lid_settings(args)
    return ScoreJob(lid=lid, run_dir=run_dir or args.run_dir, datasets=list(args.datasets), out=out or args.out,
                    settings=settings, checkpoint=getattr(args, "checkpoint", None), shard=shard,
                    num_shards=num_shards, max_examples=args.max_examples, batch_size=args.batch_size,
                    use_ema=not args.no_ema, complexity=args.complexity, device=args.device, progress=progress,
                    data_root=args.data_root, log_every=args.log_every, first=getattr(args, "first", None),
                    likelihood_regret=regret, gradients=gradients)


def _lid_settings(args: argparse.Namespace):
    """The LidSettings of --lid and its options (None without --lid; an --lid-* option alone is an error)."""
    from hvae_dist.estimators.lid import LidSettings

    given = [o for o, v in (("--lid-scales", args.lid_scales), ("--lid-ks", args.lid_ks), ("--lid-rank", args.lid_rank))
             if v is not None]
    if not args.lid:
        if given:
            raise ConfigError(f"{', '.join(given)} given without --lid: add --lid to store the LID fields")
        return None
    lid = LidSettings(chunk=args.lid_chunk, rank=args.lid_rank)
    if args.lid_scales is not None:
        lid.scales = list(args.lid_scales)
    if args.lid_ks is not None:
        lid.ks = list(args.lid_ks)
    return lid


def run_score(args: argparse.Namespace) -> int:
    from hvae_dist.score.plan import resolve_shard
    from hvae_dist.score.runner import run_job

    shard, num_shards = resolve_shard(args.shard, args.num_shards)
    print(run_job(job_from_args(args, shard=shard, num_shards=num_shards, progress=args.progress)))
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
