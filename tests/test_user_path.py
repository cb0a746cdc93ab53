"""The user's path: the README's commands exactly as written, from fresh directories, with relative paths.

Every other test passes absolute paths (`-o <tmp dir>`), which is how the README's first command once failed on a
fresh clone while the suite stayed green. These tests run the documented command text itself, in a fresh copy of
the checkout, with default options, and then use the run directory the way a user would: as the relative path
printed on the last line, from the directory they ran in — and from other directories.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LLFARM, REPO, llfarm, manifest, write

README = (REPO / "README.md").read_text(encoding="utf-8")
VENV = Path(sys.executable).parent.parent


def quickstart_command() -> str:
    """The README's first command: the fenced bash line under '## Quickstart' that runs the quickstart."""
    section = README.split("## Quickstart", 1)[1]
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            if "llfarm run quickstart" in line:
                return line.strip()
    raise AssertionError("README's Quickstart has no command that runs `llfarm run quickstart`")


def split_quickstart() -> tuple[list[str], str]:
    """(install steps, the llfarm step) of the README's first command."""
    steps = [s.strip() for s in quickstart_command().split("&&")]
    assert steps[-1].startswith(".venv/bin/llfarm "), steps
    return steps[:-1], steps[-1]


def fresh_checkout(dest: Path) -> Path:
    """A copy of the checkout as a clone would have it (tracked files only), with this suite's environment as
    its `.venv` (CI builds that environment with the README's own install steps: see .ci/run)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(VENV, target_is_directory=True)
    return dest


def bash(command: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 900):
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    """.ci/run executes the README's first command as written (read from README.md, not copied) and then its test
    command, so the install a user types is the install CI proves."""
    installs, _ = split_quickstart()
    assert installs == ["python3 -m venv .venv", '.venv/bin/pip install -c constraints.txt ".[dev]"'], installs
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "## Quickstart" in ci and "llfarm run quickstart" in ci, "CI must take the command from the README"
    assert ".venv/bin/pytest -q" in ci and "```bash\n.venv/bin/pytest -q\n```" in README


@pytest.fixture(scope="module")
def readme_quickstart(tmp_path_factory):
    """The README's quickstart step, literally, in a fresh copy of the checkout (default --output)."""
    root = fresh_checkout(tmp_path_factory.mktemp("clone"))
    _, step = split_quickstart()
    proc = bash(step, cwd=root, env={"HF_TOKEN": SECRET})
    assert proc.returncode == 0, f"`{step}` failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return root, proc


SECRET = "hf_llfarmTESTtokenABCDEFGHIJKLMNOPQRSTU"


@pytest.mark.slow
def test_readme_quickstart_as_written(readme_quickstart):
    root, proc = readme_quickstart
    last = proc.stdout.strip().splitlines()[-1]
    assert not Path(last).is_absolute() and last.startswith("runs/"), f"expected runs/<id>, printed {last!r}"
    run = root / last
    m = manifest(run)
    assert m["status"] == "completed"
    assert m["final_metrics"]["final_loss"] < 0.25 * m["final_metrics"]["first_loss"]
    assert list((run / "exports").glob("*.gguf")) and (run / "exports" / "Modelfile").is_file()
    for path in run.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert SECRET.encode() not in path.read_bytes(), f"token leaked into {path}"


@pytest.mark.slow
def test_readme_generate_and_export_on_the_printed_relative_path(readme_quickstart):
    root, proc = readme_quickstart
    last = proc.stdout.strip().splitlines()[-1]
    gen = bash(f'.venv/bin/llfarm generate {last} --prompt "What is the capital of France?"', cwd=root)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "Paris" in gen.stdout
    exp = bash(f".venv/bin/llfarm export {last} --format gguf --quant f16", cwd=root)
    assert exp.returncode == 0, exp.stderr[-3000:]
    assert (root / last / "exports" / "quickstart-f16.gguf").is_file()
    assert f"wrote {last}/exports/quickstart-f16.gguf" in exp.stderr, exp.stderr


# ---------------------------------------------------------------- relative paths from other directories

PROJECT_STRATEGY = """\
name: rel
model: {path: ./model}
template: chatml
data: {train: data/train.jsonl, max_length: 64}
training: {max_steps: 6, batch_size: 8, learning_rate: 1.0e-2, save_every: 3, logging_steps: 1}
"""


@pytest.fixture
def project(tmp_path):
    """A user's project: strategy, data (relative to the strategy) and a local model folder beside it."""
    from llfarm.resources import BUILTIN_DATA, resolve_builtin_model
    proj = tmp_path / "project"
    write(proj / "s.yaml", PROJECT_STRATEGY)
    write(proj / "data" / "train.jsonl", BUILTIN_DATA["alpaca"].read_text(encoding="utf-8"))
    shutil.copytree(resolve_builtin_model("builtin:tiny-llama"), proj / "model")
    (tmp_path / "work").mkdir()
    return tmp_path


@pytest.mark.slow
def test_run_resume_generate_export_with_relative_paths_from_elsewhere(project):
    work = project / "work"
    proc = llfarm("run", "../project/s.yaml", "--output", "out", "--run-id", "r1", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "out/r1"
    run = work / "out" / "r1"
    assert manifest(run)["status"] == "completed"
    assert manifest(run)["model_path"] == str((project / "project" / "model").resolve())

    # resume by a relative path, from the directory above
    proc = llfarm("resume", "work/out/r1", "--max-steps", "9", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "work/out/r1"
    assert manifest(run)["final_metrics"]["steps"] == 9

    # generate and export from a third directory, to a relative --out
    other = project / "project" / "data"
    gen = llfarm("generate", "../../work/out/r1", "--prompt", "What is the capital of France?", cwd=other)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-3000:]
    exp = llfarm("export", "../../work/out/r1", "--format", "ollama", "--quant", "f16", "--out", "exp", cwd=other)
    assert exp.returncode == 0, exp.stderr[-3000:]
    assert (other / "exp" / "rel-f16.gguf").is_file() and (other / "exp" / "Modelfile").is_file()
    assert "wrote exp/Modelfile" in exp.stderr
    # the manifest records where the export went so that it can be found from anywhere
    recorded = manifest(run)["exports"][-1]["paths"]
    assert all(Path(p).is_absolute() or (run / p).exists() for p in recorded), recorded
    assert any(Path(p) == (other / "exp" / "Modelfile").resolve() for p in recorded), recorded


def test_plan_and_validate_with_a_relative_strategy_and_data(project):
    work = project / "work"
    for cmd in ("validate", "plan"):
        proc = llfarm(cmd, "../project/s.yaml", cwd=work)
        assert proc.returncode == 0, proc.stderr
    proc = llfarm("validate", "s.yaml", "--set", "data.train=data/train.jsonl", cwd=project / "project")
    assert proc.returncode == 0, proc.stderr


def test_set_paths_are_relative_to_the_current_directory(project):
    """--set values are the user's words at the prompt: relative to where llfarm runs, not to the strategy."""
    work = project / "work"
    write(work / "mine.jsonl", '{"instruction": "a", "output": "b"}\n')
    proc = llfarm("plan", "../project/s.yaml", "--set", "data.train=mine.jsonl", "--set", "model.path=../project/model",
                  cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "# data: 1 train" in proc.stdout


# ---------------------------------------------------------------- validate does what plan checks

GOOD = """\
name: t
data: {train: "builtin:alpaca"}
training: {max_steps: 2}
"""


def test_validate_catches_a_misspelt_backend(tmp_path):
    write(tmp_path / "s.yaml", GOOD + "backend: pytorh\n")
    proc = llfarm("validate", "s.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown backend 'pytorh'" in proc.stderr and "did you mean 'pytorch'" in proc.stderr


def test_validate_checks_backend_options_and_capabilities(tmp_path):
    write(tmp_path / "s.yaml", GOOD + "backend_options: {pytorch: {optimm: adamw_torch}}\n")
    proc = llfarm("validate", "s.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "did you mean 'optim'" in proc.stderr
    write(tmp_path / "u.yaml", GOOD + "stage: sft\nbackend: unsloth\nmethod: {type: freeze}\n")
    proc = llfarm("validate", "u.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "freeze" in proc.stderr


def test_validate_takes_the_backend_flag(tmp_path):
    write(tmp_path / "s.yaml", GOOD.replace("builtin:alpaca", "builtin:preference") + "stage: rm\n")
    proc = llfarm("validate", "s.yaml", "--backend", "unsloth", cwd=tmp_path)
    assert proc.returncode == 2 and "reward-model" in proc.stderr
    proc = llfarm("validate", "s.yaml", "--backend", "pytorch", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- signals and pipes

def wait_for_steps(root: Path, n: int, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(root.glob("*/*/metrics.jsonl")) + list(root.glob("*/metrics.jsonl"))
        if found and found[0].read_text().count("\n") >= n:
            return found[0].parent
        time.sleep(0.3)
    raise AssertionError("training never started")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_is_handled_like_ctrl_c(tmp_path, sig):
    proc = subprocess.Popen([LLFARM, "run", "quickstart", "--set", "training.max_steps=100000",
                             "--set", "export.formats=[]", "--set", "training.save_every=1000000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = wait_for_steps(tmp_path, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-2000:])
    m = manifest(run)
    assert m["status"] == "interrupted", m["status"]
    assert "llfarm resume runs/" in err, err[-2000:]
    assert out.strip().splitlines()[-1] == f"runs/{run.name}"
    assert "Traceback" not in err


def test_closed_stdout_ends_quietly(tmp_path):
    """`llfarm plan quickstart | head -1`: the reader goes away; llfarm stops without a word."""
    proc = subprocess.Popen([LLFARM, "plan", "quickstart"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()                    # like `head -1` exiting before llfarm writes
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "", err
    piped = bash(f"{LLFARM} plan quickstart | head -1", cwd=tmp_path)
    assert piped.stdout.startswith("# strategy: ") and piped.stderr == "", piped.stderr
