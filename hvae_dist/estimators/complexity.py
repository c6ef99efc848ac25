"""Input complexity as a lossless compressed length, for the complexity-corrected OOD score.

Serra et al. (ICLR 2020, "Input complexity and out-of-distribution detection with likelihood-based
generative models") correct a model's negative log-likelihood with the length L(x) that a generic
lossless compressor needs for x: S(x) = -log p(x) - L(x). A compressor is itself a (universal)
probability model p_0(x) = exp(-L(x)), so S(x) = log p_0(x) - log p(x) is a log-likelihood ratio:
large when the trained model explains x no better than the compressor does (OOD).

`compressed_size_nats` gives L(x) in nats so that it subtracts directly from -ELBO. The scorer stores
it per example as `complexity_png` / `complexity_zlib` in the score file (see DESIGN.md).
"""
from __future__ import annotations

import io
import math
import zlib

import numpy as np

METHODS = ("png", "zlib")
NATS_PER_BYTE = 8.0 * math.log(2.0)  # 1 byte = 8 bits = 8 ln 2 nats


def _png_bytes(image: np.ndarray) -> int:
    """Length in bytes of one (C, H, W) uint8 image as a maximally compressed PNG file (headers included)."""
    from PIL import Image

    c = image.shape[0]
    if c == 1:
        pil = Image.fromarray(image[0])
    elif c in (3, 4):
        pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))  # RGB or RGBA
    else:  # no PNG colour type for C channels: stack them vertically as one grey image
        pil = Image.fromarray(np.ascontiguousarray(image.reshape(c * image.shape[1], image.shape[2])))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True, compress_level=9)
    return buf.tell()


def compressed_size_nats(x_uint8: np.ndarray, method: str) -> np.ndarray:
    """Lossless compressed size of each image, in nats.

    Args:
        x_uint8: (N, C, H, W) uint8 images (raw 0..255 pixel values, not normalised).
        method: "png" (Pillow, optimize=True, compress_level=9; the whole file, headers included, as in
            Serra et al.) or "zlib" (zlib level 9 on the raw C*H*W bytes; ~11 bytes of stream overhead).

    Returns:
        (N,) float64: bytes * 8 * ln 2.
    """
    if method not in METHODS:
        raise ValueError(f"compression method {method!r} is not one of {', '.join(METHODS)}")
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8:
        raise TypeError(f"compressed_size_nats needs uint8 images (0..255), got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"compressed_size_nats needs (N, C, H, W) images, got shape {x.shape}")
    sizes = np.empty(x.shape[0], dtype=np.float64)  # N
    for i in range(x.shape[0]):
        image = np.ascontiguousarray(x[i])  # C, H, W
        if method == "png":
            n_bytes = _png_bytes(image)
        else:
            n_bytes = len(zlib.compress(image.tobytes(), 9))
        sizes[i] = n_bytes * NATS_PER_BYTE
    return sizes
