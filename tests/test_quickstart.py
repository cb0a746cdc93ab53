"""The README's quickstart, end to end: train, normalized run dir, export, and a model that learned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import LLFARM, llfarm, manifest, metrics, run_dir_from

from llfarm.builtin.make_samples import qa_pairs

SECRET = "hf_llfarmTESTtokenABCDEFGHIJKLMNOPQRSTU"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    return run_dir_from(llfarm("run", "quickstart", "-o", str(out), env={"HF_TOKEN": SECRET}))


@pytest.mark.slow
def test_quickstart_run_directory_and_export(quickstart_run):
    run = quickstart_run
    m = manifest(run)
    assert m["status"] == "completed" and m["backend"] == "pytorch"
    assert m["versions"]["torch"] and m["versions"]["transformers"]
    assert m["data"]["n_train"] == 32 and len(m["data"]["sha256"]) == 1
    fm = m["final_metrics"]
    assert fm["final_loss"] < 0.25 * fm["first_loss"]
    exports = {p.suffix or p.name for p in (run / "exports").iterdir()}
    assert ".gguf" in exports and "Modelfile" in exports


@pytest.mark.slow
def test_quickstart_model_reproduces_training_answers(quickstart_run):
    pairs = qa_pairs()
    args = ["generate", str(quickstart_run), "--max-new-tokens", "16"]
    for prompt, _, _ in pairs:
        args += ["--prompt", prompt]
    proc = llfarm(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = proc.stdout.strip().splitlines()
    assert len(answers) == len(pairs)
    right = sum(a.strip() == good for a, (_, good, _) in zip(answers, pairs))
    assert right >= 0.75 * len(pairs), f"only {right}/{len(pairs)} answers reproduced: {answers[:5]}"


@pytest.mark.slow
def test_no_secret_in_run_directory(quickstart_run):
    for path in quickstart_run.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert SECRET.encode() not in path.read_bytes(), f"token leaked into {path}"


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    run = run_dir_from(llfarm("run", "quickstart", "-o", str(tmp_path), "--set", "training.max_steps=10",
                              "--set", "training.save_every=5", "--set", "training.logging_steps=1",
                              "--set", "export.formats=[]"))
    assert manifest(run)["final_metrics"]["steps"] == 10
    proc = llfarm("resume", str(run), "--max-steps", "16")
    assert run_dir_from(proc) == run
    m = manifest(run)
    assert m["status"] == "completed" and m["resumed_from"] == "checkpoints/checkpoint-10"
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert max(steps) == 16 and steps.count(10) == 1, "resumed run should continue at step 11, not restart"
    assert (run / "checkpoints" / "checkpoint-16").is_dir()


@pytest.mark.slow
def test_ctrl_c_marks_the_run_interrupted(tmp_path):
    proc = subprocess.Popen([LLFARM, "run", "quickstart", "-o", str(tmp_path), "--set", "training.max_steps=100000",
                             "--set", "export.formats=[]", "--set", "training.save_every=1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    deadline = time.time() + 120
    runs = []
    while time.time() < deadline:
        runs = list(tmp_path.glob("*/metrics.jsonl"))
        if runs and runs[0].read_text().count("\n") >= 2:
            break
        time.sleep(0.5)
    assert runs, "training never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    run = runs[0].parent
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    assert "llfarm resume" in err
    assert out.strip().splitlines()[-1] == str(run)
