"""`hvae submit train|score|pipeline`: SLURM jobs through submitit; prints job ids and where outputs go.

    hvae submit train --config fashionmnist --run-dir runs/fm --nodes 2 --tasks-per-node 4 --gpus-per-node 4 \\
        --partition gpu --time 1440
    hvae submit score --run-dir runs/fm --datasets FashionMNIST:test MNIST:test --iw-samples 1000 \\
        --out scores/fm --num-shards 8 --in-dist FashionMNIST:test --partition gpu --time 240
    hvae submit pipeline --config fashionmnist --run-dir runs/fm --datasets FashionMNIST:test MNIST:test \\
        --num-shards 8 --partition gpu

train: one job of nodes x tasks-per-node tasks; the tasks are the ranks of one DDP / DeepSpeed world
(hvae_dist.distributed reads it from SLURM). It checkpoints and requeues itself on a time-out or
preemption and resumes from the run dir (see hvae_dist.submit.jobs). score: one array job, one task per
shard, then a merge (+ analyze) job that starts when every shard succeeded (afterok). pipeline: train ->
score array -> merge + analyze, submitted at once as dependent jobs. submit returns after sbatch.

score and pipeline take every option of `hvae score` itself (one definition, hvae_dist.score.cli), e.g.
--precision bf16 --complexity --data-root DIR, except the per-task --shard / progress options; in pipeline
the two that `hvae train` has too are --score-batch-size and --score-precision (score.cli.SUBMIT_NOTE).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from hvae_dist.errors import ConfigError, SubmitError
from hvae_dist.submit.modes import parse_slurm_time


# ----- arguments -----
def _add_slurm_arguments(p: argparse.ArgumentParser, prefix: str = "", time_default: int = 60,
                         what: str = "") -> None:
    """SLURM resources of one kind of job; `prefix` ("score-") names them apart in `pipeline`."""
    g = p.add_argument_group(f"SLURM ({what} jobs)" if what else "SLURM")
    g.add_argument(f"--{prefix}time", type=parse_slurm_time, default=time_default, metavar="TIME",
                   help="time limit per job as sbatch takes it: minutes, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN or "
                        f"D-H:MIN:SEC; a timed-out job checkpoints and requeues (default: {time_default} minutes)")
    g.add_argument(f"--{prefix}cpus-per-task", type=int, default=None, metavar="C",
                   help="CPUs per task (default: the partition's)")
    g.add_argument(f"--{prefix}mem", default=None, metavar="MEM", help="memory per node, e.g. 32G (default: the partition's)")
    g.add_argument(f"--{prefix}gpus-per-node", type=int, default=None, metavar="G",
                   help="GPUs per node (default: none requested)")
    if not prefix:
        g.add_argument("--partition", default=None, metavar="P", help="partition (default: the cluster's)")
        g.add_argument("--account", default=None, help="account to charge (default: yours)")
        g.add_argument("--qos", default=None, help="quality of service (default: the cluster's)")
        g.add_argument("--constraint", default=None, help="node features, e.g. a100 (default: any node)")
        g.add_argument("--after", default=None, metavar="JOBID",
                       help="start only after this job succeeded (afterok; default: at once)")
        g.add_argument("--signal-delay", type=int, default=120, metavar="S",
                       help="seconds before the time limit at which jobs get SIGUSR2 to checkpoint + requeue")
        g.add_argument("--max-requeues", type=int, default=10, metavar="R",
                       help="time-outs after which a job is not requeued again (preemptions do not count)")
        g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="any other #SBATCH option, e.g. --sbatch mail-type=END (repeatable)")
        g.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="shell line run before srun in every job, e.g. 'module load cuda' (repeatable)")
        g.add_argument("--logs", default=None, metavar="DIR",
                       help="submitit folder for job scripts and logs (default: RUN_DIR/slurm, OUT/slurm)")
        mode = g.add_mutually_exclusive_group()
        mode.add_argument("--dry-run", action="store_true",
                          help="print the sbatch script and parameters of every job, submit nothing (no SLURM needed)")
        mode.add_argument("--local", action="store_true",
                          help="run the same jobs here, one stage after the other, through submitit's LocalExecutor "
                               "(one task; logs in the --logs folder); returns when the last one is done")


def _add_train_job_arguments(p: argparse.ArgumentParser) -> None:
    from hvae_dist.train import cli as train_cli

    train_cli.add_arguments(p)
    g = p.add_argument_group("training world")
    g.add_argument("--nodes", type=int, default=1, help="nodes")
    g.add_argument("--tasks-per-node", type=int, default=None, metavar="G",
                   help="ranks per node (default: --gpus-per-node, else 1)")


def _add_score_arguments(p: argparse.ArgumentParser, pipeline: bool) -> None:
    """`hvae score`'s own options (score.cli.add_score_arguments: one definition of each flag), and the
    array's: how many shards, how many at once, and the merge + analyze job."""
    from hvae_dist.score import cli as score_cli

    g = p.add_argument_group("scoring (the options of `hvae score`; the shard is set per array task)")
    score_cli.add_score_arguments(g, submit="pipeline" if pipeline else "score")
    g = p.add_argument_group("score array, merge and analyze")
    g.add_argument("--num-shards", type=int, required=True, metavar="N", help="array tasks, one shard each")
    g.add_argument("--max-concurrent", type=int, default=None, metavar="K",
                   help="run at most K shards at once (default: all)")
    g.add_argument("--in-dist", default=None, metavar="NAME:SPLIT",
                   help="in-distribution set for `hvae analyze` (default: the first of --datasets)")
    g.add_argument("--analysis-out", default=None, metavar="DIR", help="analysis folder (default: OUT/analysis)")
    g.add_argument("--no-analyze", action="store_true", help="merge only")


def _examples(which: str | None = None) -> str:
    """The examples of the module docstring (all, or the one of `hvae submit WHICH`), as a help epilog."""
    lines, keep = ["examples:"], which is None
    for line in __doc__.split("\n\n")[1].splitlines():
        if line.startswith("    hvae submit "):
            keep = which is None or line.startswith(f"    hvae submit {which} ")
        if keep:
            lines.append(line[2:])
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hvae_dist.score.cli import SUBMIT_NOTE

    p.epilog = _examples() + SUBMIT_NOTE
    sub = p.add_subparsers(dest="what", metavar="JOB")
    sub.required = True
    t = sub.add_parser("train", help="a training job (one DDP / DeepSpeed world over all its tasks)",
                       epilog=_examples("train"))
    _add_train_job_arguments(t)
    _add_slurm_arguments(t, time_default=1440)
    s = sub.add_parser("score", help="a score array (one task per shard) and a dependent merge + analyze job",
                       epilog=_examples("score") + SUBMIT_NOTE)
    _add_score_arguments(s, pipeline=False)
    _add_slurm_arguments(s, time_default=240)
    pl = sub.add_parser("pipeline", help="train -> score array -> merge + analyze, as dependent jobs",
                        epilog=_examples("pipeline") + SUBMIT_NOTE)
    _add_train_job_arguments(pl)
    _add_score_arguments(pl, pipeline=True)
    _add_slurm_arguments(pl, time_default=1440, what="train")
    _add_slurm_arguments(pl, prefix="score-", time_default=240, what="score")


# ----- executors -----
def _require_slurm() -> None:
    missing = [c for c in ("sbatch", "srun", "scontrol") if shutil.which(c) is None]
    if missing:
        raise SubmitError(f"`hvae submit` needs SLURM, but {', '.join(missing)} is not on PATH. On a machine "
                          "without SLURM run `hvae train` / `hvae score` directly (or torchrun)")


def make_executor(folder: str | Path, args: argparse.Namespace, prefix: str = "", *, job_name: str,
                  nodes: int = 1, tasks_per_node: int = 1, dependency: str | None = None,
                  array_parallelism: int | None = None):
    """A submitit SlurmExecutor for one kind of job (with --dry-run one that prints instead, with --local
    submitit's LocalExecutor). `prefix` selects the pipeline's score-* resources."""
    import submitit

    from hvae_dist.submit import modes

    opt = lambda name: getattr(args, f"{prefix}{name}".replace("-", "_"))  # noqa: E731
    if getattr(args, "local", False):
        return modes.make_local_executor(folder, opt("time"), args.max_requeues)
    if getattr(args, "dry_run", False):
        counter = vars(args).setdefault("_dry_run_counter", [0])   # DRY-1, DRY-2, ... over the whole command
        ex = modes.DryRunExecutor(Path(folder) / "%j", args.max_requeues, counter)
    else:
        _require_slurm()
        ex = submitit.SlurmExecutor(folder=str(Path(folder) / "%j"), max_num_timeout=args.max_requeues)
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        extra[key.strip().lstrip("-")] = value if sep else True
    params = dict(job_name=job_name, time=opt("time"), nodes=nodes, ntasks_per_node=tasks_per_node,
                  signal_delay_s=args.signal_delay, setup=list(args.setup))
    for key, value in (("partition", args.partition), ("account", args.account), ("qos", args.qos),
                       ("constraint", args.constraint), ("cpus_per_task", opt("cpus_per_task")),
                       ("mem", opt("mem")), ("gpus_per_node", opt("gpus_per_node")),
                       ("dependency", dependency), ("array_parallelism", array_parallelism)):
        if value is not None:
            params[key] = value
    if extra:
        params["additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


def _after(*job_ids: str | None) -> str | None:
    ids = [j for j in job_ids if j]
    return "afterok:" + ":".join(ids) if ids else None


def _log_paths(job) -> str:
    folder = Path(str(job.paths.folder))
    return str(folder / f"{job.job_id}_<task>_log.{{out,err}}")


# ----- train -----
def _train_world(args: argparse.Namespace, prefix: str = "") -> tuple[int, int]:
    gpus = getattr(args, f"{prefix}gpus_per_node")
    tasks = args.tasks_per_node or gpus or 1
    if args.nodes < 1 or tasks < 1:
        raise ConfigError(f"--nodes {args.nodes} --tasks-per-node {tasks}: both must be >= 1")
    return args.nodes, tasks


def resolve_train_config(args: argparse.Namespace, world_size: int) -> dict:
    """The run's config as `hvae train` would resolve it, with the backend fitted to the world size, checked
    against that world (`train.preflight`); the job checks the rest (data, DeepSpeed) when it starts."""
    from hvae_dist.distributed import World
    from hvae_dist.train.cli import resolve_config
    from hvae_dist.train.preflight import check_world, fit_backend_to_world

    cfg = fit_backend_to_world(resolve_config(args), world_size, args.backend)
    check_world(cfg, World(world_size=world_size), " = nodes x tasks-per-node")
    return cfg.to_dict()


def submit_train(args: argparse.Namespace, out=None, cfg: dict | None = None):
    """Submit the training job; returns the submitit Job (of task 0). `cfg`: the resolved config when the
    caller has it (a pipeline resolves it once, before anything is queued)."""
    out = sys.stdout if out is None else out
    from hvae_dist.submit.jobs import TrainJob

    args.run_dir = str(Path(args.run_dir).resolve())
    nodes, tasks = _train_world(args)
    cfg = cfg if cfg is not None else resolve_train_config(args, nodes * tasks)
    ex = make_executor(args.logs or Path(args.run_dir) / "slurm", args, nodes=nodes, tasks_per_node=tasks,
                       job_name=f"hvae-train-{Path(args.run_dir).name}", dependency=_after(args.after))
    if args.local and nodes * tasks > 1:
        raise ConfigError(f"--local runs one task; --nodes {nodes} --tasks-per-node {tasks} need SLURM "
                          "(or torchrun on one machine)")
    job = ex.submit(TrainJob(cfg, args.run_dir))
    if args.local:
        from hvae_dist.submit.modes import wait_local

        wait_local([job], "train", out)
    run = Path(args.run_dir)
    print(f"train job {job.job_id}: {nodes} node(s) x {tasks} task(s), backend={cfg['train']['backend']}, "
          f"max_steps={cfg['train']['max_steps']}, time limit {args.time} min (checkpoints + requeues itself)",
          file=out)
    print(f"  logs:        {_log_paths(job)}  (and {run / 'train.log'})", file=out)
    print(f"  checkpoints: {run / 'checkpoints'} (latest.pt)", file=out)
    print(f"  TensorBoard: tensorboard --logdir {run / 'tb'}", file=out)
    print(f"  watch:       squeue -j {job.job_id}; sacct -j {job.job_id}", file=out)
    return job


# ----- score -----
def submit_scoring(args: argparse.Namespace, run_dir: str, out_dir: str, after: str | None = None,
                   prefix: str = "", in_dist_default: str | None = None, out=None):
    """Submit the score array and the merge (+ analyze) job; returns (shard jobs, merge job)."""
    out = sys.stdout if out is None else out
    from hvae_dist.submit.jobs import MergeAnalyze, ScoreShard

    n = args.num_shards
    if n < 1:
        raise ConfigError(f"--num-shards must be >= 1, got {n}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    from hvae_dist.score.cli import job_from_args
    from hvae_dist.score.runner import check_job

    checkpoint = str(Path(args.checkpoint).resolve()) if getattr(args, "checkpoint", None) else None
    job = replace(job_from_args(args, run_dir=run_dir, out=out_dir, progress=False), checkpoint=checkpoint)
    check_job(replace(job, num_shards=n))   # before anything is queued: `hvae score`'s checks of its options
    logs = Path(args.logs) if args.logs else Path(out_dir) / "slurm"
    name = Path(out_dir).name
    ex = make_executor(logs, args, prefix, job_name=f"hvae-score-{name}", dependency=_after(after, args.after),
                       array_parallelism=args.max_concurrent or n)
    with ex.batch():
        shard_jobs = [ex.submit(ScoreShard(job, i, n)) for i in range(n)]   # one array job
    if args.local:
        from hvae_dist.submit.modes import wait_local

        wait_local(shard_jobs, "score", out)
    array_id = shard_jobs[0].job_id.split("_")[0]
    in_dist = None if args.no_analyze else (args.in_dist or in_dist_default or args.datasets[0])
    analysis = str(Path(args.analysis_out).resolve()) if args.analysis_out else str(Path(out_dir) / "analysis")
    mex = make_executor(logs, args, prefix, job_name=f"hvae-merge-{name}", dependency=f"afterok:{array_id}")
    if not args.local:
        mex.update_parameters(ntasks_per_node=1, nodes=1)
        if getattr(args, f"{prefix}gpus_per_node") is not None:
            mex.update_parameters(gpus_per_node=0)
    merge_job = mex.submit(MergeAnalyze(out_dir, in_dist, analysis))
    if args.local:
        wait_local([merge_job], "merge", out)
    limit = f", at most {args.max_concurrent} at once" if args.max_concurrent else ""
    print(f"score array {array_id}: {n} shard(s) (tasks {array_id}_0..{array_id}_{n - 1}{limit}), "
          f"S={args.iw_samples}" + (f", after job {after or args.after}" if (after or args.after) else ""), file=out)
    print(f"  logs:   {logs / (array_id + '_<shard>')}/{array_id}_<shard>_0_log.{{out,err}}", file=out)
    print(f"  shards: {Path(out_dir) / f'shard-<I>-of-{n:05d}.h5'}", file=out)
    what = "merge + analyze" if in_dist else "merge"
    print(f"merge job {merge_job.job_id} ({what}, after array {array_id} succeeds)", file=out)
    print(f"  logs:   {_log_paths(merge_job)}", file=out)
    print(f"  scores: {Path(out_dir) / 'scores.h5'}", file=out)
    if in_dist:
        print(f"  analysis (in-dist {in_dist}): {analysis}/metrics.md", file=out)
    return shard_jobs, merge_job


# ----- pipeline -----
def submit_pipeline(args: argparse.Namespace, out=None):
    """train -> score array -> merge + analyze; returns (train job, shard jobs, merge job)."""
    out = sys.stdout if out is None else out
    args.run_dir = str(Path(args.run_dir).resolve())
    out_dir = str(Path(args.out).resolve()) if args.out else str(Path(args.run_dir) / "scores")
    nodes, tasks = _train_world(args)
    cfg = resolve_train_config(args, nodes * tasks)  # once, and before anything is queued
    train_job = submit_train(args, out, cfg)
    shard_jobs, merge_job = submit_scoring(args, args.run_dir, out_dir, after=train_job.job_id, prefix="score_",
                                         in_dist_default=f"{cfg['data']['dataset']}:test", out=out)
    print(f"pipeline: train {train_job.job_id} -> score {shard_jobs[0].job_id.split('_')[0]} -> "
          f"merge {merge_job.job_id}; cancel all with: scancel {train_job.job_id} "
          f"{shard_jobs[0].job_id.split('_')[0]} {merge_job.job_id}", file=out)
    return train_job, shard_jobs, merge_job


def run(args: argparse.Namespace) -> int:
    if args.what == "train":
        submit_train(args)
    elif args.what == "score":
        args.run_dir = str(Path(args.run_dir).resolve())
        submit_scoring(args, args.run_dir, str(Path(args.out).resolve()))
    else:
        submit_pipeline(args)
    if args.dry_run:
        print("dry run: nothing was submitted (the ids above are placeholders); drop --dry-run to submit")
    return 0
