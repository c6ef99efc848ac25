"""The comparison table in the paper's form: rows = OOD sets, columns = methods (scores), one table per metric
(AUROC, AUPRC, FPR80), each cell the value and, when `hvae analyze --bootstrap R` computed them, its 95%
interval [lo, hi]. Every score is oriented higher = more OOD (hvae_dist.analysis.metrics), so a larger AUROC
is always better and a smaller FPR80 is always better.

Written by `hvae analyze` as comparison.{md,csv,json,html} beside metrics.*; the markdown adds the paper's
number (`PAPER`) beside a cell when the in-distribution / OOD pair and the method are among those published.
"""
from __future__ import annotations

import csv
import html
import io
import json
from typing import Any

from hvae_dist.estimators.detection import METRICS

COMPARISON_FILES = ("comparison.md", "comparison.csv", "comparison.json", "comparison.html")
METRIC_LABELS = {"auroc": "AUROC", "auprc": "AUPRC", "fpr80": "FPR80"}

PAPER: dict[tuple[str, str], dict[str, tuple[float, str]]] = {
    ("FashionMNIST", "MNIST"): {
        "llr1": (0.986, "Havtorn et al. 2021, S=1000"),
        "likelihood_regret": (0.988, "Havtorn et al. 2021, Table 2"),
        "waic": (0.766, "Havtorn et al. 2021, 5 VAEs"),
        "background": (0.994, "Havtorn et al. 2021, Ren et al. with PixelCNN"),
    },
    ("MNIST", "FashionMNIST"): {
        "llr1": (0.999, "Havtorn et al. 2021, S=1000"),
    },
    ("CIFAR10", "SVHN"): {
        "llr2": (0.811, "Havtorn et al. 2021, HVAE"),
        "likelihood_regret": (0.875, "Havtorn et al. 2021"),
        "complexity_png": (0.833, "Havtorn et al. 2021, HVAE"),
        "waic": (0.628, "Havtorn et al. 2021, 5 PixelCNNs"),
        "typicality": (0.885, "Bergamin et al. 2022"),
        "dose_kde": (0.825, "Bergamin et al. 2022"),
        "gradnorm": (0.804, "Bergamin et al. 2022"),
        "score_stat": (0.733, "Bergamin et al. 2022"),
        "fisher": (0.870, "Bergamin et al. 2022"),
    },
}
"""Published AUROCs: (in-distribution dataset, OOD dataset) -> score id -> (AUROC, source)."""


def paper_auroc(in_group: str, ood_group: str, score: str) -> tuple[float, str] | None:
    """The published AUROC of `score` for this pair of groups ("Name/split"), or None."""
    return PAPER.get((in_group.split("/")[0], ood_group.split("/")[0]), {}).get(score)


def _cell(row: dict[str, Any], metric: str) -> str:
    value = f"{row[metric]:.3f}"
    if f"{metric}_lo" in row:
        value += f" [{row[f'{metric}_lo']:.3f}, {row[f'{metric}_hi']:.3f}]"
    return value


def comparison(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{"methods": [(id, label)], "ood": [groups], "cells": {metric: {ood: {id: row}}}} of metric rows."""
    methods: dict[str, str] = {}
    ood: dict[str, None] = {}
    cells: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in METRICS}
    for r in rows:
        methods.setdefault(r["score"], r["label"])
        ood.setdefault(r["ood"], None)
        for m in METRICS:
            cells[m].setdefault(r["ood"], {})[r["score"]] = r
    return {"methods": list(methods.items()), "ood": list(ood), "cells": cells}


def _pipe(text: str) -> str:
    return " ".join(str(text).splitlines()).replace("|", "\\|")


def format_comparison_markdown(rows: list[dict[str, Any]], in_group: str, escape=_pipe) -> str:
    """comparison.md: one table per metric; rows OOD sets, columns methods; "(paper X)" where published."""
    t = comparison(rows)
    ci = any("auroc_lo" in r for r in rows)
    lines = [f"# Comparison: {escape(in_group)} (in-distribution) vs each OOD set", "",
             "Every score: higher = more OOD. " + ("Cells: value [95% bootstrap interval]." if ci else
                                                    "No intervals (run hvae analyze --bootstrap R).")]
    for m in METRICS:
        lines += ["", f"## {METRIC_LABELS[m]}", "",
                  "| OOD | " + " | ".join(escape(label) for _, label in t["methods"]) + " |",
                  "|---|" + "---:|" * len(t["methods"])]
        for g in t["ood"]:
            cells = []
            for sid, _ in t["methods"]:
                r = t["cells"][m][g].get(sid)
                text = _cell(r, m) if r else "-"
                paper = paper_auroc(in_group, g, sid) if m == "auroc" else None
                cells.append(text + (f" (paper {paper[0]:.3f})" if paper else ""))
            lines.append(f"| {escape(g)} | " + " | ".join(cells) + " |")
    published = sorted({(g, sid) for g in t["ood"] for sid, _ in t["methods"] if paper_auroc(in_group, g, sid)})
    if published:
        lines += ["", "Paper numbers (AUROC): " + "; ".join(
            f"{sid} on {g}: {paper_auroc(in_group, g, sid)[1]}" for g, sid in published)]
    return "\n".join(lines) + "\n"


def comparison_records(rows: list[dict[str, Any]], in_group: str) -> list[dict[str, Any]]:
    """Long form (comparison.csv / .json): one record per OOD set x method x metric, with lo / hi and paper."""
    out = []
    for r in rows:
        for m in METRICS:
            paper = paper_auroc(in_group, r["ood"], r["score"]) if m == "auroc" else None
            out.append({"in_dist": r["in_dist"], "ood": r["ood"], "method": r["score"], "label": r["label"],
                        "metric": m, "value": r[m], "lo": r.get(f"{m}_lo"), "hi": r.get(f"{m}_hi"),
                        "paper": paper[0] if paper else None, "paper_source": paper[1] if paper else None,
                        "n_in": r["n_in"], "n_ood": r["n_ood"]})
    return out


def format_comparison_html(rows: list[dict[str, Any]], in_group: str) -> str:
    """comparison.html: the tables of comparison.md as HTML (names escaped)."""
    t = comparison(rows)
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>comparison</title>",
             f"<h1>{e(in_group)} (in-distribution) vs each OOD set</h1><p>Every score: higher = more OOD.</p>"]
    parts.append(comparison_html_tables(rows, in_group, t))
    return "\n".join(parts) + "\n"


def comparison_html_tables(rows: list[dict[str, Any]], in_group: str, t: dict[str, Any] | None = None) -> str:
    """The per-metric tables as an HTML fragment (also embedded in report.html)."""
    t = t or comparison(rows)
    e = html.escape
    parts = []
    for m in METRICS:
        head = "".join(f"<th>{e(label)}</th>" for _, label in t["methods"])
        body = []
        for g in t["ood"]:
            cells = []
            for sid, _ in t["methods"]:
                r = t["cells"][m][g].get(sid)
                paper = paper_auroc(in_group, g, sid) if m == "auroc" else None
                cells.append(f"<td>{e(_cell(r, m)) if r else '-'}"
                             + (f"<br><small>paper {paper[0]:.3f}</small>" if paper else "") + "</td>")
            body.append(f"<tr><th>{e(g)}</th>{''.join(cells)}</tr>")
        parts.append(f"<h2>{METRIC_LABELS[m]}</h2><table border='1'><tr><th>OOD</th>{head}</tr>{''.join(body)}</table>")
    return "\n".join(parts)


def comparison_texts(rows: list[dict[str, Any]], in_group: str, escape=_pipe,
                     csv_text=lambda s: s) -> dict[str, str]:
    """File name -> text of comparison.{md,csv,json,html}; `escape` / `csv_text` neutralise names that come
    from the score file in markdown / CSV (the report's own helpers)."""
    records = comparison_records(rows, in_group)
    table = io.StringIO(newline="")
    fields = ["in_dist", "ood", "method", "label", "metric", "value", "lo", "hi", "paper", "paper_source", "n_in", "n_ood"]
    w = csv.DictWriter(table, fieldnames=fields)
    w.writeheader()
    w.writerows({**r, "in_dist": csv_text(r["in_dist"]), "ood": csv_text(r["ood"])} for r in records)
    return {"comparison.md": format_comparison_markdown(rows, in_group, escape),
            "comparison.csv": table.getvalue(),
            "comparison.json": json.dumps({"in_dist": in_group, "higher_is_ood": True, "records": records}, indent=2) + "\n",
            "comparison.html": format_comparison_html(rows, in_group)}
