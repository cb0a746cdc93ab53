"""Running the generated Unsloth script.

- On any machine (CPU): the script runs end to end with a **stand-in ``unsloth`` package** (written below into a
  temp dir and put first on PYTHONPATH) whose FastLanguageModel loads with transformers and adds LoRA with
  peft. That checks everything llfarm owns (data rendering, TRL configs, metrics.jsonl, saving, collect, the
  normalized run dir, and that the tokens trained on are the pytorch backend's) and nothing of Unsloth's own
  kernels or patches: those need a GPU.
- On a CUDA GPU (``gpu`` marker): the real Unsloth SFT and DPO paths, and QLoRA 4-bit through the pytorch and
  unsloth backends, end to end on the tiny model. Skipped here with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import llfarm, manifest, metrics, run_dir_from, write

from llfarm.platform import detect

HAS_CUDA = detect().name == "cuda" and not os.environ.get("LLFARM_PLATFORM") and shutil.which("nvidia-smi")

STAND_IN = '''\
"""A stand-in for unsloth used by llfarm's CPU tests (tests/test_unsloth_run.py): same call shapes, plain
transformers + peft underneath, none of Unsloth's kernels."""
import peft
import transformers

__version__ = "stand-in"
CALLS = []


def is_bfloat16_supported():
    return False


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit, full_finetuning,
                        use_gradient_checkpointing, revision, trust_remote_code, use_exact_model_name, **kw):
        assert not load_in_4bit, "the stand-in cannot load 4-bit weights (that needs a GPU)"
        tok = transformers.AutoTokenizer.from_pretrained(model_name, revision=revision)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype, revision=revision)
        model.config.pad_token_id = tok.pad_token_id
        print(f"stand-in unsloth: from_pretrained max_seq_length={max_seq_length} full={full_finetuning}")
        return model, tok

    @staticmethod
    def get_peft_model(model, r, lora_alpha, lora_dropout, target_modules, bias, use_gradient_checkpointing,
                       random_state, use_rslora, **kw):
        config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                 target_modules=target_modules, bias=bias, use_rslora=use_rslora,
                                 task_type="CAUSAL_LM")
        print(f"stand-in unsloth: get_peft_model r={r} alpha={lora_alpha}")
        return peft.get_peft_model(model, config)
'''

SFT = "quickstart"
DPO = "dpo"
FP32 = ["training.precision=fp32", "export.formats=[]"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stand-in")
    write(root / "unsloth" / "__init__.py", STAND_IN)
    write(root / "unsloth_zoo" / "__init__.py", '"""Stand-in: the backend checks that unsloth_zoo is installed."""\n')
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # LLFARM_PLATFORM=cuda lets `llfarm run --backend unsloth` past the GPU check on this CPU machine.
    return {"PYTHONPATH": path, "LLFARM_PLATFORM": "cuda"}


def run(strategy: str, backend: str, out: Path, *sets: str, env: dict[str, str] | None = None):
    args = ["run", strategy, "--backend", backend, "-o", str(out)]
    for s in sets:
        args += ["--set", s]
    return llfarm(*args, env=env)


def check_run_dir(run: Path, stage: str, output: str) -> dict:
    m = manifest(run)
    assert m["status"] == "completed" and m["backend"] == "unsloth" and m["stage"] == stage
    assert m["output_kind"] == output
    assert {"manifest.json", "strategy.yaml", "native", "logs", "metrics.jsonl", "checkpoints", "loss.png",
            output} == {p.name for p in run.iterdir()}
    assert {"train_unsloth.py", "trainer.json", "command.txt"} <= {p.name for p in
                                                                                 (run / "native").iterdir()}
    marker = "adapter_config.json" if output == "adapter" else "config.json"
    assert (run / output / marker).is_file() and (run / output / "tokenizer_config.json").is_file()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run / "checkpoints").glob("checkpoint-*"))
    rows = [r for r in metrics(run) if "loss" in r]
    assert len(rows) >= 2 and all({"step", "loss", "learning_rate"} <= set(r) for r in rows)
    return m


@pytest.mark.slow
def test_sft_script_runs_with_the_stand_in_and_trains_on_the_pytorch_tokens(stand_in, tmp_path):
    steps = ["training.max_steps=6", "training.logging_steps=1", "training.save_every=3"]
    proc = run(SFT, "unsloth", tmp_path / "u", *FP32, *steps, env=stand_in)
    run_dir = run_dir_from(proc)
    m = check_run_dir(run_dir, "sft", "adapter")
    assert m["final_metrics"]["unsloth_version"] == "stand-in"
    assert m["final_metrics"]["global_step"] == 6
    log = (run_dir / "logs" / "train.log").read_text()
    assert "stand-in unsloth: from_pretrained max_seq_length=64 full=False" in log
    assert "stand-in unsloth: get_peft_model r=16 alpha=32" in log
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
    # Same tokens, same batches, same base model: the first logged loss (LoRA's B starts at zero, so it is
    # the base model's loss) equals the pytorch backend's.
    ref = run_dir_from(run(SFT, "pytorch", tmp_path / "p", *FP32, *steps))
    first_u, first_p = metrics(run_dir)[0], metrics(ref)[0]
    assert first_u["step"] == first_p["step"] == 1
    assert first_u["loss"] == pytest.approx(first_p["loss"], rel=1e-4)
    # generation works from the unsloth run directory like from any other
    gen = llfarm("generate", str(run_dir), "--prompt", "What is the capital of France?", "--max-new-tokens", "8")
    assert gen.returncode == 0, gen.stderr[-2000:]


@pytest.mark.slow
def test_dpo_script_runs_with_the_stand_in_and_resumes(stand_in, tmp_path):
    proc = run(DPO, "unsloth", tmp_path / "u", *FP32, "training.max_steps=4", "training.logging_steps=1",
               "training.save_every=2", env=stand_in)
    run_dir = run_dir_from(proc)
    check_run_dir(run_dir, "dpo", "adapter")
    assert any("reward_margin" in r for r in metrics(run_dir))
    # resume compiles the same script with resume_from set and continues after the latest checkpoint
    resumed = llfarm("resume", str(run_dir), "--max-steps", "6", env=stand_in)
    assert run_dir_from(resumed) == run_dir
    m = manifest(run_dir)
    assert m["status"] == "completed" and m["resumed_from"] == "checkpoints/checkpoint-4"
    assert json.loads((run_dir / "native" / "trainer.json").read_text())["resume_from"].endswith(
        "checkpoint-4")
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert max(steps) == 6 and steps.count(4) == 1


@pytest.mark.slow
def test_full_sft_script_runs_with_the_stand_in(stand_in, tmp_path):
    proc = run("cpu_full_sft", "unsloth", tmp_path / "u", *FP32, "training.max_steps=3", env=stand_in)
    run_dir = run_dir_from(proc)
    check_run_dir(run_dir, "sft", "model")
    assert "full=True" in (run_dir / "logs" / "train.log").read_text()


def test_script_without_a_gpu_fails_with_one_clear_line(tmp_path):
    """What a user sees running native/train_unsloth.py by hand on a machine where `import unsloth` fails."""
    plan_dir = tmp_path / "planned"
    proc = llfarm("plan", SFT, "--backend", "unsloth", "--out", str(plan_dir))
    assert proc.returncode == 0, proc.stderr
    fake = write(tmp_path / "nogpu" / "unsloth" / "__init__.py",
                 'raise NotImplementedError("Unsloth cannot find any torch accelerator? You need a GPU.")\n')
    child = subprocess.run([sys.executable, str(plan_dir / "native" / "train_unsloth.py"),
                            str(plan_dir / "native" / "trainer.json")],
                           env=dict(os.environ, PYTHONPATH=str(fake.parent.parent)), capture_output=True,
                           text=True, timeout=120, check=False)
    assert child.returncode == 1
    assert child.stderr.strip().splitlines() == [
        ("llfarm: Unsloth cannot run on this machine (Unsloth cannot find any torch accelerator? You need a GPU.); "
         "use --backend pytorch or llamafactory")]


# ---------------------------------------------------------------- on a CUDA GPU: the real Unsloth

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.slow
@pytest.mark.parametrize("strategy,stage,sets", [
    (SFT, "sft", ["training.max_steps=40"]),
    (DPO, "dpo", ["training.max_steps=16"]),
], ids=["sft_lora", "dpo_lora"])
def test_unsloth_on_gpu(strategy, stage, sets, tmp_path):
    run_dir = run_dir_from(run(strategy, "unsloth", tmp_path, "export.formats=[]", *sets))
    m = check_run_dir(run_dir, stage, "adapter")
    assert m["final_metrics"]["unsloth_version"] not in (None, "stand-in")
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.9
    if stage == "dpo":
        assert [r["reward_margin"] for r in metrics(run_dir) if "reward_margin" in r][-1] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "unsloth"])
def test_qlora_4bit_on_gpu(backend, tmp_path):
    run_dir = run_dir_from(run(SFT, backend, tmp_path, "method.type=qlora", "training.max_steps=30",
                               "export.formats=[]"))
    m = manifest(run_dir)
    assert m["status"] == "completed" and m["method"] == "qlora" and m["output_kind"] == "adapter"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
