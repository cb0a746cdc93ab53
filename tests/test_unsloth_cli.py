"""The Unsloth backend through the CLI on a machine without a GPU: `run` refuses in one line (exit 2, names the
alternatives, leaves no run directory), `plan` compiles anyway, `auto` never picks unsloth without a GPU."""

from __future__ import annotations

import os
import py_compile
from pathlib import Path

import pytest
from conftest import llfarm, write

from llfarm.platform import detect

# This machine as it is when it has no GPU (so the real detection text shows); forced to cpu on a GPU machine.
REALLY_NO_GPU = detect().name == "cpu" and not os.environ.get("LLFARM_PLATFORM")
NO_GPU = {} if REALLY_NO_GPU else {"LLFARM_PLATFORM": "cpu"}
GPU = {"LLFARM_PLATFORM": "cuda"}       # only to test the choice logic of `--backend auto` (plan runs nothing)


def one_line_error(proc) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr}\n{proc.stdout}"
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, f"not one line:\n{err}"
    assert err.startswith("llfarm: error:")
    return err


def test_run_without_a_gpu_exits_2_in_one_line_naming_the_alternatives(tmp_path):
    out = tmp_path / "runs"
    err = one_line_error(llfarm("run", "quickstart", "--backend", "unsloth", "-o", str(out), env=NO_GPU))
    assert "backend 'unsloth' cannot run here" in err
    assert "Unsloth trains only on a GPU" in err and "this machine has" in err
    if REALLY_NO_GPU:
        assert "no CUDA, ROCm, XPU or MPS device seen" in err
    for alternative in ("--backend pytorch", "--backend llamafactory", "--backend auto"):
        assert alternative in err
    assert not out.exists(), "a run directory was created"


def test_strategy_that_names_unsloth_refuses_the_same_way(tmp_path):
    out = tmp_path / "runs"
    err = one_line_error(llfarm("run", "unsloth_sft", "-o", str(out), env=NO_GPU))
    assert "cannot run here" in err and "--backend auto" in err
    assert not out.exists()


def test_plan_works_without_a_gpu(tmp_path):
    proc = llfarm("plan", "quickstart", "--backend", "unsloth", env=NO_GPU)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# backend: unsloth" in out
    assert "# platform: cuda (precision bf16)" in out
    assert "# note: planned for a CUDA GPU; this machine has" in out
    assert "train_unsloth.py" in out and "trainer.json" in out
    assert "FastLanguageModel.from_pretrained(" in out and "FastLanguageModel.get_peft_model(" in out
    assert '"load_in_4bit": false' in out and '"learning_rate": 0.01' in out


def test_plan_out_writes_a_script_that_compiles(tmp_path):
    target = tmp_path / "planned"
    proc = llfarm("plan", "cuda_qlora_sft", "--backend", "unsloth", "--out", str(target), env=NO_GPU)
    assert proc.returncode == 0, proc.stderr
    script = target / "native" / "train_unsloth.py"
    py_compile.compile(str(script), cfile=str(tmp_path / "x.pyc"), doraise=True)
    assert '"load_in_4bit": true' in (target / "native" / "trainer.json").read_text()
    assert (target / "native" / "command.txt").read_text().strip().endswith("native/trainer.json")


def test_shipped_unsloth_strategy_plans(tmp_path):
    proc = llfarm("plan", "unsloth_sft", env=NO_GPU)
    assert proc.returncode == 0, proc.stderr
    assert "# backend: unsloth" in proc.stdout and '"model_name": "unsloth/Llama-3.2-1B-Instruct"' in proc.stdout


@pytest.mark.parametrize("strategy,expected", [("quickstart", "unsloth"), ("dpo", "unsloth"),
                                               ("reward_model", "pytorch")])
def test_auto_picks_unsloth_only_on_a_gpu_and_when_the_strategy_allows(strategy, expected):
    on_gpu = llfarm("plan", strategy, "--backend", "auto", env=GPU)
    assert on_gpu.returncode == 0, on_gpu.stderr
    assert f"# backend: {expected}" in on_gpu.stdout
    on_cpu = llfarm("plan", strategy, "--backend", "auto", env=NO_GPU)
    assert on_cpu.returncode == 0, on_cpu.stderr
    assert "# backend: unsloth" not in on_cpu.stdout
    assert "# note:" not in on_cpu.stdout       # auto plans for this machine


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("sets,expect", [
    (["stage=rm", "data.train=builtin:preference"],
     "Unsloth has no reward-model API; use --backend pytorch or llamafactory"),
    (["method.type=freeze"], "cannot run method 'freeze'"),
    (["model.quantization=8bit"], "cannot run quantization '8bit'"),
    (["distributed.launcher=torchrun"], "one process on one GPU"),
    (["distributed.deepspeed=zero2"], "does not run DeepSpeed"),
    (["backend_options.unsloth.optimm=adamw_8bit"], "did you mean 'optim'"),
    (["backend_options.unsloth.use_gradient_checkpointing=sometimes"], "use_gradient_checkpointing"),
])
def test_what_unsloth_cannot_do_is_one_line_on_any_machine(tmp_path, command, sets, expect):
    out = tmp_path / "runs"
    args = [command, "quickstart", "--backend", "unsloth", *(["-o", str(out)] if command == "run" else [])]
    for s in sets:
        args += ["--set", s]
    err = one_line_error(llfarm(*args, env=GPU))
    assert expect in err
    assert not out.exists()


def test_backends_lists_why_unsloth_cannot_run_here():
    proc = llfarm("backends", env=NO_GPU)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("unsloth"))
    assert "cannot run here" in line and "GPU" in line


def test_cli_and_core_never_import_unsloth(tmp_path):
    """`llfarm plan --backend unsloth` must not import unsloth (it raises without a GPU)."""
    poison = write(tmp_path / "poison" / "unsloth" / "__init__.py", 'raise RuntimeError("unsloth was imported")\n')
    env = dict(NO_GPU, PYTHONPATH=os.pathsep.join([str(poison.parent.parent), os.environ.get("PYTHONPATH", "")]))
    for args in (["plan", "quickstart", "--backend", "unsloth"], ["plan", "quickstart", "--backend", "auto"],
                 ["backends"]):
        proc = llfarm(*args, env=env)
        assert proc.returncode == 0, proc.stderr
    refused = llfarm("run", "quickstart", "--backend", "unsloth", "-o", str(tmp_path / "r"), env=env)
    assert refused.returncode == 2 and "unsloth was imported" not in refused.stderr
    assert not Path(tmp_path / "r").exists()
