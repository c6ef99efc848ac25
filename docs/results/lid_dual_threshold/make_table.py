"""The side-by-side AUROC table of README.md from the metrics.json of `hvae analyze`, one per direction.

    python make_table.py ANALYSIS_DIR_1/metrics.json [ANALYSIS_DIR_2/metrics.json ...]
"""
from __future__ import annotations

import json
import sys

COLUMNS = [("-ELBO", "nll"), ("LLR>1", "llr1"), ("LLR>2", "llr2"),
           ("-LID>1(0.1)", "lid1@0.1"), ("-LIDlin>1(0.1)", "lidlin1@0.1"), ("-LIDlin>1(1)", "lidlin1@1"),
           ("-LIDlin>2(1)", "lidlin2@1"), ("dual>1(0.1)", "dual1@0.1"), ("dual>1(1)", "dual1@1"),
           ("dual>2(1)", "dual2@1")]


def main(paths: list[str]) -> None:
    print("| in-dist -> OOD | " + " | ".join(label for label, _ in COLUMNS) + " | envelope dual>1(1) |")
    print("| --- |" + " ---: |" * (len(COLUMNS) + 1))
    for path in paths:
        doc = json.loads(open(path).read())
        rows = {r["score"]: r for r in doc["rows"]}
        first = doc["rows"][0]
        cells = [f"{rows[sid]['auroc']:.3f}" if sid in rows else "—" for _, sid in COLUMNS]
        env = rows.get("dual1@1", {}).get("auroc_envelope")
        print(f"| {first['in_dist']} -> {first['ood']} (n = {first['n_in']} / {first['n_ood']}) | " + " | ".join(cells)
              + f" | {'—' if env is None else f'{env:.3f}'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
