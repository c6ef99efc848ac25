"""Experiments, one command each: `hvae demo` (the paper's headline on offline data, cli.py)."""
