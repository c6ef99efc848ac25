"""Loaders of the paper's other datasets from a data root (none ships offline here): each is tested on
small files that the test writes in the real format, and without a root each error says how to get it."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hvae_dist.data import get_dataset, load_arrays
from hvae_dist.data.sources import SMALLNORB_FILES
from hvae_dist.errors import DatasetUnavailableError


def _png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_omniglot_reads_torchvisions_folders_background_as_train_evaluation_as_test(tmp_path):
    rng = np.random.default_rng(0)
    drawn = {}
    for block, alphabets in (("images_background", 2), ("images_evaluation", 1)):
        for a in range(alphabets):
            for c in range(2):
                for k in range(5):
                    img = np.where(rng.random((105, 105)) < 0.1, 0, 255).astype(np.uint8)   # black strokes
                    _png(tmp_path / "omniglot-py" / block / f"Alpha{a}" / f"character{c + 1:02d}" / f"{k}.png", img)
                    drawn.setdefault(block, []).append(img)
    train = get_dataset("Omniglot", "train", root=str(tmp_path))
    val = get_dataset("Omniglot", "validation", root=str(tmp_path))
    test = get_dataset("Omniglot", "test", root=str(tmp_path))
    assert (len(train), len(val), len(test)) == (18, 2, 10) and train.shape == (1, 105, 105)
    assert set(np.unique(test.images)) == {0, 255}
    small = get_dataset("Omniglot-28x28-inverted", "test", root=str(tmp_path))
    assert small.shape == (1, 28, 28) and small.images.dtype == np.uint8
    assert small.images.mean() < 128          # inverted: mostly black background, white strokes (as MNIST)


def test_notmnist_reads_one_folder_per_letter_and_splits_per_class(tmp_path):
    rng = np.random.default_rng(1)
    for letter in "ABCDEFGHIJ":
        for k in range(10):
            _png(tmp_path / "notMNIST_small" / letter / f"img{k:02d}.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    (tmp_path / "notMNIST_small" / "C" / "broken.png").write_bytes(b"not a png")   # the public set has such files
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        x, y = load_arrays("notMNIST", "train", root=str(tmp_path))
    xt, yt = load_arrays("notMNIST", "test", root=str(tmp_path))
    assert x.shape == (80, 1, 28, 28) and xt.shape == (10, 1, 28, 28)
    assert np.array_equal(np.bincount(y), np.full(10, 8)) and np.array_equal(yt, np.arange(10))
    first = np.asarray(Image.open(tmp_path / "notMNIST_small" / "A" / "img00.png"))
    assert np.array_equal(x[0, 0], first)


def _norb_file(path, array: np.ndarray) -> None:
    magic = 0x1E3D4C55 if array.dtype == np.uint8 else 0x1E3D4C54
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = np.asarray([magic, array.ndim, *dims], dtype="<u4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())


def test_smallnorb_reads_the_binary_matrix_files_left_camera(tmp_path):
    rng = np.random.default_rng(2)
    blocks = {}
    for split, n in (("train", 20), ("test", 6)):
        pairs = rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8)
        cats = (np.arange(n) % 5).astype(np.int32)
        _norb_file(tmp_path / f"{SMALLNORB_FILES[split]}-dat.mat", pairs)
        _norb_file(tmp_path / f"{SMALLNORB_FILES[split]}-cat.mat", cats)
        blocks[split] = (pairs, cats)
    x, y = load_arrays("SmallNORB", "train", root=str(tmp_path))
    xv, _ = load_arrays("SmallNORB", "validation", root=str(tmp_path))
    xt, yt = load_arrays("SmallNORB", "test", root=str(tmp_path))
    assert x.shape == (18, 1, 96, 96) and xv.shape == (2, 1, 96, 96) and xt.shape == (6, 1, 96, 96)
    assert np.array_equal(x[:, 0], blocks["train"][0][:18, 0]) and np.array_equal(xt[:, 0], blocks["test"][0][:, 0])
    assert np.array_equal(yt, blocks["test"][1])
    assert get_dataset("SmallNORB-28x28", "test", root=str(tmp_path)).shape == (1, 28, 28)
    (tmp_path / f"{SMALLNORB_FILES['test']}-dat.mat").write_bytes(b"\\x00" * 40)
    load_arrays.__globals__["_load_cached"].cache_clear()
    load_arrays.__globals__["_official_block_cached"].cache_clear()
    with pytest.raises(DatasetUnavailableError, match="not a SmallNORB matrix file"):
        load_arrays("SmallNORB", "test", root=str(tmp_path))


@pytest.mark.parametrize("name, words", [("Omniglot", "download it with torchvision"),
                                         ("notMNIST", "notMNIST_small"), ("SmallNORB", "SmallNORB binary files")])
def test_without_a_root_the_error_says_how_to_get_the_set(name, words):
    with pytest.raises(DatasetUnavailableError, match=words):
        load_arrays(name, "test")


def test_hvae_data_root_is_the_default_root_after_an_explicit_one(tmp_path, monkeypatch):
    """Precedence: --data-root / data.root (the `root` argument), then $HVAE_DATA_ROOT, then the offline copies."""
    from hvae_dist.data.registry import DATA_ROOT_ENV

    rng = np.random.default_rng(3)
    for c in range(2):
        for k in range(5):
            _png(tmp_path / "omniglot-py" / "images_evaluation" / "Alpha0" / f"character{c + 1:02d}" / f"{k}.png",
                 np.where(rng.random((105, 105)) < 0.1, 0, 255).astype(np.uint8))
    with pytest.raises(DatasetUnavailableError):
        load_arrays("Omniglot", "test")                                   # no root, no variable: not offline
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert len(get_dataset("Omniglot", "test")) == 10                     # the variable's root
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "absent"))
    assert len(get_dataset("Omniglot", "test", root=str(tmp_path))) == 10  # an explicit root wins
    with pytest.raises(DatasetUnavailableError, match=r"\$HVAE_DATA_ROOT .*absent.* does not exist"):
        load_arrays("FashionMNIST", "test")                               # a bad variable is an error, no fallback
    monkeypatch.setenv(DATA_ROOT_ENV, "")
    assert load_arrays("FashionMNIST", "test")[0].shape[1:] == (1, 28, 28)   # empty: the offline copies
