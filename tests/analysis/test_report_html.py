"""report.html: self-contained (every figure embedded, no external resource) and rendered by a real
headless Chromium, in which every image loads."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.analysis import write_score_file
from hvae_dist.analysis import analyze

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium's network and background services are off: the page must need nothing outside itself.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.insertAdjacentHTML("beforeend", `<p id="probe">loaded ${ok} of ${imgs.length}</p>`);
});</script>"""


@pytest.fixture
def report(tmp_path: Path) -> Path:
    score_file = write_score_file(tmp_path / "scores.h5", {"A/test": 40, "B/test": 50, "C/test": 35},
                                  shifts={"B/test": 1.0, "C/test": -0.5})
    analyze(score_file, "A:test", out_dir=tmp_path / "out")
    return tmp_path / "out" / "report.html"


def test_report_is_self_contained_with_every_figure(report: Path):
    page = report.read_text()
    pngs = sorted(p.stem for p in report.parent.glob("*.png"))
    assert pngs and all(f'alt="{name}"' in page for name in pngs)
    assert page.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", page), "the page points outside itself"
    assert "<script" not in page and "LLR&gt;1" in page and "B/test" in page


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(report: Path, tmp_path: Path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    count = len(list(report.parent.glob("*.png")))
    assert f"loaded {count} of {count}" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2400",
                    f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120)
    import numpy as np
    from PIL import Image

    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[0] >= 2000 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50   # text and figures
