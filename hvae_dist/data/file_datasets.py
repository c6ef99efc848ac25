"""File datasets: the user's own images, from a file or a folder, read lazily (a spec's syntax: `specs.py`).

Formats (by what the path is):

    x.npy                  np.load(mmap_mode="r"): memory-mapped, rows read when a batch needs them
    x.npz[#KEY]            the only array of ndim 3 or 4, or KEY (a missing key lists the keys); read whole
                           (a zip member cannot be memory-mapped: use .npy for large sets)
    x.h5 | x.hdf5#/PATH    the HDF5 dataset PATH (h5py, rows read per batch); #PATH is needed when the file
                           holds more than one dataset of ndim 3 or 4
    FOLDER/                every image below it (.png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm), found
                           recursively, sorted by relative path, decoded per batch (Pillow); other files are
                           ignored; the class of an image is its first-level subfolder (sorted, numbered from 0,
                           as torchvision's ImageFolder), -1 for images directly in FOLDER
    FOLDER (HF) | x.parquet  a Hugging Face `save_to_disk` folder (#SPLIT picks a DatasetDict's split) or parquet
                           file(s), with the optional extra `hf` (`pip install hvae-dist[hf]`): the column of
                           `Image` feature (or named image / img), labels from a column label / labels

Arrays: shapes (N, H, W) (grey), (N, H, W, C) or (N, C, H, W) with C in {1, 3}; a shape that reads both ways
((N, 3, 3, 3), (N, 1, H, 1), ...) or neither is refused. Values: uint8 (or any integer type) 0..255, or float
in [0, 1] (stored as round(255 x)); NaN, values out of range and integers above 255 are refused naming the
file and the row. Labels of an array: a 1-d integer array named `labels` (npz) or dataset `labels` beside the
images (HDF5) of length N, else -1. Images: modes 1 / L / LA are grey (1 channel), RGB / RGBA / P / CMYK /
YCbCr colour (3; alpha dropped, palettes expanded), 16-bit and float images are refused. Every image of a
folder must have the shape of the first (in sorted order): the first odd one is named.

Bad data is an error before anything is written (`DataError`: one line naming the file, the row, and what was
expected): a folder scan opens every image (header and, for PNG, the chunk checksums: `Image.verify`), so an
unreadable, truncated or odd-sized image stops the job at once; arrays are checked on the rows the job
scores (`FileDataset.check`). An image that passes the scan but fails to decode later also stops the job
with its name; rows scored before stay complete in the shard file and a re-run resumes.

Memory: arrays are memory-mapped (npy, HDF5) and folders decoded per batch, so a job holds one batch of
pixels plus the list of file names (about 60 bytes per image), whatever the dataset's size.
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from hvae_dist.data import variants
from hvae_dist.data.pixels import array_layout, chw_of, decode_image, image_mode_channels, to_uint8
from hvae_dist.data.specs import DatasetSpec
from hvae_dist.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CHECK_BLOCK = 4096
"""Rows of an array converted and checked at a time."""
DECODE_THREADS = 4
"""Threads that decode one batch of a folder (Pillow releases the GIL while it inflates)."""


# ------------------------------------------------------------------------------------------- arrays
class _ArrayRows:
    """Rows of an array-like (np.memmap, h5py.Dataset, ndarray) as uint8 (B, C, H, W)."""

    def __init__(self, array, where: str, reopen=None):
        self.array, self.where, self.reopen = array, where, reopen
        self.layout = array_layout(array.shape, where)
        self.n = int(array.shape[0])
        self.chw = chw_of(array.shape, self.layout)

    def __len__(self) -> int:
        return self.n

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) of file rows `idx` (any order), values checked (`to_uint8`)."""
        idx = np.asarray(idx, dtype=np.int64)
        if not len(idx):
            return np.zeros((0, *self.chw), np.uint8)
        if np.all(idx[1:] > idx[:-1]) and idx[-1] - idx[0] + 1 == len(idx):
            block = np.array(self.array[int(idx[0]):int(idx[-1]) + 1])   # a copy: a memmap's rows are read-only
        else:                                         # h5py reads increasing, distinct indices only
            uniq, inverse = np.unique(idx, return_inverse=True)
            block = np.asarray(self.array[uniq])[inverse]
        block = to_uint8(block, self.where, idx)
        if self.layout == "NHW":
            return block[:, None]
        if self.layout == "NHWC":
            return np.ascontiguousarray(block.transpose(0, 3, 1, 2))
        return np.ascontiguousarray(block)


def _open_npz(path: str, key: str | None):
    npz = np.load(path, allow_pickle=False)
    keys = list(npz.files)
    if key is not None:
        if key not in keys:
            raise DataError(f"{path}: no array {key!r}; the file holds: {', '.join(keys) or 'nothing'}")
        chosen = key
    else:
        stacks = [k for k in keys if npz[k].ndim in (3, 4)]
        if len(stacks) != 1:
            raise DataError(f"{path}: holds {len(stacks)} image arrays ({', '.join(keys) or 'no arrays'}); "
                            f"name one as {path}#KEY")
        chosen = stacks[0]
    images = npz[chosen]
    labels = npz["labels"] if "labels" in keys and chosen != "labels" else None
    return images, labels, f"{path}#{chosen}"


def _open_h5(path: str, key: str | None):
    import h5py

    f = h5py.File(path, "r")
    if key is None:
        found: list[str] = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim in (3, 4) else None)
        if len(found) != 1:
            raise DataError(f"{path}: holds {len(found)} image datasets ({', '.join(found) or 'none'}); "
                            f"name one as {path}#/PATH")
        key = found[0]
    if key not in f or not isinstance(f[key], h5py.Dataset):
        have: list[str] = []
        f.visititems(lambda name, obj: have.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
        raise DataError(f"{path}: no dataset {key!r}; the file holds: {', '.join(have) or 'nothing'}")
    images = f[key]
    parent = images.parent
    labels = parent["labels"][()] if "labels" in parent and images.name != parent["labels"].name else None
    return images, labels, f"{path}#{images.name}"


def _labels(labels, n: int, where: str) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, np.int64)
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: 'labels' is {labels.dtype} {labels.shape}; expected {n} integers (or no 'labels')")
    return labels.astype(np.int64)


# ------------------------------------------------------------------------------------------ folders
def scan_folder(folder: str) -> tuple[list[str], np.ndarray, list[str], tuple[int, int, int], str]:
    """(sorted relative paths, labels, classes, (C, H, W), sha256) of the images below `folder`: every image's
    header read and verified, its bytes hashed (with its relative path) into the folder's content hash.
    DataError on an empty folder, a folder without images, an unreadable image or one of another shape."""
    from PIL import Image, UnidentifiedImageError

    paths = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        paths += [os.path.relpath(os.path.join(dirpath, f), folder) for f in filenames]
    if not paths:
        raise DataError(f"{folder}: the folder is empty; expected image files (e.g. {folder}/CLASS/x.png)")
    images = sorted(p.replace(os.sep, "/") for p in paths if p.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise DataError(f"{folder}: holds {len(paths)} file(s) but no images ({' '.join(IMAGE_SUFFIXES)})")
    classes = sorted({p.split("/")[0] for p in images if "/" in p})
    number = {c: i for i, c in enumerate(classes)}
    labels = np.array([number[p.split("/")[0]] if "/" in p else -1 for p in images], np.int64)
    h = hashlib.sha256()
    shape = None
    for rel in images:
        where = os.path.join(folder, rel)
        with open(where, "rb") as f:
            data = f.read()
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        try:
            with Image.open(io.BytesIO(data)) as im:
                this = (image_mode_channels(im.mode, where), im.size[1], im.size[0])
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DataError(f"{where}: cannot be read as an image ({e}); fix or remove it (images are never skipped)") from None
        if shape is None:
            shape = this
        elif this != shape:
            raise DataError(f"{where}: image of shape {this} (C, H, W), but {os.path.join(folder, images[0])} and the "
                            f"images before it are {shape}; every image of a folder must have one shape")
    return images, labels, classes, shape, h.hexdigest()


class _FolderRows:
    def __init__(self, folder: str, paths: list[str], chw: tuple[int, int, int]):
        self.folder, self.chw, self.n = folder, chw, len(paths)
        self.paths = np.array([p.encode() for p in paths], dtype=f"S{max(1, max(len(p.encode()) for p in paths))}")

    def __len__(self) -> int:
        return self.n

    def rows(self, idx: np.ndarray) -> np.ndarray:
        files = [os.path.join(self.folder, self.paths[i].decode()) for i in np.asarray(idx, dtype=np.int64)]
        decode = (lambda p: decode_image(p, p, self.chw[0]))   # noqa: E731
        if len(files) >= 8:
            with ThreadPoolExecutor(DECODE_THREADS) as pool:
                arrays = list(pool.map(decode, files))
        else:
            arrays = [decode(p) for p in files]
        for p, a in zip(files, arrays):
            if a.shape != self.chw:
                raise DataError(f"{p}: image of shape {a.shape}, expected {self.chw} (it changed since the scan)")
        return np.stack(arrays) if arrays else np.zeros((0, *self.chw), np.uint8)


# --------------------------------------------------------------------------------------- the dataset
def file_sha256(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class LazyImages:
    """`images` of a FileDataset: `images[idx]` (an int array, a slice or an int) reads and converts only those
    rows, uint8 (B, C, H, W) after the variants; `np.asarray(images)` reads all of them."""

    def __init__(self, ds: FileDataset):
        self.ds = ds

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.ds), *self.ds.shape)

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(len(self.ds))[idx]
        elif np.ndim(idx) == 0:
            return self[np.array([int(idx)])][0]
        return self.ds.read(np.asarray(idx, dtype=np.int64))

    def __array__(self, dtype=None, copy=None):
        a = self[np.arange(len(self.ds))]
        return a if dtype is None else a.astype(dtype)


class FileDataset(torch.utils.data.Dataset):
    """The rows of one split of a file dataset. Item i is ``(x, i)`` like `registry.ArrayDataset`: x uint8 (C, H, W).

    `labels` int64 (N,) (-1 unknown); `paths` the folder-relative path of each row (fixed-length bytes) or None;
    `source` the full path (with #KEY); `source_sha256` the content hash (the file's bytes; for a folder, of
    every image's relative path and bytes); `offset` the file row of index 0 (the 90/10 split)."""

    def __init__(self, spec: DatasetSpec):
        path, key = spec.path, spec.key
        self.spec, self.name, self.split = spec, spec.name, spec.split
        self.classes: list[str] = []
        paths = None
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or folder (dataset spec {spec.text!r})")
        if os.path.isdir(path) and not _is_hf_folder(path):
            rel, labels, self.classes, chw, self.source_sha256 = scan_folder(path)
            rows = _FolderRows(path, rel, chw)
            paths, self.source = rows.paths, path
        elif os.path.isdir(path) or path.endswith(".parquet"):
            from hvae_dist.data.hf_datasets import open_hf

            rows, labels, self.classes, self.source, self.source_sha256 = open_hf(path, key)
        else:
            suffix = os.path.splitext(path)[1].lower()
            if suffix == ".npy":
                if key:
                    raise DataError(f"{path}: a .npy file holds one array; drop #{key}")
                try:
                    arr = np.load(path, mmap_mode="r", allow_pickle=False)
                except (ValueError, OSError) as e:
                    raise DataError(f"{path}: cannot be read as a .npy array ({e})") from None
                rows, labels, self.source = _ArrayRows(arr, path), None, path
            elif suffix == ".npz":
                images, labels, self.source = _open_npz(path, key)
                rows = _ArrayRows(images, self.source)
            elif suffix in (".h5", ".hdf5"):
                images, labels, self.source = _open_h5(path, key)
                rows = _ArrayRows(images, self.source)
            else:
                raise DataError(f"{path}: unknown kind of file; expected .npy, .npz, .h5 / .hdf5, .parquet or a folder "
                                "of images")
            self.source_sha256 = file_sha256(path)
            labels = _labels(labels, len(rows), self.source)
        self._rows = rows
        n = len(rows)
        cut = n - n // 10
        self.offset, stop = {"all": (0, n), "train": (0, cut), "validation": (cut, n)}[spec.split]
        self.length = stop - self.offset
        self.labels = np.ascontiguousarray(labels[self.offset:stop], dtype=np.int64)
        self.paths = None if paths is None else paths[self.offset:stop]
        shape = rows.chw
        for token in spec.variants:
            shape = variants.variant_shape(shape, token)
        if "rgb" in spec.variants and rows.chw[0] != 1:
            raise DataError(f"{self.source}: variant 'rgb' needs grey images, but these have {rows.chw[0]} channels")
        self.shape = tuple(int(s) for s in shape)
        self.images = LazyImages(self)

    def __len__(self) -> int:
        return self.length

    def read(self, idx: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) of dataset rows `idx` (0-based in this split), after the variants."""
        if len(idx) and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"rows {idx.min()}..{idx.max()} out of range for {self.name}:{self.split} of length {self.length}")
        images = self._rows.rows(idx + self.offset)
        for token in self.spec.variants:
            images = variants.apply_variant(images, token)
        return np.ascontiguousarray(images, dtype=np.uint8)

    def check(self, idx: np.ndarray | None = None) -> None:
        """Read and convert rows `idx` (default: all) block by block: DataError on the first bad value, before
        the job writes anything. Folders were checked by their scan."""
        if isinstance(self._rows, _ArrayRows):
            idx = np.arange(self.length) if idx is None else np.sort(np.asarray(idx, np.int64))
            for a in range(0, len(idx), CHECK_BLOCK):
                self._rows.rows(idx[a:a + CHECK_BLOCK] + self.offset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i) + (self.length if int(i) < 0 else 0)
        return torch.from_numpy(self.read(np.array([i]))[0]), torch.tensor(i, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"FileDataset({self.source}:{self.split}, n={len(self)}, shape={self.shape})"


def _is_hf_folder(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def open_file_dataset(spec: DatasetSpec) -> FileDataset:
    """The FileDataset of a file spec (`specs.parse_spec`); DataError naming the file on bad data."""
    return FileDataset(spec)
