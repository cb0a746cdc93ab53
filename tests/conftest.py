"""Shared fixtures: the installed `llfarm` command, offline hub, small runs in tmp dirs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The training processes the tests start run torch on one thread: on a 2-core CI machine where pytest, llfarm and its
# child share the cores, torch's default (one thread per core) made the tiny model's training loop 15x slower
# (quickstart, 60 steps: 61.9 s against 3.95 s, the same final loss to the last bit).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One data/token cache for the whole session, away from the user's ~/.cache/llfarm.
os.environ.setdefault("LLFARM_CACHE", tempfile.mkdtemp(prefix="llfarm-test-cache-"))

LLFARM = str(Path(sys.executable).parent / "llfarm")
REPO = Path(__file__).resolve().parent.parent


def llfarm(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the installed CLI in a real process (so exit codes and tracebacks are what a user sees)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([LLFARM, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cli():
    return llfarm


@pytest.fixture(autouse=True)
def _sigint_as_a_terminal_gives_it():
    """Every test starts llfarm with Ctrl-C as a terminal delivers it: a library used in-process by an earlier test
    may leave SIGINT ignored or blocked in this process, and children inherit both (the SIGINT tests then failed
    only after other tests, never alone)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    yield


def process_gone(pid: int) -> bool:
    """The process no longer runs (it does not exist, or it is a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float = 180, what: str = "condition") -> None:
    """Poll ``predicate`` every 0.2 s until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_dir_from(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, f"llfarm failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


HEAVY = ("torch", "transformers", "peft", "trl", "llamafactory", "unsloth", "datasets", "accelerate", "matplotlib")


def heavy_imports(argv: list[str]) -> list[str]:
    """The heavy libraries `llfarm <argv>` imports in the CLI process (it must succeed)."""
    code = ("import sys\nfrom llfarm.cli import cli\n"
            f"try:\n    cli({argv!r}, prog_name='llfarm')\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY "))
    return eval(line[len("HEAVY "):])  # noqa: S307 - our own printed list


def one_line_error(proc: subprocess.CompletedProcess, expect: list[str] | tuple[str, ...] = (), code: int = 2) -> str:
    """Bad input's contract: exit ``code``, one `llfarm: error:` line on stderr holding every piece of ``expect``,
    no traceback. Returns the line."""
    err = proc.stderr.strip()
    assert proc.returncode == code, f"exit {proc.returncode}: {err}\n{proc.stdout}"
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("llfarm: error:"), err
    for piece in expect:
        assert piece in err, f"{piece!r} not in: {err}"
    return err


OPT_IN = {
    "rl": "opt-in: minutes-long reinforcement-learning runs; run them with pytest -m rl",
    "heavy": "opt-in: a longer variant of a check the default suite makes; run them with pytest -m heavy",
}


def pytest_collection_modifyitems(config, items):
    """Opt-in markers (OPT_IN) run only when -m names them: CI's default suite stays within its time."""
    asked = config.getoption("-m") or ""
    for marker, reason in OPT_IN.items():
        if marker in asked:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
