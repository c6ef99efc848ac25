"""`hvae score` of a folder of PNGs next to the same images in one .npy array: images/s and peak RSS (issue 21).

    python benchmarks/file_datasets.py                 # 10^5 PNGs (about 30 MB on disk)
    python benchmarks/file_datasets.py --n 2000        # a quick run

1. Writes N 28x28 grey PNGs (FashionMNIST test images, cycled; 10 class subfolders) and the same N images as
   one uint8 .npy file, and a run dir with a small random-init model (the test helpers' 3-layer VAE, 8 channels).
2. Runs `python -m hvae_dist score --datasets DIR` and `--datasets X.npy` (S = `--iw-samples`, default 1, so
   that the data path, not the model, is what differs), each in its own process, and reads the process's
   peak RSS from wait4(); the time includes the folder's scan (every image opened and verified) and hashing.
3. Baseline in the same run: the .npy array (memory-mapped). A floor is measured too (a process that only
   imports the package, torch, h5py and Pillow): images/s are N over the wall time above the floor's, and
   peak RSS is also given above the floor's; the scoring loop's own rate (the job's last progress line, without
   start-up and the folder's scan) is printed beside it. The last line is `folder / array: images/s X, peak RSS Y` (ratios).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def run_measured(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stderr) of one command in its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, err


def write_data(root: Path, n: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    from hvae_dist.data import load_arrays

    images, labels = load_arrays("FashionMNIST", "test")
    idx = np.arange(n) % len(images)
    folder = root / "pngs"
    for c in range(10):
        (folder / f"class{c}").mkdir(parents=True)
    for i, j in enumerate(idx):
        Image.fromarray(images[j, 0]).save(folder / f"class{labels[j]}" / f"{i:07d}.png")
    array = root / "images.npy"
    np.save(array, np.ascontiguousarray(images[idx, 0]))                          # N, 28, 28 uint8
    return folder, array


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="images (N)")
    p.add_argument("--iw-samples", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dir", default=None, help="parent folder of the benchmark's files (default: the temp folder)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    from helpers.score import make_run_dir

    root = Path(tempfile.mkdtemp(prefix="file_datasets_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        folder, array = write_data(root, args.n)
        print(f"wrote {args.n} PNGs ({sum(f.stat().st_size for f in folder.rglob('*.png')) / 2**20:.1f} MiB) and "
              f"{array.name} ({array.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s", flush=True)
        run = make_run_dir(root / "run")
        floor_wall, floor_rss, _ = run_measured([sys.executable, "-c", "import hvae_dist.score.runner, h5py, PIL.Image, tqdm"])
        print(f"floor (python importing hvae_dist, torch, h5py, PIL): {floor_wall:.1f} s, peak RSS {floor_rss:.0f} MiB; "
              "images/s below are over the time above it", flush=True)
        results = {}
        for name, spec in (("array (.npy, baseline)", str(array)), ("folder of PNGs", str(folder))):
            out = root / f"out_{len(results)}"
            out.mkdir()
            wall, rss, err = run_measured([sys.executable, "-m", "hvae_dist", "score", "--run-dir", str(run), "--datasets",
                                      spec, "--iw-samples", str(args.iw_samples), "--ks", "1", "--batch-size",
                                      str(args.batch_size), "--out", str(out), "--no-progress"])
            rate = args.n / max(wall - floor_wall, 1e-9)
            loop = float(re.findall(r"done, \d+/\d+ rows in \S+, ([\d.]+) rows/s", err)[-1])
            results[name] = (rate, rss, loop)
            print(f"{name}: {args.n} images in {wall:.1f} s, {rate:.0f} images/s over the floor (scan and hashing "
                  f"included), scoring loop {loop:.0f} images/s, peak RSS {rss:.0f} MiB ({rss - floor_rss:+.0f} MiB "
                  "over the floor)", flush=True)
        (a_rate, a_rss, a_loop), (f_rate, f_rss, f_loop) = results.values()
        print(f"folder / array: images/s {f_rate / a_rate:.2f}x (scoring loop {f_loop / a_loop:.2f}x), peak RSS "
              f"{f_rss / a_rss:.2f}x (N = {args.n}, S = {args.iw_samples})")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
