"""benchmarks/llamafactory_overhead.py without training: --plan-only writes the native config through `llfarm plan`
and prints both commands of the side-by-side run (llfarm vs `llamafactory-cli train` on that config)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "llamafactory_overhead.py"


def load():
    spec = importlib.util.spec_from_file_location("llamafactory_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_only_prints_both_commands(tmp_path, capsys):
    bench = load()
    assert bench.main(["--plan-only", "--steps", "7", "--workdir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    config = Path(out["native_config"])
    assert config == tmp_path / "plan" / "native" / "llamafactory_train.yaml"
    c = yaml.safe_load(config.read_text())
    assert c["max_steps"] == 7 and c["stage"] == "sft" and Path(c["dataset_dir"], "dataset_info.json").is_file()
    assert out["env"] == {"DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    assert out["commands"]["native"].endswith(f"llamafactory-cli train {config}")
    assert "llfarm run quickstart --backend llamafactory --set training.max_steps=7" in out["commands"]["llfarm"]


def test_same_job_ignores_only_the_run_directory(tmp_path):
    bench = load()
    a, b = tmp_path / "a" / "x.yaml", tmp_path / "b" / "x.yaml"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text(f"output_dir: {p.parent}/checkpoints\nmax_steps: 7\n")
    assert bench.same_job(a, b, a.parent, b.parent)
    b.write_text(f"output_dir: {b.parent}/checkpoints\nmax_steps: 8\n")
    assert not bench.same_job(a, b, a.parent, b.parent)
