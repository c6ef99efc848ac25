"""One name per score, used everywhere a score is named: `to_dataframe`'s columns, `hvae analyze`'s score ids
(metrics.{md,csv,json}, figures, TensorBoard), and the validation scalars of a training run.

Per example (the datasets of a score file, `hvae_dist.score.layout`):

    elbo        the importance-weighted ELBO, nats (higher: more likely)
    nll         -elbo, nats: the score "-ELBO" of hvae analyze (higher: more OOD)
    lk<k>       the L>k bound of k = 1, 2, ..., nats (a column of the `lk` dataset, k from the file's `ks`)
    llr<k>      the likelihood ratio elbo - L>k, nats
    kl<l>       the KL term of latent layer l = 1 (bottom) ... L, nats
    bpd         -elbo in bits per dimension

`hvae analyze` orients every score so that higher = more OOD: its `lk<k>` is -L>k (label "-L>k"), its
`llr<k>` and `nll` are as above; the sign convention table of each report says so again.

Metric keys (TensorBoard scalars and validation): `<prefix>/<metric>/<OOD set>/<score>`, all lower case, e.g.
`ood/auroc/MNIST_test/llr1` (hvae analyze) and `val/auroc/MNIST_validation/nll` (training's validation).

Renamed in issue 24 (the old names are no longer written): to_dataframe's `lk_<k>`, `llr_<k>`, `kl_<l>` are now
`lk<k>`, `llr<k>`, `kl<l>`; validation's `val/auroc/<set>/neg_elbo` is `val/auroc/<set>/nll`; analyze's
TensorBoard `ood/AUROC/...`, `ood/AUPRC/...`, `ood/FPR80/...` are `ood/auroc/...`, `ood/auprc/...`, `ood/fpr80/...`.
"""
from __future__ import annotations

ELBO = "elbo"
NLL = "nll"
BPD = "bpd"


def lk(k: int) -> str:
    """The L>k bound (nats); in hvae analyze, the score -L>k."""
    return f"lk{k}"


def llr(k: int) -> str:
    """The likelihood ratio elbo - L>k (nats)."""
    return f"llr{k}"


def kl(layer: int) -> str:
    """The KL term of latent layer `layer` (1 = bottom), nats."""
    return f"kl{layer}"


def metric_key(prefix: str, metric: str, ood: str, score: str) -> str:
    """'<prefix>/<metric>/<ood>/<score>' (metric lower case): a TensorBoard scalar tag of a detection metric;
    `ood` must already be safe in a tag (e.g. analysis.plots.file_stem of a group)."""
    return f"{prefix}/{metric.lower()}/{ood}/{score}"
