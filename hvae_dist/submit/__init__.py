"""SLURM through submitit: `hvae submit train|score|pipeline` (cli.py) and the callables the jobs run
(jobs.py). The sbatch templates for plain `sbatch` users live in the repository's slurm/ folder."""
