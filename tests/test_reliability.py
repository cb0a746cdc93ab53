"""Reliability and security: the adversarial cases of the "Reliability and security" issue, one test (or more) per
numbered item, each run as the user's command. A refusal is exit 2, one line, no traceback and nothing left behind;
a run that goes wrong leaves the right status; no secret reaches any file of a run directory.

    1 half-written checkpoints ........ test_resume_passes_over_a_half_written_checkpoint, ..._no_complete_checkpoint,
                                        checkpoint unit tests; kills and a full disk mid-save: test_fault_injection.py
    2 no run lock ..................... test_a_run_that_is_training_cannot_be_resumed_or_exported
    3 orphaned trainers ............... test_kill_9_of_llfarm_takes_the_training_with_it (+ lifeline unit tests);
                                        SIGTERM/SIGHUP: test_user_path.py::test_sigterm_is_handled_like_ctrl_c
    4 path traversal .................. test_run_id_cannot_leave_output, test_strategy_name_cannot_leave_output
    5 tokens in the run directory ..... test_no_secret_in_any_file_of_a_run, test_secret_options_travel_by_environment,
                                        test_llamafactory_run_keeps_its_token_out_of_every_file, ..._refused
    6 YAML alias bomb ................. test_alias_bomb_is_refused_in_under_a_second
    7 encoding (strategy files) ....... test_non_utf8_strategy_or_template_is_one_line
    8 bad input caught in the child ... test_caught_before_anything_is_written (+ validate)
    9 duplicate YAML keys ............. test_duplicate_keys_name_both_lines
   10 the rest ........................ test_set_path_errors_blame_the_set, test_resume_max_steps_must_move_forward,
                                        test_misspelt_backend_under_backend_options, test_os_errors_name_the_file,
                                        test_output_piped_into_head_does_not_kill_the_run; exit_code after a
                                        successful resume and the full-disk message: test_fault_injection.py

The data-file items of the issue (a lone surrogate escape, every example longer than max_length, a BOM in JSONL, a
record missing `output`) belong to the data layer and are tested with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LLFARM, llfarm, manifest, metrics, one_line_error, process_gone, wait_for, write

SECRET = "hf_llfarmRELIABILITYtokenABCDEFGHIJKLMN"        # $HF_TOKEN in these tests
OTHER = "wandb-0123456789abcdef0123456789abcdef"           # $WANDB_API_KEY
STRAY = "hf_strayTOKENinTEXT0123456789abcdefgh"            # an hf_ token typed into a strategy
GOOD = """\
name: t
model: {path: "builtin:tiny-llama"}
data: {train: "builtin:alpaca", max_length: 64}
training: {max_steps: 2, batch_size: 4}
"""
SHORT = ["--set", "training.save_every=4", "--set", "training.logging_steps=1", "--set", "export.formats=[]"]


def strategy(tmp_path: Path, text: str, name: str = "s.yaml") -> str:
    return str(write(tmp_path / name, text))


def refused(tmp_path: Path, *args: str, expect: list[str], env: dict[str, str] | None = None) -> str:
    """`llfarm run ...` refused: one line, exit 2, and no run directory (nor anything else) under --output."""
    out = tmp_path / "runs"
    proc = llfarm(*args, *(["-o", str(out)] if args[0] == "run" else []), cwd=tmp_path, env=env)
    err = one_line_error(proc)
    for piece in expect:
        assert piece in err, f"{piece!r} not in: {err}"
    assert not out.exists() or not any(out.iterdir()), f"left behind: {list(out.iterdir())}"
    return err


def files_hold(root: Path, *secrets: str) -> list[str]:
    """Files under ``root`` whose name or content holds one of ``secrets``."""
    found = []
    for path in root.rglob("*"):
        if any(s in path.name for s in secrets):
            found.append(f"name: {path}")
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}" for s in secrets if s.encode() in data]
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 12-step run with checkpoints at 4, 8 and 12 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("trained")
    proc = llfarm("run", "quickstart", "-o", str(out), "--run-id", "base", "--set", "training.max_steps=12", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "base"


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def steps_logged(run: Path) -> int:
    try:
        return sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------- 1. half-written checkpoints

@pytest.mark.slow
def test_resume_passes_over_a_half_written_checkpoint(trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    last = run / "checkpoints" / "checkpoint-12"
    assert (last / "llfarm-complete.json").is_file(), "every saved checkpoint is marked complete"
    with open(last / "optimizer.pt", "r+b") as fh:                  # what a kill mid-save leaves
        fh.truncate(100)
    proc = llfarm("resume", str(run), "--max-steps", "14")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {run} from checkpoint-8" in proc.stderr
    assert "removed checkpoint-12: optimizer.pt has 100 bytes" in proc.stderr, proc.stderr
    m = manifest(run)
    assert m["status"] == "completed" and m["resumed_from"] == "checkpoints/checkpoint-8"
    assert m["final_metrics"]["steps"] == 14
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == list(range(1, 15)), steps


@pytest.mark.slow
def test_resume_with_no_complete_checkpoint_is_one_line(trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    for ckpt in (run / "checkpoints").glob("checkpoint-*"):
        (ckpt / "llfarm-complete.json").unlink()
        (ckpt / "trainer_state.json").unlink()
    before = (run / "metrics.jsonl").read_text()
    err = one_line_error(llfarm("resume", str(run)))
    assert "no complete checkpoint to resume from" in err and "checkpoint-12" in err, err
    assert (run / "metrics.jsonl").read_text() == before and manifest(run)["status"] == "completed"
    assert not (run / "run.lock").exists()


def test_checkpoint_choice_verifies_the_marker(tmp_path):
    from llfarm.checkpoints import MARKER, mark_complete
    from llfarm.rundir import RunDir
    run = RunDir(tmp_path).create()
    for step in (4, 8, 12):
        ckpt = run.checkpoints / f"checkpoint-{step}"
        write(ckpt / "adapter_model.safetensors", "w" * step)
        write(ckpt / "trainer_state.json", json.dumps({"global_step": step}))
        if step != 12:
            mark_complete(ckpt, step)                       # checkpoint-12: cut short before its marker
    choice = run.resumable_checkpoint()
    assert choice.checkpoint.name == "checkpoint-8"
    assert [(p.name, why) for p, why in choice.skipped] == [("checkpoint-12", "not marked complete (the save was "
                                                                              "cut short)")]
    write(run.checkpoints / "checkpoint-8" / "adapter_model.safetensors", "short")   # changed after the marker
    assert run.resumable_checkpoint().checkpoint.name == "checkpoint-4"
    (run.checkpoints / "checkpoint-4" / MARKER).write_text(json.dumps({"step": 3, "files": {"x": 1}}))
    assert run.resumable_checkpoint().checkpoint is None
    assert run.latest_checkpoint().name == "checkpoint-12"


def test_runs_from_before_markers_fall_back_to_trainer_state(tmp_path):
    from llfarm.rundir import RunDir
    run = RunDir(tmp_path).create()
    for step in (5, 10):
        write(run.checkpoints / f"checkpoint-{step}" / "trainer_state.json", json.dumps({"global_step": step}))
    write(run.checkpoints / "checkpoint-15" / "adapter_model.safetensors", "x")      # no trainer_state.json yet
    choice = run.resumable_checkpoint()
    assert choice.legacy and choice.checkpoint.name == "checkpoint-10"
    assert "checkpoint-15: no readable trainer_state.json" in choice.describe()


# ---------------------------------------------------------------- 2. the run lock

@pytest.mark.slow
def test_a_run_that_is_training_cannot_be_resumed_or_exported(tmp_path):
    run = tmp_path / "runs" / "busy"
    steps = 300     # still training while resume/export are tried (one-thread torch runs 24 steps in ~2 s)
    proc = subprocess.Popen([LLFARM, "run", "quickstart", "-o", str(tmp_path / "runs"), "--run-id", "busy",
                             "--set", f"training.max_steps={steps}", "--set", "training.save_every=2",
                             "--set", "training.logging_steps=1", "--set", "export.formats=[]"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # any complete checkpoint: checkpoint-2 itself can be rotated away between two looks
        wait_for(lambda: any((run / "checkpoints").glob("checkpoint-*/llfarm-complete.json")), what="a checkpoint")
        lock = json.loads((run / "run.lock").read_text())
        assert lock["pid"] == proc.pid and lock["command"] == "run" and lock["child_pid"] > 0
        from llfarm.rundir import RunDir
        assert RunDir(run).liveness() == "running" and RunDir(run).status() == "running"
        native_before = {p: p.stat().st_mtime_ns for p in (run / "native").rglob("*") if p.is_file()}
        logged = steps_logged(run)
        for command in (["resume", str(run)], ["export", str(run), "--format", "gguf"]):
            err = one_line_error(llfarm(*command))
            assert f"the run is in use by llfarm run (pid {proc.pid}" in err, err
        assert steps_logged(run) >= logged, "metrics.jsonl was truncated"
        assert {p: p.stat().st_mtime_ns for p in (run / "native").rglob("*") if p.is_file()} == native_before
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert manifest(run)["status"] == "completed" and manifest(run)["exit_code"] == 0
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, steps + 1))
    assert not (run / "run.lock").exists(), "the lock is removed when the run ends"


def test_lock_refuses_a_second_holder_and_is_stale_once_its_holder_dies(tmp_path):
    from llfarm.rundir import RunDir
    from llfarm.runlock import RunLocked
    run = RunDir(tmp_path).create()
    run.write_manifest({"status": "running"})
    assert run.liveness() == "none"
    with run.lock("run") as lock:
        lock.update(child_pid=123)
        info = run.lock_info()
        assert info["pid"] == os.getpid() and info["child_pid"] == 123 and info["heartbeat"] <= time.time()
        assert run.liveness() == "running" and run.status() == "running"
        with pytest.raises(RunLocked, match=f"in use by llfarm run \\(pid {os.getpid()}"):
            run.lock("resume").acquire()
    # released: the file is gone, and a manifest still saying running (nobody set it to completed) reads as crashed
    assert not run.lock_path.exists() and run.liveness() == "none" and run.status() == "crashed"
    # a holder that died (kill -9) leaves its file behind, unlocked: stale, and the run shows as crashed too.
    code = ("import sys, os; from llfarm.rundir import RunDir; l = RunDir(sys.argv[1]).lock('run').acquire(); "
            "os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code, str(run.root)], check=False)
    assert run.lock_path.exists() and run.liveness() == "stale" and run.status() == "crashed"
    with run.lock("resume") as lock:                                    # a stale lock is taken over
        assert lock.previous["command"] == "run" and lock.previous["pid"] != os.getpid()


# ---------------------------------------------------------------- 3. orphaned trainers

@pytest.mark.slow
def test_kill_9_of_llfarm_takes_the_training_with_it(tmp_path):
    run = tmp_path / "runs" / "k"
    proc = subprocess.Popen([LLFARM, "run", "quickstart", "-o", str(tmp_path / "runs"), "--run-id", "k",
                             "--set", "training.max_steps=1000", *SHORT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: any((run / "checkpoints").glob("checkpoint-*/llfarm-complete.json")), what="a checkpoint")
        child = json.loads((run / "run.lock").read_text())["child_pid"]
        proc.kill()
        proc.wait()
        start = time.time()
        wait_for(lambda: process_gone(child), timeout=15, what=f"the training process {child} to die")
        print(f"training process gone {time.time() - start:.2f} s after kill -9 of llfarm")
    finally:
        if proc.poll() is None:
            proc.kill()
    from llfarm.rundir import RunDir
    assert manifest(run)["status"] == "running" and RunDir(run).status() == "crashed"
    assert RunDir(run).liveness() == "stale"
    # training may have saved more checkpoints between the wait and the kill: resume 2 steps past the newest
    newest = max(int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*/llfarm-complete.json"))
    resumed = llfarm("resume", str(run), "--max-steps", str(newest + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "had died without finishing (status: crashed)" in resumed.stderr
    assert manifest(run)["status"] == "completed" and RunDir(run).liveness() == "none"


@pytest.mark.slow
def test_kill_9_of_llfarm_takes_a_torchrun_tree_with_it(tmp_path):
    """torchrun starts each worker in a session of its own: the worker's watchdog ends its group and the launcher's."""
    run = tmp_path / "runs" / "t"
    proc = subprocess.Popen([LLFARM, "run", "quickstart", "-o", str(tmp_path / "runs"), "--run-id", "t",
                             "--set", "training.max_steps=1000", "--set", "distributed.launcher=torchrun", *SHORT],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: steps_logged(run) >= 2, what="training")
        found = subprocess.run(["pgrep", "-f", str(run / "native")], capture_output=True, text=True, check=False)
        tree = [int(p) for p in found.stdout.split()]
        assert len(tree) >= 2, f"expected torchrun and a worker, found {tree}"
        proc.kill()
        proc.wait()
        wait_for(lambda: all(process_gone(p) for p in tree), timeout=15, what=f"{tree} to die")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_child_outlives_nothing_it_was_not_asked_to_guard(tmp_path):
    """Without LLFARM_PARENT (a native command run by hand) guard() does nothing; with a parent that is alive it
    only watches; when that parent dies it kills its own process group (and nothing else)."""
    from llfarm import lifeline
    env = {k: v for k, v in os.environ.items() if k != lifeline.ENV}
    code = "from llfarm import lifeline; print(lifeline.guard())"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "None"
    # a parent (sleep) that dies after 1 s: the guarded child and its own child (a grandchild) die with it
    parent = subprocess.Popen(["sleep", "1"])
    script = ("import os, subprocess, sys, time; from llfarm import lifeline; "
              "g = subprocess.Popen(['sleep', '60']); print(g.pid, flush=True); lifeline.guard(); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**env, lifeline.ENV: f"{parent.pid}:{lifeline.start_time(parent.pid)}"},
                             start_new_session=True)
    grandchild = int(child.stdout.readline())
    parent.wait()
    assert child.wait(timeout=15) == -signal.SIGKILL
    wait_for(lambda: process_gone(grandchild), timeout=10, what="the grandchild to die")
    assert lifeline.alive(os.getpid(), lifeline.start_time(os.getpid()))
    assert not lifeline.alive(os.getpid(), "1")                          # same pid, another start time: reused


# ---------------------------------------------------------------- 4. path traversal

@pytest.mark.parametrize("run_id", ["../../escaped", "/tmp/llfarm-escaped-abs", "a/b", "..", ".hidden", "-rf", ""])
def test_run_id_cannot_leave_output(tmp_path, run_id):
    (tmp_path / "inside").mkdir()
    err = refused(tmp_path / "inside", "run", strategy(tmp_path, GOOD), "--run-id", run_id, expect=["--run-id"])
    assert "must be letters, digits" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inside", "s.yaml"]
    assert not Path("/tmp/llfarm-escaped-abs").exists()


@pytest.mark.parametrize("name", ["x/../../../y", "../up", "a\\\\b", "dots..dots", "spa ce"])
def test_strategy_name_cannot_leave_output(tmp_path, name):
    s = strategy(tmp_path, GOOD.replace("name: t", f'name: "{name}"'))
    for command in ("run", "validate"):
        refused(tmp_path, command, s, expect=["'name' must be letters, digits", "s.yaml:1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_safe_names_are_accepted():
    from llfarm.rundir import name_problem
    for ok in ("quickstart", "my-run_2", "v1.5", "_x"):
        assert name_problem(ok) is None, ok
    for bad in ("a/b", "..", "a..b", ".x", "-x", "x" * 101, "é", "a b", "a\nb"):
        assert name_problem(bad), bad


# ---------------------------------------------------------------- 5. secrets

@pytest.mark.slow
def test_no_secret_in_any_file_of_a_run(tmp_path):
    """$HF_TOKEN, $WANDB_API_KEY and a stray hf_ token in the description: none reaches strategy.yaml, the manifest,
    native/, logs, checkpoints, the adapter, the GGUF or the Modelfile (nor a file name)."""
    env = {"HF_TOKEN": SECRET, "WANDB_API_KEY": OTHER}
    text = GOOD.replace("name: t", f"name: t\ndescription: 'my token {SECRET}, wandb {OTHER}, old {STRAY}'") \
        + "export: {formats: [ollama], quant: f16, name: tiny-export}\n" \
        + "backend_options: {pytorch: {torch_compile: false}}\n"
    proc = llfarm("run", strategy(tmp_path, text), "-o", str(tmp_path / "runs"), "--run-id", "r", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    assert (run / "exports" / "Modelfile").is_file() and (run / "exports" / "tiny-export-f16.gguf").is_file()
    assert files_hold(run, SECRET, OTHER, STRAY) == []
    assert "my token ***, wandb ***, old ***" in (run / "strategy.yaml").read_text()


@pytest.mark.parametrize("where", ["data.system", "export.name", "name"])
def test_a_secret_that_would_be_trained_on_or_become_a_name_is_refused(tmp_path, where):
    value = {"data.system": f"You are helpful. {SECRET}", "export.name": STRAY, "name": SECRET}[where]
    err = refused(tmp_path, "run", strategy(tmp_path, GOOD), "--set", f"{where}={value}",
                  env={"HF_TOKEN": SECRET}, expect=[where.split(".")[-1]])
    assert SECRET not in err and STRAY not in err
    err = refused(tmp_path, "run", strategy(tmp_path, GOOD), "--run-id", SECRET, env={"HF_TOKEN": SECRET},
                  expect=["--run-id", "***"])
    assert SECRET not in err


def test_secret_options_travel_by_environment(tmp_path):
    """backend_options.llamafactory.hf_hub_token never reaches a file: the native config has no such key, the
    command shows it as ***, and the training process receives it through LLFARM_SECRET_OPTIONS."""
    text = GOOD + f"backend: llamafactory\nbackend_options:\n  llamafactory: {{hf_hub_token: {SECRET}, " \
                  f"swanlab_api_key: {OTHER}, logging_first_step: true}}\n"
    out = tmp_path / "planned"
    proc = llfarm("plan", strategy(tmp_path, text), "--out", str(out), env={"HF_TOKEN": "", "WANDB_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout and OTHER not in proc.stdout
    assert files_hold(out, SECRET, OTHER) == []
    config = (out / "native" / "llamafactory_train.yaml").read_text()
    assert "hf_hub_token" not in config and "swanlab_api_key" not in config and "logging_first_step: true" in config
    assert "LLFARM_SECRET_OPTIONS='***'" in (out / "native" / "command.txt").read_text()
    strategy_yaml = (out / "strategy.yaml").read_text()
    assert "hf_hub_token: '***'" in strategy_yaml and "swanlab_api_key: '***'" in strategy_yaml

    from llfarm.backends.llamafactory import entry
    os.environ[entry.SECRET_OPTIONS_ENV] = json.dumps({"hf_hub_token": SECRET})
    try:
        args = entry.read_config(str(out / "native" / "llamafactory_train.yaml"))
    finally:
        os.environ.pop(entry.SECRET_OPTIONS_ENV, None)
    assert args["hf_hub_token"] == SECRET and args["logging_first_step"] is True


@pytest.mark.slow
def test_llamafactory_run_keeps_its_token_out_of_every_file(tmp_path):
    pytest.importorskip("llamafactory")
    text = GOOD + f"backend: llamafactory\nbackend_options:\n  llamafactory: {{hf_hub_token: {SECRET}}}\n" \
                  "training: {max_steps: 2, batch_size: 4, save_every: 1}\n"
    text = text.replace("training: {max_steps: 2, batch_size: 4}\n", "", 1)
    proc = llfarm("run", strategy(tmp_path, text), "-o", str(tmp_path / "runs"), "--run-id", "lf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "lf"
    assert files_hold(run, SECRET) == []
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*/llfarm-complete.json")) == \
        ["llfarm-complete.json"] * 2, "LlamaFactory's checkpoints are marked complete too"
    resumed = llfarm("resume", str(run), "--max-steps", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "hf_hub_token was not saved with the run" in resumed.stderr
    assert files_hold(run, SECRET) == []


def test_redaction_rules():
    from llfarm.redact import find_secret, is_secret_name, redact, redact_text
    for name in ("HF_TOKEN", "hf_hub_token", "WANDB_API_KEY", "swanlab_lark_secret", "AWS_SECRET_ACCESS_KEY",
                 "hubToken", "db_password", "token"):
        assert is_secret_name(name), name
    for name in ("max_new_tokens", "pad_token", "add_special_tokens", "TOKENIZERS_PARALLELISM", "tokenized_path",
                 "ignore_pad_token_for_loss", "include_num_input_tokens_seen", "keys"):
        assert not is_secret_name(name), name
    os.environ["MY_SERVICE_API_KEY"] = "k3y-value-1234"
    try:
        assert redact_text("a k3y-value-1234 b hf_abcdefghijklmnopqrstuvwxyz c") == "a *** b *** c"
        assert find_secret("uses k3y-value-1234") == "the value of $MY_SERVICE_API_KEY"
    finally:
        del os.environ["MY_SERVICE_API_KEY"]
    assert redact({"opts": {"hub_token": "abc", "pad_token": "<pad>", "note": STRAY}}) == \
        {"opts": {"hub_token": "***", "pad_token": "<pad>", "note": "***"}}


# ---------------------------------------------------------------- 6, 7, 9. YAML: bombs, encoding, duplicates

def bomb(levels: int = 9) -> str:
    lines = ["name: t", 'data: {train: "builtin:alpaca"}', "x0: &x0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7}"]
    for i in range(1, levels):
        p = f"*x{i - 1}"
        lines.append(f"x{i}: &x{i} {{a: {p}, b: {p}, c: {p}, d: {p}, e: {p}, f: {p}, g: {p}}}")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_in_under_a_second(tmp_path):
    from llfarm.errors import StrategyError
    from llfarm.strategy import resolve
    s = strategy(tmp_path, bomb())
    start = time.perf_counter()
    with pytest.raises(StrategyError, match="aliases expand to more than"):
        resolve(s)
    assert time.perf_counter() - start < 1.0
    for command in ("validate", "run"):
        refused(tmp_path, command, s, expect=["YAML aliases expand to more than 100,000 values", "s.yaml:"])
    recursive = strategy(tmp_path, GOOD + "x: &a [1, *a]\n", "r.yaml")
    refused(tmp_path, "validate", recursive, expect=["refers to itself"])
    err = refused(tmp_path, "validate", strategy(tmp_path, GOOD + "description: *nope\n", "u.yaml"),
                  expect=["malformed YAML"])
    assert "u.yaml:5" in err


def test_non_utf8_strategy_or_template_is_one_line(tmp_path):
    (tmp_path / "s.yaml").write_bytes(GOOD.replace("name: t", "name: t\ndescription: caf\xe9").encode("latin-1"))
    for command in ("validate", "run", "plan"):
        refused(tmp_path, command, str(tmp_path / "s.yaml"), expect=["not UTF-8 text (byte 0xe9 on line 2)",
                                                                      "s.yaml:2", "save the file as UTF-8"])
    tpl = (Path(__file__).parent.parent / "templates" / "chatml.yaml").read_text(encoding="utf-8")
    (tmp_path / "t.yaml").write_bytes(tpl.encode().replace(b"description:", b"description: \xff", 1))
    refused(tmp_path, "run", strategy(tmp_path, GOOD + "template: t.yaml\n", "u.yaml"), expect=["not UTF-8 text"])
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbf" + GOOD.encode())      # a BOM is fine
    assert llfarm("validate", str(tmp_path / "bom.yaml")).returncode == 0


def test_duplicate_keys_name_both_lines(tmp_path):
    s = strategy(tmp_path, GOOD + "training: {max_steps: 5}\n")
    for command in ("run", "validate"):
        refused(tmp_path, command, s, expect=["duplicate key 'training' on lines 4 and 5", "s.yaml:5"])
    nested = strategy(tmp_path, GOOD.replace("max_steps: 2,", "max_steps: 2, max_steps: 3,"), "n.yaml")
    refused(tmp_path, "validate", nested, expect=["duplicate key 'training.max_steps' on lines 4 and 4"])
    merged = strategy(tmp_path, "base: &b {max_steps: 2}\n" + GOOD.replace("training: {max_steps: 2, batch_size: 4}",
                                                                          "training: {<<: *b, batch_size: 4}"),
                      "m.yaml")
    proc = llfarm("validate", merged)               # a merge key (<<) is not a duplicate; 'base' is unknown
    assert proc.returncode == 2 and "unknown key 'base'" in proc.stderr and "duplicate key" not in proc.stderr


# ---------------------------------------------------------------- 8. caught before anything is written

def _template(tmp_path: Path, name: str, edit) -> str:
    src = (Path(__file__).parent.parent / "templates" / "chatml.yaml").read_text(encoding="utf-8")
    return str(write(tmp_path / name, edit(src)))


def _model(tmp_path: Path, name: str, drop=(), config: str | None = None) -> str:
    from llfarm.resources import resolve_builtin_model
    dest = tmp_path / name
    shutil.copytree(resolve_builtin_model("builtin:tiny-llama"), dest)
    for f in drop:
        (dest / f).unlink()
    if config is not None:
        (dest / "config.json").write_text(config)
    return str(dest)


CAUGHT = {
    "broken jinja": (lambda t: GOOD + f"template: {_template(t, 'b.yaml', lambda s: s.replace('{% for', '{% if %}{% for', 1))}\n",
                     ["jinja syntax error", "b.yaml:"]),
    "template that fails on the data": (lambda t: GOOD + "template: " + _template(
        t, "f.yaml", lambda s: s.replace("{% for message in messages %}",
                                         "{% for message in messages %}{{ message.missing.deeper }}", 1)) + "\n",
        ["cannot render data.train example 1", "has no attribute 'missing'"]),
    "prompt not a prefix": (lambda t: GOOD + "template: " + _template(
        t, "p.yaml", lambda s: s.replace("{% for message in messages %}", "{{ messages | length }}"
                                         "{% for message in messages %}", 1)) + "\n",
        ["is not the start of the whole conversation"]),
    "bad pytorch option value": (lambda t: GOOD + "backend_options: {pytorch: {label_smoothing_factor: 2}}\n",
                                 ["'backend_options.pytorch.label_smoothing_factor' input should be less than 1",
                                  "s.yaml:5"]),
    "bad llamafactory option value": (lambda t: GOOD + "backend: llamafactory\nbackend_options: {llamafactory: "
                                      "{ddp_timeout: eight}}\n",
                                      ["'backend_options.llamafactory.ddp_timeout' input should be a valid "
                                       "integer", "'eight'", "s.yaml:6"]),
    "model folder without a tokenizer": (lambda t: GOOD.replace('"builtin:tiny-llama"', _model(
        t, "m", drop=["tokenizer.json", "tokenizer_config.json"])), ["has no tokenizer", "model.path"]),
    "corrupt config.json": (lambda t: GOOD.replace('"builtin:tiny-llama"', _model(t, "m", config='{"model_type": ')),
                            ["config.json is not valid JSON", "model.path"]),
    "uncached hub id offline": (lambda t: GOOD.replace('"builtin:tiny-llama"', "llfarm-test/never-downloaded"),
                                ["not in the Hugging Face cache and HF_HUB_OFFLINE=1"]),
    "plain template with an Ollama export": (lambda t: GOOD + "template: plain\nexport: {formats: [ollama]}\n",
                                             ["template 'plain' has no Ollama form", "export.formats"]),
    "reward model with a GGUF export": (lambda t: GOOD.replace("builtin:alpaca", "builtin:preference")
                                        + "stage: rm\nexport: {formats: [gguf]}\n", ["reward model", "no GGUF"]),
}


@pytest.mark.parametrize("case", list(CAUGHT))
def test_caught_before_anything_is_written(tmp_path, case):
    make, expect = CAUGHT[case]
    s = strategy(tmp_path, make(tmp_path))
    refused(tmp_path, "run", s, expect=expect)
    if case != "uncached hub id offline":            # validate and plan compile for a model they need not load
        refused(tmp_path, "validate", s, expect=expect)


# ---------------------------------------------------------------- 10. the rest

def test_set_path_errors_blame_the_set(tmp_path):
    s = strategy(tmp_path, GOOD)
    err = refused(tmp_path, "run", s, "--set", "training.max_steps.x=1",
                  expect=["--set training.max_steps.x: 'training.max_steps' is a value (2), not a section"])
    assert "s.yaml" not in err
    refused(tmp_path, "run", s, "--set", "model=oops", expect=["'model'", "--set model=oops"])
    refused(tmp_path, "run", s, "--set", "training..x=1", expect=["empty part"])


def test_misspelt_backend_under_backend_options(tmp_path):
    s = strategy(tmp_path, GOOD + "backend_options: {lamafactory: {}}\n")
    refused(tmp_path, "run", s, expect=["unknown backend 'lamafactory'", "did you mean 'llamafactory'", "s.yaml:5"])


@pytest.mark.slow
def test_resume_max_steps_must_move_forward(trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    before = {p: p.read_bytes() for p in (run / "manifest.json", run / "metrics.jsonl")}
    assert "--max-steps must be at least 1, received 0" in one_line_error(llfarm("resume", str(run), "--max-steps", "0"))
    err = one_line_error(llfarm("resume", str(run), "--max-steps", "12"))
    assert "--max-steps 12 is not beyond checkpoint-12 (step 12)" in err
    assert {p: p.read_bytes() for p in before} == before, "a refused resume changed the run"
    assert not (run / "run.lock").exists()


@pytest.mark.slow
def test_export_name_holding_a_secret_is_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    err = one_line_error(llfarm("export", str(run), "--format", "gguf", "--name", STRAY))
    assert "--name" in err and STRAY not in err
    assert not (run / "exports").exists() and not (run / "run.lock").exists()


def test_os_errors_name_the_file(tmp_path, monkeypatch):
    import errno

    from llfarm.cli import _os_hint
    from llfarm.rundir import atomic_write_text

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "manifest.json", "{}")
    assert info.value.filename == str(tmp_path / "manifest.json") and info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == [], "temporary file left behind"
    assert "free space" in _os_hint(info.value)


@pytest.mark.slow
def test_output_piped_into_head_does_not_kill_the_run(tmp_path):
    """`llfarm run ... 2>&1 | head -1`: the reader goes away after the first line; the run still completes."""
    cmd = f"{LLFARM} run quickstart -o runs --run-id p --set training.max_steps=3 --set export.formats=[] 2>&1 | head -1"
    proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.stdout.startswith("run: runs/p") and proc.stderr == "", proc.stderr
    assert manifest(tmp_path / "runs" / "p")["status"] == "completed"
