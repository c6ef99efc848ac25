"""Hugging Face datasets as file datasets (the optional extra `hf`: `pip install hvae-dist[hf]`).

A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (#SPLIT picks the split of a
DatasetDict with more than one) or a `.parquet` file. Arrow data is memory-mapped; images are decoded per
batch. The image column is the one of `datasets.Image` feature, else the column named image / img (an
array column of shape (H, W) or (H, W, C) works too); labels come from a column label / labels (int),
else -1. Every image's header is read first, so one of another size is named (by row) before any work.
"""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from hvae_dist.errors import DataError

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")


def _load(path: str, key: str | None):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a Hugging Face dataset needs the optional extra 'hf' (pip install datasets)") from None
    if path.endswith(".parquet"):
        ds = datasets.Dataset.from_parquet(path, keep_in_memory=False)
    else:
        ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if key is None and len(splits) == 1:
            key = splits[0]
        if key not in ds:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}; name one as {path}#SPLIT")
        ds = ds[key]
    elif key is not None:
        raise DataError(f"{path}: a single Dataset has no split {key!r}; drop #{key}")
    return ds, key


def _hash_tree(path: str) -> str:
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for name in files:
        h.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


class _HFRows:
    """Rows of an HF dataset's image column as uint8 (B, C, H, W)."""

    def __init__(self, ds, column: str, is_image: bool, chw: tuple[int, int, int], where: str):
        self.ds, self.column, self.is_image, self.chw, self.where = ds, column, is_image, chw, where

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        from hvae_dist.data.pixels import array_layout, decode_image, to_uint8

        idx = np.asarray(idx, dtype=np.int64)
        values = self.ds[[int(i) for i in idx]][self.column] if len(idx) else []
        out = []
        for i, v in zip(idx, values):
            where = f"{self.where} row {int(i)}"
            if self.is_image:
                a = decode_image(v["bytes"] if v.get("bytes") else v["path"], where, self.chw[0])
            else:
                a = np.asarray(v)
                layout = array_layout((1, *a.shape) if a.ndim >= 2 else a.shape, where)
                a = to_uint8(a[None], self.where, np.array([i]))[0]
                a = a[None] if layout == "NHW" else (a.transpose(2, 0, 1) if layout == "NHWC" else a)
            if a.shape != self.chw:
                raise DataError(f"{where}: image of shape {a.shape}, but row 0 is {self.chw}; every image must have one shape")
            out.append(a)
        return np.stack(out) if out else np.zeros((0, *self.chw), np.uint8)


def open_hf(path: str, key: str | None):
    """(rows, labels, classes, source, sha256) of an HF dataset at `path` (see the module docstring)."""
    import datasets

    ds, key = _load(path, key)
    source = path + (f"#{key}" if key else "")
    feats = ds.features
    col = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    col = col or next((c for c in IMAGE_COLUMNS if c in feats), None)
    if col is None:
        raise DataError(f"{source}: no image column (a datasets.Image feature or a column named image / img); "
                        f"columns: {', '.join(feats)}")
    is_image = isinstance(feats[col], datasets.Image)
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset has no rows")
    if is_image:
        from PIL import Image

        from hvae_dist.data.pixels import image_mode_channels

        ds = ds.cast_column(col, datasets.Image(decode=False))
        chw = None
        for i, v in enumerate(ds[col]):
            where = f"{source} row {i}"
            try:
                with Image.open(io.BytesIO(v["bytes"]) if v.get("bytes") else v["path"]) as im:
                    this = (image_mode_channels(im.mode, where), im.size[1], im.size[0])
            except OSError as e:
                raise DataError(f"{where}: cannot be read as an image ({e})") from None
            if chw is None:
                chw = this
            elif this != chw:
                raise DataError(f"{where}: image of shape {this} (C, H, W), but row 0 is {chw}; every image must have one shape")
    else:
        from hvae_dist.data.pixels import array_layout, chw_of

        first = (1, *np.asarray(ds[0][col]).shape)
        chw = chw_of(first, array_layout(first, source))
    rows = _HFRows(ds, col, is_image, tuple(int(c) for c in chw), source)
    lab = next((c for c in LABEL_COLUMNS if c in feats), None)
    classes: list[str] = []
    if lab is not None:
        labels = np.asarray(ds[lab], dtype=np.int64)
        names = getattr(feats[lab], "names", None)
        classes = list(names) if names else []
    else:
        labels = np.full(len(ds), -1, np.int64)
    return rows, labels, classes, source, _hash_tree(path)
