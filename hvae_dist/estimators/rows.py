"""The one rows-per-pass policy: how many rows (examples x importance samples) one forward pass of the IW
scorer holds, for `hvae score` and for the training's evaluation alike.

A batch of B examples streams its S samples in chunks of C, so one pass holds B x C rows: memory grows
with B x C, never with S, and the values do not depend on B or C (`hvae_dist.estimators.scorer`). Speed
does: a GPU needs thousands of rows to be busy; a CPU is fastest near the knee measured below.

How the CPU value was measured (benchmarks/rows_per_pass.py, default arguments: the `fashionmnist`
preset, random weights, 128 FashionMNIST test images, ELBO_S + L>1_S with S = 16, fp32, 2 threads on the
shared 2-core machine, 2 interleaved rounds after a warm-up, medians; 2026-12-05):

    rows per pass (batch x chunk)   16x1  16x4  16x16  128x1  128x2  128x4  128x8  128x16
    rows                            16    64    256    128    256    512    1024   2048
    examples/s                      0.30  1.69  2.49   2.20   2.66   3.04   3.12   3.21
    of the fastest                  0.09  0.53  0.78   0.69   0.83   0.95   0.97   1.00
    largest activation (MB)         3     12    49     24     49     98     196    392

The knee is at 512 rows: below it every halving costs 15-45%, above it every doubling gains 3% or less
(within the noise of a shared machine) for twice the memory. The former values contradicted each other
and this measurement: the scorer used 64 rows (issue 11 had found 16 rows 1.6x faster than 1,000-2,000;
here 64 rows is 0.53x of 2,048), the evaluation 1,024. The machine's load rose from 0.5 to about 8 during
the run; the ratios of neighbouring cases, measured in the same rounds, are what to read.
"""
from __future__ import annotations

import torch

ROWS_PER_PASS = {"cpu": 512, "cuda": 4096}
"""Target rows (examples x samples) of one forward pass, by device type (others: the CPU's); see the module
docstring for the CPU measurement. GPU: a few thousand rows keep it busy with the paper's models while the
activations stay at a few GB (4,096 x 64 x 28 x 28 fp32: 0.8 GB per activation of the first stage); not
measured on a GPU here (the evaluation used 8,192 before this policy was shared)."""
BATCH_SIZE = {"cpu": 16, "cuda": 128}
"""Examples per batch by device type (with a CPU's 512 rows, chunks of 32 samples): `hvae score`'s
--batch-size default and the training evaluation's, raised by `default_batch_size` when S is small."""


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def rows_per_pass(device: torch.device | str) -> int:
    """The target rows (examples x samples) of one forward pass on `device` (see ROWS_PER_PASS)."""
    return ROWS_PER_PASS.get(_device_type(device), ROWS_PER_PASS["cpu"])


def default_batch_size(device: torch.device | str, num_samples: int | None = None) -> int:
    """Examples per batch on `device`: BATCH_SIZE, or more when a bound has few samples (`num_samples` S),
    so that one pass of batch x S rows still reaches rows_per_pass(device) (e.g. the training evaluation's
    S = 10)."""
    batch = BATCH_SIZE.get(_device_type(device), BATCH_SIZE["cpu"])
    if num_samples:
        batch = max(batch, -(-rows_per_pass(device) // int(num_samples)))   # ceil
    return batch


def resolve_sample_chunk(sample_chunk: int | str, batch_size: int, device: torch.device | str,
                         num_samples: int | None = None) -> int:
    """Samples per example in one pass: an int as given; "auto": rows_per_pass(device) // batch_size (>= 1).

    Capped at num_samples when given (a chunk never holds more samples than the bound has). The values of
    the scores do not depend on it.
    """
    if sample_chunk == "auto":
        chunk = max(1, rows_per_pass(device) // max(1, int(batch_size)))
    else:
        chunk = int(sample_chunk)
    return min(chunk, int(num_samples)) if num_samples else chunk
