"""report.html: the analysis as one self-contained page (tables and every figure embedded as base64 PNG,
inline CSS, no script, no network access), to open in a browser instead of reading metrics.md."""
from __future__ import annotations

import base64
import html
from typing import Any

from hvae_dist.analysis.metrics import Analysis

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: 600; } figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; } img { max-width: 100%; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def _png_data_uri(fig: Any, dpi: int = 110) -> str:
    from hvae_dist.analysis.plots import figure_png

    return "data:image/png;base64," + base64.b64encode(figure_png(fig, dpi)).decode("ascii")


def _metrics_table(result: Analysis) -> str:
    e = html.escape
    rows = []
    for ood in result.ood_groups:
        mine = [r for r in result.rows if r["ood"] == ood]
        best = max(r["auroc"] for r in mine)
        for r in mine:
            cls = ' class="num best"' if r["auroc"] == best else ' class="num"'
            rows.append(f"<tr><td>{e(ood)}</td><td>{e(r['label'])}</td><td{cls}>{r['auroc']:.4f}</td>"
                        f"<td class=\"num\">{r['auprc']:.4f}</td><td class=\"num\">{r['fpr80']:.4f}</td>"
                        f"<td class=\"num\">{r['n_in']}</td><td class=\"num\">{r['n_ood']}</td></tr>")
    head = ("<tr><th>OOD set</th><th>score</th><th>AUROC</th><th>AUPRC</th><th>FPR80</th>"
            "<th>n in-dist</th><th>n OOD</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def build_html(result: Analysis, figures: dict[str, Any]) -> str:
    """The page for `result` with every figure of `figures` (name -> matplotlib Figure) embedded."""
    e = html.escape
    a = result.attrs
    facts = [("score file", str(result.score_file)), ("in-distribution (negatives)", result.in_group),
             ("OOD sets (positives)", ", ".join(result.ood_groups))]
    facts += [(k, str(a[k])) for k in ("model_checkpoint", "checkpoint_step", "checkpoint_file", "iw_samples", "ks", "seed",
                                       "created") if k in a]
    if result.background_file:
        facts.append(("background score file", str(result.background_file)))
    signs = "".join(f"<tr><td>{e(s.label)}</td><td><code>{e(s.id)}</code></td><td>{e(s.meaning)}</td></tr>"
                    for s in result.specs)
    figs = "".join(f'<figure><img alt="{e(name)}" src="{_png_data_uri(fig)}"><figcaption>{e(name)}.png'
                   "</figcaption></figure>" for name, fig in figures.items())
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>OOD metrics: {e(result.in_group)}</title><style>{_CSS}</style></head><body>"
            f"<h1>OOD metrics: {e(result.in_group)} vs {e(', '.join(result.ood_groups))}"
            + (f" (checkpoint step {int(a['checkpoint_step'])})" if "checkpoint_step" in a else "") + "</h1>"
            "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts) + "</table>"
            "<h2>Metrics</h2><p>Negatives (label 0): in-distribution; positives (label 1): OOD; FPR80 = the false "
            "positive rate at a true positive rate of at least 0.8. Bold: the best AUROC per OOD set.</p>"
            + _metrics_table(result)
            + "<h2>Sign convention (every score: higher = more OOD)</h2><table><tr><th>score</th><th>id</th>"
            f"<th>value</th></tr>{signs}</table><h2>Figures</h2>{figs}</body></html>\n")
