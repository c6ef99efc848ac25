"""Where the DMoL kernels' sources live, and the likelihood's two numerical constants.

The constants are owned by ``csrc/dmol_constants.h`` (the C++/CUDA math includes it); this module parses
that header at import, so the Python reference and the fused kernel cannot drift apart:

* ``LOG_SCALE_MIN`` (``DMOL_LOG_SCALE_MIN``, -7): log-scales are clamped below at this value.
* ``CDF_DELTA_MIN`` (``DMOL_CDF_DELTA_MIN``, 1e-5): interior bins use log(cdf_plus - cdf_min) only above it,
  else the density at the bin centre times the bin width.

To change one, edit the header: the next import reads the new value, and the fused extension's build hash
(which covers the header) triggers a rebuild.
"""
from __future__ import annotations

import re
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
CONSTANTS_HEADER = CSRC / "dmol_constants.h"


def parse_define(text: str, name: str, source: str = "dmol_constants.h") -> float:
    """The number of the line ``#define <name> <number>`` in `text` (a C header). Raises RuntimeError, naming
    the macro and the file, when there is no such line or the value is not a plain number."""
    found = re.findall(rf"^[ \t]*#[ \t]*define[ \t]+{re.escape(name)}[ \t]+(\S+)[ \t]*(?://.*)?$", text, re.M)
    if len(found) != 1:
        raise RuntimeError(f"{source}: expected exactly one line '#define {name} <number>', found {len(found)}")
    try:
        return float(found[0])
    except ValueError:
        raise RuntimeError(f"{source}: #define {name} {found[0]!r} is not a plain number") from None


def _read_constants() -> tuple[float, float]:
    try:
        text = CONSTANTS_HEADER.read_text()
    except OSError as e:
        raise RuntimeError(f"hvae_dist: cannot read the DMoL constants header {CONSTANTS_HEADER}: {e}") from e
    return (parse_define(text, "DMOL_LOG_SCALE_MIN", str(CONSTANTS_HEADER)),
            parse_define(text, "DMOL_CDF_DELTA_MIN", str(CONSTANTS_HEADER)))


LOG_SCALE_MIN, CDF_DELTA_MIN = _read_constants()
