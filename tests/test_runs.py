"""`llfarm runs`, `llfarm run --detach` and `llfarm monitor`, run the way the README shows them: from a fresh
directory, with the default `runs` folder and relative paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LLFARM, llfarm, manifest, metrics, one_line_error, process_gone, wait_for

# Long enough that `monitor`, started after `run --detach` returns, sees the run train (one torch thread: ~40 steps
# a second on a loaded 2-core machine; 40 steps were sometimes over before monitor attached).
N_STEPS = 300
STEPS = f"training.max_steps={N_STEPS}"


def runs_json(cwd: Path, *args: str) -> list[dict]:
    proc = llfarm("runs", "--json", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_detach_returns_at_once_and_monitor_follows_to_the_end(tmp_path):
    """The README's lifecycle commands as written: run --detach returns while the run trains; `runs` lists it as
    running; `monitor ID` prints the steps as they are logged and ends with the run, exit 0."""
    started = time.time()
    proc = llfarm("run", "quickstart", "--detach", "--set", STEPS, cwd=tmp_path)
    took = time.time() - started
    assert proc.returncode == 0, proc.stderr
    rel = proc.stdout.strip().splitlines()[-1]
    assert rel.startswith("runs/") and not os.path.isabs(rel)
    run = tmp_path / rel
    assert "in the background" in proc.stderr and f"llfarm monitor {rel}" in proc.stderr
    status_now = manifest(run)["status"]
    assert status_now in ("created", "running"), status_now   # returned before training ended
    (listed,) = runs_json(tmp_path)
    assert listed["id"] == run.name and listed["status"] in ("created", "running") and listed["total_steps"] == N_STEPS

    mon = llfarm("monitor", run.name, cwd=tmp_path)                 # by id, looked up in ./runs
    assert mon.returncode == 0, mon.stderr + mon.stdout
    lines = mon.stdout.strip().splitlines()
    assert lines[0].startswith(f"monitoring {run.name}")
    steps = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step ")]
    assert steps == sorted(steps) and steps[-1] == N_STEPS and len(steps) >= 2, lines
    assert all(f"/{N_STEPS}  loss " in line for line in lines if line.startswith("step "))
    assert lines[-1].startswith(f"{run.name}: completed — loss ") and "adapter: runs/" in lines[-1]

    m = manifest(run)
    assert m["status"] == "completed" and (run / "adapter" / "adapter_config.json").is_file()
    assert max(r["step"] for r in metrics(run)) == N_STEPS
    log = (run / "logs" / "llfarm.log").read_text()
    assert "loss" in log and "Traceback" not in log
    assert not (run / "run.lock").exists()
    table = llfarm("runs", cwd=tmp_path)
    assert table.returncode == 0
    header, row = table.stdout.strip().splitlines()
    assert header.split()[:5] == ["ID", "STRATEGY", "BACKEND", "STAGE", "STATUS"]
    assert row.split()[:6] == [run.name, "quickstart", "pytorch", "sft", "completed", f"{N_STEPS}/{N_STEPS}"]
    assert float(row.split()[6]) == pytest.approx(m["final_metrics"]["final_loss"], abs=1e-4)
    # an ended run: monitor says how it ended at once
    again = llfarm("monitor", rel, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip().startswith(f"{run.name}: completed")
    assert took < 120, f"--detach took {took:.0f}s to return"


def test_monitor_follows_a_foreground_run_from_another_terminal(tmp_path):
    fg = subprocess.Popen([LLFARM, "run", "quickstart", "--run-id", "fg", "--set", "training.max_steps=20"],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "runs" / "fg" / "manifest.json").exists(), timeout=300,
                 what="the run directory")
        other = tmp_path / "elsewhere"
        other.mkdir()
        mon = llfarm("monitor", "../runs/fg", cwd=other)
        assert mon.returncode == 0, mon.stderr + mon.stdout
        assert mon.stdout.strip().splitlines()[-1].startswith("fg: completed — loss ")
        assert any(line.startswith("step 20/20") for line in mon.stdout.splitlines())
    finally:
        fg.communicate(timeout=600)
    assert fg.returncode == 0, fg.stderr


def test_a_run_whose_llfarm_process_was_killed_shows_as_crashed(tmp_path):
    """kill -9 of the background llfarm process: the training dies with it (one process tree), the manifest still
    says running, and `runs`/`monitor` say crashed (the lock's holder is gone), with the resume command."""
    proc = llfarm("run", "quickstart", "--detach", "--run-id", "k", "--set", "training.max_steps=400",
                  "--set", "training.save_every=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "k"
    wait_for(lambda: any(r.get("step", 0) >= 3 for r in _rows(run)), timeout=300, what="three logged steps")
    info = json.loads((run / "run.lock").read_text())
    (row,) = runs_json(tmp_path)
    assert row["status"] == "running" and row["pid"] == info["pid"]
    os.kill(info["pid"], signal.SIGKILL)
    wait_for(lambda: process_gone(info["pid"]) and process_gone(info["child_pid"]), timeout=30,
             what="llfarm and its training child to end")
    assert manifest(run)["status"] == "running"                   # nobody lived to write otherwise
    (row,) = runs_json(tmp_path)
    assert row["status"] == "crashed" and row["step"] >= 3
    mon = llfarm("monitor", "k", cwd=tmp_path)
    assert mon.returncode == 1
    assert mon.stdout.strip() == f"k: crashed (the llfarm process died at step {row['step']}) — resume with: " \
                                 "llfarm resume runs/k"


def _rows(run: Path) -> list[dict]:
    try:
        return metrics(run)
    except (OSError, ValueError):
        return []


@pytest.mark.parametrize("args, expect", [
    (["monitor", "no-such-run"], ["no run 'no-such-run'", "llfarm runs"]),
    (["monitor", "."], ["not a run directory", "."]),
    (["runs", "--output", "missing"], ["missing", "no such folder"]),
    (["runs", "--output", "afile"], ["afile", "not a folder"]),
])
def test_bad_input_is_one_line(tmp_path, args, expect):
    (tmp_path / "afile").write_text("x")
    one_line_error(llfarm(*args, cwd=tmp_path), expect)


def test_ambiguous_id_prefix_and_an_empty_folder(tmp_path):
    for name in ("a-1", "a-2"):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"run_id": name, "status": "completed", "total_steps": 3}))
    one_line_error(llfarm("monitor", "a-", cwd=tmp_path), ["'a-' matches 2 runs", "a-1", "a-2"])
    done = llfarm("monitor", "a-2", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("a-2: completed")
    (tmp_path / "empty").mkdir()
    empty = llfarm("runs", "-o", "empty", cwd=tmp_path)
    assert empty.returncode == 0 and empty.stdout == "" and "no runs in empty" in empty.stderr


def test_runs_and_monitor_import_no_heavy_library(tmp_path):
    from conftest import heavy_imports
    d = tmp_path / "runs" / "r1"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"run_id": "r1", "status": "completed", "total_steps": 3}))
    assert heavy_imports(["runs", "-o", str(tmp_path / "runs")]) == []
    assert heavy_imports(["monitor", str(d)]) == []
