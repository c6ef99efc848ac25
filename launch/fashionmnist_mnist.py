"""The paper's FashionMNIST -> MNIST experiment on SLURM: train, score (S=1000, 8 shards), merge, analyze.

    python launch/fashionmnist_mnist.py --partition gpu [--run-dir runs/fashionmnist] [any `hvae submit
        pipeline` option, e.g. --nodes 1 --tasks-per-node 4 --gpus-per-node 4 --time 1440]

Extra options are appended, so they override the defaults below. Prints the job ids and where logs,
checkpoints, TensorBoard and scores go.
"""
import sys

from hvae_dist.cli import main

DEFAULTS = [
    "--config", "fashionmnist", "--run-dir", "runs/fashionmnist",
    "--datasets", "FashionMNIST:test", "MNIST:test", "--in-dist", "FashionMNIST:test",
    "--iw-samples", "1000", "--num-shards", "8",
    "--nodes", "1", "--tasks-per-node", "1", "--gpus-per-node", "1", "--cpus-per-task", "8", "--time", "1440",
    "--score-gpus-per-node", "1", "--score-cpus-per-task", "8", "--score-time", "240",
]

if __name__ == "__main__":
    sys.exit(main(["submit", "pipeline", *DEFAULTS, *sys.argv[1:]]))
