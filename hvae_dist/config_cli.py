"""`hvae config show PRESET|FILE [--set KEY=VALUE ...]`: the resolved config, every default filled in, as JSON.

The defaults live in the dataclasses of `hvae_dist.config`; a preset or file sets only what it changes.
This prints what a run would use (before the dataset fills in `model.input_shape`), validated as
`hvae train` validates it, so a typo fails here with the same message.
"""
from __future__ import annotations

import argparse

EXAMPLES = """examples:
  hvae config show tiny                                  # every field of the tiny preset, defaults included
  hvae config show fashionmnist --set train.lr=1e-3      # with an override, as hvae train --set takes it
  hvae config show my.json > resolved.json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT")
    sub.required = True
    show = sub.add_parser("show", help="print the resolved config (every default) as JSON",
                          description="print the resolved config (every default) as JSON", epilog=EXAMPLES)
    show.add_argument("config", metavar="PRESET|FILE", help="a preset name or a JSON config file")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set train.lr=1e-3 (repeatable; default: none)")


def run(args: argparse.Namespace) -> int:
    from hvae_dist.config import load_config

    print(load_config(args.config, args.overrides).to_json())
    return 0
