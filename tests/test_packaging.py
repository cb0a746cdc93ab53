"""The README installs llfarm with `pip install ".[dev]"` — a real wheel, not the editable checkout the
developers work in. A module or data file left out of the wheel works for every developer and fails for every
user (a missing `llfarm.data` package once did exactly that), so build the wheel and compare it with the tree."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import shutil

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _sources():
    """(source folder, package name) pairs from pyproject's package-dir, the longest source first."""
    return [(ROOT / src, pkg) for pkg, src in SETUPTOOLS["package-dir"].items()]


def _files(folder: Path):
    for path in folder.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".pyc", ".pyo"}:
            yield path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # A copy without build/ and *.egg-info: setuptools reuses a stale build/lib, which hides a missing package.
    src = tmp_path_factory.mktemp("src") / "llfarm"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", "__pycache__", ".*_cache"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (built,) = out.glob("llfarm-*.whl")
    return built


def test_every_module_and_data_file_is_in_the_wheel(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    want = {}
    for folder, pkg in _sources():
        for path in _files(folder):
            want[f"{pkg.replace('.', '/')}/{path.relative_to(folder).as_posix()}"] = path.relative_to(ROOT)
    assert "llfarm/data/prepare.py" in want and "llfarm/backends/pytorch.py" in want
    missing = sorted(str(src) for dest, src in want.items() if dest not in names)
    assert not missing, f"left out of the wheel (add to pyproject's packages / package-data): {missing}"


def test_every_python_package_is_listed():
    found = set()
    for folder, pkg in _sources():
        for init in folder.rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add(".".join([pkg, *init.parent.relative_to(folder).parts]))
    missing = sorted(found - set(SETUPTOOLS["packages"]))
    assert not missing, f"packages missing from pyproject's [tool.setuptools] packages: {missing}"


def test_the_installed_wheel_imports_every_module(wheel, tmp_path):
    """The unpacked wheel — not the checkout — imports every module: what the README's quickstart failed on."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
        modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in zf.namelist()
                         if n.startswith("llfarm/") and n.endswith(".py") and "/builtin/" not in n
                         and not n.endswith("__main__.py"))          # `python -m llfarm` runs the CLI
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); import llfarm; "
            "assert llfarm.__file__.startswith(sys.argv[1]), llfarm.__file__; "
            "[importlib.import_module(m) for m in sys.argv[2:]]")
    proc = subprocess.run([sys.executable, "-c", code, str(target), *modules], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
