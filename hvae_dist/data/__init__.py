"""Dataset registry and pixel transforms.

``load_arrays`` / ``get_dataset`` give uint8 images (N, C, H, W) for the names in ``DATASET_NAMES`` and the
splits train / validation / test (defined in ``registry.py``); ``preprocess_batch`` turns a uint8 batch into
model input; ``perturb`` is the background-model noise of Ren et al. (2019).
"""

from hvae_dist.data.registry import (
    DATASET_NAMES,
    SPLITS,
    ArrayDataset,
    RootHint,
    canonical_name,
    check_image_shape,
    dataset_shape,
    get_dataset,
    group_name,
    load_arrays,
    parse_dataset_spec,
)
from hvae_dist.data.transforms import perturb, preprocess_batch

__all__ = [
    "DATASET_NAMES",
    "SPLITS",
    "ArrayDataset",
    "RootHint",
    "canonical_name",
    "check_image_shape",
    "dataset_shape",
    "get_dataset",
    "group_name",
    "load_arrays",
    "parse_dataset_spec",
    "perturb",
    "preprocess_batch",
]
