"""House rules that keep the code navigable (the import layers are checked by `make lint`)."""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hvae_dist"
MAX_LINES = 600


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*") if p.suffix in (".py", ".h", ".cpp", ".cu")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by responsibility (STYLE.md): {long}"
