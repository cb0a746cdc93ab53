"""llfarm: one YAML strategy, many fine-tuning backends, one run directory."""

__version__ = "0.1.0"

# In a source checkout `backends/` sits beside this folder (pyproject.toml installs it as llfarm.backends).
# When the checkout is what Python imports (a script or `python -c` run from the repo root, even with a
# non-editable install present), let `import llfarm.backends` find it there too.
def _source_checkout_backends() -> None:
    from pathlib import Path
    here = Path(__file__).resolve().parent
    if not (here / "backends").is_dir() and (here.parent / "backends" / "__init__.py").is_file():
        __path__.append(str(here.parent))  # noqa: F821 - a package's __path__


_source_checkout_backends()
