"""Dataset registry and pixel transforms.

``load_arrays`` / ``get_dataset`` give uint8 images (N, C, H, W) for the names in ``DATASET_NAMES`` and the
splits train / validation / test (defined in ``registry.py``); ``preprocess_batch`` turns a uint8 batch into
model input; ``open_dataset`` / ``parse_spec`` take any dataset spec, a registry NAME:SPLIT or a path to the
user's own data (`specs.py`, `file_datasets.py`); ``select_rows`` picks the rows a job scores; ``perturb`` is
the background-model noise of Ren et al. (2019).
"""

from hvae_dist.data.registry import (
    DATASET_NAMES,
    SPLITS,
    ArrayDataset,
    LazyVariants,
    RootHint,
    canonical_name,
    check_image_shape,
    dataset_shape,
    get_dataset,
    group_name,
    load_arrays,
    open_dataset,
    parse_dataset_spec,
    parse_spec,
    parse_specs,
)
from hvae_dist.data.selection import select_rows
from hvae_dist.data.specs import DatasetSpec
from hvae_dist.data.transforms import perturb, preprocess_batch

__all__ = [
    "DATASET_NAMES",
    "SPLITS",
    "ArrayDataset",
    "DatasetSpec",
    "LazyVariants",
    "RootHint",
    "canonical_name",
    "check_image_shape",
    "dataset_shape",
    "get_dataset",
    "group_name",
    "load_arrays",
    "open_dataset",
    "parse_dataset_spec",
    "parse_spec",
    "parse_specs",
    "perturb",
    "preprocess_batch",
    "select_rows",
]
