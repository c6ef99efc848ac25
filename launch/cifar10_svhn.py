"""The paper's CIFAR10 -> SVHN experiment on SLURM: train (DDP, 4 GPUs), score (S=1000, 16 shards), merge, analyze.

    python launch/cifar10_svhn.py --partition gpu [--run-dir runs/cifar10] [any `hvae submit pipeline` option]

Extra options are appended, so they override the defaults below. Prints the job ids and where logs,
checkpoints, TensorBoard and scores go.
"""
import sys

from hvae_dist.cli import main

DEFAULTS = [
    "--config", "cifar10", "--run-dir", "runs/cifar10", "--backend", "ddp", "--precision", "bf16",
    "--datasets", "CIFAR10:test", "SVHN:test", "--in-dist", "CIFAR10:test",
    "--iw-samples", "1000", "--num-shards", "16",
    "--nodes", "1", "--tasks-per-node", "4", "--gpus-per-node", "4", "--cpus-per-task", "8", "--time", "2880",
    "--score-gpus-per-node", "1", "--score-cpus-per-task", "8", "--score-time", "480",
]

if __name__ == "__main__":
    sys.exit(main(["submit", "pipeline", *DEFAULTS, *sys.argv[1:]]))
