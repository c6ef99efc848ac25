"""The one place that knows the distributed world: rank / world size / device from torchrun, SLURM or a
single process; process-group set-up, a clean shutdown, and the mean over ranks.

Environment precedence: torchrun's RANK / WORLD_SIZE / LOCAL_RANK; else SLURM's SLURM_PROCID /
SLURM_NTASKS / SLURM_LOCALID (one task per rank under `srun`), with MASTER_ADDR from the first host
of SLURM_JOB_NODELIST and MASTER_PORT derived from the job id; else a single process.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^\[,]+)(\[(\d+))?", nodelist)   # "node[3-5,7]" -> node3 (scontrol absent)
    return (m.group(1) + (m.group(3) or "")) if m else "127.0.0.1"


def detect_world(env: dict | None = None) -> World:
    """Read rank and world size from the environment (does not initialise anything)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    return World()


def export_slurm_rendezvous(env: dict | None = None) -> None:
    """Under srun, set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for torch.distributed's env://."""
    env = os.environ if env is None else env
    world = detect_world(env)
    if world.source != "slurm":
        return
    env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(world.rank), str(world.world_size), str(world.local_rank)


def device_for(world: World) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """The device of a `--device` option: `auto` is this rank's GPU when there is one (`device_for`), else the
    CPU; `cpu`, `cuda` and `cuda:N` as given. ConfigError for a name torch does not know, or a GPU that this
    machine does not have."""
    from hvae_dist.errors import ConfigError

    if name == "auto":
        return device_for(world or detect_world())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; give auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only auto, cpu, cuda and cuda:N are supported")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"--device {name}: CUDA is not available here ({why}); use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} GPU(s), cuda:0 .. cuda:{count - 1}")
    return device


def init_distributed(world: World) -> None:
    """Create the default process group (NCCL on GPU, gloo on CPU) when world_size > 1."""
    if not world.distributed or torch.distributed.is_initialized():
        return
    export_slurm_rendezvous()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device_for(world))
    torch.distributed.init_process_group(backend=backend, rank=world.rank, world_size=world.world_size)


def shutdown(world: World, exit_code: int = 0, exit_process: bool = True) -> None:
    """Leave the world cleanly and end the process.

    2-process gloo runs sometimes abort in interpreter teardown after all work is done ("terminate
    called without an active exception"), which fails torchrun. Barrier, destroy the group, flush,
    then os._exit skips the teardown that races. `exit_process=False` only leaves the world: a host
    process (a submitit SLURM job) still has work to do after training and ends the process itself.
    """
    if world.distributed and torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
        if not exit_process:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)

