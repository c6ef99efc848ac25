"""Helpers shared by the tests, importable as `helpers.<module>` (pyproject's pytest `pythonpath` puts tests/
on sys.path): models (small preset architectures, seeded noise), train (configs, torchrun and CLI
drivers, checkpoint comparison), score (exact toy models, run dirs, the score CLI)."""
