"""Fault injection: kill real runs of the tiny model at several points and resume each to the final step.

One uninterrupted run (24 steps, a checkpoint every 4, a loss logged every step) is the reference. Each case starts
the same run and breaks it — SIGKILL of llfarm, SIGKILL of the training process, SIGKILL in the middle of a
checkpoint save (LLFARM_FAULT_KILL_IN_SAVE: weights written, optimizer file cut in half, no trainer state, no
completeness marker), a full disk during a save (the optimizer file is a link to /dev/full) — then `llfarm resume`
continues it. The resumed run must end at step 24 with exactly the reference's final loss (CPU training is
deterministic, and resume restores the optimizer, scheduler and RNG state of a complete checkpoint), its status
`completed`, exit_code 0, every step logged once, and no lock left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LLFARM, llfarm, manifest, metrics, process_gone

pytestmark = pytest.mark.slow

STEPS = 24
SETTINGS = ["--set", f"training.max_steps={STEPS}", "--set", "training.save_every=4", "--set", "training.logging_steps=1",
            "--set", "export.formats=[]"]
RESULTS: dict[str, dict] = {}          # printed at the end of the module (pytest -s)


def start(out: Path, run_id: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([LLFARM, "run", "quickstart", "-o", str(out), "--run-id", run_id, *SETTINGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))


def logged_step(run: Path) -> int:
    try:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return max((r.get("step", 0) for r in rows), default=0)


def wait_until(predicate, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)        # a one-thread step of the tiny model takes ~0.1 s: look often
    raise AssertionError("timed out")


def newest_marked(run: Path, killed_at: int) -> str:
    """The checkpoint resume should take: the newest one marked complete — at most one save behind the kill (a
    kill can land in the middle of saving the newest)."""
    steps = [int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*/llfarm-complete.json")]
    assert steps and max(steps) >= killed_at // 4 * 4 - 4, (steps, killed_at)
    return f"checkpoint-{max(steps)}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> float:
    out = tmp_path_factory.mktemp("reference")
    proc = llfarm("run", "quickstart", "-o", str(out), "--run-id", "ref", *SETTINGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = manifest(out / "ref")
    assert m["final_metrics"]["steps"] == STEPS
    RESULTS["uninterrupted"] = {"final_loss": m["final_metrics"]["final_loss"]}
    return m["final_metrics"]["final_loss"]


def resume_and_check(run: Path, reference: float, case: str, expect_from: str, **extra) -> None:
    proc = llfarm("resume", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {run} from {expect_from}" in proc.stderr, proc.stderr[-2000:]
    m = manifest(run)
    final = m["final_metrics"]["final_loss"]
    RESULTS[case] = {"resumed_from": expect_from, "final_loss": final, **extra}
    assert m["status"] == "completed" and m["exit_code"] == 0 and m["final_metrics"]["steps"] == STEPS
    assert final == reference, f"{case}: resumed to loss {final}, uninterrupted {reference}"
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, STEPS + 1))
    assert not (run / "run.lock").exists()
    complete = sorted(p.parent.name for p in (run / "checkpoints").glob("checkpoint-*/llfarm-complete.json"))
    assert f"checkpoint-{STEPS}" in complete


@pytest.mark.parametrize("at_step", [6, pytest.param(15, marks=pytest.mark.heavy)])
def test_sigkill_of_llfarm(tmp_path, reference, at_step):
    run = tmp_path / "r"
    proc = start(tmp_path, "r")
    wait_until(lambda: logged_step(run) >= at_step)
    child = json.loads((run / "run.lock").read_text())["child_pid"]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    wait_until(lambda: process_gone(child), timeout=15)          # the training process died with llfarm
    killed_at = logged_step(run)
    from llfarm.rundir import RunDir
    assert RunDir(run).status() == "crashed"
    resume_and_check(run, reference, f"kill -9 llfarm at step {killed_at}", newest_marked(run, killed_at))


def test_sigkill_of_the_training_process(tmp_path, reference):
    run = tmp_path / "r"
    proc = start(tmp_path, "r")
    wait_until(lambda: logged_step(run) >= 10)
    os.kill(json.loads((run / "run.lock").read_text())["child_pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    killed_at = logged_step(run)
    assert proc.returncode == 1, err[-2000:]
    assert "the pytorch process exited with code -9" in err.strip().splitlines()[-1]
    m = manifest(run)
    assert m["status"] == "failed" and m["exit_code"] == -9
    resume_and_check(run, reference, f"kill -9 of the training process at step {killed_at}",
                     newest_marked(run, killed_at))


@pytest.mark.parametrize("save_step", [8, pytest.param(20, marks=pytest.mark.heavy)])
def test_sigkill_during_a_checkpoint_save(tmp_path, reference, save_step):
    run = tmp_path / "r"
    proc = start(tmp_path, "r", env={"LLFARM_FAULT_KILL_IN_SAVE": str(save_step)})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and manifest(run)["status"] == "failed", err[-2000:]
    partial = run / "checkpoints" / f"checkpoint-{save_step}"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / "llfarm-complete.json").exists()
    assert not (partial / "trainer_state.json").exists()
    resume_and_check(run, reference, f"kill -9 while saving checkpoint-{save_step}", f"checkpoint-{save_step - 4}")


def test_full_disk_during_a_checkpoint_save(tmp_path, reference):
    """The optimizer file of checkpoint-12 cannot be written (ENOSPC): the run fails with a line that names the file
    and the disk; once there is space, resume continues from checkpoint-8."""
    run = tmp_path / "r"
    proc = start(tmp_path, "r")
    # after checkpoint-8 (the Trainer deletes the oldest checkpoints by modification time when it saves)
    wait_until(lambda: (run / "checkpoints" / "checkpoint-8" / "llfarm-complete.json").is_file())
    (run / "checkpoints" / "checkpoint-12").mkdir()
    (run / "checkpoints" / "checkpoint-12" / "optimizer.pt").symlink_to("/dev/full")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-2000:]
    assert "llfarm: writing checkpoint-12/optimizer.pt failed:" in err and "MiB free" in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "exited with code 1" in last and f"then `llfarm resume {run}` continues" in last, last
    resume_and_check(run, reference, "full disk while saving checkpoint-12", "checkpoint-8")


def test_zz_report():
    """Prints the table the README quotes (run with -s)."""
    for case, result in RESULTS.items():
        print(f"{case:<48} {result}")
    assert "uninterrupted" in RESULTS
