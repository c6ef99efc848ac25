"""Figures of `hvae analyze`: ROC curves and score histograms (the paper's figures), PNG and TensorBoard.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly (no pyplot state, no
display needed). Files written to the output dir:

- `roc_<OOD>.png`: ROC curve of every score for one OOD set (in-dist = negatives), AUROC in the legend.
- `hist_<OOD>.png`: log p(x) (the ELBO, nats) and LLR>k for each k, in-dist vs that OOD set.
- `hist_all.png`: the same quantities for every group in one figure.
- `scatter_<OOD>.png`: ELBO against LLR>k per example, in-dist vs that OOD set, one panel per k.
- `kl_layers.png`: the KL of each latent layer, in-dist vs every OOD set, one panel per layer.
- `auroc_by_k.png`: the AUROC of LLR>k as a function of k, a line per OOD set.
- `lid_scatter.png` (with `hvae score --lid`): log-likelihood (ELBO) against the linearised LID per example,
  every group, one panel per stored (lid k, scale) (Kamkari et al. 2024, their likelihood-LID scatter).

Group names such as "MNIST/test" become "MNIST_test" in file names. Figures draw the rows of
`Analysis.values` / `Analysis.groups`: every row up to 100,000 per group, else a seeded uniform subsample of
100,000 (`metrics.DRAW_ROWS`), so a ROC curve of 10^7 rows is drawn from 2 x 10^5 of them (and with at most
ROC_VERTICES points); its legend's AUROC and every number in the tables use every row.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hvae_dist.estimators import names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hvae_dist.analysis.metrics import Analysis


ROC_VERTICES = 2000
"""At most this many points of a ROC curve are drawn (evenly spaced along it, both ends kept): finer than the
figure's pixels, and fast to render where the curve of 2 x 10^5 drawn rows has as many points."""


def file_stem(group: str) -> str:
    """"MNIST/test" -> "MNIST_test": safe in file names and TensorBoard tags."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", group)


def wrap_title(text: str, width_in: float, fontsize: float = 12.0) -> str:
    """`text` broken at spaces into lines that fit `width_in` inches at `fontsize` points (a long dataset name
    would be cut at the figure's edge: constrained layout shrinks axes, never titles). A word longer than a line
    stays whole; the tight bounding box of `save_figures` keeps it in the image."""
    import textwrap

    chars = max(int(width_in * 72 / (fontsize * 0.55)), 12)
    return "\n".join(textwrap.wrap(text, chars, break_long_words=False, break_on_hyphens=False)) or text


def figure_png(fig: Figure, dpi: int = 120) -> bytes:
    """The PNG of `fig` with a tight bounding box: nothing drawn (titles, labels, legends) falls outside."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08)
    return png.getvalue()


def _new_figure(ncols: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def roc_figure(result: Analysis, ood: str) -> Figure:
    """ROC curves of every score of `result` for one OOD group."""
    from sklearn.metrics import roc_curve

    fig, (ax,) = _new_figure(1, width=5.0, height=4.4)
    neg_values = result.values[result.in_group]
    for spec in result.specs:
        neg, pos = neg_values[spec.id], result.values[ood][spec.id]
        y = np.concatenate([np.zeros(neg.size), np.ones(pos.size)])
        fpr, tpr, _ = roc_curve(y, np.concatenate([neg, pos]))
        keep = np.unique(np.linspace(0, fpr.size - 1, min(fpr.size, ROC_VERTICES)).astype(int))  # ends kept
        fpr, tpr = fpr[keep], tpr[keep]
        auroc = next(r["auroc"] for r in result.rows if r["ood"] == ood and r["score"] == spec.id)
        ax.plot(fpr, tpr, label=f"{spec.label} ({auroc:.3f})", lw=1.4)
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    ax.axhline(0.8, color="0.8", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (in-dist flagged)",
           ylabel="true positive rate (OOD flagged)", title=wrap_title(f"{result.in_group} vs {ood}", 5.0))
    ax.legend(loc="lower right", fontsize=7, title="score (AUROC)", title_fontsize=7)
    return fig


def _histogram_panels(result: Analysis) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(title, group -> values) for log p(x) and each LLR>k."""
    ks = result.attrs["ks"]
    panels = [("log p(x) (ELBO, nats)", {g: d["elbo"] for g, d in result.groups.items()})]
    panels += [(f"LLR>{k} (nats)", {g: d["llr"][:, j] for g, d in result.groups.items()}) for j, k in enumerate(ks)]
    return panels


def _draw_histograms(ax: Any, title: str, series: dict[str, np.ndarray], legend: bool = True) -> None:
    """Density histograms on shared bins spanning the central 99.8% of the values (tails clipped in)."""
    allv = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    if allv.size == 0:
        ax.set_title(f"{title}: no finite values")
        return
    lo, hi = np.quantile(allv, [0.001, 0.999])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, int(np.clip(np.sqrt(allv.size), 10, 60)) + 1)
    colors = [f"C{i}" for i in range(10)]
    for i, (name, v) in enumerate(series.items()):
        v = np.clip(v[np.isfinite(v)], lo, hi)
        color = colors[i % len(colors)]
        ax.hist(v, bins=bins, density=True, histtype="stepfilled", alpha=0.3, color=color, label=name)
        ax.hist(v, bins=bins, density=True, histtype="step", lw=1, color=color)
    ax.set(title=title, ylabel="density")
    if legend:
        ax.legend(fontsize=7)


def _legend_below(fig: Figure, ax: Any) -> None:
    """One legend for every panel, below them (long dataset names would cover the histograms)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8, frameon=False)


def histogram_figure(result: Analysis, groups: list[str]) -> Figure:
    """log p(x) and LLR>k histograms of `groups` (the in-dist group first), one panel each."""
    panels = _histogram_panels(result)
    fig, axes = _new_figure(len(panels))
    for ax, (title, series) in zip(axes, panels):
        _draw_histograms(ax, title, {g: series[g] for g in groups}, legend=False)
    _legend_below(fig, axes[0])
    fig.suptitle(wrap_title(" vs ".join(groups), 4.2 * len(panels), 9), fontsize=9)
    return fig


def kl_figure(result: Analysis) -> Figure:
    """The mean KL of each latent layer (nats, one panel per layer, bottom first): in-dist vs every OOD set."""
    groups = [result.in_group, *result.ood_groups]
    num_layers = result.groups[result.in_group]["kl"].shape[1]
    fig, axes = _new_figure(num_layers, width=3.4, height=3.0)
    for i, ax in enumerate(axes):
        _draw_histograms(ax, f"KL of layer {i + 1} (nats)", {g: result.groups[g]["kl"][:, i] for g in groups},
                         legend=False)
    _legend_below(fig, axes[0])
    fig.suptitle("KL per latent layer: what each layer spends on the data", fontsize=9)
    return fig


def auroc_by_k_figure(result: Analysis) -> Figure:
    """AUROC of LLR>k against k, a line per OOD set; the -ELBO AUROC as a dashed line of the same colour."""
    fig, (ax,) = _new_figure(1, width=5.0, height=3.8)
    ks = result.attrs["ks"]
    auroc = {(r["ood"], r["score"]): r["auroc"] for r in result.rows}
    for i, ood in enumerate(result.ood_groups):
        ys = [auroc.get((ood, f"llr{k}"), np.nan) for k in ks]
        ax.plot(ks, ys, marker="o", color=f"C{i}", label=f"{ood}: LLR>k")
        if (ood, "nll") in auroc:
            ax.axhline(auroc[(ood, "nll")], color=f"C{i}", ls="--", lw=0.8)
    ax.axhline(0.5, color="0.7", ls=":", lw=0.8)
    ax.set(xlabel="k (layers decoded from the prior)", ylabel="AUROC", ylim=(0, 1.02), xticks=ks,
           title=wrap_title(f"AUROC of LLR>k, in-dist {result.in_group} (dashed: -ELBO)", 5.0))
    ax.legend(fontsize=7)
    return fig


def scatter_figure(result: Analysis, ood: str) -> Figure:
    """ELBO (x) against LLR>k (y) per example, one panel per k: in-dist vs one OOD set."""
    ks = result.attrs["ks"]
    fig, axes = _new_figure(max(1, len(ks)), width=3.8, height=3.4)
    for j, (ax, k) in enumerate(zip(axes, ks)):
        for i, g in enumerate((result.in_group, ood)):
            d = result.groups[g]
            ax.scatter(d["elbo"], d["llr"][:, j], s=4, alpha=0.4, color=f"C{i}", label=g, linewidths=0)
        ax.set(xlabel="ELBO (nats)", ylabel=f"LLR>{k} (nats)", title=f"ELBO vs LLR>{k}")
        ax.legend(fontsize=7, markerscale=3)
    return fig


def lid_scatter_figure(result: Analysis) -> Figure:
    """ELBO (x, nats) against LID_lin (y) per example, a colour per group, one panel per (lid k, scale)."""
    from hvae_dist.analysis.dual_threshold import lid_columns

    columns = lid_columns(result.attrs.get("lid"))
    fig, axes = _new_figure(max(1, len(columns)), width=4.0, height=3.6)
    groups = [result.in_group, *result.ood_groups]
    for ax, (_, j, s, k, delta) in zip(axes, columns):
        for i, g in enumerate(groups):
            d = result.groups[g]
            ax.scatter(d["elbo"], d["lid_lin"][:, j, s], s=5, alpha=0.5, color=f"C{i}", label=g, linewidths=0)
        z = "all latents" if k == 0 else f"z>{k}"
        ax.set(xlabel="log-likelihood: ELBO (nats)", ylabel=f"LID_lin (delta={delta:g})", title=f"LID of d mean / d {z}")
        ax.legend(fontsize=7, markerscale=3)
    fig.suptitle("likelihood vs local intrinsic dimension (OOD: high likelihood, low LID)", fontsize=9)
    return fig


def make_figures(result: Analysis) -> dict[str, Figure]:
    """name (file stem) -> figure: per OOD group its ROC curves, histograms and ELBO-LLR scatter; the
    all-groups histogram, the KL per layer and the AUROC of LLR>k against k."""
    figures: dict[str, Figure] = {}
    for ood in result.ood_groups:
        figures[f"roc_{file_stem(ood)}"] = roc_figure(result, ood)
        figures[f"hist_{file_stem(ood)}"] = histogram_figure(result, [result.in_group, ood])
        if result.attrs["ks"]:
            figures[f"scatter_{file_stem(ood)}"] = scatter_figure(result, ood)
    if len(result.ood_groups) > 1:
        figures["hist_all"] = histogram_figure(result, [result.in_group, *result.ood_groups])
    figures["kl_layers"] = kl_figure(result)
    if result.attrs["ks"] and any(s.family == "llr" for s in result.specs):
        figures["auroc_by_k"] = auroc_by_k_figure(result)
    if result.attrs.get("lid") and all("lid_lin" in d for d in result.groups.values()):
        figures["lid_scatter"] = lid_scatter_figure(result)
    return figures


def save_figures(figures: dict[str, Figure], out: Path, dpi: int = 120) -> list[Path]:
    """Write each figure to out/<name>.png (atomically: rendered in memory, then `write_bytes_atomic`)."""
    from hvae_dist.files import write_bytes_atomic

    paths = []
    for name, fig in figures.items():
        paths.append(write_bytes_atomic(out / f"{name}.png", figure_png(fig, dpi)))
    return paths


def tensorboard_dir(path: str | Path) -> Path:
    """A run dir (has config.json or tb/) maps to its tb/ folder; anything else is used as given."""
    path = Path(path)
    if (path / "tb").is_dir() or (path / "config.json").is_file():
        return path / "tb"
    return path


def write_tensorboard(path: str | Path, result: Analysis, markdown: str, figures: dict[str, Figure],
                      step: int = 0) -> Path:
    """Log the metrics table (text), the figures and every metric (scalar `ood/<metric>/<OOD>/<score id>`,
    `estimators.names.metric_key`)."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = tensorboard_dir(path)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        writer.add_text(f"ood/{file_stem(result.in_group)}/metrics", markdown, global_step=step)
        for name, fig in figures.items():
            writer.add_figure(f"ood/{file_stem(result.in_group)}/{name}", fig, global_step=step, close=False)
        for r in result.rows:
            for metric in ("auroc", "auprc", "fpr80"):
                writer.add_scalar(names.metric_key("ood", metric, file_stem(r["ood"]), r["score"]), r[metric],
                                  global_step=step)
    finally:
        writer.close()
    return log_dir
