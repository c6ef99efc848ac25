"""What `hvae analyze` writes: the terminal table, metrics.{md,csv,json}, figures and TensorBoard.

The report folder is replaced as a whole (`hvae_dist.files.staged_folder`: written beside it, then swapped
in), so a full disk, SIGTERM or Ctrl-C leave the previous report or none, never a 0-byte metrics.md nor new
tables beside the previous run's figures; files of the folder that the report does not write are kept.
TensorBoard event files are appended by TensorBoard's own writer.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hvae_dist.analysis.comparison import COMPARISON_FILES, comparison_texts
from hvae_dist.analysis.metrics import Analysis, run_analysis
from hvae_dist.estimators.detection import METRICS
from hvae_dist.files import require_folder, staged_folder, with_path, write_bytes_atomic, write_text_atomic

REPORT_FILES = ("metrics.md", "metrics.csv", "metrics.json", "report.html")
FIGURE_PREFIXES = ("roc_", "hist_", "scatter_", "kl_layers", "auroc_by_k", "lid_scatter")


def is_report_file(name: str) -> bool:
    """Whether a file of the report folder is one that `report` writes (replaced by the next report; any
    other file there is kept)."""
    return name in REPORT_FILES or name in COMPARISON_FILES or (name.endswith(".png") and name.startswith(FIGURE_PREFIXES))


def analyze(score_file: str | Path, in_dist: str, out_dir: str | Path | None = None,
            background: str | Path | None = None, scores: list[str] | None = None,
            plots: bool = True, tensorboard: str | Path | None = None, bootstrap: int = 0,
            bootstrap_seed: int = 0, dose: str | None = None, ensemble: list | None = None) -> list[dict[str, Any]]:
    """Metric rows (one per OOD group x score: in_dist, ood, score, label, auroc, auprc, fpr80, n_in,
    n_ood, orientation). With `out_dir`, also writes metrics.{md,csv,json} (and PNGs unless plots=False)
    there; with `tensorboard`, logs the table, figures and metrics to that run / TensorBoard dir. bootstrap > 0:
    95% intervals (`<metric>_lo` / `_hi`) from that many resamples (hvae_dist.analysis.intervals)."""
    figures = plots and (out_dir is not None or tensorboard is not None)
    result = run_analysis(score_file, in_dist, background=background, scores=scores, figures=figures,
                          bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, dose=dose, ensemble=ensemble)
    report(result, out_dir, plots=figures, tensorboard=tensorboard)
    return result.rows


def report(result: Analysis, out_dir: str | Path | None, plots: bool = True,
           tensorboard: str | Path | None = None, tb_step: int = 0) -> list[Path]:
    """Write the tables (and figures) of `result` to out_dir and/or TensorBoard; returns the files written."""
    from hvae_dist.analysis import plots as plotting

    written: list[Path] = []
    plots = plots and bool(result.groups)        # run_analysis(figures=False) keeps no rows to draw
    figures = plotting.make_figures(result) if plots and (out_dir is not None or tensorboard is not None) else {}
    if out_dir is not None:
        out = require_folder(out_dir, "--out")
        # Written beside the old report and swapped in whole: a stop (SIGTERM, Ctrl-C) or a full disk leaves
        # the previous report, never new tables beside old figures. Other files in the folder are kept.
        with staged_folder(out, keep=lambda entry: not is_report_file(entry.name)) as stage:
            try:
                files = write_tables(result, stage) + plotting.save_figures(figures, stage)
                if plots:
                    from hvae_dist.analysis.html import build_html

                    files.append(write_bytes_atomic(stage / "report.html", build_html(result, figures).encode()))
            except OSError as e:   # name the file the user asked for, not its staged copy
                name = Path(e.filename).name if e.filename else ""
                raise with_path(e, out / name) from e
        written += [out / p.name for p in files]
    if tensorboard is not None:
        plotting.write_tensorboard(tensorboard, result, format_markdown(result), figures, step=tb_step)
    return written


# ------------------------------------------------------------------------------------------------ tables
def sign_convention(result: Analysis) -> list[tuple[str, str, str]]:
    """(label, id, what it is) for each score of the analysis; every score: higher = more OOD."""
    return [(s.label, s.id, s.meaning) for s in result.specs]


def format_text(result: Analysis) -> str:
    """The terminal table: one block per OOD set, one line per score, then the sign convention."""
    width = max(len(s.label) for s in result.specs)
    lines = [f"in-distribution (negatives): {result.in_group}  (n={result.rows[0]['n_in']})", ""]
    header = f"{'OOD (positives)':<24} {'score':<{width}}  {'AUROC':>7} {'AUPRC':>7} {'FPR80':>7}"
    lines += [header, "-" * len(header)]
    for g in result.ood_groups:
        shown = " ".join(g.splitlines())   # a name from the score file: one line
        for r in (r for r in result.rows if r["ood"] == g):
            ci = f"  AUROC 95% [{r['auroc_lo']:.4f}, {r['auroc_hi']:.4f}]" if "auroc_lo" in r else ""
            lines.append(f"{shown:<24} {r['label']:<{width}}  {r['auroc']:7.4f} {r['auprc']:7.4f} {r['fpr80']:7.4f}{ci}")
        lines.append("")
    lines.append("sign convention: every score is oriented so that higher = more OOD")
    lines += [f"  {label:<{width}}  {meaning}" for label, _, meaning in sign_convention(result)]
    return "\n".join(lines)


def format_markdown(result: Analysis) -> str:
    """metrics.md: provenance, the metrics table and the sign convention table. Group names come from the
    score file, which may hold any text: they are escaped (`_md_name`) so that none breaks a line or the table."""
    a = result.attrs
    lines = [f"# OOD metrics: {_md_name(result.in_group)} (in-distribution) vs "
             f"{_md_name(', '.join(result.ood_groups))}", "",
             f"- score file: `{result.score_file}`"]
    if result.background_file:
        lines.append(f"- background score file: `{result.background_file}`")
    for key in ("model_checkpoint", "checkpoint_step", "iw_samples", "ks", "seed", "created"):
        if key in a:
            lines.append(f"- {key}: {a[key]}")
    if a.get("checkpoint_file"):
        lines.append(f"- checkpoint_file: {a['checkpoint_file']} (the numbered checkpoint file of that step)")
    lines += ["- negatives (label 0): in-distribution; positives (label 1): OOD; FPR80 = FPR at TPR >= 0.8", "",
              "| OOD | score | AUROC | AUPRC | FPR80 | n in-dist | n OOD |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {_md_name(r['ood'])} | {_md(r['label'])} | {_with_ci(r, 'auroc')} | {_with_ci(r, 'auprc')} "
                     f"| {_with_ci(r, 'fpr80')} | {r['n_in']} | {r['n_ood']} |")
    if result.bootstrap:
        lines += ["", f"Brackets: 95% percentile-bootstrap interval, {result.bootstrap} resamples of the in-dist and OOD "
                  f"rows (independently), seed {result.bootstrap_seed}."]
    lines += ["", "## Sign convention (every score: higher = more OOD)", "", "| score | id | value |", "|---|---|---|"]
    lines += [f"| {_md(label)} | `{sid}` | {_md(meaning)} |" for label, sid, meaning in sign_convention(result)]
    return "\n".join(lines) + "\n"


def _with_ci(row: dict[str, Any], metric: str) -> str:
    """`0.9860 [0.9790, 0.9920]` when the row has an interval, else the value."""
    text = f"{row[metric]:.4f}"
    return text + (f" [{row[metric + '_lo']:.4f}, {row[metric + '_hi']:.4f}]" if metric + "_lo" in row else "")


def _md(text: str) -> str:
    """`text` as one line of a markdown table cell: line breaks as spaces, backslashes and `|` escaped."""
    text = " ".join(str(text).splitlines())
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _md_name(text: str) -> str:
    """A name from the score file (any text) in metrics.md: `_md`, and markdown's link / HTML / code
    characters escaped, so that it shows as the text it is."""
    text = _md(text)
    for c in ("<", ">", "[", "]", "`"):
        text = text.replace(c, "\\" + c)
    return text


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet reads a CSV cell that starts with one of these as a formula (OWASP's CSV injection list)."""


def _csv_text(text: str) -> str:
    """A cell of metrics.csv that came from the score file (a group name), neutralised against formula
    injection: a leading formula character is preceded by an apostrophe, which spreadsheets show as text."""
    text = str(text)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_tables(result: Analysis, out: Path) -> list[Path]:
    """metrics.md, metrics.csv and metrics.json in `out`."""
    md, csv_path, js = out / "metrics.md", out / "metrics.csv", out / "metrics.json"
    write_text_atomic(md, format_markdown(result))
    fields = ["in_dist", "ood", "score", "label", *METRICS, "n_in", "n_ood"]
    if result.bootstrap:
        fields += [f"{m}_{end}" for m in METRICS for end in ("lo", "hi")]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    # Group names come from the score file: neutralised. Our labels (-ELBO, LLR>1) are written as they are.
    w.writerows({**r, "in_dist": _csv_text(r["in_dist"]), "ood": _csv_text(r["ood"])} for r in result.rows)
    write_text_atomic(csv_path, table.getvalue())
    meta = {k: result.attrs[k] for k in ("model_checkpoint", "model_sha256", "checkpoint_step", "iw_samples", "ks", "seed",
                                         "created", "format_version", "package_version", "checkpoint_file",
                                         "row_selection") if k in result.attrs}
    doc = {"score_file": str(result.score_file), "in_dist": result.in_group, "ood": result.ood_groups,
           "background_file": str(result.background_file) if result.background_file else None,
           "typicality_reference": result.typicality_ref, "attrs": meta,
           "sign_convention": {"higher_is_ood": True,
                               "scores": [{"id": s.id, "label": s.label, "value": s.meaning} for s in result.specs]},
           "bootstrap": {"replicates": result.bootstrap, "seed": result.bootstrap_seed, "level": 0.95}
           if result.bootstrap else None,
           "rows": result.rows}
    write_text_atomic(js, json.dumps(doc, indent=2) + "\n")
    written = [md, csv_path, js]
    # The comparison table in the paper's form (hvae_dist.analysis.comparison), beside metrics.*
    for name, text in comparison_texts(result.rows, result.in_group, _md_name, _csv_text).items():
        written.append(write_text_atomic(out / name, text))
    return written


def checkpoint_step(attrs: dict[str, Any]) -> int | None:
    """The training step of the checkpoint a score file was made with: its `checkpoint_step` attribute (score files
    since issue 24), else the step stored in its `model_checkpoint` file when that file is still there, else None."""
    if "checkpoint_step" in attrs:
        return int(attrs["checkpoint_step"])
    path = attrs.get("model_checkpoint")
    if path and Path(path).is_file():
        from hvae_dist.checkpoint import load_checkpoint
        from hvae_dist.errors import CheckpointError

        try:
            return int(load_checkpoint(path)["step"])
        except CheckpointError:
            return None
    return None
