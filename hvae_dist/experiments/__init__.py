"""Experiments, one command each: `hvae demo` (the paper's headline on offline data, cli.py) and `hvae poster`
(the paper's table, poster.py); their stages call the functions behind the commands (stages.py)."""
