"""OOD scores and metrics (AUROC, AUPRC, FPR80) from a merged score file: what `hvae analyze` computes.

The metrics are `hvae_dist.estimators.detection.compute_metrics` (re-exported here and in hvae_dist.analysis).

The in-distribution set (``--in-dist NAME:SPLIT``, usually the test split) is the negative class
(label 0); each other dataset in the file is, in turn, the positive class (label 1). Other splits of
the in-distribution dataset (train / validation) are never treated as OOD sets.

Sign convention: every score is oriented so that HIGHER = MORE OOD (all values in nats).

| id               | label           | value                                                    | from                  |
|------------------|-----------------|----------------------------------------------------------|-----------------------|
| `nll`            | `-ELBO`         | -elbo (negative log-likelihood bound; ranks as bpd)      | likelihood baseline   |
| `lk<k>`          | `-L>k`          | -lk[:, j], j = ks.index(k)                               | Havtorn et al. 2021   |
| `llr<k>`         | `LLR>k`         | +llr[:, j] = elbo - L>k, as stored (no sign flip)        | Havtorn et al. 2021   |
| `complexity_<m>` | `-ELBO-C_<m>`   | -elbo - complexity_<m> (m = png or zlib, when stored)    | Serra et al. 2020     |
| `background`     | `-ELBO+ELBO_bg` | -(elbo - elbo_bg), background rows joined on `index`     | Ren et al. 2019       |
| `typicality`     | `|NLL-mean|`    | abs(-elbo - mean(-elbo over NAME/validation or /train))  | Nalisnick et al. 2019 |
| `lid<k>@<d>`     | `-LID(d)`       | -lid[:, k, d] (threshold count, with `hvae score --lid`) | Kamkari et al. 2024   |
| `lidlin<k>@<d>`  | `-LIDlin(d)`    | -lid_lin[:, k, d] (linearised LID)                       | Kamkari et al. 2024   |
| `dual<k>@<d>`    | `dual(d)`       | max(z(-elbo), z(-lid_lin)): the dual threshold           | Kamkari et al. 2024   |

The LID scores and the dual threshold: `hvae_dist.analysis.dual_threshold` (what is followed, where it
differs; the dual rows also carry `auroc_envelope`, Kamkari et al.'s envelope AUROC, in metrics.json).

Why LLR>k keeps its stored sign: L>k decodes the k lowest latents from the conditional prior, so it
credits x only with what the upper (semantic) latents explain. In-distribution data keep most of their
likelihood (small L - L>k); OOD data lose much more, since their high likelihood comes from low-level
statistics the lower latents capture while their high-level code is atypical: large L - L>k. The
paper's own evaluation (hvae-oodd `scripts/ood-llr.py`: `score = elbo - elbo_k`, passed unnegated to
`roc_auc_score` with OOD = 1, while L>k is negated) uses this orientation; with it FashionMNIST -> MNIST
gives AUROC 0.986 for LLR>1. A trained model's demo run should show LLR>k AUROC well above 0.5 there;
well below 0.5 would mean the stored llr has the opposite sign.

Python use::

    from hvae_dist.analysis import analyze, compute_metrics
    from hvae_dist.score import read_scores
    rows = analyze("scores/fmnist/scores.h5", "FashionMNIST:test")      # computes, writes nothing
    rows = analyze("scores/fmnist/scores.h5", "FashionMNIST:test", out_dir="reports/fmnist")
    groups, attrs = read_scores("scores/fmnist/scores.h5")             # plain numpy arrays
    compute_metrics(groups["FashionMNIST/test"]["llr"][:, 0],          # negatives: in-dist
                    groups["MNIST/test"]["llr"][:, 0])                 # -> {"auroc", "auprc", "fpr80"}
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hvae_dist.analysis import dual_threshold as dual
from hvae_dist.analysis.baselines import prepare as prepare_baselines
from hvae_dist.analysis.intervals import bootstrap_metrics
from hvae_dist.data import group_name
from hvae_dist.errors import ConfigError, ScoreFileError
from hvae_dist.estimators import names
from hvae_dist.estimators.complexity import METHODS as COMPLEXITY_METHODS
from hvae_dist.estimators.detection import compute_metrics
from hvae_dist.score.reader import read_scores

SCORE_FAMILIES = ("nll", "lk", "llr", "complexity", "background", "typicality", *dual.LID_FAMILIES, "likelihood_regret",
                  "gradients", "dose", "waic")


# ------------------------------------------------------------------------------------------------ scores
@dataclass(frozen=True)
class ScoreSpec:
    """One OOD score: `id` (machine name, CSV/JSON), `label` (tables, plots), `meaning` (orientation)."""

    id: str
    label: str
    family: str
    meaning: str


def score_specs(ks: list[int], extra_keys: set[str], background: bool, typicality_ref: str | None,
                lid_attr: dict | None = None) -> list[ScoreSpec]:
    """The scores available for a file with these ks and extra datasets (and `lid` attribute), in table order."""
    specs = [ScoreSpec(names.NLL, "-ELBO", "nll", "-elbo: negative log-likelihood bound, nats (same ranking as bpd)")]
    specs += [ScoreSpec(names.lk(k), f"-L>{k}", "lk", f"-lk[k={k}]: negative L>{k} bound, nats") for k in ks]
    specs += [ScoreSpec(names.llr(k), f"LLR>{k}", "llr", f"llr[k={k}] = elbo - L>{k}, as stored") for k in ks]
    specs += [ScoreSpec(f"complexity_{m}", f"-ELBO-C_{m}", "complexity",
                        f"-elbo - complexity_{m}: NLL minus {m} compressed size, nats (Serra et al.)")
              for m in COMPLEXITY_METHODS if f"complexity_{m}" in extra_keys]
    if background:
        specs.append(ScoreSpec("background", "-ELBO+ELBO_bg", "background",
                               "-(elbo - elbo_background): minus the foreground/background log ratio (Ren et al.)"))
    if typicality_ref:
        specs.append(ScoreSpec("typicality", "|NLL-mean|", "typicality",
                               f"|-elbo - mean(-elbo on {typicality_ref})| (Nalisnick et al.)"))
    if "lid" in extra_keys and "lid_lin" in extra_keys:
        specs += [ScoreSpec(f"{fam}{suffix}", dual.lid_label(fam, k, d), fam, dual.lid_meaning(fam, k, d))
                  for fam in dual.LID_FAMILIES for suffix, _, _, k, d in dual.lid_columns(lid_attr)]
    return specs


def _lid_column_of(spec: ScoreSpec, lid_attr: dict | None) -> tuple[int, int]:
    """(j, s): the lid k and scale columns of a LID-family spec."""
    return next((j, s) for suffix, j, s, _, _ in dual.lid_columns(lid_attr) if spec.id == spec.family + suffix)


def select_specs(specs: list[ScoreSpec], wanted: list[str] | None) -> list[ScoreSpec]:
    """Keep the specs named in `wanted` (score ids like llr1, or families: nll lk llr complexity ...)."""
    if not wanted:
        return specs
    known = {s.id for s in specs} | {s.family for s in specs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ConfigError(f"--scores {' '.join(unknown)}: not available for this file; "
                          f"choose from {', '.join(sorted(known))}")
    return [s for s in specs if s.id in wanted or s.family in wanted]


def typicality_reference(groups: dict[str, Any], in_group: str) -> str | None:
    """The in-dist split whose mean NLL is the typical value: validation if present, else train."""
    name = in_group.rsplit("/", 1)[0]
    for split in ("validation", "train"):
        ref = f"{name}/{split}"
        if ref in groups and ref != in_group:
            return ref
    return None


def _join_background(fg: dict[str, np.ndarray], bg: dict[str, np.ndarray], group: str, bg_path: Path) -> np.ndarray:
    """The background elbo reordered to match fg's `index` rows; ScoreFileError when they differ."""
    fi, bi = fg["index"], bg["index"]   # each without repeats (read_scores checks every file's index)
    if fi.size != bi.size or not np.array_equal(np.sort(fi), np.sort(bi)):
        only_fg, only_bg = np.setdiff1d(fi, bi), np.setdiff1d(bi, fi)
        raise ScoreFileError(f"{bg_path}: '{group}' indices do not match the foreground file: "
                             f"{only_fg.size} only in the foreground (e.g. {only_fg[:5].tolist()}), "
                             f"{only_bg.size} only in the background (e.g. {only_bg[:5].tolist()})")
    order = np.argsort(bi)
    return bg["elbo"][order[np.searchsorted(bi[order], fi)]]


def compute_scores(data: dict[str, np.ndarray], specs: list[ScoreSpec], ks: list[int],
                   bg_elbo: np.ndarray | None, typical_nll: float | None, lid_attr: dict | None = None,
                   dual_ref: dict | None = None) -> dict[str, np.ndarray]:
    """Score id -> (N,) float64 array, higher = more OOD, for one group. `dual_ref`: score id of a dual spec ->
    ((mean, std) of -elbo, (mean, std) of lid_lin) on the in-dist reference rows (`dual_reference`)."""
    nll = -data["elbo"].astype(np.float64)
    out: dict[str, np.ndarray] = {}
    for s in specs:
        if s.id == "nll":
            out[s.id] = nll
        elif s.family in ("lk", "llr"):
            j = ks.index(int(s.id[len(s.family):]))
            column = data[s.family][:, j].astype(np.float64)
            out[s.id] = -column if s.family == "lk" else column
        elif s.family == "complexity":
            out[s.id] = nll - data[s.id].astype(np.float64)
        elif s.id == "background":
            out[s.id] = nll + bg_elbo
        elif s.id == "typicality":
            out[s.id] = np.abs(nll - typical_nll)
        elif s.family in ("lid", "lidlin"):
            out[s.id] = -dual.column(data, s.family, *_lid_column_of(s, lid_attr))
        elif s.family == "dual":
            out[s.id] = dual.dual_score(nll, dual.column(data, s.family, *_lid_column_of(s, lid_attr)), *dual_ref[s.id])
    return out


def dual_reference(data: dict[str, np.ndarray], specs: list[ScoreSpec], lid_attr: dict | None) -> dict:
    """For each dual spec: ((mean, std) of -elbo, (mean, std) of its lid_lin column) over a reference group's rows."""
    nll = dual.standardiser(-data["elbo"])
    return {s.id: (nll, dual.standardiser(dual.column(data, s.family, *_lid_column_of(s, lid_attr))))
            for s in specs if s.family == "dual"}


# ------------------------------------------------------------------------------------- checks of the file
# (the metrics themselves: hvae_dist.estimators.detection, shared with the training's evaluation)
def _check_complete(path: Path, name: str, data: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Metrics of part of a dataset would look like a result: refuse empty groups, unfinished shards and
    one shard of several (its rows are complete, but they are a slice of the dataset the job scored)."""
    if data["index"].size == 0:
        raise ScoreFileError(f"{path}: group '{name}' has no rows")
    if "complete" in data and not np.all(data["complete"]):
        raise ScoreFileError(f"{path}: group '{name}' has {int(np.sum(~data['complete'].astype(bool)))} "
                             "incomplete rows (an unfinished shard?); run `hvae merge` on finished shards")
    size = (attrs.get("dataset_sizes") or {}).get(name)
    if size is not None and data["index"].size < int(size):
        shard = (f"shard {attrs['shard']} of {attrs['num_shards']}; " if "num_shards" in attrs else "")
        raise ScoreFileError(f"{path}: group '{name}' holds {data['index'].size} of the {int(size)} examples the job "
                             f"scored ({shard}partial data); finish every shard, run `hvae merge {path.parent}` and "
                             f"analyze its {path.parent / 'scores.h5'}")


def _check_finite(values: np.ndarray, group: str, spec: ScoreSpec, path: Path) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        kinds = ", ".join(f"{int(c)} {w}" for c, w in ((np.isnan(values).sum(), "NaN"),
                                                     (np.isposinf(values).sum(), "+inf"),
                                                     (np.isneginf(values).sum(), "-inf")) if c)
        raise ScoreFileError(f"{path}: score {spec.label} ({spec.id}) of '{group}' is not finite for "
                             f"{int(bad.sum())} of {values.size} examples ({kinds}; first at row {int(np.argmax(bad))})")


# ---------------------------------------------------------------------------------------------- analysis
DRAW_ROWS = 100_000
"""Rows per group that the figures draw: every row up to this many, else a seeded uniform subsample of
this size (in file order, the same rows in every figure). Metrics always use every row."""


def draw_rows(n: int, cap: int | None = None) -> slice | np.ndarray:
    """The rows of a group of n that figures draw (see DRAW_ROWS, the default cap)."""
    cap = DRAW_ROWS if cap is None else cap
    if n <= cap:
        return slice(None)
    return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))


@dataclass
class Analysis:
    """Everything `hvae analyze` reports: metric rows, the drawn score values and what they mean.

    `values` and `groups` hold the rows the figures draw (`draw_rows`: all of them up to DRAW_ROWS per
    group); `rows` (the metrics) and their n_in / n_ood are computed on every row."""

    score_file: Path
    in_group: str
    ood_groups: list[str]
    specs: list[ScoreSpec]
    rows: list[dict[str, Any]]
    values: dict[str, dict[str, np.ndarray]]  # group -> score id -> (n,) drawn rows (in-dist and OOD groups)
    groups: dict[str, dict[str, np.ndarray]]  # group -> index, elbo, llr, kl of the drawn rows (with figures)
    attrs: dict[str, Any]
    typicality_ref: str | None
    background_file: Path | None
    bootstrap: int = 0                        # replicates of the intervals (0: none), hvae_dist.analysis.intervals
    bootstrap_seed: int = 0


def fields_needed(specs: list[ScoreSpec], figures: bool) -> list[str]:
    """The datasets of a group that the scores `specs` (and the figures) read; `index` is always read."""
    need = {"complete", "elbo"}
    for s in specs:
        if s.family in ("lk", "llr"):
            need.add(s.family)
        elif s.family == "complexity":
            need.add(s.id)
        elif s.family in dual.LID_FAMILIES:
            need.add(dual.FIELD_OF[s.family])
    if figures and any(s.family in dual.LID_FAMILIES for s in specs):
        need |= {"lid_lin"}
    if figures:
        need |= {"llr", "kl"}
    return sorted(need)


def find_group(path: Path, groups: dict[str, Any], spec: str) -> str:
    """The group of `groups` that NAME:SPLIT (or NAME/SPLIT, or a file dataset's spec: its group, `data.specs`)
    `spec` names; names match case-insensitively, as `hvae score --datasets` takes them (fashionmnist:test is
    FashionMNIST/test). ScoreFileError otherwise."""
    path_like = spec.startswith(("/", ".", "~")) or os.path.exists(spec.split("#")[0])   # a file dataset's spec
    wanted = group_name(spec) if ":" in spec or "/" not in spec or path_like else spec
    if wanted in groups:
        return wanted
    same = [g for g in groups if g.lower() == wanted.lower()]
    if len(same) == 1:
        return same[0]
    why = f"several groups match it in any case ({', '.join(same)}); give the exact one" if same else \
        f"groups in the file: {', '.join(groups)}"
    raise ScoreFileError(f"{path}: no in-distribution group '{wanted}'; {why}")


def run_analysis(score_file: str | Path, in_dist: str, background: str | Path | None = None,
                 scores: list[str] | None = None, figures: bool = True, bootstrap: int = 0,
                 bootstrap_seed: int = 0, dose: str | None = None, ensemble: list | None = None) -> Analysis:
    """Load, score and compute the metrics for every OOD group x score (no files written).

    bootstrap > 0: each row also gets `<metric>_lo` / `<metric>_hi`, the 95% percentile-bootstrap interval
    from that many resamples seeded with `bootstrap_seed` (`hvae_dist.analysis.intervals`).
    The baselines (hvae_dist.analysis.baselines): Likelihood Regret and the gradient scores when the file holds
    their fields; `dose` ("kde" / "svm") fits DoSE to NAME/train; `ensemble` (other runs' score files): WAIC.

    Memory: one group at a time is read, and of it only the datasets the scores need (`fields_needed`);
    the in-dist group's scores stay while each OOD group is scored, compared and dropped. With
    figures=False the datasets only figures use (kl) are not read and `groups` / `values` stay empty.
    """
    path = Path(score_file)
    names, attrs = read_scores(path, fields={})               # names of groups and datasets; no values
    in_group = find_group(path, names, in_dist)
    in_name = in_group.rsplit("/", 1)[0]
    ood_groups = [g for g in names if g.rsplit("/", 1)[0] != in_name]
    if not ood_groups:
        raise ScoreFileError(f"{path}: no OOD group besides '{in_name}/*'; groups in the file: {', '.join(names)}")
    used = [in_group] + ood_groups
    ref = typicality_reference(names, in_group)
    bg_path = None
    if background is not None:
        bg_path = Path(background)
        bg_names = read_scores(bg_path, fields={}).groups
        lacking = [g for g in used if g not in bg_names]
        if lacking:
            raise ScoreFileError(f"{bg_path}: background file lacks group(s) {', '.join(lacking)}; "
                                 f"it has: {', '.join(bg_names)}")
    extra = set.intersection(*(set(names[g]) for g in used))
    lid_attr = attrs.get("lid")
    base = prepare_baselines(path, names, used, in_group, ScoreSpec, dose, ensemble)
    specs = select_specs(score_specs(attrs["ks"], extra, bg_path is not None, ref, lid_attr) + base.specs, scores)
    base.specs = [s for s in base.specs if s in specs]
    typical = None
    if any(s.id == "typicality" for s in specs):
        typical = float(np.mean(-read_scores(path, fields={ref: ["elbo"]}).groups[ref]["elbo"]))
        if not math.isfinite(typical):
            raise ScoreFileError(f"{path}: mean -elbo of typicality reference '{ref}' is not finite")
    fields = sorted(set(fields_needed(specs, figures)) | (base.fields if base.specs else set()))
    dual_ref, dual_ref_group = None, None
    if any(s.family == "dual" for s in specs):
        # the in-dist validation / train split when the file has it (with LID fields), else the in-dist group
        dual_ref_group = ref if ref is not None and {"lid_lin", "elbo"} <= set(names[ref]) else in_group
        ref_data = read_scores(path, fields={dual_ref_group: ["elbo", "lid_lin"]}).groups[dual_ref_group]
        dual_ref = dual_reference(ref_data, specs, lid_attr)

    def load(g: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], tuple | None]:
        """Group g's scores (every row), the drawn rows of its raw datasets, and (with dual scores) its -elbo and
        lid_lin (every row, for the envelope AUROC)."""
        data = read_scores(path, fields={g: fields}).groups[g]
        _check_complete(path, g, data, attrs)
        bg_elbo = None
        if bg_path is not None:
            bg_elbo = _join_background(data, read_scores(bg_path, fields={g: ["elbo"]}).groups[g], g, bg_path)
        values = compute_scores(data, specs, attrs["ks"], bg_elbo, typical, lid_attr, dual_ref)
        values.update(base.scores(g, data))
        for s in specs:
            _check_finite(values[s.id], g, s, bg_path if s.id == "background" else path)
        rows = draw_rows(data["index"].size)
        drawn = {k: data[k][rows] for k in ("index", "elbo", "llr", "kl", "lid_lin")
                 if figures and data.get(k) is not None}
        aux = (-data["elbo"], data["lid_lin"]) if dual_ref is not None else None
        return values, drawn, aux

    in_values, in_drawn, in_aux = load(in_group)
    drawn_values = {in_group: {k: v[draw_rows(v.size)] for k, v in in_values.items()}} if figures else {}
    drawn_groups = {in_group: in_drawn} if figures else {}
    rows = []
    for g in ood_groups:
        values, drawn, aux = load(g)
        for s in specs:
            m = compute_metrics(in_values[s.id], values[s.id])
            if bootstrap:
                ci = bootstrap_metrics(in_values[s.id], values[s.id], bootstrap, bootstrap_seed)
                m.update({f"{k}_{end}": v for k, (lo, hi) in ci.items() for end, v in (("lo", lo), ("hi", hi))})
            row = {"in_dist": in_group, "ood": g, "score": s.id, "label": s.label, **m,
                   "n_in": int(in_values[s.id].size), "n_ood": int(values[s.id].size),
                   "orientation": s.meaning + "; higher = more OOD"}
            if s.family == "dual":
                j, c = _lid_column_of(s, lid_attr)
                row["auroc_envelope"] = dual.envelope_auroc(in_aux[0], in_aux[1][:, j, c], aux[0], aux[1][:, j, c])
                row["reference"] = dual_ref_group
            rows.append(row)
        if figures:
            drawn_values[g] = {k: v[draw_rows(v.size)] for k, v in values.items()}
            drawn_groups[g] = drawn
        del values
    return Analysis(path, in_group, ood_groups, specs, rows, drawn_values, drawn_groups, attrs, ref, bg_path,
                    bootstrap, bootstrap_seed)
