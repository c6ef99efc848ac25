"""House rules that keep the code navigable (the import layers are checked by `make lint`), and the
packaging: setup.cfg holds the metadata the build reads, pyproject.toml the build system and tool settings."""
from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hvae_dist"
MAX_LINES = 600


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*") if p.suffix in (".py", ".h", ".cpp", ".cu")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by responsibility (STYLE.md): {long}"


def _grep(pattern: str, *folders: str) -> list[str]:
    """`grep -rnE pattern folders` over the package's Python files: the matching lines."""
    regex = re.compile(pattern)
    return [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for folder in folders for p in sorted((REPO / folder).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if regex.search(line)]


def test_jobs_and_experiments_call_functions_not_the_command_line():
    # issue 20's `grep -rnE "cli\.main|argv\.index|score.args" hvae_dist/submit hvae_dist/experiments`
    assert not _grep(r"cli\.main|argv\.index|score.args", "hvae_dist/submit", "hvae_dist/experiments")


def test_no_test_hooks_in_the_package():
    # issue 20's `grep -rn "HVAE_DEBUG\|HVAE_SCORE_TRACE" hvae_dist`: fault injection lives in tests/helpers/faults.py
    assert not _grep(r"HVAE_DEBUG|HVAE_SCORE_TRACE", "hvae_dist")


def _import_contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_linter_keeps_train_and_score_independent_and_no_cycles():
    layers = [c for c in _import_contracts() if c["type"] == "layers"]
    assert len(layers) == 1
    siblings = [[m.strip() for m in layer.split("|")] for layer in layers[0]["layers"] if "|" in layer]
    assert ["hvae_dist.train", "hvae_dist.score"] in siblings   # "|": independent (neither imports the other)
    assert any(c["type"] == "acyclic_siblings" for c in _import_contracts())
    listed = {m.strip() for layer in layers[0]["layers"] for m in re.split(r"[|:]", layer)}
    missing = {m for m in listed
               if not (REPO / Path(*m.split("."))).is_dir() and not (REPO / f"{Path(*m.split('.'))}.py").is_file()}
    assert not missing, f"import-linter names modules that do not exist: {missing}"


def test_lint_imports_passes():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("lint-imports is not installed in this environment (pip install -e '.[dev]')")
    done = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 broken" in done.stdout


def test_setup_cfg_holds_the_package_metadata_and_pyproject_the_build_system_and_tools():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["metadata"]["name"] == "hvae-dist" and cfg["metadata"]["version"] == "attr: hvae_dist.__version__"
    assert cfg["options"]["packages"] == "find:" and "torch" in cfg["options"]["install_requires"]
    assert cfg["options.entry_points"]["console_scripts"].strip() == "hvae = hvae_dist.cli:main"
    extras = cfg["options.extras_require"]
    assert "pandas" in extras["dev"] and "pandas" in extras["pandas"] and {"datasets", "pyarrow"} <= set(
        re.findall(r"^\s*([\w-]+)", extras["hf"], re.M))
    globs = cfg["options.package_data"]["hvae_dist"].split()
    kernel_sources = {p.relative_to(PACKAGE) for p in (PACKAGE / "kernels" / "csrc").iterdir()}
    packaged = {p.relative_to(PACKAGE) for g in globs for p in PACKAGE.glob(g)}
    assert kernel_sources <= packaged and any(p.parts[0] == "presets" for p in packaged)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert set(pyproject) == {"build-system", "tool"} and "setuptools" not in pyproject["tool"]


def test_the_wheel_holds_the_presets_the_kernel_sources_and_the_console_script(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "hvae_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("hvae_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    from hvae_dist import __version__
    assert wheel.name.startswith(f"hvae_dist-{__version__}-")
    for p in [*(PACKAGE / "presets").glob("*.json"), *(PACKAGE / "kernels" / "csrc").iterdir()]:
        assert p.relative_to(REPO).as_posix() in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hvae = hvae_dist.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
