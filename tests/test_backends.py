"""The shared backend suite: every registered backend runs the same strategies (SFT LoRA, SFT full, DPO, RM)
for a few steps on the tiny model, and the same assertions hold on the normalized run directory.

A backend that cannot run a case is marked per case with the reason (ibis-style): `never` (the library cannot) is a
strict xfail naming the exception — a case that starts passing fails the suite until its marker is removed. Cases
needing hardware this machine lacks are skipped with that reason. tests/test_backend_contract.py holds the
compile-level contract every backend passes on any machine.
"""

from __future__ import annotations

import pytest
from conftest import llfarm, manifest, metrics, run_dir_from

from llfarm.backend import registry
from llfarm.platform import detect

CASES = {
    "sft_lora": ("quickstart", ["training.max_steps=40", "export.formats=[]"]),
    "sft_full": ("cpu_full_sft", ["training.max_steps=20"]),
    "dpo_lora": ("dpo", ["training.max_steps=16"]),
    "rm_lora": ("reward_model", ["training.max_steps=32"]),
}


def never(reason: str):
    return pytest.mark.xfail(strict=True, reason=f"never: {reason}")


MARKS = {
    ("unsloth", "rm_lora"): never("Unsloth has no reward-model API; its capability table refuses rm"),
}

COMMON_FILES = {"manifest.json", "strategy.yaml", "native", "logs", "metrics.jsonl", "checkpoints", "loss.png"}


def params():
    for backend in registry():
        for case in CASES:
            marks = [MARKS[(backend, case)]] if (backend, case) in MARKS else []
            yield pytest.param(backend, case, marks=marks, id=f"{backend}-{case}")


_RUNS: dict[tuple[str, str], object] = {}


def run_case(backend: str, case: str, tmp_root):
    """One run per (backend, case) per session, shared by the tests below."""
    key = (backend, case)
    if key not in _RUNS:
        plat = detect()
        caps = registry()[backend].capabilities
        if plat.name not in caps.platforms:
            pytest.skip(f"{backend} needs {'/'.join(sorted(caps.platforms))}; this machine has {plat.accelerator}")
        strategy, overrides = CASES[case]
        args = ["run", strategy, "--backend", backend, "-o", str(tmp_root / backend)]
        for o in overrides:
            args += ["--set", o]
        _RUNS[key] = llfarm(*args)
    return _RUNS[key]


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("backend-runs")


@pytest.mark.slow
@pytest.mark.parametrize("backend,case", list(params()))
def test_run_directory_contract(backend, case, runs_root):
    proc = run_case(backend, case, runs_root)
    run = run_dir_from(proc)
    m = manifest(run)
    output = "adapter" if case.endswith("lora") else "model"
    assert {p.name for p in run.iterdir()} == COMMON_FILES | {output}
    assert m["status"] == "completed"
    assert m["backend"] == backend
    assert m["stage"] == case.split("_")[0]
    assert m["output_kind"] == output
    assert (run / "native" / "command.txt").read_text().strip()
    assert (run / "logs" / "train.log").stat().st_size > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    marker = "adapter_config.json" if output == "adapter" else "config.json"
    assert (run / output / marker).is_file()
    assert (run / output / "tokenizer_config.json").is_file()
    assert any((run / "checkpoints").glob("checkpoint-*")), "a final checkpoint is kept for resume"


@pytest.mark.slow
@pytest.mark.parametrize("backend,case", list(params()))
def test_loss_falls_and_stage_metrics(backend, case, runs_root):
    run = run_dir_from(run_case(backend, case, runs_root))
    rows = [r for r in metrics(run) if "loss" in r]
    assert len(rows) >= 3
    assert all({"step", "loss", "learning_rate"} <= set(r) for r in rows)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first * 0.9, f"loss did not fall: {first} → {last}"
    fm = manifest(run)["final_metrics"]
    assert fm["final_loss"] == pytest.approx(last)
    if case.startswith("dpo"):
        margins = [r["reward_margin"] for r in metrics(run) if "reward_margin" in r]
        assert margins and margins[-1] > 0, f"DPO reward margin (chosen - rejected) not positive: {margins[-3:]}"
    if case.startswith("rm"):
        assert fm["train_pair_accuracy"] > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in registry()])
def test_generate_from_sft_run(backend, runs_root):
    run = run_dir_from(run_case(backend, "sft_lora", runs_root))
    proc = llfarm("generate", str(run), "--prompt", "What is the capital of France?", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = proc.stdout.strip()
    assert answer and "<|im_end|>" not in answer


@pytest.mark.slow
@pytest.mark.parametrize("backend,case", [p for p in params() if p.values[1] in ("sft_lora", "sft_full")])
def test_export_from_a_real_run(backend, case, runs_root, tmp_path):
    """merged + GGUF + Modelfile from each backend's real LoRA and full runs; the GGUF computes the merged
    model's logits (numpy forward over the GGUF alone vs transformers)."""
    import numpy as np
    from export_helpers import gguf_forward, hf_logits
    from transformers import AutoTokenizer

    run = run_dir_from(run_case(backend, case, runs_root))
    proc = llfarm("export", str(run), "--format", "merged", "--format", "ollama", "--quant", "f32",
                  "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    gguf = next(tmp_path.glob("*-f32.gguf"))
    assert "FROM ./" + gguf.name in (tmp_path / "Modelfile").read_text()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    diff = np.abs(gguf_forward(gguf, ids) - hf_logits(tmp_path / "merged", ids)).max()
    assert diff < 1e-3, f"GGUF logits differ from the merged model's by {diff}"
    assert manifest(run)["exports"][-1]["quant"] == "f32"
