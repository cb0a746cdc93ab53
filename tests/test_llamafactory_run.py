"""LlamaFactory backend end to end on the tiny model (CPU, a few short runs):

- SFT LoRA, the same strategy on pytorch and llamafactory (quickstart, 40 steps, seed 42): the run
  directories hold the same files, the metrics rows the same keys, the train losses agree (parity), and
  `llfarm generate` answers the same;
- RM LoRA: the value head is kept with the adapter, rm accuracy/margin stream into metrics.jsonl and
  train_pair_accuracy lands in the final metrics;
- full fine-tuning: model/ holds the pytorch backend's files; `llfarm resume` continues it from its checkpoint;
- a config LlamaFactory's parser rejects reaches the user as one recognizable line.

The shared suite (tests/test_backends.py) covers DPO margins and the loss falling for every case.
"""

from __future__ import annotations

import itertools
import json
import shlex
from pathlib import Path

import pytest
from conftest import llfarm, manifest, metrics, run_dir_from

pytestmark = pytest.mark.slow

SFT = ["quickstart", "--set", "training.max_steps=40", "--set", "training.save_every=20", "--set",
       "export.formats=[]"]
RM = ["reward_model", "--set", "training.max_steps=8", "--set", "training.save_every=4"]
FULL = ["quickstart", "--set", "method.type=full", "--set", "training.learning_rate=1e-3", "--set",
        "training.max_steps=6", "--set", "training.save_every=3", "--set", "training.logging_steps=1", "--set",
        "export.formats=[]"]
PROMPTS = ["What is the capital of France?", "What is the capital of Italy?"]

_RUNS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lf-runs")


def run(root: Path, name: str, backend: str, args: list[str]) -> Path:
    if name not in _RUNS:
        _RUNS[name] = run_dir_from(llfarm("run", *args, "--backend", backend, "-o", str(root), "--run-id", name))
    return _RUNS[name]


def files(run_dir: Path) -> set[str]:
    """Every file of a run directory, except the backend's own native/ files and its logs."""
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
            if p.is_file() and p.relative_to(run_dir).parts[0] not in ("native", "logs")}


def test_sft_run_directory_equals_pytorch(root):
    pt, lf = run(root, "pt-sft", "pytorch", SFT), run(root, "lf-sft", "llamafactory", SFT)
    assert files(lf) == files(pt)
    expected = {"adapter/adapter_model.safetensors", "adapter/chat_template.jinja",
                "checkpoints/checkpoint-20/optimizer.pt", "checkpoints/checkpoint-40/adapter_model.safetensors"}
    assert expected <= files(lf)
    m = manifest(lf)
    assert (m["status"], m["backend"], m["output_kind"]) == ("completed", "llamafactory", "adapter")
    assert m["final_metrics"]["global_step"] == 40
    native = {str(p.relative_to(lf / "native")) for p in (lf / "native").rglob("*") if p.is_file()}
    assert not (lf / "native" / "data").exists(), "the data is referenced in the cache, not copied"
    assert {"command.txt", "llamafactory_train.yaml", "dataset_info.json",
            "output/trainer_log.jsonl", "output/trainer_state.json", "output/all_results.json"} <= native
    # the adapter's tokenizer carries the template (same chat template and eos as the pytorch backend's)
    assert (lf / "adapter/chat_template.jinja").read_text() == (pt / "adapter/chat_template.jinja").read_text()
    assert json.loads((lf / "adapter/tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    # command.txt: cd <run> && env ... <python> -m llfarm.backends.llamafactory.entry <yaml> ...
    cmd = (lf / "native/command.txt").read_text().strip()
    cd, rest = cmd.split(" && ", 1)
    argv = shlex.split(rest)
    assert shlex.split(cd) == ["cd", str(lf)]
    assert argv[:2] == ["DISABLE_VERSION_CHECK=1", "HF_HUB_OFFLINE=1"]
    assert argv[3:6] == ["-m", "llfarm.backends.llamafactory.entry", str(lf / "native/llamafactory_train.yaml")]


def test_metrics_rows_have_the_pytorch_keys(root):
    pt, lf = run(root, "pt-sft", "pytorch", SFT), run(root, "lf-sft", "llamafactory", SFT)
    lf_rows, pt_rows = metrics(lf), metrics(pt)
    assert [r["step"] for r in lf_rows] == [r["step"] for r in pt_rows] == [1, *range(5, 41, 5)]
    want = {"step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "memory_mb",
            "time"}
    for row in lf_rows:
        assert want <= set(row) <= want | {"train_runtime"}, row
        assert row["total_steps"] == 40
    assert all(a["time"] <= b["time"] for a, b in itertools.pairwise(lf_rows))


def test_train_loss_parity_with_pytorch(root):
    """Compared: the train loss of the last logged step (step 40) and the mean of all logged train losses,
    quickstart (LoRA r16, chatml, alpaca data, seed 42, batch 8, lr 1e-2 cosine) on both backends.
    Same data order, same LoRA init and the same answer-only labels make them agree closely here; the bound
    is 15%."""
    pt, lf = run(root, "pt-sft", "pytorch", SFT), run(root, "lf-sft", "llamafactory", SFT)
    pl, ll = [r["loss"] for r in metrics(pt)], [r["loss"] for r in metrics(lf)]
    print(f"final train loss: pytorch {pl[-1]:.4f}, llamafactory {ll[-1]:.4f}; "
          f"mean: pytorch {sum(pl) / len(pl):.4f}, llamafactory {sum(ll) / len(ll):.4f}")
    assert ll[0] == pytest.approx(pl[0], rel=0.01)           # same labels: the same first loss
    assert ll[-1] == pytest.approx(pl[-1], rel=0.15)
    assert sum(ll) / len(ll) == pytest.approx(sum(pl) / len(pl), rel=0.15)
    assert ll[-1] < ll[0] * 0.5


def test_generate_answers_like_pytorch(root):
    pt, lf = run(root, "pt-sft", "pytorch", SFT), run(root, "lf-sft", "llamafactory", SFT)
    answers = {}
    for name, d in (("pytorch", pt), ("llamafactory", lf)):
        args = [a for p in PROMPTS for a in ("--prompt", p)]
        proc = llfarm("generate", str(d), *args, "--max-new-tokens", "12")
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[name] = proc.stdout.strip().splitlines()
    assert len(answers["llamafactory"]) == len(PROMPTS)
    assert answers["llamafactory"] == answers["pytorch"]
    assert "Paris" in answers["llamafactory"][0]


def test_rm_value_head_and_accuracy(root):
    rm = run(root, "lf-rm", "llamafactory", RM)
    got = files(rm)
    assert {"adapter/adapter_model.safetensors", "adapter/value_head.safetensors", "adapter/tokenizer.json",
            "checkpoints/checkpoint-4/value_head.safetensors", "checkpoints/checkpoint-8/adapter_config.json"} <= got
    from safetensors import safe_open
    with safe_open(str(rm / "adapter/value_head.safetensors"), "pt") as fh:
        assert set(fh.keys()) == {"v_head.summary.weight", "v_head.summary.bias"}
    rows = [r for r in metrics(rm) if "loss" in r]
    assert rows and all({"accuracy", "reward_margin"} <= set(r) for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    fm = manifest(rm)["final_metrics"]
    assert 0.0 <= fm["train_pair_accuracy"] <= 1.0 and fm["global_step"] == 8
    proc = llfarm("generate", str(rm), "--prompt", "hi")
    assert proc.returncode == 2 and "reward model" in proc.stderr


def test_full_finetuning_and_resume(root):
    full = run(root, "lf-full", "llamafactory", FULL)
    model_files = {"model/chat_template.jinja", "model/config.json", "model/generation_config.json",
                   "model/model.safetensors", "model/tokenizer.json", "model/tokenizer_config.json",
                   "model/training_args.bin"}          # what the pytorch backend writes for full fine-tuning
    assert {f for f in files(full) if f.startswith("model/")} == model_files
    assert not (full / "adapter").exists()
    assert {"checkpoints/checkpoint-3", "checkpoints/checkpoint-6"} == {
        str(p.relative_to(full)) for p in (full / "checkpoints").glob("checkpoint-*")}
    proc = llfarm("resume", str(full), "--max-steps", "9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = manifest(full)
    assert m["status"] == "completed" and m["resumed_from"] == "checkpoints/checkpoint-6"
    steps = [r["step"] for r in metrics(full)]
    assert steps[-1] == 9 and 7 in steps and steps.count(6) == 1   # continued at 7, not restarted at 1
    assert m["final_metrics"]["global_step"] == 9
    assert (full / "checkpoints/checkpoint-9").is_dir()
    assert "Resuming training from checkpoint" in (full / "logs/train.log").read_text()
    proc = llfarm("generate", str(full), "--prompt", PROMPTS[0], "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_config_rejected_by_llamafactory_is_one_line(root):
    """llfarm's checks pass (the key exists), LlamaFactory's parser refuses the combination at run time."""
    proc = llfarm("run", "dpo", "--backend", "llamafactory", "-o", str(root), "--run-id", "bad",
                  "--set", "training.max_steps=2", "--set", "backend_options.llamafactory.neat_packing=true")
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.splitlines() if x.startswith("llfarm: LlamaFactory rejected")]
    assert len(lines) == 1 and "neat_packing" in lines[0] and "SFT" in lines[0]
    assert proc.stderr.strip().splitlines()[-1].startswith("llfarm: error:")
    assert manifest(root / "bad")["status"] == "failed"
