"""Out-of-distribution analysis of score files: metrics (scores, AUROC / AUPRC / FPR80), report (tables,
files, TensorBoard), plots (ROC curves, histograms) and the `hvae analyze` command (cli)."""
from hvae_dist.analysis.metrics import Analysis, compute_metrics, run_analysis
from hvae_dist.analysis.report import analyze, format_markdown, format_text, report

__all__ = ["Analysis", "analyze", "compute_metrics", "format_markdown", "format_text", "report", "run_analysis"]
