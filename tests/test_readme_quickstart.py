"""The README's quick start, run as written but smaller (issue 24 item 9): its lines are read from README.md
between the quick-start markers, `hvae` runs as `python -m hvae_dist` from this checkout, and the settings that
take time are cut (2 training steps, 2 importance samples, 8 examples). Slow: about a minute."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALLER = [("train.max_minutes=5", "train.max_minutes=5 --max-steps 2 --set train.eval_every=0 "
            "--set data.max_train_examples=64 --no-progress"),
           ("--iw-samples 16", "--iw-samples 2"), ("--max-examples 500", "--max-examples 8")]


def quickstart_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quick start:.*?-->\s*```bash\n(.*?)```\s*<!-- end of quick start -->", text, re.S)
    assert block, "README.md has no quick-start block between the markers"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_quick_start_has_at_most_ten_lines_and_comes_first():
    text = (ROOT / "README.md").read_text()
    assert len(quickstart_lines()) <= 10
    assert re.findall(r"^## (.*)$", text, re.M)[0] == "Quick start"                      # the first section


@pytest.mark.slow
def test_the_readme_quick_start_runs_and_ends_with_a_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    report = None
    for line in quickstart_lines():
        argv = shlex.split(line)
        if argv[0] == "pip":                     # the package is installed (or on PYTHONPATH) already
            continue
        for old, new in SMALLER:
            line = line.replace(old, new)
        argv = [a.replace("runs/quick", str(tmp_path / "quick")) for a in shlex.split(line)]
        if argv[:3] == ["python", "-m", "webbrowser"]:
            report = Path(argv[3])               # what the last line opens
            continue
        assert argv[0] == "hvae", line
        proc = subprocess.run([sys.executable, "-m", "hvae_dist", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert report is not None and report.is_file(), report
    page = report.read_text()
    assert "FashionMNIST/test" in page and "MNIST/test" in page and "data:image/png;base64," in page
