"""Dataset variants in the dataset name (inverted, resized, rgb) and the synthetic OOD sets."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hvae_dist.data import get_dataset, load_arrays, parse_dataset_spec
from hvae_dist.data.variants import apply_variant
from hvae_dist.errors import ConfigError


def test_names_with_variants_parse_case_insensitively_to_one_canonical_spelling():
    assert parse_dataset_spec("mnist-INVERTED:Test") == ("MNIST-inverted", "test")
    assert parse_dataset_spec("fashionmnist-32X32-rgb:train") == ("FashionMNIST-32x32-rgb", "train")
    assert parse_dataset_spec("uniformnoise:validation") == ("UniformNoise", "validation")
    for bad, word in (("MNIST-blurred:test", "blurred"), ("MNIST-0x28:test", "0x28"), ("Nope-inverted:test", "Nope")):
        with pytest.raises(ConfigError, match=word):
            parse_dataset_spec(bad)


def test_inversion_is_255_minus_x_pixel_by_pixel():
    base = load_arrays("MNIST", "test")[0][:50]
    inv = get_dataset("MNIST-inverted", "test", max_examples=50).images
    assert inv.dtype == np.uint8 and inv.shape == base.shape
    assert np.array_equal(inv.astype(np.int64), 255 - base.astype(np.int64))


def test_nearest_resize_picks_the_source_pixels_and_bilinear_matches_pil():
    x = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4) * 10
    up = apply_variant(x, "8x8nearest")
    assert up.shape == (1, 1, 8, 8) and np.array_equal(up[0, 0], np.kron(x[0, 0], np.ones((2, 2), np.uint8)))
    down = apply_variant(x, "2x2nearest")
    assert np.array_equal(down[0, 0], x[0, 0][1::2, 1::2])            # the pixel nearest each target centre
    img = load_arrays("FashionMNIST", "test")[0][:3]
    got = get_dataset("FashionMNIST-32x32", "test", max_examples=3).images
    want = np.stack([np.asarray(Image.fromarray(im[0]).resize((32, 32), Image.BILINEAR))[None] for im in img])
    assert got.shape == (3, 1, 32, 32) and np.array_equal(got, want)
    assert np.array_equal(apply_variant(img, "28x28"), img)            # the identity resize changes nothing


def test_rgb_repeats_the_grey_channel_and_refuses_colour_images():
    x = load_arrays("MNIST", "test")[0][:4]
    rgb = apply_variant(x, "rgb")
    assert rgb.shape == (4, 3, 28, 28) and all(np.array_equal(rgb[:, c], x[:, 0]) for c in range(3))
    with pytest.raises(ConfigError, match="rgb"):
        apply_variant(rgb, "rgb")


@pytest.mark.parametrize("name", ["UniformNoise", "BernoulliNoise", "Constant"])
def test_synthetic_sets_are_deterministic_per_split_with_the_documented_values(name):
    a = get_dataset(name, "test")
    assert len(a) == 10_000 and a.shape == (1, 28, 28) and a.images.dtype == np.uint8
    assert (a.labels == -1).all()
    from hvae_dist.data import variants
    again, _ = variants.synthetic(name, "test")                        # recomputed, not the cached copy
    assert np.array_equal(again, a.images)
    assert not np.array_equal(variants.synthetic(name, "validation")[0][:100], a.images[:100])
    v = a.images[:200].astype(np.int64)
    if name == "BernoulliNoise":
        assert set(np.unique(v)) == {0, 255} and 0.45 < (v == 255).mean() < 0.55
    elif name == "Constant":
        assert (v == v[:, :, :1, :1]).all() and len(np.unique(v[:, 0, 0, 0])) > 100
    else:
        assert v.min() == 0 and v.max() == 255 and abs(v.mean() - 127.5) < 2
