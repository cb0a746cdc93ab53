"""The README documents what exists: every strategy key, every command, and the CI's install/test commands."""

from __future__ import annotations

from conftest import REPO

from llfarm.cli import cli
from llfarm.strategy import strategy_keys

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_strategy_key_is_in_the_reference():
    missing = sorted(k for k in strategy_keys() if f"`{k}`" not in README)
    assert not missing, f"README strategy reference lacks {missing}"


def test_every_command_is_documented():
    import click
    names = []
    for name, cmd in cli.commands.items():
        if cmd.hidden:                        # internal (`_detached`: the background half of `run --detach`)
            continue
        if isinstance(cmd, click.Group):
            names += [f"{name} {sub}" for sub in cmd.commands]
        else:
            names.append(name)
    missing = [n for n in names if f"llfarm {n}" not in README]
    assert not missing, missing


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt ".[dev]"' in README   # CI runs it from the README (test_user_path)
    assert ".venv/bin/pytest -q" in ci and ".venv/bin/pytest -q" in README
