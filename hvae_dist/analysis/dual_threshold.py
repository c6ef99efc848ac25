"""Likelihood and LID together: the dual-threshold OOD test of Kamkari et al. (ICML 2024), as `hvae analyze` scores.

Kamkari et al. ("A Geometric Explanation of the Likelihood OOD Detection Paradox"; code
layer6ai-labs/dgm_ood_detection, `ood/intrinsic_dimension/lid_ood.py`, `notebooks/roc_analysis.py`) call x
in-distribution when BOTH its log-likelihood and its local intrinsic dimension are high:

    in-distribution  <=>  log p(x) > tau_L  and  LID_delta(x) > tau_LID

since OOD data that a model likes sits in sharp, low-dimensional likelihood peaks of little mass. The LID
values come from the score file (`hvae score --lid`, hvae_dist.estimators.lid). Scores added here (all
oriented higher = more OOD, like every score of `hvae analyze`), for each lid k and scale delta stored:

    lid<k>@<delta>     -lid[:, k, delta]       minus the threshold count #{s_i > delta}
    lidlin<k>@<delta>  -lid_lin[:, k, delta]   minus the linearised LID sum_i s_i^2 / (s_i^2 + delta^2)
    dual<k>@<delta>    max(z_NLL, z_-LIDlin)   the dual threshold as one ranking (below)

What we follow: the detector itself (a threshold on each of log-likelihood and LID, OOD when either is
crossed), the LID estimators of their flow code (threshold on the Jacobian's singular values, or the
Gaussian-convolution linearisation), and their AUROC of the dual threshold: the area under the upper
envelope of the ROC points of all threshold pairs (`envelope_auroc`, their `get_roc_graph` +
`get_convex_hull`; reported as `auroc_envelope` in the dual rows of metrics.json).

Where we differ, and why:
- One ranking for the common metrics. The envelope picks, at each false-positive rate, the best threshold
  pair *with the labels*: an upper bound, not a detector one can deploy. `dual` fixes the pair without OOD
  labels: each quantity is standardised on in-distribution reference rows (mean and standard deviation of
  -ELBO and of -LID_lin on NAME/validation, else NAME/train, else the in-distribution group itself), and
  x is flagged when either exceeds the same threshold c: OOD <=> max(z_NLL(x), z_-LID(x)) > c. Sweeping c
  gives an ordinary score, so AUROC / AUPRC / FPR80 (and any interval the analysis adds) use the one
  metric path of every other score. Their code standardises both axes the same way in
  `get_roc_graph_linear`.
- The LID scale delta is given when scoring (`--lid-scales`), one column per value, instead of their
  in-distribution scale search (plateau / match to a model-free estimate): every stored delta gets its own
  scores, so the choice is visible in the table rather than hidden in a fit.
- The log-likelihood is the IW ELBO bound (nats), not an exact flow likelihood.
"""
from __future__ import annotations

import numpy as np

LID_FAMILIES = ("lid", "lidlin", "dual")
FIELD_OF = {"lid": "lid", "lidlin": "lid_lin", "dual": "lid_lin"}
"""Score family -> the score-file dataset it reads."""
ENVELOPE_GRID = 256
"""LID thresholds of the envelope (quantiles of the pooled values; every distinct value when fewer)."""


def lid_columns(lid_attr: dict | None) -> list[tuple[str, int, int, int, float]]:
    """(suffix "<k>@<delta>", j, s, k, delta) for every stored LID column (j indexes lid ks, s the scales)."""
    if not lid_attr:
        return []
    return [(f"{k}@{delta:g}", j, s, int(k), float(delta))
            for j, k in enumerate(lid_attr["ks"]) for s, delta in enumerate(lid_attr["scales"])]


def lid_label(family: str, k: int, delta: float) -> str:
    what = {"lid": "-LID", "lidlin": "-LIDlin", "dual": "dual"}[family]
    return f"{what}{'' if k == 0 else f'>{k}'}({delta:g})"


def lid_meaning(family: str, k: int, delta: float) -> str:
    z = "all latents" if k == 0 else f"z>{k}"
    if family == "lid":
        return f"-lid[k={k}, delta={delta:g}]: minus #singular values of d mean / d {z} above delta"
    if family == "lidlin":
        return f"-lid_lin[k={k}, delta={delta:g}]: minus sum s^2/(s^2+delta^2) of d mean / d {z}"
    return (f"max(z(-elbo), z(-lid_lin[k={k}, delta={delta:g}])), z standardised on the in-dist reference rows: "
            "the dual threshold (Kamkari et al. 2024)")


def column(data: dict[str, np.ndarray], family: str, j: int, s: int) -> np.ndarray:
    """The (N,) float64 LID column of a group's data for a family (lid or lid_lin)."""
    return np.asarray(data[FIELD_OF[family]][:, j, s], dtype=np.float64)


def standardiser(values: np.ndarray) -> tuple[float, float]:
    """(mean, std) of reference values; std 1 where the values are constant (e.g. every LID = D)."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std())
    return float(values.mean()), std if std > 0 else 1.0


def dual_score(nll: np.ndarray, lid: np.ndarray, ref_nll: tuple[float, float], ref_lid: tuple[float, float]) -> np.ndarray:
    """max(z_NLL, z_-LID) (N,): OOD when the NLL is high OR the LID low, both against the in-dist reference
    (mean, std) pairs of -ELBO and of LID."""
    z_nll = (np.asarray(nll, np.float64) - ref_nll[0]) / ref_nll[1]
    z_lid = (ref_lid[0] - np.asarray(lid, np.float64)) / ref_lid[1]
    return np.maximum(z_nll, z_lid)


def envelope_auroc(in_nll: np.ndarray, in_lid: np.ndarray, ood_nll: np.ndarray, ood_lid: np.ndarray,
                   grid: int = ENVELOPE_GRID) -> float:
    """Kamkari et al.'s AUROC of the dual threshold: the area under the upper envelope of the ROC points
    (FPR, TPR) of every pair (tau_L, tau_LID) ("OOD if NLL > tau_L or LID < tau_LID"), with up to `grid`
    LID thresholds (quantiles) and every NLL threshold. Uses the labels to choose the pairs: an upper bound.
    The area is that of the staircase E(f) = max TPR over the points with FPR <= f, which equals the AUROC of
    a single score without ties (their `get_convex_hull` joins the kept points by trapezoids instead)."""
    in_nll, ood_nll = np.asarray(in_nll, np.float64), np.asarray(ood_nll, np.float64)
    in_lid, ood_lid = np.asarray(in_lid, np.float64), np.asarray(ood_lid, np.float64)
    pooled = np.unique(np.concatenate([in_lid, ood_lid]))
    taus = pooled if pooled.size <= grid else np.unique(np.quantile(pooled, np.linspace(0, 1, grid)))
    taus = np.append(taus, np.inf)                           # LID < inf flags everything; the lowest flags none
    fprs, tprs = [np.array([0.0, 1.0])], [np.array([0.0, 1.0])]
    for tau in taus:
        flag_in, flag_ood = in_lid < tau, ood_lid < tau      # flagged by LID whatever the NLL threshold
        # the rest flagged by NLL > tau_L: sweep tau_L over every NLL value (descending)
        scores = np.concatenate([np.where(flag_in, np.inf, in_nll), np.where(flag_ood, np.inf, ood_nll)])
        is_ood = np.r_[np.zeros(in_nll.size, bool), np.ones(ood_nll.size, bool)]
        order = np.argsort(-scores, kind="stable")
        s, y = scores[order], is_ood[order]
        last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
        tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
        fprs.append(fp / in_nll.size)
        tprs.append(tp / ood_nll.size)
    fpr, tpr = np.concatenate(fprs), np.concatenate(tprs)
    order = np.lexsort((tpr, fpr))
    fpr, tpr = fpr[order], np.maximum.accumulate(tpr[order])  # best TPR at or below each FPR
    keep = np.r_[fpr[1:] != fpr[:-1], True]                   # one point per FPR: the highest TPR
    fpr, tpr = fpr[keep], tpr[keep]
    return float(np.sum(np.diff(fpr) * tpr[:-1]))               # the staircase E(f) = best TPR at FPR <= f
