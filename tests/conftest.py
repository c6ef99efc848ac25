"""Tests are grouped by area (core, kernels, train, score, analysis, submit); shared helpers live in the
importable `helpers` package, not here."""
