"""Strategy resolution: extends, --set, provenance, redaction, and every shipped strategy."""

from __future__ import annotations

import pytest
import yaml
from conftest import llfarm, write

from llfarm.errors import StrategyError
from llfarm.strategy import redact, resolve, shipped_strategies

SHIPPED = ["quickstart", "cpu_lora_sft", "cpu_full_sft", "dpo", "reward_model", "cuda_qlora_sft",
           "mps_lora_sft", "llamafactory_sft", "unsloth_sft", "pretrain", "orpo", "simpo", "kto", "grpo"]


def test_all_required_strategies_are_shipped():
    assert set(SHIPPED) <= set(shipped_strategies())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_strategy_validates(name):
    res = resolve(name)
    assert res.strategy.name == name
    assert res.strategy.description


def test_extends_inherits_and_overrides():
    res = resolve("cpu_full_sft")
    s = res.strategy
    assert s.method.type == "full"                      # own value
    assert s.training.batch_size == 8                   # inherited from cpu_lora_sft
    assert s.data.train == "builtin:sharegpt"
    assert res.source_of("method.type").startswith(str(shipped_strategies()["cpu_full_sft"]))
    assert res.source_of("training.batch_size").startswith("extends cpu_lora_sft")
    assert res.source_of("preference.beta") == "default"


def test_extends_chain_of_files(tmp_path):
    write(tmp_path / "base.yaml", "name: base\ndata: {train: 'builtin:alpaca'}\ntraining: {epochs: 2, seed: 7}\n")
    write(tmp_path / "mid.yaml", "name: mid\nextends: base.yaml\ntraining: {epochs: 4}\n")
    child = write(tmp_path / "child.yaml", "name: child\nextends: mid.yaml\nmethod: {r: 4}\n")
    s = resolve(child).strategy
    assert (s.name, s.training.epochs, s.training.seed, s.method.r) == ("child", 4, 7, 4)


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "name: a\nextends: b.yaml\ndata: {train: x}\n")
    write(tmp_path / "b.yaml", "name: b\nextends: a.yaml\n")
    with pytest.raises(StrategyError, match="cycle"):
        resolve(tmp_path / "a.yaml")


def test_set_overrides_and_records_source():
    res = resolve("quickstart", ["training.max_steps=7", "method.r=4", "export.formats=[]"])
    assert res.strategy.training.max_steps == 7
    assert res.strategy.method.r == 4
    assert res.strategy.export.formats == []
    assert res.source_of("training.max_steps") == "--set training.max_steps=7"


def test_relative_data_paths_resolve_against_the_strategy_file(tmp_path):
    write(tmp_path / "data" / "d.jsonl", '{"instruction": "a", "output": "b"}\n')
    s = write(tmp_path / "sub" / "s.yaml", "name: s\ndata: {train: ../data/d.jsonl}\n")
    assert resolve(s).strategy.data.train == str((tmp_path / "data" / "d.jsonl").resolve())


def test_validate_explain_prints_sources():
    proc = llfarm("validate", "cpu_full_sft", "--explain", "--set", "training.seed=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("training.seed = 3") and "--set" in line for line in lines)
    assert any(line.startswith("training.batch_size = 8") and "extends cpu_lora_sft" in line for line in lines)
    from llfarm.platform import detect, resolve_precision
    plat = detect()
    precision = llfarm("validate", "quickstart", "--explain").stdout
    assert f"training.precision = '{resolve_precision('auto', plat)}'    # platform default ({plat.name}" in precision
    assert lines[-1].startswith("ok:")


def test_redaction_of_secrets():
    data = {"backend_options": {"llamafactory": {"hf_hub_token": "hf_abcdefghijklmnopqrstuvwxyz0123"}},
            "note": "hf_abcdefghijklmnopqrstuvwxyz0123", "keep": "hello"}
    out = redact(data)
    assert out["backend_options"]["llamafactory"]["hf_hub_token"] == "***"
    assert out["note"] == "***" and out["keep"] == "hello"


def test_strategies_list_and_show():
    proc = llfarm("strategies", "list")
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert set(SHIPPED) <= set(names)
    shown = llfarm("strategies", "show", "dpo")
    assert yaml.safe_load(shown.stdout)["stage"] == "dpo"
