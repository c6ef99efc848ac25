"""The package's one hash: counter-based random numbers that depend only on *what* they are for.

A value is a pure function of a tuple of integer counters (a seed, a stream, a step or dataset key, a
row, an element), never of how the work was batched, chunked, sharded or spread over ranks, and it is
computed on whatever device the counters live on. Training (`train.engine`: seed, step, global row of
the batch) and scoring (`estimators.noise`: seed, dataset, example, sample) both draw through it.

The hash is splitmix64 (Steele, Lea & Flood 2014) on int64 torch tensors, fully vectorised:

    key      = absorb(... absorb(mix(c0), c1) ..., ck)     (a Python int: `key_of(c0, .., ck)`)
    key_r    = absorb(key, r)                              (per row r: `row_keys`)
    bits_j   = mix(key_r + GAMMA * (j + 1))                (the splitmix64 stream of key_r, element j)

with absorb(h, v) = mix(h + GAMMA * (v + 1)) and mix the splitmix64 finaliser (a bijection of 64-bit
words). One 64-bit word gives one number: a uniform from its high 32 bits, or a standard normal by
Box-Muller from (hi + 0.5) / 2^32 and lo / 2^32 (|z| <= 6.7), computed in float64. torch's int64
arithmetic wraps modulo 2^64 and `>>` is arithmetic, so logical shifts are masked.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15       # splitmix64 increment (odd: h -> h + GAMMA*(v+1) is injective in v)
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_TWO32 = float(2 ** 32)


def _signed(v: int) -> int:
    """A 64-bit word as the int64 torch stores."""
    v &= _MASK64
    return v - (1 << 64) if v >= (1 << 63) else v


def mix64_int(z: int) -> int:
    """splitmix64 finaliser on a Python int (reference for the tensor version)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def absorb_int(h: int, v: int) -> int:
    return mix64_int(h + GAMMA * (int(v) + 1))


def _shr(z: Tensor, r: int) -> Tensor:
    """Logical right shift of int64 words."""
    return (z >> r) & ((1 << (64 - r)) - 1)


def mix64(z: Tensor) -> Tensor:
    """splitmix64 finaliser on an int64 tensor (wrapping arithmetic), elementwise."""
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    return z ^ _shr(z, 31)


def absorb(h: Tensor, v: Tensor) -> Tensor:
    """Hash a counter v into keys h (broadcasting int64 tensors)."""
    return mix64(h + v.to(torch.int64) * _signed(GAMMA) + _signed(GAMMA))


def key_of(*counters: int) -> int:
    """The 64-bit key (as a Python int) of a tuple of integer counters, e.g. (seed, stream, step)."""
    h = mix64_int(int(counters[0]))
    for c in counters[1:]:
        h = absorb_int(h, c)
    return h


def row_keys(key: int, rows: Tensor) -> Tensor:
    """(R,) int64 keys of rows `rows` (R,) under `key` (from `key_of`), on the device of `rows`."""
    idx = rows.to(torch.int64)
    return absorb(torch.full_like(idx, _signed(key)), idx)


def _words(keys: Tensor, offset: int, count: int) -> Tensor:
    """(..., count) splitmix64 words j = offset .. offset+count-1 of each key (...)."""
    j = torch.arange(offset + 1, offset + count + 1, dtype=torch.int64, device=keys.device)
    return mix64(keys.unsqueeze(-1) + j * _signed(GAMMA))


def _hi_lo(w: Tensor) -> tuple[Tensor, Tensor]:
    return _shr(w, 32).double(), (w & 0xFFFFFFFF).double()


def uniform(keys: Tensor, shape: Sequence[int]) -> Tensor:
    """(B, *shape) float32 U[0, 1) noise (24-bit resolution, never 1.0) for example keys (B,)."""
    n = math.prod(shape)
    hi, _ = _hi_lo(_words(keys, 0, n))                       # B, n
    u = (torch.floor(hi / 256.0) / 2.0 ** 24).float()        # exact in float32: k / 2^24 < 1
    return u.view(keys.shape[0], *shape)


def normal(keys: Tensor, sample_start: int, num_samples: int,
                 layer_shapes: Sequence[Sequence[int]], layers: Sequence[int] | None = None) -> list[Tensor | None]:
    """Standard-normal posterior noise of samples s = sample_start .. +num_samples for example keys (B,).

    Returns one tensor per layer, (B * num_samples, *layer_shapes[i]) float32 with row b * num_samples + s
    for sample s of example b (the row order of `Precomputed.repeat`); None for layers not in `layers`
    (default: all). Element offsets are global over all layers, so a layer's noise never depends on
    which other layers are requested.
    """
    batch = keys.shape[0]
    s = torch.arange(sample_start, sample_start + num_samples, dtype=torch.int64, device=keys.device)
    keys_s = absorb(keys.unsqueeze(1), s.unsqueeze(0))      # B, S
    wanted = set(range(len(layer_shapes)) if layers is None else layers)
    out: list[Tensor | None] = []
    offset = 0
    for i, shape in enumerate(layer_shapes):
        n = math.prod(shape)
        if i in wanted:
            hi, lo = _hi_lo(_words(keys_s, offset, n))       # B, S, n
            u1 = (hi + 0.5) / _TWO32
            u2 = lo / _TWO32
            z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
            out.append(z.float().view(batch * num_samples, *shape))
        else:
            out.append(None)
        offset += n
    return out


__all__ = ["GAMMA", "absorb", "absorb_int", "key_of", "mix64", "mix64_int", "normal", "row_keys", "uniform"]
