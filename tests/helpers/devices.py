"""Device parametrization: tests that should also run on a GPU take `device` from DEVICES; on a machine
without CUDA the cuda case is skipped with the reason (`make gpu-check` runs them where a GPU is lent)."""
from __future__ import annotations

import pytest
import torch

NO_CUDA = "CUDA is not available on this machine (run `make gpu-check` where a GPU is)"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]
