"""CLI surface: help, backends, plan for every shipped strategy, lazy imports."""

from __future__ import annotations

import pytest
from conftest import heavy_imports, llfarm
from test_strategy import SHIPPED


def test_help_lists_commands():
    proc = llfarm("--help")
    assert proc.returncode == 0
    for cmd in ("strategies", "validate", "backends", "plan", "run", "resume", "generate", "export"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("argv", [["--help"], ["plan", "quickstart"], ["validate", "dpo"], ["backends"]])
def test_fast_commands_do_not_import_heavy_libraries(argv):
    assert heavy_imports(argv) == []


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_strategy_plans(name, tmp_path):
    proc = llfarm("plan", name, "--out", str(tmp_path / "plan"))
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()
    assert any(line.startswith("# backend: ") for line in header)
    from llfarm.strategy import resolve
    assert f"# stage: {resolve(name).strategy.stage}" in header
    assert (tmp_path / "plan" / "native" / "command.txt").is_file()


def test_plan_backend_flag_switches_backend(tmp_path):
    proc = llfarm("plan", "quickstart", "--backend", "llamafactory")
    assert proc.returncode == 0, proc.stderr
    assert "# backend: llamafactory" in proc.stdout.splitlines()


def test_backends_lists_every_backend():
    proc = llfarm("backends")
    assert proc.returncode == 0
    out = proc.stdout
    for name in ("pytorch", "llamafactory", "unsloth"):
        assert f"\n{name} " in out
    assert "broken" not in out


def test_plan_needs_no_backend_package_but_run_does(monkeypatch, tmp_path):
    from llfarm.backend import get_backend
    from llfarm.errors import BackendUnavailable
    from llfarm.runner import prepare_run
    from llfarm.strategy import resolve

    monkeypatch.setattr(get_backend("llamafactory"), "packages", ("llfarm_no_such_package",))
    res = resolve("quickstart", ["backend=llamafactory"])
    assert prepare_run(res, plan=True).backend.name == "llamafactory"
    with pytest.raises(BackendUnavailable, match="llfarm_no_such_package"):
        prepare_run(res)
