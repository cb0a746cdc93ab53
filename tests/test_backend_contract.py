"""The backend contract (ibis-style): every registered backend must pass these compile-level checks on any
machine — no GPU, no backend package, no training. A new backend (one module under backends/ plus its entry point)
is picked up here with no other edit.

Expected gaps are data: MARKS names the (backend, case) cells a backend cannot do, each a strict xfail that names
the exception it must raise; a cell that starts passing, or fails another way, fails the suite.
"""

from __future__ import annotations

import itertools
import re

import pytest
from conftest import REPO, heavy_imports, llfarm, write

from llfarm.backend import registry
from llfarm.errors import BackendUnavailable, UnsupportedError
from llfarm.runner import create_run, prepare_run
from llfarm.strategy import resolve

BACKENDS = list(registry())
STAGES = ("sft", "dpo", "rm")
METHODS = ("lora", "qlora", "full", "freeze")


def never(reason: str, raises=UnsupportedError):
    return pytest.mark.xfail(strict=True, raises=raises, reason=f"never: {reason}")


MARKS = {
    **{("unsloth", "rm", m): never("Unsloth has no reward-model API") for m in METHODS},
    **{("unsloth", s, "freeze"): never("freezing layers is not an Unsloth feature") for s in ("sft", "dpo")},
}


def overrides(stage: str, method: str) -> list[str]:
    return [f"stage={stage}", f"method.type={method}", "training.max_steps=3", "export.formats=[]",
            *(["data.train=builtin:preference"] if stage != "sft" else [])]


@pytest.fixture
def no_packages(monkeypatch):
    """As if no backend's package were installed."""
    for b in registry().values():
        monkeypatch.setattr(b, "packages", ("llfarm_no_such_package",))


def cells():
    for backend, stage, method in itertools.product(BACKENDS, STAGES, METHODS):
        marks = [MARKS[(backend, stage, method)]] if (backend, stage, method) in MARKS else []
        yield pytest.param(backend, stage, method, marks=marks, id=f"{backend}-{stage}-{method}")


@pytest.mark.parametrize("backend,stage,method", list(cells()))
def test_plan_every_stage_and_method_without_the_package(backend, stage, method, tmp_path, no_packages):
    """plan compiles without the backend's package (and for a GPU it lacks); native files and command written,
    the trainer named, the strategy's values in what the trainer gets."""
    prep = prepare_run(resolve("quickstart", overrides(stage, method)), backend, plan=True)
    assert prep.backend.name == backend
    ctx, native = create_run(prep, tmp_path, run_id="plan")
    assert native.files and all(f.is_file() and f.is_relative_to(ctx.run.native) for f in native.files)
    assert (ctx.run.native / "command.txt").read_text().strip()
    assert native.trainer and native.total_steps == 3
    text = "".join(f.read_text() for f in native.files)
    assert "learning_rate" in text and "0.01" in text, "the trainer arguments are in the native files"


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_needs_the_package(backend, no_packages):
    with pytest.raises((BackendUnavailable, UnsupportedError)) as exc:
        prepare_run(resolve("quickstart"), backend)
    assert "llfarm_no_such_package" in str(exc.value) or "cannot run here" in str(exc.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capability_table_matches_the_marks(backend):
    """What the table refuses is exactly what MARKS expects (the table is the data; MARKS keeps it honest)."""
    caps = registry()[backend].capabilities
    refused = {(s, m) for s, m in itertools.product(STAGES, METHODS) if s not in caps.stages or m not in caps.methods}
    assert refused == {(s, m) for (b, s, m) in MARKS if b == backend}


@pytest.mark.parametrize("backend", BACKENDS)
def test_option_typo_is_one_line_with_file_line_and_did_you_mean(backend, tmp_path):
    write(tmp_path / "s.yaml", f"name: t\ndata: {{train: 'builtin:alpaca'}}\nbackend: {backend}\n"
                                   f"backend_options:\n  {backend}:\n    optimm: adamw_torch\n")
    proc = llfarm("plan", "s.yaml", cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"unknown key 'backend_options.{backend}.optimm'" in err and "s.yaml:6" in err
    assert "did you mean 'optim'" in err


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_imports_nothing_heavy(backend):
    assert heavy_imports(["plan", "quickstart", "--backend", backend]) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_declares_what_the_core_needs(backend):
    b = registry()[backend]
    assert b.name == backend and b.summary and b.packages and b.distributions
    assert isinstance(b.priority, int) and b.capabilities.stages and b.capabilities.platforms
    assert hasattr(b.options, "model_validate")
    assert b.options.model_validate({}) is not None


def test_exactly_one_default_backend():
    assert sum(b.default for b in registry().values()) == 1


def test_unknown_backend_under_backend_options(tmp_path):
    write(tmp_path / "s.yaml", "name: t\ndata: {train: 'builtin:alpaca'}\nbackend_options: {pytorh: {}}\n")
    proc = llfarm("validate", "s.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "unknown backend 'pytorh'" in proc.stderr and "did you mean 'pytorch'" in proc.stderr
    assert "s.yaml:3" in proc.stderr


def test_the_core_names_no_backend():
    """llfarm/ (the core, schema, runner, CLI) and templates/ never name a backend: backends are data."""
    word = re.compile(r"\b(" + "|".join(map(re.escape, registry())) + r")\b")
    offenders = []
    for path in [*sorted((REPO / "llfarm").rglob("*.py")), *sorted((REPO / "templates").glob("*.yaml"))]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if word.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
