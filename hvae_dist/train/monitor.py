"""What a run shows: TensorBoard scalars and image grids, a log file, and a progress bar (rank 0 only)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from hvae_dist.config import Config
from hvae_dist.model import HierarchicalVAE
from hvae_dist.train.evaluate import evaluate

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

    The trainer passes what each call needs (step, stats, the model to validate); the monitor never
    sees the trainer itself.
    """

    def __init__(self, run_dir: Path, is_main: bool, log_every: int, device: torch.device,
                 progress: bool | None = None):
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.log_every, self.device = log_every, device
        self.writer = None
        self.bar = None
        self.progress = sys.stderr.isatty() if progress is None else progress

    def start(self, step: int, max_steps: int) -> None:
        if not self.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events a killed run wrote after its last checkpoint (steps > `step`; those up to
        # `step` were flushed before that checkpoint was saved, see flush()): the resumed run's step
        # sequence then equals an uninterrupted run's. From step 0 it drops a run killed before its first
        # checkpoint.
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=step + 1)
        if self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def _memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    def on_step(self, step: int, stats: dict) -> None:
        """After update `step`: progress bar, TensorBoard scalars every log_every steps (and on skips), log line."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{stats['loss']:.1f}", bpd=f"{stats['bpd']:.3f}", refresh=False)
        if step % self.log_every == 0 or stats["skipped"]:
            for key, value in stats.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.add_scalar("perf/peak_memory_mb", self._memory_mb(), step)
        if step % self.log_every == 0:
            log.info("step %d loss %.3f elbo %.3f bpd %.4f grad_norm %.2f skipped %d img/s %.0f", step, stats["loss"],
                     stats["elbo"], stats["bpd"], stats["grad_norm"], stats["skipped_total"], stats["images_per_s_total"])

    def evaluate(self, step: int, model: HierarchicalVAE, cfg: Config, batch: torch.Tensor) -> None:
        """Validation scalars of `model` and image grids (prior samples; reconstructions of `batch`, model input)."""
        if not self.is_main:
            return
        t = cfg.train
        # Logged, not only sent to TensorBoard: without a terminal (SLURM logs) train.log shows the evaluation.
        log.info("step %d: evaluating %s (%d examples each, %d importance samples)", step,
                 ", ".join(cfg.data.val_datasets), t.eval_examples, t.eval_iw_samples)
        start = time.perf_counter()
        results = evaluate(model, cfg, self.device)
        log.info("step %d: validation (%.1f s): %s", step, time.perf_counter() - start,
                 "  ".join(f"{key.removeprefix('val/')} {value:.4g}" for key, value in results.items()))
        for key, value in results.items():
            self.writer.add_scalar(key, value, step)
        self.write_images(step, model, cfg.train.seed, batch)
        self.write_layer_grid(step, model, cfg)
        self.writer.flush()

    @torch.no_grad()
    def write_images(self, step: int, model: HierarchicalVAE, seed: int, batch: torch.Tensor) -> None:
        from torchvision.utils import make_grid
        g = torch.Generator(device=self.device).manual_seed(seed)
        samples = model.sample_prior(64, device=self.device, generator=g)
        self.writer.add_image("samples/prior", make_grid(samples.float().cpu(), nrow=8), step)
        x = batch[:32]
        recon = model.reconstruct(x)
        pairs = torch.stack([x.float(), recon.float()], dim=1).flatten(0, 1)
        self.writer.add_image("samples/reconstructions", make_grid(pairs.cpu(), nrow=8), step)

    @torch.no_grad()
    def write_layer_grid(self, step: int, model: HierarchicalVAE, cfg: Config, examples: int = 4) -> None:
        """The `hvae visualize` grid (the L>k decodes and prior samples) of the first examples of every
        validation set, as the TensorBoard image `visualize/reconstructions`."""
        from hvae_dist.data import get_dataset, group_name, parse_dataset_spec
        from hvae_dist.estimators.reconstructions import reconstruction_grid

        images = {}
        for spec in cfg.data.val_datasets:
            name, split = parse_dataset_spec(spec)
            images[group_name(f"{name}:{split}")] = get_dataset(name, split, cfg.data.root, False, examples).images
        grid = reconstruction_grid(model, images, cfg.data.binarize, cfg.train.seed, device=self.device)
        self.writer.add_image("visualize/reconstructions", grid.image, step)

    def flush(self) -> None:
        """Write queued events to disk (before each checkpoint, so that a resume loses none of its steps)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
