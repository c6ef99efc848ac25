"""`hvae merge` and `hvae analyze` on large synthetic score sets: rows/s and peak RSS (issue 22).

    python benchmarks/score_files_scale.py --rows 10000000 --shards 64

1. Writes K shard files of N rows (two groups, InDist/test and OOD/test, N/2 rows each, K=2 ks, L=3 layers)
   through the package's ShardWriter (`tests/helpers/score.py: write_synthetic_shards`: a seeded generator,
   every row complete, batches of 65,536 rows), in a child process, and reports how long that took.
2. Runs `python -m hvae_dist merge DIR` and `python -m hvae_dist analyze DIR/scores.h5 --in-dist InDist:test`
   (with its figures) as a user does, each in its own process, and reads that process's peak RSS from
   wait4(); the floor (python importing hvae_dist, h5py and numpy) is measured the same way.
3. Baseline, in the same run: copying the shard files' bytes into one file (what any merge must at least
   read and write); merge's time is printed as a ratio of it.

The last line is `merge: R rows/s, peak RSS M MiB; analyze: R rows/s, peak RSS M MiB`. The files are removed
at the end unless --keep. Disk needed: about 2 x 90 bytes per row (shards + scores.h5), printed per row.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATE = """
import sys
sys.path.insert(0, sys.argv[1] + "/tests")            # the synthetic shard writer shared with the tests
from helpers.score import write_synthetic_shards
write_synthetic_shards(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
"""


def run_measured(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stderr tail) of one command in its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, err.strip()[-300:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in all (N)")
    p.add_argument("--shards", type=int, default=16, help="shard files (K)")
    p.add_argument("--dir", default=None, help="parent folder of the benchmark's files (default: the temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the shard files, scores.h5 and the analysis")
    p.add_argument("--no-plots", action="store_true", help="analyze without figures")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="score_files_scale_", dir=args.dir))
    out = root / "scores"
    out.mkdir()
    py = sys.executable
    try:
        print(f"# score_files_scale: {args.rows:,} rows, {args.shards} shards, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f} at the start; files in {root} ({shutil.disk_usage(root).free / 2**30:.1f} GiB "
              "free)", flush=True)
        # in a child process: this one stays small, and a child's peak RSS counts the parent's at fork
        gen, _, _ = run_measured([py, "-c", GENERATE, str(REPO), str(out), str(args.rows), str(args.shards)])
        shard_bytes = sum(f.stat().st_size for f in out.glob("shard-*.h5"))
        print(f"generate: {gen:.1f} s through ShardWriter ({args.rows / gen:,.0f} rows/s), shards "
              f"{shard_bytes / 2**20:,.1f} MiB ({shard_bytes / args.rows:.1f} bytes/row)", flush=True)

        t0 = time.perf_counter()
        with open(root / "copy.bin", "wb") as dst:
            for f in sorted(out.glob("shard-*.h5")):
                with open(f, "rb") as src:
                    shutil.copyfileobj(src, dst, 8 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        copy = time.perf_counter() - t0
        (root / "copy.bin").unlink()

        floor_wall, floor_rss, _ = run_measured([py, "-c", "import hvae_dist.cli, h5py, numpy"])
        merge_wall, merge_rss, _ = run_measured([py, "-m", "hvae_dist", "merge", str(out)])
        merged = (out / "scores.h5").stat().st_size
        print(f"merge: {merge_wall:.1f} s, {args.rows / merge_wall:,.0f} rows/s, peak RSS {merge_rss:.0f} MiB "
              f"(python + imports alone: {floor_rss:.0f} MiB); scores.h5 {merged / 2**20:,.1f} MiB "
              f"({merged / args.rows:.1f} bytes/row); {merge_wall / copy:.2f}x the time of copying the shard bytes "
              f"({copy:.1f} s)", flush=True)
        analyze = [py, "-m", "hvae_dist", "analyze", str(out / "scores.h5"), "--in-dist", "InDist:test",
                   "--out", str(root / "analysis"), "--bootstrap", "0"] + (["--no-plots"] if args.no_plots else [])
        # --bootstrap 0: this measures reading, scoring and sorting at scale; the intervals cost O(R x rows) more
        analyze_wall, analyze_rss, _ = run_measured(analyze)
        print(f"analyze: {analyze_wall:.1f} s, {args.rows / analyze_wall:,.0f} rows/s, peak RSS {analyze_rss:.0f} MiB "
              f"({'no figures' if args.no_plots else 'with figures'}; 5 scores x 1 OOD set)", flush=True)
        print(f"disk: {(shard_bytes + merged) / args.rows:.1f} bytes/row for shards + scores.h5 "
              f"({(shard_bytes + merged) / 2**30:.2f} GiB at this N)")
        print(f"merge: {args.rows / merge_wall:,.0f} rows/s, peak RSS {merge_rss:.0f} MiB; "
              f"analyze: {args.rows / analyze_wall:,.0f} rows/s, peak RSS {analyze_rss:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
