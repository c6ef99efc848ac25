"""The DDP backend (`train.backend = "ddp"`): `single.SingleBackend` with the model wrapped in
DistributedDataParallel (gloo on CPU, NCCL on GPU) when the world has more than one rank.

An update is skipped on every rank alike, since DDP all-reduces the gradients before the norm is taken.
Gradient accumulation (`train.accumulation_steps` k): all but the last micro-batch run in `no_sync()`, and
the last one's backward all-reduces the sum once.
"""
from __future__ import annotations

import contextlib

from torch import nn

from hvae_dist.train.backends.single import SingleBackend


class DDPBackend(SingleBackend):
    """SingleBackend over the ranks of the world (with one rank, exactly SingleBackend)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.world.distributed:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Only the last micro-batch's backward all-reduces (the others accumulate locally)."""
        if last or not self.world.distributed:
            return contextlib.nullcontext()
        ddp = getattr(self.forward_module, "_orig_mod", self.forward_module)   # under torch.compile
        return ddp.no_sync()
