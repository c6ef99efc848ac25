"""Dataset variants named inside the dataset name, and synthetic OOD sets.

Syntax: ``BASE[-VARIANT]...:SPLIT``, variants applied left to right, usable wherever a dataset is named
(`data.dataset`, `data.val_datasets`, `hvae score --datasets`, `hvae analyze --in-dist`):

    inverted       255 - x                                       MNIST-inverted:test
    HxW            resize to H x W, bilinear (PIL); H, W 1..1024 Omniglot-28x28:test
    HxWnearest     resize to H x W, nearest neighbour            SmallNORB-28x28nearest:test
    rgb            grey -> 3 channels (the grey value repeated)  MNIST-32x32-rgb:test (for a CIFAR model)

Synthetic sets (BASE), 1 x 28 x 28, deterministic from (name, split) alone (no RNG state), 10,000 test /
1,000 validation / 10,000 train images, labels -1:

    UniformNoise     every pixel uniform in 0..255
    BernoulliNoise   every pixel 0 or 255 with probability 1/2
    Constant         every image one value, uniform in 0..255

so e.g. ``UniformNoise-32x32-rgb:test`` scores against a CIFAR10 model.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from hvae_dist.errors import ConfigError

SYNTHETIC_NAMES = ("UniformNoise", "BernoulliNoise", "Constant")
SYNTHETIC_SIZES = {"train": 10_000, "validation": 1_000, "test": 10_000}
_RESIZE = re.compile(r"^(\d+)x(\d+)(nearest)?$")
MAX_SIDE = 1024
"""The largest height / width of a resize variant (the paper's images are 28 and 32 pixels wide)."""
VARIANT_HELP = f"inverted, HxW (bilinear resize, H and W in 1..{MAX_SIDE}), HxWnearest, rgb"


def canonical_variant(token: str) -> str:
    """The canonical spelling of one variant token (lower case); ConfigError naming it when unknown, and
    saying which sizes a resize takes when its size is out of range."""
    t = token.strip().lower()
    m = _RESIZE.match(t)
    if m:
        if not (1 <= int(m.group(1)) <= MAX_SIDE and 1 <= int(m.group(2)) <= MAX_SIDE):
            raise ConfigError(f"dataset variant {token!r}: a resize takes a height and a width in 1..{MAX_SIDE} "
                              "(e.g. MNIST-32x32, SmallNORB-28x28nearest)")
        return t
    if t in ("inverted", "rgb"):
        return t
    raise ConfigError(f"unknown dataset variant {token!r}; variants: {VARIANT_HELP} (e.g. MNIST-inverted, "
                      "Omniglot-28x28)")


def variant_shape(shape: tuple[int, ...], token: str) -> tuple[int, int, int]:
    """(C, H, W) of an image of `shape` after variant `token`, computed without touching any pixel."""
    c, h, w = (int(s) for s in shape)
    if token == "rgb":
        return (3, h, w) if c == 1 else (c, h, w)   # apply_variant refuses c != 1 with its own message
    m = _RESIZE.match(token)
    return (c, int(m.group(1)), int(m.group(2))) if m else (c, h, w)


def split_name(name: str) -> tuple[str, list[str]]:
    """'MNIST-inverted-32x32' -> ('MNIST', ['inverted', '32x32']) (tokens canonical, the base as given)."""
    base, *tokens = str(name).strip().split("-")
    return base, [canonical_variant(t) for t in tokens]


def _resize(images: np.ndarray, h: int, w: int, nearest: bool) -> np.ndarray:
    n, c, h0, w0 = images.shape
    if (h, w) == (h0, w0):
        return images
    if nearest:   # the source pixel whose centre is nearest to each target pixel's centre
        rows = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(np.int64), h0 - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(np.int64), w0 - 1)
        return np.ascontiguousarray(images[:, :, rows][:, :, :, cols])
    from PIL import Image

    out = np.empty((n, c, h, w), dtype=np.uint8)
    for i in range(n):
        for j in range(c):
            out[i, j] = np.asarray(Image.fromarray(images[i, j]).resize((w, h), Image.BILINEAR))
    return out


def apply_variant(images: np.ndarray, token: str) -> np.ndarray:
    """One variant applied to uint8 images (N, C, H, W); returns a new uint8 array."""
    if token == "inverted":
        return 255 - images
    if token == "rgb":
        if images.shape[1] != 1:
            raise ConfigError(f"dataset variant 'rgb' needs grey images (1 channel), got {images.shape[1]} channels")
        return np.repeat(images, 3, axis=1)
    m = _RESIZE.match(token)
    return _resize(images, int(m.group(1)), int(m.group(2)), bool(m.group(3)))


def synthetic(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic set's images uint8 (N, 1, 28, 28) and labels (-1), from a seed hashed from name and split."""
    seed = int.from_bytes(hashlib.sha256(f"{name}/{split}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    n = SYNTHETIC_SIZES[split]
    if name == "UniformNoise":
        images = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    elif name == "BernoulliNoise":
        images = (rng.random((n, 1, 28, 28)) < 0.5).astype(np.uint8) * 255
    else:
        images = np.broadcast_to(rng.integers(0, 256, (n, 1, 1, 1), dtype=np.uint8), (n, 1, 28, 28)).copy()
    return images, np.full(n, -1, dtype=np.int64)
