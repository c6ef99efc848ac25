"""Detection metrics of an OOD score: AUROC, AUPRC and the FPR at 80% TPR, the one implementation that
`hvae analyze` (hvae_dist.analysis.metrics) and the training's evaluation (hvae_dist.train.evaluate) use.

Negatives are the in-distribution examples (label 0), positives the OOD ones (label 1); scores are
oriented so that higher = more OOD.
"""
from __future__ import annotations

import math

import numpy as np

from hvae_dist.errors import ConfigError

TPR_LEVEL = 0.8
METRICS = ("auroc", "auprc", "fpr80")


def ranked_counts(neg_scores: np.ndarray, pos_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fps, tps): for each distinct score, highest first, the number of negatives / positives scoring at
    least that much; both start with 0 (the threshold above every score). One sort: O(N log N) time and
    about 4 x 8 bytes per score of memory (N = negatives + positives), which every metric reads from."""
    s = np.concatenate([np.asarray(neg_scores, np.float64).ravel(), np.asarray(pos_scores, np.float64).ravel()])
    order = np.argsort(s)[::-1]                       # descending; the order of ties does not matter, only
    s = s[order]                                      # the counts at the last of each run of equal scores
    is_pos = order >= s.size - np.asarray(pos_scores).size
    del order
    last = np.flatnonzero(s[1:] != s[:-1])
    last = np.append(last, s.size - 1)
    tps = np.cumsum(is_pos)[last]
    return np.r_[0, last + 1 - tps], np.r_[0, tps]


def compute_metrics(neg_scores: np.ndarray, pos_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC (average precision) and FPR at 80% TPR; negatives = in-dist (0), positives = OOD (1).

    Scores must be finite, higher = more OOD. All three come from one sort (`ranked_counts`) and equal
    scikit-learn's roc_auc_score, average_precision_score and roc_curve (to rounding, ~1e-15), also on
    10^7 rows. FPR80 is the false positive rate at the highest threshold whose TPR >= 0.8; tied scores move
    together (every distinct threshold is kept), so ties are never broken in the detector's favour.
    """
    n_neg, n_pos = np.asarray(neg_scores).size, np.asarray(pos_scores).size
    if n_neg == 0 or n_pos == 0:
        raise ConfigError(f"compute_metrics needs both classes: {n_neg} negatives, {n_pos} positives")
    fps, tps = ranked_counts(neg_scores, pos_scores)
    fpr, tpr = fps / n_neg, tps / n_pos
    precision = tps[1:] / (tps[1:] + fps[1:])
    # TPR >= 0.8 compared in counts, not in float (e.g. 4/5 must count as 0.8)
    first = int(np.argmax(tps >= math.ceil(TPR_LEVEL * n_pos - 1e-9)))
    auroc = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2           # the trapezoids under the ROC curve
    return {"auroc": float(auroc), "auprc": float(np.sum(np.diff(tpr) * precision)),
            "fpr80": float(fpr[first])}


def auroc(neg_scores: np.ndarray, pos_scores: np.ndarray) -> float:
    """Area under the ROC curve (sklearn's roc_auc_score): the probability that a positive scores above a
    negative, ties counted half."""
    return compute_metrics(neg_scores, pos_scores)["auroc"]
