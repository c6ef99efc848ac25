"""Import alias of `hvae_dist.submit.jobs`, kept for job objects pickled before the move.

submitit pickles a job's callable by reference (module + class name): a job queued with an older
install names `hvae_dist.slurm_jobs.TrainJob`. New code imports `hvae_dist.submit.jobs`.
"""
from hvae_dist.submit.jobs import MergeAnalyze, ScoreShard, TrainJob

__all__ = ["MergeAnalyze", "ScoreShard", "TrainJob"]
