"""Training: preflight (the run's config and its one validation before any work), the engine (data order,
noise, objective, checkpoints, signals), backends (single / DDP / DeepSpeed), EMA, the evaluator
(evaluate.py: returns the validation's scalars and images), the monitor (writes them: TensorBoard, log,
progress), `run_training` (runner.py) and the `hvae train` command (cli.py)."""
