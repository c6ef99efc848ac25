"""The baselines' OOD scores in `hvae analyze`: Likelihood Regret, the gradient scores, DoSE and WAIC.

| id                  | label      | value (higher = more OOD)                                   | needs                  |
|---------------------|------------|-------------------------------------------------------------|------------------------|
| `likelihood_regret` | LR         | likelihood_regret = elbo_refit - elbo, nats                 | score --likelihood-regret |
| `gradnorm`          | norm grad  | sqrt(sum_l grad_norm[:, l]^2)                               | score --gradients      |
| `score_stat`        | score stat | sum_l grad_norm_l^2 / mean_train grad_norm_l^2              | --gradients, NAME/train |
| `fisher`            | Fisher     | -2 sum_l log p_l, p_l = (1 + #{train >= x}) / (1 + n_train) | --gradients, NAME/train |
| `dose_kde`          | DoSE-KDE   | -log density of a Gaussian KDE of the statistics            | --dose kde, NAME/train |
| `dose_svm`          | DoSE-SVM   | -decision function of a one-class SVM of the statistics     | --dose svm, NAME/train |
| `waic`              | -WAIC      | -(mean_m elbo_m - var_m elbo_m) over the ensemble's M files | --ensemble FILE ...    |

NAME/train is the in-distribution dataset's training split in the same score file (score it with the test
sets: `hvae score --datasets FashionMNIST:train FashionMNIST:test MNIST:test`); it is never an OOD set.
Gradient scores: Bergamin et al. (AISTATS 2022), see hvae_dist.estimators.gradients for the per-layer Fisher
approximation. DoSE (Morningstar et al., AISTATS 2021): the per-example statistics the score file holds
(elbo, kl per layer, L>k and LLR>k for each k) are standardised with the TRAINING rows' mean and std, and
the density (scikit-learn KernelDensity, Gaussian kernel, Scott's bandwidth; or OneClassSVM, RBF kernel,
gamma "scale", nu 0.1) is fitted to the TRAINING rows only, then scores test and OOD rows. WAIC (Choi et al.
2018): the same examples scored by M independently trained runs (`--ensemble`: the other runs' score files,
rows joined on `index`); log p_m(x) is each run's IW ELBO, the variance is over the M runs (ddof 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hvae_dist.errors import ConfigError, ScoreFileError
from hvae_dist.score.reader import read_scores

DOSE_METHODS = ("kde", "svm")
BASELINE_FAMILIES = ("likelihood_regret", "gradients", "dose", "waic")


def join_rows(index: np.ndarray, other: dict[str, np.ndarray], key: str, path: Path, group: str) -> np.ndarray:
    """other[key] reordered to the rows of `index` (both without repeats); ScoreFileError when the indices differ."""
    oi = other["index"]
    if oi.size != index.size or not np.array_equal(np.sort(oi), np.sort(index)):
        raise ScoreFileError(f"{path}: '{group}' holds other examples than the first score file "
                             f"({np.setdiff1d(index, oi).size} missing, {np.setdiff1d(oi, index).size} extra): an "
                             "ensemble's files must score the same examples (same --datasets and --max-examples)")
    order = np.argsort(oi)
    return other[key][order[np.searchsorted(oi[order], index)]]


def waic_score(elbos: np.ndarray) -> np.ndarray:
    """-WAIC per example from elbos (M, N) of M models: -(mean_m - var_m), higher = more OOD."""
    return -(elbos.mean(0) - elbos.var(0))


def dose_features(data: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 1 + L + 2K) float64: elbo, kl per layer, lk and llr for each k (DoSE's per-example statistics)."""
    return np.concatenate([data["elbo"][:, None], data["kl"], data["lk"], data["llr"]], 1).astype(np.float64)


def fit_dose(method: str, train: np.ndarray):
    """The fitted density of DoSE on the training rows' statistics (N_train, F); returns score(features) -> (N,)."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    z = (train - mean) / std
    if method == "kde":
        from sklearn.neighbors import KernelDensity

        model = KernelDensity(kernel="gaussian", bandwidth="scott").fit(z)
        return lambda f: -model.score_samples((f - mean) / std)
    if method == "svm":
        from sklearn.svm import OneClassSVM

        model = OneClassSVM(kernel="rbf", gamma="scale", nu=0.1).fit(z)
        return lambda f: -model.decision_function((f - mean) / std)
    raise ConfigError(f"--dose {method!r}: choose one of {', '.join(DOSE_METHODS)}")


def fisher_combination(norms: np.ndarray, train: np.ndarray) -> np.ndarray:
    """-2 sum_l log p_l with p_l the upper-tail empirical p-value of norms[:, l] among train[:, l] (+1 smoothing)."""
    n_train = train.shape[0]
    stat = np.zeros(norms.shape[0])
    for j in range(norms.shape[1]):
        ref = np.sort(train[:, j])
        above = n_train - np.searchsorted(ref, norms[:, j], side="left")       # train >= x
        stat += -2.0 * np.log((1.0 + above) / (1.0 + n_train))
    return stat


@dataclass
class Baselines:
    """What the baselines need, prepared once per analysis: the fitted densities, training references, files."""

    specs: list = field(default_factory=list)               # ScoreSpec of each baseline score in use
    fields: set = field(default_factory=set)                # datasets of a group they read
    dose: Any = None                                        # (method, scorer)
    grad_train: np.ndarray | None = None                    # (N_train, G) grad_norm of NAME/train
    ensemble: list = field(default_factory=list)            # other score files (Path)

    def scores(self, group: str, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        ids = {s.id for s in self.specs}
        if "likelihood_regret" in ids:
            out["likelihood_regret"] = data["likelihood_regret"].astype(np.float64)
        if "gradnorm" in ids:
            out["gradnorm"] = np.sqrt(np.sum(data["grad_norm"].astype(np.float64) ** 2, 1))
        if "score_stat" in ids:
            out["score_stat"] = np.sum(data["grad_norm"] ** 2 / np.mean(self.grad_train ** 2, 0), 1)
        if "fisher" in ids:
            out["fisher"] = fisher_combination(data["grad_norm"].astype(np.float64), self.grad_train)
        if self.dose is not None:
            method, score = self.dose
            out[f"dose_{method}"] = score(dose_features(data))
        if "waic" in ids:
            elbos = [data["elbo"].astype(np.float64)]
            for path in self.ensemble:
                other = read_scores(path, fields={group: ["elbo"]}).groups
                if group not in other:
                    raise ScoreFileError(f"{path}: ensemble file lacks group '{group}'; it has: {', '.join(other)}")
                elbos.append(join_rows(data["index"], other[group], "elbo", path, group))
            out["waic"] = waic_score(np.stack(elbos))
        return out


def prepare(path: Path, names: dict[str, Any], used: list[str], in_group: str, spec_type,
            dose: str | None = None, ensemble: list[str | Path] | None = None) -> Baselines:
    """The baseline scores available for this file (fields present in every used group) and their fits.

    `spec_type` is ScoreSpec (passed in: it lives in the module that imports this one)."""
    b = Baselines()
    have = set.intersection(*(set(names[g]) for g in used))
    train = f"{in_group.rsplit('/', 1)[0]}/train"
    has_train = train in names and train != in_group
    if "likelihood_regret" in have:
        b.specs.append(spec_type("likelihood_regret", "LR", "likelihood_regret",
                                 "elbo_refit - elbo: Likelihood Regret, nats (Xiao et al. 2020)"))
        b.fields.add("likelihood_regret")
    if "grad_norm" in have:
        b.fields.add("grad_norm")
        b.specs.append(spec_type("gradnorm", "grad norm", "gradients", "norm of the ELBO_1 gradient (Bergamin et al.)"))
        if has_train and "grad_norm" in names[train]:
            b.grad_train = read_scores(path, fields={train: ["grad_norm"]}).groups[train]["grad_norm"].astype(np.float64)
            b.specs.append(spec_type("score_stat", "score stat", "gradients",
                                     f"sum_l |g_l|^2 / mean |g_l|^2 on {train} (score statistic, Bergamin et al.)"))
            b.specs.append(spec_type("fisher", "Fisher", "gradients",
                                     f"Fisher's method over per-layer p-values of |g_l| among {train} (Bergamin et al.)"))
    if dose is not None:
        if dose not in DOSE_METHODS:
            raise ConfigError(f"--dose {dose!r}: choose one of {', '.join(DOSE_METHODS)}")
        if not has_train:
            raise ConfigError(f"--dose fits its density to the training split, but {path} has no group '{train}'; "
                              f"score it too (hvae score --datasets {train.replace('/', ':')} ...)")
        rows = read_scores(path, fields={train: ["elbo", "kl", "lk", "llr"]}).groups[train]
        b.dose = (dose, fit_dose(dose, dose_features(rows)))
        b.fields |= {"elbo", "kl", "lk", "llr"}
        b.specs.append(spec_type(f"dose_{dose}", f"DoSE-{dose.upper()}", "dose",
                                 f"-{'log density' if dose == 'kde' else 'decision function'} of a {dose.upper()} fitted "
                                 f"to {train}'s elbo, kl, lk, llr (Morningstar et al.)"))
    if ensemble:
        b.ensemble = [Path(p) for p in ensemble]
        for p in b.ensemble:
            if not p.is_file():
                raise ConfigError(f"--ensemble {p}: no such score file")
        b.specs.append(spec_type("waic", "-WAIC", "waic",
                                 f"-(mean - variance) of the elbo over {1 + len(b.ensemble)} runs (Choi et al.)"))
    return b
