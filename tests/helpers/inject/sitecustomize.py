"""Test-only: started with tests/helpers/inject on PYTHONPATH (`helpers.faults.subprocess_env`), a child
process gets the patches of `helpers.faults` for the variables set in its environment, applied right after
the patched module is imported. Without those variables this does nothing."""
import os
import sys


def _install() -> None:
    import importlib.abc
    import importlib.machinery
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[2])
    if tests not in sys.path:
        sys.path.append(tests)
    from helpers import faults

    hooks = {}
    if os.environ.get(faults.NAN_ENV, "").strip():
        steps = faults.parse_steps(os.environ[faults.NAN_ENV])
        hooks["hvae_dist.train.engine"] = lambda m: faults.patch_nan_steps(m, steps)
    if os.environ.get(faults.TRACE_ENV):
        path = os.environ[faults.TRACE_ENV]
        hooks["hvae_dist.score.runner"] = lambda m: faults.patch_score_trace(m, path)
    if not hooks:
        return

    class AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in hooks:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return None
            run, hook = spec.loader.exec_module, hooks.pop(name)

            def exec_module(module):
                run(module)
                hook(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, AfterImport())


if os.environ.get("HVAE_DEBUG_NAN_AT_STEP", "").strip() or os.environ.get("HVAE_SCORE_TRACE"):
    _install()
