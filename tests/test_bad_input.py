"""Bad input: one line on stderr naming the file/key/line, a hint, exit code 2, no traceback, no run dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import llfarm, write

GOOD = """\
name: t
model: {path: "builtin:tiny-llama"}
stage: sft
data: {train: "builtin:alpaca"}
training: {max_steps: 2, batch_size: 4}
"""


def fails(tmp_path: Path, *args: str, expect: list[str], command: str = "run") -> str:
    out = tmp_path / "runs"
    extra = ["-o", str(out)] if command == "run" else []
    proc = llfarm(command, *args, *extra, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit {proc.returncode}: {err}\n{proc.stdout}"
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, f"not one line:\n{err}"
    assert err.startswith("llfarm: error:")
    for piece in expect:
        assert piece in err, f"{piece!r} not in: {err}"
    assert not out.exists() or not any(out.iterdir()), "a run directory was left behind"
    return err


def strategy(tmp_path: Path, text: str, name: str = "s.yaml") -> str:
    return str(write(tmp_path / name, text))


def test_unknown_top_level_key_did_you_mean(tmp_path):
    s = strategy(tmp_path, GOOD + "modle: {path: x}\n")
    fails(tmp_path, s, expect=["unknown key 'modle'", "did you mean 'model'", "s.yaml:6"])


def test_unknown_nested_key_did_you_mean(tmp_path):
    s = strategy(tmp_path, GOOD.replace("max_steps: 2", "max_steps: 2, learnig_rate: 0.1"))
    fails(tmp_path, s, expect=["unknown key 'training.learnig_rate'", "did you mean 'learning_rate'", "s.yaml:5"])


def test_unknown_deeply_nested_key(tmp_path):
    s = strategy(tmp_path, GOOD + "preference: {beta: 0.1, los: ipo}\n")
    fails(tmp_path, s, expect=["unknown key 'preference.los'", "did you mean 'loss'"])


def test_wrong_type_names_key(tmp_path):
    s = strategy(tmp_path, GOOD.replace("batch_size: 4", "batch_size: eight"))
    fails(tmp_path, s, expect=["'training.batch_size'", "'eight'"])


def test_out_of_range_number(tmp_path):
    s = strategy(tmp_path, GOOD.replace("max_steps: 2", "max_steps: 2, learning_rate: -0.1"))
    fails(tmp_path, s, expect=["'training.learning_rate'", "greater than 0", "-0.1"])


def test_unknown_stage(tmp_path):
    s = strategy(tmp_path, GOOD.replace("stage: sft", "stage: sfft"))
    fails(tmp_path, s, expect=["'stage'", "one of 9 values", "'sfft'", "did you mean 'sft'"])


def test_unknown_method(tmp_path):
    s = strategy(tmp_path, GOOD + "method: {type: adapter}\n")
    fails(tmp_path, s, expect=["'method.type'", "'lora'", "'adapter'"])


def test_unknown_backend_flag(tmp_path):
    fails(tmp_path, strategy(tmp_path, GOOD), "--backend", "pytorh",
          expect=["unknown backend 'pytorh'", "did you mean 'pytorch'"])


def test_unknown_backend_in_strategy(tmp_path):
    s = strategy(tmp_path, GOOD + "backend: llamafactry\n")
    fails(tmp_path, s, expect=["unknown backend 'llamafactry'"])


def test_malformed_yaml_names_line(tmp_path):
    s = strategy(tmp_path, GOOD + "training: [unclosed\n  x: 1\n")
    fails(tmp_path, s, expect=["malformed YAML", "s.yaml:"])


def test_yaml_not_a_mapping(tmp_path):
    s = strategy(tmp_path, "- just\n- a list\n")
    fails(tmp_path, s, expect=["expected a mapping", "list"])


def test_missing_data_file(tmp_path):
    s = strategy(tmp_path, GOOD.replace('"builtin:alpaca"', "nothere.jsonl"))
    fails(tmp_path, s, expect=["data.train", "nothere.jsonl", "not found"])


def test_malformed_jsonl_line_number(tmp_path):
    write(tmp_path / "d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    s = strategy(tmp_path, GOOD.replace('"builtin:alpaca"', "d.jsonl"))
    fails(tmp_path, s, expect=["d.jsonl:2", "malformed JSON line"])


def test_sft_data_for_dpo(tmp_path):
    s = strategy(tmp_path, GOOD.replace("stage: sft", "stage: dpo"))
    fails(tmp_path, s, expect=["stage 'dpo' needs preference pairs", "alpaca", "data.train"])


def test_preference_data_for_sft(tmp_path):
    s = strategy(tmp_path, GOOD.replace('"builtin:alpaca"', '"builtin:preference"'))
    fails(tmp_path, s, expect=["stage 'sft'", "preference pairs"])


def test_record_missing_field(tmp_path):
    write(tmp_path / "d.jsonl", '{"instruction": "a", "output": "b"}\n{"messages": []}\n')
    s = strategy(tmp_path, GOOD.replace('"builtin:alpaca"', "d.jsonl"))
    fails(tmp_path, s, expect=["d.jsonl:2"])


def test_missing_local_model_directory(tmp_path):
    s = strategy(tmp_path, GOOD.replace('"builtin:tiny-llama"', "./no-such-model"))
    fails(tmp_path, s, expect=["model.path", "no-such-model", "not found"])


def test_extends_unknown_strategy(tmp_path):
    s = strategy(tmp_path, "extends: quikstart\n" + GOOD)
    fails(tmp_path, s, expect=["extends", "unknown strategy 'quikstart'", "did you mean 'quickstart'", "s.yaml:1"])


def test_zero_training_steps(tmp_path):
    write(tmp_path / "empty.jsonl", "\n")
    s = strategy(tmp_path, GOOD.replace('"builtin:alpaca"', "empty.jsonl"))
    fails(tmp_path, s, expect=["empty", "zero training steps"])


def test_unknown_template(tmp_path):
    s = strategy(tmp_path, GOOD + "template: chatlm\n")
    fails(tmp_path, s, expect=["unknown template 'chatlm'", "did you mean 'chatml'"])


def test_bad_set_override(tmp_path):
    fails(tmp_path, strategy(tmp_path, GOOD), "--set", "training.max_steps", expect=["--set expects key.path=value"])


def test_set_override_unknown_key(tmp_path):
    fails(tmp_path, strategy(tmp_path, GOOD), "--set", "training.epochz=2",
          expect=["unknown key 'training.epochz'", "did you mean 'epochs'", "--set"])


def test_missing_required_key(tmp_path):
    s = strategy(tmp_path, "name: t\n")
    fails(tmp_path, s, expect=["'data' is required"])


def test_all_problems_reported_at_once(tmp_path):
    s = strategy(tmp_path, GOOD.replace("stage: sft", "stage: sfft") + "method: {type: lora, r: 0}\n")
    err = fails(tmp_path, s, expect=["2 problems", "'stage'", "'method.r'"])
    assert "s.yaml:3" in err and "s.yaml:6" in err


def test_strategy_file_not_found(tmp_path):
    fails(tmp_path, "missing/strategy.yaml", expect=["strategy file 'missing/strategy.yaml' not found"])


def test_qlora_without_gpu(tmp_path):
    s = strategy(tmp_path, GOOD + "method: {type: qlora}\n")
    fails(tmp_path, s, "--backend", "pytorch", expect=["qlora", "needs a CUDA GPU"])


def test_generate_on_a_folder_that_is_not_a_run(tmp_path):
    fails(tmp_path, str(tmp_path), "--prompt", "hi", command="generate", expect=["not a run directory"])


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_other_commands_report_the_same_way(tmp_path, command):
    s = strategy(tmp_path, GOOD + "modle: {path: x}\n")
    fails(tmp_path, s, command=command, expect=["unknown key 'modle'"])


def test_unknown_backend_option_for_pytorch(tmp_path):
    s = strategy(tmp_path, GOOD + "backend_options: {pytorch: {optimm: adamw_torch}}\n")
    fails(tmp_path, s, expect=["unknown key 'backend_options.pytorch.optimm'", "did you mean 'optim'", "s.yaml:6"])


def test_unwritable_output_folder(tmp_path):
    blocker = write(tmp_path / "afile", "not a folder")
    proc = llfarm("run", strategy(tmp_path, GOOD), "-o", str(blocker / "runs"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "afile" in proc.stderr


def test_8bit_quantization_without_gpu(tmp_path):
    s = strategy(tmp_path, GOOD.replace('"builtin:tiny-llama"}', '"builtin:tiny-llama", quantization: 8bit}'))
    fails(tmp_path, s, "--backend", "pytorch", expect=["model.quantization", "8bit", "needs a CUDA GPU"])
