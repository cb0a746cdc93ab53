"""benchmarks/unsloth_vs_pytorch.py without a GPU: it builds the model and data and compiles both backends'
plans (--plan-only), refuses a real run without CUDA, and computes tokens/s and peak memory from metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "unsloth_vs_pytorch.py"
SMALL = ["--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2",
         "--vocab", "1024", "--steps", "4", "--warmup", "1", "--seq-len", "32"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("unsloth_vs_pytorch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_only_builds_model_and_data_and_compiles_both(bench, tmp_path, capsys):
    work = tmp_path / "work"
    assert bench.main([*SMALL, "--method", "qlora", "--plan-only", "--workdir", str(work)]) == 0
    assert json.loads(capsys.readouterr().out) == {"pytorch": {"planned": True}, "unsloth": {"planned": True}}
    config = json.loads((work / "model" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 1024)
    rows = (work / "train.jsonl").read_text().splitlines()
    assert len(rows) == 4 * 4                                   # steps × batch size: one example per sequence
    unsloth = json.loads((work / "plans" / "unsloth" / "native" / "trainer.json").read_text())
    pytorch = json.loads((work / "plans" / "pytorch" / "native" / "trainer.json").read_text())
    load = unsloth["unsloth"]["from_pretrained"]
    assert load["load_in_4bit"] is True and pytorch["model"]["quantization"]["load_in_4bit"] is True
    assert load["use_gradient_checkpointing"] == "unsloth"
    assert pytorch["args"]["gradient_checkpointing"] is True
    assert unsloth["args"]["max_steps"] == pytorch["args"]["max_steps"] == 4
    assert unsloth["args"]["per_device_train_batch_size"] == pytorch["args"]["per_device_train_batch_size"] == 4
    assert load["max_seq_length"] == pytorch["data"]["max_length"] == 32
    assert unsloth["args"]["bf16"] is True and pytorch["args"]["bf16"] is True
    # the same job: both plans read the same normalized training data
    assert unsloth["data"]["train"] == pytorch["data"]["train"]


@pytest.mark.skipif(sys.platform == "darwin", reason="CUDA check only")
def test_refuses_a_real_run_without_cuda(bench, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert bench.main([*SMALL, "--workdir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_measure_and_table(bench, tmp_path):
    args = bench.parse_args(["--steps", "5", "--warmup", "1", "--batch-size", "2", "--seq-len", "100"])
    runs = {}
    for name, step_s, mem in (("pytorch", 1.0, 2000.0), ("unsloth", 0.5, 1000.0)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": 3.0 - 0.1 * s, "time": 10 + s * step_s, "memory_mb": mem - 100 + 20 * s}
                for s in range(1, 6)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "manifest.json").write_text(json.dumps({"timings": {"train_s": 9.0}, "versions": {"torch": "x"}}))
        runs[name] = bench.measure(run, args)
    assert runs["pytorch"]["tokens_per_s"] == pytest.approx(4 * 2 * 100 / 4.0)
    assert runs["unsloth"]["tokens_per_s"] == pytest.approx(4 * 2 * 100 / 2.0)
    assert runs["unsloth"]["peak_memory_mb"] == 1000.0
    text = bench.table(runs, args, {"gpu": "test", "parameters": 6.7e8})
    assert "| unsloth | 400.0 | 1000.0 | 2.5000 |" in text
    assert "unsloth / pytorch: 2.00× tokens/s, 0.50× peak memory" in text
