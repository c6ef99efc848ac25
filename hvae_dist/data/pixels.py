"""Pixels of the user's files as the package's uint8 (C, H, W) images: array layouts, value checks, image modes
(the rules are listed in `file_datasets.py`)."""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from hvae_dist.errors import DataError

GREY_MODES = ("1", "L", "LA")
COLOUR_MODES = ("RGB", "RGBA", "P", "CMYK", "YCbCr")


def array_layout(shape: Sequence[int], where: str) -> str:
    """'NHW', 'NHWC' or 'NCHW' of an image array's shape; DataError when it is ambiguous or no image stack."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        first, last = shape[1] in (1, 3), shape[3] in (1, 3)
        if last and not first:
            return "NHWC"
        if first and not last:
            return "NCHW"
        if first and last:
            raise DataError(f"{where}: shape {shape} is ambiguous, (N, H, W, C) or (N, C, H, W)? Store it as (N, H, W, C) "
                            "with H and W not in {1, 3} or as (N, H, W) for grey images")
    raise DataError(f"{where}: shape {shape} is not a stack of images; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
                    "with C = 1 or 3")


def to_uint8(block: np.ndarray, where: str, rows: np.ndarray) -> np.ndarray:
    """A block of rows as uint8, values checked: integers 0..255, floats finite in [0, 1] (-> round(255 x)).
    DataError naming `where` and the file row (`rows[i]` of block row i) of the first bad value."""
    if block.dtype == np.uint8:
        return block
    if block.dtype == np.bool_ or not (np.issubdtype(block.dtype, np.integer) or np.issubdtype(block.dtype, np.floating)):
        raise DataError(f"{where}: dtype {block.dtype}; expected uint8 0..255 or float in [0, 1]")
    flat = block.reshape(len(block), -1)
    if np.issubdtype(block.dtype, np.integer):
        bad = ((flat < 0) | (flat > 255)).any(1)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            v = flat[r][(flat[r] < 0) | (flat[r] > 255)][0]
            raise DataError(f"{where}: row {int(rows[r])} holds {v}; integer pixels must be in 0..255")
        return block.astype(np.uint8)
    nan = ~np.isfinite(flat).all(1)
    bad = nan | ((flat < 0) | (flat > 1)).any(1)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        what = "a NaN or infinite value" if nan[r] else f"{flat[r][(flat[r] < 0) | (flat[r] > 1)][0]}"
        raise DataError(f"{where}: row {int(rows[r])} holds {what}; float pixels must be finite and in [0, 1] "
                        "(uint8 arrays hold 0..255)")
    return np.rint(block.astype(np.float64) * 255.0).astype(np.uint8)


def image_mode_channels(mode: str, where: str) -> int:
    if mode in GREY_MODES:
        return 1
    if mode in COLOUR_MODES:
        return 3
    raise DataError(f"{where}: image mode {mode!r}; expected 8-bit grey (L) or colour (RGB) images")


def decode_image(data, where: str, channels: int) -> np.ndarray:
    """An image file (path or bytes) as uint8 (C, H, W) with C = `channels` (1: grey, 3: RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            image_mode_channels(im.mode, where)
            a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{where}: cannot be decoded as an image ({e}); fix or remove it") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def chw_of(shape: Sequence[int], layout: str) -> tuple[int, int, int]:
    """(C, H, W) of one image of an array of `shape` (N first) in `layout` ('NHW', 'NHWC', 'NCHW')."""
    rest = [int(d) for d in shape[1:]]
    if layout == "NHW":
        return (1, rest[0], rest[1])
    if layout == "NHWC":
        return (rest[2], rest[0], rest[1])
    return (rest[0], rest[1], rest[2])
