"""The training loop: data order, noise, objective, checkpoints, signals. Backend-agnostic.

Reproducibility by construction: the data order of epoch e is a permutation seeded by (seed, e), and
every random number of step t (dynamic binarization, background perturbation, latent noise) is a pure
function of (seed, stream, t, global row of the batch, element) through the package's one hash
(`hvae_dist.rng`). Each rank computes only its own rows, on its device, so the per-rank work does not
grow with the number of ranks, a run gives the same updates whatever the number of ranks (up to float
reduction order), and a resumed run is bitwise identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hvae_dist import rng
from hvae_dist.checkpoint import (
    LATEST,
    atomic_write,
    checkpoint_dir,
    checkpoint_files,
    list_checkpoints,
    load_checkpoint,
    load_newest,
    save_checkpoint,
    set_aside,
    step_of,
)
from hvae_dist.config import Config
from hvae_dist.data import open_dataset, perturb, preprocess_batch
from hvae_dist.distributed import World
from hvae_dist.errors import TrainingDivergedError
from hvae_dist.model import HierarchicalModel, build_model
from hvae_dist.objectives import bits_per_dim, elbo_loss, free_nats_at, kl_warmup_beta, lr_at
from hvae_dist.signals import StoppedBySignal
from hvae_dist.train.backends import Backend, make_backend
from hvae_dist.train.ema import EMA
from hvae_dist.train.evaluate import Evaluation, evaluate
from hvae_dist.train.monitor import Monitor
from hvae_dist.train.preflight import RunPlan, check_resume, check_run

log = logging.getLogger("hvae_dist.train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)   # see hvae_dist.signals: finish the step, save
# Streams of the training noise (the second counter of `rng.key_of(seed, stream, step or epoch)`).
_PERMUTATION, _BINARIZE, _PERTURB, _LATENT = 1, 2, 3, 4


@dataclass
class Counters:
    """Run statistics saved in checkpoints."""
    skipped_total: int = 0
    skipped_in_row: int = 0
    images_seen: int = 0


class UpdateStats(Mapping):
    """The stats of one update: 0-d tensors on the training device (loss, elbo, log_px, bpd, grad_norm,
    skipped, kl/layerI) and host floats (beta, free_nats, lr). Reading a value reads the device (a float);
    the training loop never does that per update, it reads them all at once (`Trainer.read_updates`)."""

    def __init__(self, step: int, on_device: dict[str, torch.Tensor], on_host: dict[str, float]):
        self.step, self.on_device, self.on_host = step, on_device, on_host

    def __getitem__(self, key: str) -> float:
        return float(self.on_device[key]) if key in self.on_device else self.on_host[key]

    def __iter__(self):
        return iter([*self.on_device, *self.on_host])

    def __len__(self) -> int:
        return len(self.on_device) + len(self.on_host)


class Trainer:
    """Owns a run dir: builds data, model and backend, trains, checkpoints, resumes."""

    def __init__(self, cfg: Config, run_dir: str | Path, world: World, device: torch.device,
                 monitor: Monitor | None = None, plan: RunPlan | None = None):
        self.cfg, self.world, self.device = cfg, world, device
        self.run_dir = Path(run_dir)
        t = cfg.train
        self.plan = plan if plan is not None else check_run(cfg, world)   # the run's one validation
        self.local_batch = t.batch_size // world.world_size
        self.train_set = open_dataset(f"{cfg.data.dataset}:train", cfg.data.root, cfg.data.download,
                                      max_examples=cfg.data.max_train_examples)
        self.images = torch.from_numpy(np.array(self.train_set.images))  # writable copy  # N, C, H, W uint8
        if cfg.model.input_shape is None:
            cfg.model = replace(cfg.model, input_shape=list(self.plan.input_shape))
        torch.manual_seed(t.seed)  # parameter init is identical on every rank
        model = build_model(cfg.model)
        self.backend: Backend = make_backend(model, t, world, device, self.plan.deepspeed_config)
        self.model: HierarchicalModel = self.backend.raw_model  # type: ignore[assignment]
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.batches_per_epoch = len(self.train_set) // t.batch_size  # the last partial batch is dropped
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self._counters = Counters()         # as of the last read_updates(); `counters` reads first
        self._pending: list[UpdateStats] = []      # updates whose stats are still on the device
        self.monitor = monitor
        self._stop_requested = False
        self.stop_signal: int | None = None   # the first stop signal this process got
        self._perm: tuple[int, torch.Tensor] | None = None
        # The stop flag's all-reduce runs on the host, away from the device's stream (NCCL would sync it).
        self._host_group = torch.distributed.new_group(backend="gloo") if world.distributed else None
        if t.lr_schedule == "cosine" and t.max_minutes is not None and world.is_main:
            log.warning("train.lr_schedule='cosine' decays over train.max_steps=%d steps; train.max_minutes=%g may stop "
                        "the run before the lr has decayed (a resume continues along the same schedule)",
                        t.max_steps, t.max_minutes)

    # ----- state -----
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        rngs = [rng]
        if self.world.distributed:
            rngs = [None] * self.world.world_size
            torch.distributed.all_gather_object(rngs, rng)
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "model": self.backend.model_state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                **self.backend.state_dict(), "rng": rngs,
                "counters": dataclasses.asdict(self.counters),
                "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_resume(state, self.cfg, self.run_dir)
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.backend.load_state_dict(state)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        c = state["counters"]
        self._pending = []
        self._counters = Counters(c["skipped_total"], c["skipped_in_row"], c["images_seen"])
        rngs = state["rng"]
        rng = rngs[self.world.rank] if self.world.rank < len(rngs) else rngs[0]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def save(self) -> Path | None:
        self._write_updates()   # reads the pending updates: TrainingDivergedError before anything is written
        if self.monitor is not None:
            self.monitor.flush()  # events up to this step are on disk before the checkpoint a resume starts from
        state = self.state_dict()  # collective in DDP: every rank takes part
        path = None
        if self.world.is_main:
            path = save_checkpoint(state, self.run_dir, self.cfg.train.keep_last)
            log.info("saved checkpoint %s", path)
        return path

    def maybe_resume(self, checkpoint: str | Path | None = None, restart: bool = False) -> bool:
        """Load the checkpoint to continue from; False when the run starts at step 0.

        Default: the newest checkpoint of the run dir that loads (`checkpoint.load_newest`), with a warning
        naming it and why each newer file was passed over; when the run dir holds checkpoint files but none
        loads, CheckpointError lists them (a run never silently starts over). `checkpoint`: resume from that
        file. `restart`: start at step 0 and move the run's checkpoints aside. Before training on from step
        S, every file that would mix another history into this one (a numbered file newer than S, latest.pt
        when it is not S's, an unreadable newer file) is moved to checkpoints/superseded-TIME/, so that
        latest.pt and the keep_last pruning only ever see this run's files.
        """
        if restart:
            self._set_aside(checkpoint_files(self.run_dir), "--restart: starting over at step 0")
            return False
        ckdir = checkpoint_dir(self.run_dir)
        if checkpoint is not None:
            path, passed_over = Path(checkpoint), []
            state = load_checkpoint(path, map_location=self.device)
        else:
            found = load_newest(self.run_dir, map_location=self.device)
            if found is None:
                return False
            path, state, passed_over = found.path, found.state, found.passed_over
        self.load_state_dict(state)
        del state
        if passed_over and self.world.is_main:
            log.warning("resuming from %s (step %d), the newest checkpoint that loads; passed over: %s", path, self.step,
                        "; ".join(f"{p.name}: {why}" for p, why in passed_over))
        if self.world.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        if self.step >= self.cfg.train.max_steps:
            return True   # fit() stops at once and writes nothing: nothing needs to move
        own = path.resolve()
        stale = [p for p, _ in passed_over]
        if checkpoint is not None:
            stale += [p for p in list_checkpoints(self.run_dir) if step_of(p) > self.step]
            if (ckdir / LATEST).exists() and (ckdir / LATEST).resolve() != own:
                stale.append(ckdir / LATEST)
        self._set_aside([p for p in stale if p.exists() and p.resolve() != own],
                        f"continuing from step {self.step} of {path}")
        return True

    def _set_aside(self, paths: list[Path], why: str) -> None:
        """Rank 0 moves `paths` to checkpoints/superseded-TIME/ once every rank has read its checkpoint."""
        if self.world.distributed:
            torch.distributed.barrier()
        if self.world.is_main and paths:
            folder = set_aside(paths, self.run_dir)
            log.warning("%s: moved %s to %s (nothing is deleted)", why, ", ".join(p.name for p in paths), folder)

    # ----- data and noise -----
    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            seed = rng.key_of(self.cfg.train.seed, _PERMUTATION, epoch) & 0x7FFFFFFFFFFFFFFF
            self._perm = (epoch, torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(seed)))
        return self._perm[1]

    def rank_rows(self) -> torch.Tensor:
        """(local_batch,) int64: the rows of the global batch (0 .. batch_size-1) that this rank trains on."""
        return torch.arange(self.world.rank * self.local_batch, (self.world.rank + 1) * self.local_batch)

    def next_batch(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(x (R * train_samples, C, H, W) float, noise per latent layer (R * train_samples, *shape)) of the
        current step's global-batch rows `rows` (R,) (default: this rank's, `rank_rows`).

        Only these rows are drawn, on the training device: row r's pixels, binarization, perturbation and
        latent noise are the same whichever rank or batch slice asks for it.
        """
        t, d = self.cfg.train, self.cfg.data
        rows = self.rank_rows() if rows is None else rows
        perm = self._permutation(self.epoch)
        x_u8 = self.images[perm[self.batch_in_epoch * t.batch_size + rows]].to(self.device)   # R, C, H, W
        rows = rows.to(self.device)

        def keys(stream: int) -> torch.Tensor:
            return rng.row_keys(rng.key_of(t.seed, stream, self.step), rows)

        if d.perturb_rate > 0:
            x_u8 = perturb(x_u8, d.perturb_rate, rng.uniform(keys(_PERTURB), x_u8.shape[1:]))
        u = rng.uniform(keys(_BINARIZE), x_u8.shape[1:]) if d.binarize in ("dynamic", "dequantize") else None
        x = preprocess_batch(x_u8, d.binarize, u)
        s = t.train_samples
        noise = rng.normal(keys(_LATENT), 0, s, self.model.latent_shapes)
        if s > 1:
            x = x.repeat_interleave(s, dim=0)
        return x, noise

    def _advance(self) -> None:
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ----- one update -----
    def lr_at(self, step: int) -> float:
        """The learning rate of update `step` (a pure function of the step and train.*)."""
        t = self.cfg.train
        return lr_at(step, t.lr, warmup_steps=t.lr_warmup_steps, schedule=t.lr_schedule, max_steps=t.max_steps,
                     lr_min=t.lr_min)

    def train_step(self) -> UpdateStats:
        """One optimizer update of train.accumulation_steps micro-batches (this rank's rows in order, split
        evenly). Nothing is read back from the device: the skip decision, the EMA and the stats stay there.
        Returns the update's stats (`UpdateStats`: floats on access, which reads the device), and queues
        them for `read_updates`, which the loop calls on logging steps and before checkpoints."""
        t = self.cfg.train
        beta = kl_warmup_beta(self.step, t.kl_warmup_steps)
        fn = free_nats_at(self.step, t.free_nats, t.free_nats_steps, t.free_nats_cooldown_steps)
        self.backend.set_lr(self.lr_at(self.step))
        self.backend.forward_module.train()
        k = t.accumulation_steps
        totals, parts = [], []
        for m, rows in enumerate(self.rank_rows().chunk(k)):
            x, noise = self.next_batch(rows)
            with self.backend.micro_batch(last=m == k - 1):
                with self.backend.autocast():
                    out = self.backend.forward_module(x, noise=noise)
                loss = elbo_loss(out, beta=beta, free_nats=fn)   # the micro-batch's mean
                total = loss.loss
                self.backend.backward(total)
            totals.append(total.detach())
            parts.append((loss.elbo, loss.log_px, loss.kl))   # detached
        grad_norm, skipped = self.backend.step().as_tensors(self.device)
        if self.ema is not None:
            self.ema.update(self.model, skipped=skipped)       # a skipped update leaves the average as it was
        self._counters.images_seen += t.batch_size
        num_dims = math.prod(self.model.input_shape)
        # This rank's update: the micro-batches' mean loss, and per-example means over all of its rows.
        elbo, log_px, kl = (torch.cat(column) for column in zip(*parts))
        on_device = {"loss": torch.stack(totals).mean(), "elbo": elbo.mean(), "log_px": log_px.mean(),
                     "bpd": bits_per_dim(-elbo.mean(), num_dims), "grad_norm": grad_norm, "skipped": skipped}
        on_device |= {f"kl/layer{i + 1}": kl_i for i, kl_i in enumerate(kl.mean(0).unbind())}
        stats = UpdateStats(self.step, on_device, {"beta": beta, "free_nats": fn, "lr": self.backend.lr})
        self._pending.append(stats)
        self._advance()
        return stats

    def read_updates(self) -> list[tuple[int, dict[str, float]]]:
        """Read the stats of every update since the last read from the device, in one transfer, and account
        for them in order: the skip counters, a warning per skipped update, and TrainingDivergedError at the
        first update that made train.max_skipped skips in a row. Returns (step after the update, its stats
        with `skipped_total`) per update, oldest first.

        The loop reads on logging steps (train.log_every), before every checkpoint and at the end, so a
        run that reaches max_skipped stops at the next of these, up to log_every - 1 updates after the
        update the error names; no checkpoint is written after that update.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return []
        t, c = self.cfg.train, self._counters
        values = torch.stack([torch.stack([v.reshape(()).double() for v in u.on_device.values()])
                              for u in pending]).tolist()                  # one host read: updates x stats
        out = []
        for u, row in zip(pending, values):
            stats = dict(zip(u.on_device, row)) | u.on_host
            if stats["skipped"]:
                c.skipped_total += 1
                c.skipped_in_row += 1
                if c.skipped_in_row >= t.max_skipped:
                    self._pending = []
                    raise TrainingDivergedError(
                        f"{c.skipped_in_row} updates in a row were skipped at step {u.step} (grad norm "
                        f"{stats['grad_norm']}); lower train.lr, set train.grad_clip, or raise train.max_skipped")
                log.warning("step %d: skipped update (grad norm %s)", u.step, stats["grad_norm"])
            else:
                c.skipped_in_row = 0
            stats["skipped_total"] = float(c.skipped_total)
            out.append((u.step + 1, stats))
        return out

    def _write_updates(self, images_per_s: float | None = None) -> None:
        """`read_updates`, and hand them to the monitor; `images_per_s` (this interval's) goes with the last."""
        updates = self.read_updates()
        if updates and images_per_s is not None:
            updates[-1][1].update(images_per_s_total=images_per_s,
                                  images_per_s_per_rank=images_per_s / self.world.world_size)
        if self.monitor is not None:
            for step, stats in updates:
                self.monitor.on_update(step, stats)

    @property
    def counters(self) -> Counters:
        """The run's counters up to the last update (reads the updates not yet read, see `read_updates`)."""
        self._write_updates()
        return self._counters

    # ----- signals -----
    def request_stop(self, signum: int | None = None, _frame=None) -> None:
        """Signal handler (SIGTERM / SIGUSR1 / SIGINT): finish the current step, checkpoint, exit cleanly.

        A second Ctrl-C does not wait for the step: it unwinds at once (the last saved checkpoint stays)."""
        if signum == signal.SIGINT and self._stop_requested:
            raise StoppedBySignal(signum, f"a second Ctrl-C: the step in progress was not saved; re-run the same "
                                          f"command to resume {self.run_dir} from its last checkpoint")
        self._stop_requested = True
        if self.stop_signal is None and signum is not None:
            self.stop_signal = int(signum)

    def install_signal_handlers(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.request_stop)

    def stop_requested(self) -> bool:
        """True on every rank as soon as any rank got a stop signal. The flag is a host value: in a distributed
        run it is all-reduced over a gloo group of CPU tensors (`_host_group`), so no rank waits for its device."""
        if not self.world.distributed:
            return self._stop_requested
        flag = torch.tensor([1 if self._stop_requested else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._host_group)
        return bool(flag.item())

    # ----- the loop -----
    def fit(self, max_steps: int | None = None) -> dict:
        """Train until `max_steps` (default train.max_steps), the time budget, or a stop signal.

        Returns {"step", "reason"} with reason in finished | time | signal | already done (the run was at or
        past max_steps: nothing trained, nothing written); when stopped by a signal, also "signal": the number of
        the first stop signal this process got (None when another rank got it). The updates' stats stay on
        the device until a logging step (train.log_every), a checkpoint or the end, where `read_updates` reads
        them all at once and the monitor writes them.
        """
        t = self.cfg.train
        max_steps = max_steps if max_steps is not None else t.max_steps
        if self.step >= max_steps:
            # Saving here would write this step's model as latest.pt again and, below an older run's step, let
            # the keep_last pruning delete newer files: stop with nothing written.
            if self.world.is_main:
                (log.info if self.step == max_steps else log.warning)(
                    "the run is at step %d and max_steps is %d: nothing to train, no checkpoint written "
                    "(give --max-steps above %d to train on)", self.step, max_steps, self.step)
            return {"step": self.step, "reason": "already done"}
        start_time, reason = time.monotonic(), "finished"
        last_t, last_step = time.perf_counter(), self.step
        if self.monitor is not None:
            self.monitor.start(self.step, max_steps, self.cfg)
        while self.step < max_steps:
            self.train_step()
            if self.monitor is not None:
                self.monitor.advance()
            if self.step % t.log_every == 0:
                now = time.perf_counter()
                self._write_updates(images_per_s=(self.step - last_step) * t.batch_size / max(now - last_t, 1e-9))
                last_t, last_step = now, self.step
            if self.monitor is not None and t.eval_every and self.step % t.eval_every == 0:
                self.validate()
            if self.step % t.checkpoint_every == 0 and self.step < max_steps:
                self.save()
            if self.stop_requested():
                reason = "signal"
                break
            if t.max_minutes is not None and (time.monotonic() - start_time) / 60 >= t.max_minutes:
                reason = "time"
                break
        self.save()
        if self.monitor is not None:
            # A final validation unless just done, or stopped by a signal (a preempted job's grace time is short).
            if reason != "signal" and t.eval_every and self.step % t.eval_every != 0:
                self.validate()
            self.monitor.close()
        if reason == "signal":
            return {"step": self.step, "reason": reason, "signal": self.stop_signal}
        return {"step": self.step, "reason": reason}

    def validate(self) -> Evaluation | None:
        """Evaluate the model (the EMA weights when kept) on rank 0 (`train.evaluate.evaluate`) and hand the
        result to the monitor when there is one; returns it (None on the other ranks). The training batch
        of the current step is the input of the reconstruction grid."""
        if not self.world.is_main:
            return None
        model = self.ema.model if self.ema is not None else self.model
        x, _ = self.next_batch()
        if self.monitor is not None:
            self.monitor.evaluation_started(self.step, self.cfg)
        start = time.perf_counter()
        # Under the training precision: DeepSpeed bf16 holds the module's weights in bf16 themselves.
        with self.backend.autocast():
            result = evaluate(model, self.cfg, self.device, x)
        if self.monitor is not None:
            self.monitor.write_evaluation(self.step, result, time.perf_counter() - start)
        return result

    def write_config(self) -> None:
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.cfg.to_dict(), indent=2).encode()
            atomic_write(self.run_dir / "config.json", lambda f: f.write(text), "config")   # files.write_atomic
