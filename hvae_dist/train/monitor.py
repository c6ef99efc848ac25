"""What a run shows: TensorBoard scalars and image grids, a log file, and a progress bar (rank 0 only).

The monitor writes; it computes nothing. The trainer hands it the stats of the updates (read from the
device on logging steps) and the `Evaluation` that `train.evaluate.evaluate` returned."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from hvae_dist.config import Config
from hvae_dist.train.evaluate import Evaluation

log = logging.getLogger("hvae_dist.train")


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever sys.stderr is when it logs (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """Log to stderr and DIR/train.log (rank 0); other ranks log warnings only.

    Called again in the same process (a second run, tests), it swaps its train.log handler for the new
    run dir's instead of logging into the first run's file.
    """
    root = logging.getLogger("hvae_dist")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    if not root.handlers:
        stream = _StderrHandler()
        stream.setFormatter(fmt)
        root.addHandler(stream)
    for old in [h for h in root.handlers if getattr(h, "_hvae_run_log", False)]:
        root.removeHandler(old)
        old.close()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        fh._hvae_run_log = True
        root.addHandler(fh)


class Monitor:
    """Rank 0 writes TensorBoard (run_dir/tb), the log lines and the progress bar; other ranks do nothing.

    The trainer passes what each call needs (step, stats, an evaluation); the monitor never sees the
    trainer or the model.
    """

    def __init__(self, run_dir: Path, is_main: bool, log_every: int, device: torch.device,
                 progress: bool | None = None):
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.log_every, self.device = log_every, device
        self.writer = None
        self.bar = None
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.cfg: Config | None = None
        self.max_steps, self.first_step, self.t0 = 0, 0, 0.0
        self.hparams_written = False
        self._redirect = contextlib.ExitStack()

    def start(self, step: int, max_steps: int, cfg: Config | None = None) -> None:
        """Open TensorBoard (and the bar on a terminal); with `cfg`, log the resolved config as text at `step`
        and keep it for the HParams entry that the first validation writes."""
        if not self.is_main:
            return
        self.cfg, self.max_steps, self.first_step, self.t0 = cfg, max_steps, step, time.perf_counter()
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events a killed run wrote after its last checkpoint (steps > `step`; those up to
        # `step` were flushed before that checkpoint was saved, see flush()): the resumed run's step
        # sequence then equals an uninterrupted run's. From step 0 it drops a run killed before its first
        # checkpoint.
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=step + 1)
        if cfg is not None:
            self.writer.add_text("config", "```json\n" + cfg.to_json() + "\n```", step)
        if self.progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self.bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
            # Log lines go above the bar (tqdm.write), not into its line.
            self._redirect.enter_context(logging_redirect_tqdm([logging.getLogger("hvae_dist")]))

    def _memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    def advance(self) -> None:
        """One more update done: the progress bar moves (no values: those arrive on logging steps)."""
        if self.bar is not None:
            self.bar.update(1)

    def on_update(self, step: int, stats: dict[str, float]) -> None:
        """The stats of update `step` (read from the device by the trainer on logging steps): TensorBoard
        scalars every log_every steps and on skipped updates, the log line and the bar's values every
        log_every steps."""
        if not self.is_main:
            return
        logging_step = step % self.log_every == 0
        if logging_step or stats["skipped"]:
            for key, value in stats.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.add_scalar("perf/peak_memory_mb", self._memory_mb(), step)
        if logging_step:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{stats['loss']:.1f}", bpd=f"{stats['bpd']:.3f}", refresh=False)
            log.info("step %d loss %.3f elbo %.3f bpd %.4f grad_norm %.2f skipped %d img/s %.0f%s", step, stats["loss"],
                     stats["elbo"], stats["bpd"], stats["grad_norm"], stats["skipped_total"],
                     stats.get("images_per_s_total", float("nan")), self._progress_text(step))

    def _progress_text(self, step: int) -> str:
        """' (step/max_steps, P%, ETA hh:mm:ss)' for the log line (what a SLURM log is read for); the ETA from
        this process's mean step time, capped by train.max_minutes when set."""
        if not self.max_steps:
            return ""
        pct = 100.0 * step / self.max_steps
        done = step - self.first_step
        if done <= 0:
            return f" ({step}/{self.max_steps}, {pct:.0f}%)"
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.max_steps - step)
        minutes = self.cfg.train.max_minutes if self.cfg is not None else None
        if minutes is not None:
            eta = min(eta, max(minutes * 60 - elapsed, 0.0))
        return f" ({step}/{self.max_steps}, {pct:.0f}%, ETA {format_hms(eta)})"

    def evaluation_started(self, step: int, cfg: Config) -> None:
        """Logged, not only sent to TensorBoard: without a terminal (SLURM logs) train.log shows the evaluation."""
        if self.is_main:
            log.info("step %d: evaluating %s (%d examples each, %d importance samples)", step,
                     ", ".join(cfg.data.val_datasets), cfg.train.eval_examples, cfg.train.eval_iw_samples)

    def write_evaluation(self, step: int, evaluation: Evaluation, seconds: float) -> None:
        """The evaluator's scalars and images at `step`, to the log and TensorBoard."""
        if not self.is_main:
            return
        log.info("step %d: validation (%.1f s): %s", step, seconds,
                 "  ".join(f"{key.removeprefix('val/')} {value:.4g}" for key, value in evaluation.scalars.items()))
        for key, value in evaluation.scalars.items():
            self.writer.add_scalar(key, value, step)
        if not self.hparams_written and self.cfg is not None and evaluation.scalars:
            write_hparams(self.writer, self.cfg, list(evaluation.scalars))
            self.hparams_written = True
        for tag, image in evaluation.images.items():
            self.writer.add_image(tag, image, step)
        self.writer.flush()

    def flush(self) -> None:
        """Write queued events to disk (before each checkpoint, so that a resume loses none of its steps)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if not self.is_main:
            return
        self._redirect.close()
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def format_hms(seconds: float) -> str:
    """hh:mm:ss (hours past 99 as they are)."""
    seconds = max(round(seconds), 0)
    h, rest = divmod(seconds, 3600)
    return f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"


def flat_hparams(cfg: Config) -> dict[str, int | float | str | bool]:
    """The resolved config as TensorBoard hparams: "section.field" -> value; lists and nested values as JSON
    text, None as "none" (HParams takes numbers, strings and booleans only)."""
    flat = {}
    for section, fields in cfg.to_dict().items():
        for key, value in fields.items():
            if value is None:
                value = "none"
            elif not isinstance(value, (int, float, str, bool)):
                value = json.dumps(value, separators=(",", ":"))
            flat[f"{section}.{key}"] = value
    return flat


def write_hparams(writer, cfg: Config, metric_tags: list[str]) -> None:
    """The HParams entry of this run, in its own event file (not a sub-run as SummaryWriter.add_hparams
    makes): the flattened config, and `metric_tags`, the validation scalars that the HParams view reads
    (their latest values) from this run's scalars."""
    from torch.utils.tensorboard.summary import hparams

    experiment, session_start, session_end = hparams(flat_hparams(cfg), dict.fromkeys(metric_tags, 0.0))
    for summary in (experiment, session_start, session_end):
        writer.file_writer.add_summary(summary)
