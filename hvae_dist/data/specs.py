"""Dataset specs: the one parser of every way a dataset is named (config, `hvae score --datasets`, visualize, ...).

Two kinds:

- a registry set, ``NAME[-VARIANT]...:SPLIT`` (``MNIST-inverted:test``; `registry.py`, `variants.py`);
- a file dataset, a path to the user's own data (`file_datasets.py`):

      [GROUP=]PATH[#KEY][:SPLIT[-VARIANT]...]

  ``PATH`` is a ``.npy`` / ``.npz`` / ``.h5`` / ``.hdf5`` file, a folder of images, a Hugging Face
  ``save_to_disk`` folder or a ``.parquet`` file. ``#KEY`` picks the array of an ``.npz``, the dataset of an
  HDF5 file (``file.h5#/images/test``) or the split of a saved DatasetDict. ``SPLIT`` is ``all`` (the
  default: the whole file, row i = index i), ``train`` (the first N - N // 10 rows) or ``validation`` (the
  last N // 10 rows): the registry's 90/10 rule for sets with one official block. A file is one split, so
  ``test`` is refused (score the file as ``PATH`` or ``PATH:all``). Variants follow the split, as in
  ``pngs/:all-32x32-rgb`` or ``x.npy:validation-inverted``.

A spec is a file spec when its name part contains ``/``, ``.`` or ``~``, or names an existing file or
folder and no registry set. The score file's group of a file dataset is ``GROUP/SPLIT`` with GROUP the
file's (or folder's) base name, ``#KEY`` with ``/`` written ``.``, then the variants: ``pngs/all``,
``data.npz#x-inverted/validation``, ``stack.h5#images.test/all``. It depends on neither the working folder
nor the machine, so the noise of a row (a hash of (seed, group, index), `estimators/noise.py`) is the same
wherever the file lies. ``GROUP=`` names the group yourself (``mine=/data/pngs`` -> ``mine/all``), ``GROUP/SPLIT=`` the whole
group name (``FashionMNIST/test=fm_test.npy``): the rows then get the noise of that registry set, so the
same images in the same order score bitwise alike through the file and through the registry.
The full path is stored in the score file (`source` attribute of the group).
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hvae_dist.data import variants
from hvae_dist.errors import ConfigError

FILE_SPLITS = ("all", "train", "validation")
FILE_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5", ".parquet")
_GROUP_PREFIX = re.compile(r"^([A-Za-z0-9_.#+@~]+)(?:/([A-Za-z0-9_.#+@~]+))?=")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec. `name` is the registry's canonical name with variants (`MNIST-inverted`) or, for
    a file dataset, the group's name part (`pngs-inverted`); `group` is the score file's group name."""

    name: str
    split: str
    path: str | None = None
    """Absolute path of a file dataset (None for a registry set)."""
    key: str | None = None
    """The npz key, HDF5 dataset path or DatasetDict split after '#' (None: the only one)."""
    variants: tuple[str, ...] = ()
    """Variant tokens of a file dataset, applied left to right (a registry set keeps them in `name`)."""
    text: str = ""
    """The spec as given."""
    group_split: str | None = None
    """The split part of the group name when `GROUP=` gave one (`FashionMNIST/test=fm.npy`); None: `split`."""

    @property
    def is_file(self) -> bool:
        return self.path is not None

    @property
    def group(self) -> str:
        return f"{self.name}/{self.group_split or self.split}"

    def __str__(self) -> str:
        return self.text or f"{self.name}:{self.split}"


def looks_like_path(name: str, registry_names: Sequence[str] = ()) -> bool:
    """True when `name` (a spec's part before any ':' and '#') is a path rather than a registry name: it holds
    '/', '.' or '~', or it names an existing file or folder and its base is no registry name."""
    if any(c in name for c in "/.~"):
        return True
    lower = {n.lower() for n in registry_names}
    return bool(name) and name.split("-")[0].lower() not in lower and os.path.exists(name)


def _split_and_variants(tail: str, text: str) -> tuple[str, tuple[str, ...]]:
    split, *tokens = tail.split("-")
    split = split.strip().lower() or "all"
    if split == "test":
        raise ConfigError(f"dataset spec {text!r}: a file is one split, so it has no 'test' split; score the whole "
                          "file as PATH (or PATH:all), or its last 10% as PATH:validation")
    if split not in FILE_SPLITS:
        raise ConfigError(f"dataset spec {text!r}: unknown split {split!r} of a file; allowed: {', '.join(FILE_SPLITS)} "
                          "(all: every row; train / validation: the first 90% / last 10% of the rows)")
    return split, tuple(variants.canonical_variant(t) for t in tokens)


def _cut_path(body: str) -> tuple[str, str]:
    """(path, split tail) of 'PATH[#KEY][:TAIL]': the tail is what follows the last ':' when the part before it
    is a path that exists or the tail reads as a split (paths may hold ':' themselves)."""
    head, sep, tail = body.rpartition(":")
    if sep and head and (os.path.exists(head.split("#")[0]) or tail.split("-")[0].strip().lower() in FILE_SPLITS + ("test", "")):
        return head, tail
    return body, ""


def is_file_spec(text: str, registry_names: Sequence[str] = ()) -> bool:
    """Whether spec `text` names a file dataset (a path, or GROUP=PATH) rather than a registry set."""
    text = text.strip()
    if _GROUP_PREFIX.match(text) and not os.path.exists(text.split("#")[0].rpartition(":")[0] or text):
        return True
    name_part = text.rpartition(":")[0] if ":" in text else text
    return looks_like_path(name_part.split("#")[0] or text, registry_names)


def parse_file_spec(text: str) -> DatasetSpec:
    """The DatasetSpec of a file spec `[GROUP[/SPLIT]=]PATH[#KEY][:SPLIT[-VARIANT]...]` (module docstring);
    ConfigError naming it when malformed."""
    text = text.strip()
    body, group, group_split = text, None, None
    m = _GROUP_PREFIX.match(text)
    if m and not os.path.exists(text.split("#")[0].rpartition(":")[0] or text):
        group, group_split, body = m.group(1), m.group(2), text[m.end():]
    path_text, tail = _cut_path(body)
    path_text, _, key = path_text.partition("#")
    if not path_text:
        raise ConfigError(f"dataset spec {text!r}: the path is empty")
    split, tokens = _split_and_variants(tail, text)
    path = os.path.realpath(os.path.expanduser(path_text))
    base = group or os.path.basename(path.rstrip(os.sep)) or "root"
    if group is None and key:
        base += "#" + key.strip("/").replace("/", ".")
    if "/" in base or ":" in base:
        raise ConfigError(f"dataset spec {text!r}: cannot make a group name of {base!r}; name it with GROUP=PATH")
    return DatasetSpec("-".join([base, *tokens]), split, path, key or None, tokens, text, group_split or None)


def check_distinct(specs: Sequence[DatasetSpec]) -> list[DatasetSpec]:
    """`specs` as a list; ConfigError when two give the same group (naming both specs)."""
    seen: dict[str, DatasetSpec] = {}
    for s in specs:
        if s.group in seen:
            other = seen[s.group]
            hint = ("; name one yourself with GROUP=PATH" if s.is_file or other.is_file else "")
            raise ConfigError(f"datasets {str(other)!r} and {str(s)!r} both make the group {s.group!r}{hint}")
        seen[s.group] = s
    return list(specs)
