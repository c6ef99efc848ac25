"""The stages of `hvae demo` and `hvae poster` as typed calls: train, score, merge, analyze.

Each stage calls the function behind the command (never the command line) and first prints the
`hvae` command that does the same, so that a demo is also a worked example of the CLI.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from hvae_dist.experiments.recipe import recipe_overrides


def _show(argv: list[str]) -> None:
    print(f"\n$ hvae {shlex.join(argv)}", flush=True)


def train(run_dir: Path, config: str | None, overrides: list[str], user_overrides: list[str] | None = None,
          precision: str | None = None) -> dict:
    """Train (or resume) `run_dir`: a new run from `config` with `overrides`, then the recipe and the user's
    overrides (`recipe.recipe_overrides`), then the precision; a resumed run (config None) with `overrides`
    only. Returns run_training's {"step", "reason"}."""
    from hvae_dist.train.preflight import resolve_run_config
    from hvae_dist.train.runner import run_training

    items = list(overrides) + (recipe_overrides(user_overrides) if config is not None else [])
    argv = ["train"] + (["--config", config] if config is not None else []) + ["--run-dir", str(run_dir)]
    argv += ["--precision", precision] if precision else []
    _show(argv + [arg for item in items for arg in ("--set", item)])
    if precision:
        items.append(f"train.precision={precision}")     # --precision goes after the --set items
    return run_training(resolve_run_config(run_dir, config, items), run_dir)


def budget_overrides(steps: int, minutes: float | None) -> list[str]:
    """--set items of a fixed step budget with an optional wall-clock cap (`train.max_minutes`, null: none)."""
    return [f"train.max_steps={int(steps)}", f"train.max_minutes={'null' if minutes is None else minutes}"]


def budget_note(result: dict, steps: int, minutes: float | None) -> str | None:
    """"stopped at step N of M ..." when the --minutes cap (or a signal) ended training before the step budget."""
    if result.get("reason") in ("time", "signal") and result.get("step", steps) < steps:
        why = f"the --minutes {minutes:g} cap" if result["reason"] == "time" else "a signal"
        return (f"stopped at step {result['step']} of {steps} ({why}): the model is less trained than the fixed "
                "budget, and its numbers depend on how fast this machine was")
    return None


def score(run_dir: Path, datasets: list[str], out: Path, iw_samples: int, max_examples: int,
          data_root: str | None = None) -> Path:
    """Score every dataset (one shard) into `out`; returns the shard file."""
    from hvae_dist.estimators.scorer import ScoreSettings
    from hvae_dist.score.runner import ScoreJob, run_job

    argv = ["score", "--run-dir", str(run_dir), "--datasets", *datasets, "--iw-samples", str(iw_samples),
            "--out", str(out), "--max-examples", str(max_examples)]
    _show(argv + (["--data-root", data_root] if data_root else []))
    return run_job(ScoreJob(run_dir=str(run_dir), datasets=list(datasets), out=str(out),
                            settings=ScoreSettings(iw_samples=iw_samples), max_examples=max_examples,
                            data_root=data_root))


def merge(out: Path) -> Path:
    """Merge the shards of `out` into out/scores.h5; returns its path."""
    from hvae_dist.score import merge_shards

    _show(["merge", str(out)])
    return merge_shards(out)


def analyze(scores: Path, in_dist: str, out: Path, note: str | None = None, ensemble: list | None = None) -> None:
    """Metrics, tables and figures of `scores` into `out`; prints the table. `note` (e.g. "stopped at step N
    of M") is printed and added to out/metrics.md; `ensemble`: other runs' score files (adds -WAIC)."""
    from hvae_dist.analysis import format_text, report, run_analysis
    from hvae_dist.analysis.intervals import REPLICATES
    from hvae_dist.files import write_text_atomic

    _show(["analyze", str(scores), "--in-dist", in_dist, "--out", str(out)]
          + (["--ensemble", *map(str, ensemble)] if ensemble else []))
    # The intervals of `hvae analyze`'s defaults (REPLICATES resamples, seed 0), so that the command shown is what ran.
    result = run_analysis(scores, in_dist, ensemble=ensemble, bootstrap=REPLICATES, bootstrap_seed=0)
    written = report(result, out)
    print(format_text(result))
    if note:
        md = out / "metrics.md"
        write_text_atomic(md, md.read_text() + f"\n**Training: {note}.**\n")
        print(f"\nNOTE: training {note}")
    print(f"\nwrote {len(written)} files to {out}")
