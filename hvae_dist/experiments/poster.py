"""`hvae poster`: the paper's OOD table (Havtorn et al. 2021) in one command, on one machine.

For each in-distribution set (FashionMNIST, MNIST): train a model (`--config`, `--minutes` of wall time),
score its test split against every OOD set that resolves here (the other of the two, the inverted
variants, AnimalMNIST, KMNIST / notMNIST / Omniglot / SmallNORB when `--data-root` holds them, the noise
sets) and against its own held-out validation split (the paper's ~0.5 rows: scored under the identity
variant NAME-28x28 so that analysis treats it as a second set), merge, analyze, and write one table with
the paper's AUROC beside ours (markdown / csv / json) plus every analysis figure.

Every stage leaves a `done` marker in its folder: re-running continues an interrupted stage (training
and scoring resume) and never recomputes a finished one. The paper's dataset names map to ours as
`PAPER_NAMES` says (Omniglot's files hold black strokes on white: `Omniglot-28x28-inverted` is the
MNIST-like white-on-black rendering; which of the two the paper calls "Inverted" is our reading of it).
"""
from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from hvae_dist.errors import DatasetUnavailableError, HvaeError
from hvae_dist.experiments import stages
from hvae_dist.files import write_bytes_atomic, write_text_atomic

IN_DISTS = ("FashionMNIST", "MNIST")
# (trained on, paper's OOD name) -> (paper's k, paper's AUROC of LLR>k)
PAPER = {
    ("FashionMNIST", "MNIST"): (1, 0.986), ("FashionMNIST", "notMNIST"): (1, 0.998),
    ("FashionMNIST", "KMNIST"): (1, 0.974), ("FashionMNIST", "Omniglot28x28"): (2, 1.000),
    ("FashionMNIST", "Omniglot28x28Inverted"): (1, 0.954), ("FashionMNIST", "SmallNORB28x28"): (2, 0.999),
    ("FashionMNIST", "SmallNORB28x28Inverted"): (2, 0.941), ("FashionMNIST", "FashionMNIST"): (1, 0.488),
    ("MNIST", "FashionMNIST"): (1, 0.999), ("MNIST", "notMNIST"): (1, 1.000), ("MNIST", "KMNIST"): (1, 0.999),
    ("MNIST", "Omniglot28x28"): (1, 1.000), ("MNIST", "Omniglot28x28Inverted"): (1, 0.944),
    ("MNIST", "SmallNORB28x28"): (1, 1.000), ("MNIST", "SmallNORB28x28Inverted"): (1, 0.985),
    ("MNIST", "MNIST"): (2, 0.515),
}
# the paper's OOD set name -> our dataset name (None: the in-distribution set itself, its validation split)
PAPER_NAMES = {"MNIST": "MNIST", "FashionMNIST": "FashionMNIST", "notMNIST": "notMNIST", "KMNIST": "KMNIST",
               "Omniglot28x28": "Omniglot-28x28-inverted", "Omniglot28x28Inverted": "Omniglot-28x28",
               "SmallNORB28x28": "SmallNORB-28x28", "SmallNORB28x28Inverted": "SmallNORB-28x28-inverted"}
EXTRA_OOD = ("FashionMNIST-inverted", "MNIST-inverted", "AnimalMNIST", "UniformNoise", "BernoulliNoise", "Constant")


def ood_candidates(in_dist: str) -> list[str]:
    """Our dataset names scored against `in_dist` (the paper's rows first), without the in-dist test set."""
    names = [PAPER_NAMES[p] for (t, p) in PAPER if t == in_dist and p != in_dist]
    names += [f"{in_dist}-28x28"] + [n for n in EXTRA_OOD if n not in names]
    return list(dict.fromkeys(names))


def resolvable(names: list[str], data_root: str | None) -> tuple[list[str], dict[str, str]]:
    """(names whose test split loads here, name -> why the others do not)."""
    from hvae_dist.data import load_arrays

    ok, missing = [], {}
    for n in names:
        split = "validation" if n.endswith("-28x28") and n.split("-")[0] in IN_DISTS else "test"
        try:
            load_arrays(n, split, data_root)
            ok.append(n)
        except DatasetUnavailableError as e:
            missing[n] = str(e).splitlines()[0]
    return ok, missing


def _stage(folder: Path, what: str, run: Callable[[], object]) -> None:
    """Run one stage (`run`, a call of experiments/stages.py) unless `folder/done` says it finished; mark it
    done after it succeeds."""
    marker = folder / "done"
    if marker.exists():
        print(f"[done before] {what}", flush=True)
        return
    try:
        run()
    except HvaeError as e:
        raise type(e)(f"{what}: {e}; re-run `hvae poster` with the same --out to continue where it stopped") from e
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


def run_poster(out: str | Path, minutes: float = 30.0, config: str = "tiny", iw_samples: int = 64,
               max_examples: int = 1000, data_root: str | None = None, overrides: list[str] | None = None) -> Path:
    """Train, score, analyze per in-dist set; returns the path of the table (OUT/poster.md)."""
    out = Path(out)
    rows, missing_all = [], {}
    for in_dist in IN_DISTS:
        base = out / in_dist
        run_dir, scores, analysis = base / "run", base / "scores", base / "analysis"
        budget = [f"train.max_minutes={minutes}", "train.max_steps=10000000"]
        if (run_dir / "config.json").exists():
            train = partial(stages.train, run_dir, None, budget)
        else:
            other = "FashionMNIST" if in_dist == "MNIST" else "MNIST"
            val = json.dumps([f"{in_dist}:validation", f"{other}:validation"])
            train = partial(stages.train, run_dir, config,
                            [*budget, f"data.dataset={in_dist}", f"data.val_datasets={val}"], overrides)
        _stage(run_dir / "poster", f"training {run_dir}", train)
        names, missing = resolvable(ood_candidates(in_dist), data_root)
        missing_all.update({(in_dist, n): why for n, why in missing.items()})
        specs = [f"{in_dist}:test"] + [f"{n}:validation" if n == f"{in_dist}-28x28" else f"{n}:test" for n in names]
        _stage(scores / "poster-score", f"scoring {scores}",
               partial(stages.score, run_dir, specs, scores, iw_samples, max_examples, data_root))
        _stage(scores / "poster-merge", f"merging {scores}", partial(stages.merge, scores))
        _stage(analysis, f"analyzing {scores / 'scores.h5'}",
               partial(stages.analyze, scores / "scores.h5", f"{in_dist}:test", analysis))
        rows += _rows(in_dist, analysis / "metrics.json", missing)
    return _write_table(out, rows, minutes, iw_samples, max_examples)


def _rows(in_dist: str, metrics_json: Path, missing: dict[str, str]) -> list[dict]:
    doc = json.loads(metrics_json.read_text())
    auroc = {(r["ood"], r["score"]): r["auroc"] for r in doc["rows"]}
    rows = []
    for (trained, paper_name), (k, paper_auroc) in PAPER.items():
        if trained != in_dist:
            continue
        ours = f"{in_dist}-28x28" if paper_name == in_dist else PAPER_NAMES[paper_name]
        group = f"{ours}/validation" if paper_name == in_dist else f"{ours}/test"
        rows.append(_row(in_dist, paper_name, ours, group, k, paper_auroc, auroc, missing.get(ours)))
    paper_ours = {PAPER_NAMES[p] for (t, p) in PAPER if t == in_dist} | {f"{in_dist}-28x28"}
    for ood in doc["ood"]:
        name = ood.rsplit("/", 1)[0]
        if name not in paper_ours:
            rows.append(_row(in_dist, None, name, ood, 1, None, auroc, None))
    return rows


def _row(in_dist, paper_name, ours, group, k, paper_auroc, auroc, why) -> dict:
    llrs = {int(s[3:]): v for (g, s), v in auroc.items() if g == group and s.startswith("llr")}
    best = max(llrs, key=llrs.get) if llrs else None
    return {"trained_on": in_dist, "ood_paper": paper_name or "—", "ood_ours": ours, "k": k,
            "paper_auroc": paper_auroc, "ours_auroc_llr": llrs.get(k), "ours_auroc_neg_elbo": auroc.get((group, "nll")),
            "ours_best_k": best, "ours_best_auroc": llrs.get(best) if best is not None else None,
            "note": f"not scored: {why}" if why else ""}


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _write_table(out: Path, rows: list[dict], minutes: float, iw_samples: int, max_examples: int) -> Path:

    head = ["trained on", "OOD (paper)", "OOD (ours)", "k", "paper AUROC LLR>k", "ours AUROC LLR>k",
            "ours AUROC -ELBO", "ours best k (AUROC)", "note"]
    lines = [f"# The paper's table, ours beside it ({minutes:g} min of training per model, S = {iw_samples}, "
             f"{max_examples} examples per set, a seeded subset stratified by class)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        best = f"{r['ours_best_k']} ({_fmt(r['ours_best_auroc'])})" if r["ours_best_k"] is not None else "—"
        lines.append(f"| {r['trained_on']} | {r['ood_paper']} | {r['ood_ours']} | {r['k']} | {_fmt(r['paper_auroc'])} "
                     f"| {_fmt(r['ours_auroc_llr'])} | {_fmt(r['ours_auroc_neg_elbo'])} | {best} | {r['note']} |")
    md = out / "poster.md"
    write_bytes_atomic(md, ("\n".join(lines) + "\n").encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trained_on"])
    w.writeheader()
    w.writerows(rows)
    write_bytes_atomic(out / "poster.csv", buf.getvalue().encode())
    write_bytes_atomic(out / "poster.json", (json.dumps({"minutes": minutes, "iw_samples": iw_samples,
                                                          "max_examples": max_examples, "rows": rows}, indent=2)
                                             + "\n").encode())
    print("\n".join(lines))
    return md
