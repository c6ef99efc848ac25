"""Fault injection and tracing for tests, kept out of the package (issue 20): nothing in hvae_dist reads a
test's environment variable.

    nan_at_steps(monkeypatch, steps)      the training loss of these steps (0-based, a set or "all") is NaN
                                          on every rank, in this process
    trace_scored_rows(monkeypatch, path)  every row `hvae score` computes in this process is appended to
                                          `path` as "<group> <index>" (after its values are computed,
                                          before they are written)
    subprocess_env(env)                   `env` with tests/helpers/inject on PYTHONPATH: its sitecustomize
                                          installs the same patches in a child process (also under torchrun)
                                          when the child's environment has
                                            HVAE_DEBUG_NAN_AT_STEP  "3", "3,7" or "all"
                                            HVAE_SCORE_TRACE        a file
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

NAN_ENV = "HVAE_DEBUG_NAN_AT_STEP"
TRACE_ENV = "HVAE_SCORE_TRACE"
INJECT_DIR = Path(__file__).resolve().parent / "inject"
REPO = Path(__file__).resolve().parents[2]


def parse_steps(raw: str) -> set[int] | str:
    """"3" / "3,7" / "all" -> {3} / {3, 7} / "all"."""
    raw = raw.strip()
    return raw if raw == "all" else {int(s) for s in raw.split(",") if s.strip()}


def patch_nan_steps(engine, steps: set[int] | str, patch: Callable = setattr) -> None:
    """Make the loss of Trainer.train_step NaN at `steps` (module `engine`: hvae_dist.train.engine)."""
    loss_fn, train_step = engine.elbo_loss, engine.Trainer.train_step
    current: list[int] = []

    def train_step_noting_the_step(self):
        current.append(self.step)
        try:
            return train_step(self)
        finally:
            current.pop()

    def elbo_loss(out, **kw):
        loss = loss_fn(out, **kw)
        if current and (steps == "all" or current[-1] in steps):
            loss.loss = loss.loss * float("nan")
        return loss

    patch(engine, "elbo_loss", elbo_loss)
    patch(engine.Trainer, "train_step", train_step_noting_the_step)


def patch_score_trace(runner, path: str | Path, patch: Callable = setattr) -> None:
    """Append the rows every scorer of `hvae score` computes to `path` (module `runner`: hvae_dist.score.runner)."""
    base = runner.IWScorer

    class TracingScorer(base):
        def score_batch(self, images, indices, group, *args, **kwargs):
            values = super().score_batch(images, indices, group, *args, **kwargs)
            with open(path, "a") as f:
                f.write("".join(f"{group} {int(i)}\n" for i in indices))
            return values

    patch(runner, "IWScorer", TracingScorer)


def nan_at_steps(monkeypatch, steps: set[int] | str) -> None:
    from hvae_dist.train import engine

    patch_nan_steps(engine, steps, monkeypatch.setattr)


def trace_scored_rows(monkeypatch, path: str | Path) -> None:
    from hvae_dist.score import runner

    patch_score_trace(runner, path, monkeypatch.setattr)


def subprocess_env(env: dict | None = None, **extra: str) -> dict:
    """A child's environment (default: this process's) with the injection hooks on PYTHONPATH, plus `extra`."""
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", str(REPO)).split(os.pathsep) if p and p != str(INJECT_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(INJECT_DIR), *paths])
    env.update(extra)
    return env
