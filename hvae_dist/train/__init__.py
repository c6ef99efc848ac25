"""Training: the engine (data order, noise, objective, checkpoints, signals), backends (single / DDP /
DeepSpeed), EMA, validation, the monitor (TensorBoard, log, progress), `run_training` (runner.py) and
the `hvae train` command (cli.py)."""
