"""llfarm eval: on a quickstart-trained run the trained model beats its base model; the numbers equal a direct
computation; the run's own eval data is the default; adapter and full-model runs of both CPU backends; one-line
errors that write nothing. Also the memory keys the run recorded."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, llfarm, manifest, metrics, one_line_error, write

README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_eval_command() -> str:
    """The README's `llfarm eval` example (section 'Evaluating a run')."""
    section = README.split("### Evaluating a run", 1)[1]
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            if line.startswith("llfarm eval "):
                return line.split("#")[0].strip()
    raise AssertionError("README's 'Evaluating a run' has no `llfarm eval` command")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`llfarm run quickstart` (no export) in a fresh directory, default output: (directory, 'runs/<id>')."""
    work = tmp_path_factory.mktemp("work")
    proc = llfarm("run", "quickstart", "--set", "export.formats=[]", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout.strip().splitlines()[-1]
    assert shown.startswith("runs/")
    return work, shown


@pytest.fixture(scope="module")
def evaluated(trained):
    """The README's eval command, run as written (the run id filled in) from the directory the run was made in."""
    work, shown = trained
    command = readme_eval_command().replace("runs/<run-id>", shown)
    proc = llfarm(*command.split()[1:], "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, shown, json.loads(proc.stdout)


@pytest.mark.slow
def test_trained_model_beats_its_base_model(evaluated):
    work, shown, result = evaluated
    run, base = result["model"], result["baseline"]
    print(f"run: loss {run['loss']:.4f} ppl {run['perplexity']:.3f} acc {run['token_accuracy']:.3f} "
          f"EM {run['exact_match']:.3f}; baseline: loss {base['loss']:.4f} ppl {base['perplexity']:.1f} "
          f"acc {base['token_accuracy']:.3f} EM {base['exact_match']:.3f}")
    assert run["loss"] < base["loss"] and run["perplexity"] < base["perplexity"]
    assert run["token_accuracy"] > base["token_accuracy"]
    assert run["exact_match"] > base["exact_match"] and run["exact_match"] >= 0.75
    assert run["n_examples"] == run["n_scored"] == 32 and result["data"]["source"] == "--data"
    on_disk = json.loads((work / shown / "eval.json").read_text())
    assert on_disk == result
    summary = manifest(work / shown)["eval"]
    for key in ("loss", "perplexity", "token_accuracy", "exact_match"):
        assert summary[key] == run[key] and summary["baseline"][key] == base[key]
    assert summary["n"] == 32 and summary["data"] == "builtin:alpaca"


@pytest.mark.slow
def test_numbers_equal_a_direct_computation(evaluated):
    """Loss and token accuracy recomputed example by example with transformers' own labels API (prompt tokens
    masked with -100), exact match from `llfarm generate` on the same prompts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llfarm.builtin.make_samples import qa_pairs
    from llfarm.evaluation import read_sft
    from llfarm.templates import load_template
    from llfarm.train_common import tokenize_sft

    work, shown, result = evaluated
    run = work / shown
    m = manifest(run)
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(m["model_path"], dtype=torch.float32),
                                      run / "adapter").eval()
    rows, _ = read_sft("builtin:alpaca", "data", None)
    examples, _ = tokenize_sft(rows, load_template("chatml"), tokenizer, 64)
    total, right, count = 0.0, 0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            labels = torch.tensor([[t if k else -100 for t, k in zip(e["input_ids"], e["completion_mask"])]])
            out = model(input_ids=ids, labels=labels)
            n = int((labels[0, 1:] != -100).sum())
            total += float(out.loss) * n
            right += int(((out.logits[0, :-1].argmax(-1) == ids[0, 1:]) & (labels[0, 1:] != -100)).sum())
            count += n
    assert result["model"]["loss"] == pytest.approx(total / count, rel=1e-4)
    assert result["model"]["token_accuracy"] == pytest.approx(right / count, abs=1e-6)
    assert result["model"]["answer_tokens"] == count
    assert result["model"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)

    prompts = [p for p, _, _ in qa_pairs()]
    assert prompts == [a["prompt"] for a in result["model"]["answers"]]
    args = ["generate", shown, "--max-new-tokens", "24"]
    for p in prompts:
        args += ["--prompt", p]
    gen = llfarm(*args, cwd=work)
    assert gen.returncode == 0, gen.stderr[-2000:]
    generated = gen.stdout.strip().splitlines()
    exact = [g.strip() == a["reference"].strip() for g, a in zip(generated, result["model"]["answers"])]
    assert [a["exact"] for a in result["model"]["answers"]] == exact
    assert result["model"]["exact_match"] == pytest.approx(sum(exact) / len(exact))


@pytest.mark.slow
def test_the_runs_own_eval_data_is_the_default(trained, tmp_path):
    """A run with held-out data (manifest.json's data.eval, as the core records it) is scored on it without
    --data."""
    from llfarm.evaluation import read_sft
    work, shown = trained
    copy = tmp_path / "runs" / "with-eval"
    shutil.copytree(work / shown, copy)
    rows, _ = read_sft("builtin:alpaca", "data", None)
    held = write(tmp_path / "cache" / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:5]))
    m = manifest(copy)
    m["data"]["eval"] = str(held)
    (copy / "manifest.json").write_text(json.dumps(m))
    proc = llfarm("eval", "runs/with-eval", "--max-new-tokens", "16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"5 examples from {held}" in proc.stdout
    assert "wrote runs/with-eval/eval.json" in proc.stderr
    result = json.loads((copy / "eval.json").read_text())
    assert result["data"]["source"] == "run" and result["model"]["n_examples"] == 5 and "baseline" not in result
    assert manifest(copy)["eval"]["n"] == 5
    held.unlink()                                   # the data cache was cleared: one line, nothing written
    proc = llfarm("eval", "runs/with-eval", cwd=tmp_path)
    assert proc.returncode == 2 and "eval data is gone" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_the_run_recorded_memory(trained):
    work, shown = trained
    rows = metrics(work / shown)
    assert all(r["rss_peak_mb"] >= r["rss_mb"] > 100 for r in rows)
    assert all("gpu_peak_mb" not in r for r in rows)           # CPU machine: no GPU keys
    assert manifest(work / shown)["memory"]["rss_peak_mb"] == max(r["rss_peak_mb"] for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("backend,method", [("pytorch", "full"), ("llamafactory", "lora"), ("llamafactory", "full")])
def test_adapter_and_full_runs_of_each_cpu_backend(tmp_path, backend, method):
    proc = llfarm("run", "quickstart", "--backend", backend, "-o", str(tmp_path), "--run-id", "r",
                  "--set", f"method.type={method}", "--set", "training.max_steps=20", "--set", "export.formats=[]",
                  "--set", "training.learning_rate=5.0e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "r"
    assert (run / ("adapter" if method == "lora" else "model")).is_dir()
    proc = llfarm("eval", str(run), "--data", "builtin:alpaca", "--baseline", "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["output_kind"] == ("adapter" if method == "lora" else "model")
    assert result["model"]["loss"] < result["baseline"]["loss"], result["model"]["loss"]
    assert manifest(run)["eval"]["loss"] == result["model"]["loss"]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def fake_run(root: Path, stage: str = "sft") -> Path:
    """A completed run's skeleton: enough for every check eval makes before loading a model."""
    run = root / "runs" / "r1"
    write(run / "manifest.json", json.dumps({"status": "completed", "stage": stage, "output_kind": "adapter",
                                             "model_path": "/nonexistent", "template": "chatml"}))
    write(run / "adapter" / "adapter_config.json", "{}")
    return run


def fails(cwd: Path, *args: str, expect: list[str]) -> str:
    before = {p: p.read_bytes() for p in cwd.rglob("*") if p.is_file()}
    err = one_line_error(llfarm("eval", *args, cwd=cwd), expect)
    after = {p: p.read_bytes() for p in cwd.rglob("*") if p.is_file()}
    assert after == before, "eval wrote or changed files on bad input"
    return err


def test_unknown_run(tmp_path):
    fails(tmp_path, "runs/nope", "--data", "builtin:alpaca", expect=["runs/nope", "not a run directory"])


def test_a_folder_that_is_not_a_run(tmp_path):
    write(tmp_path / "stuff" / "notes.txt", "hello")
    fails(tmp_path, "stuff", expect=["stuff", "not a run directory"])


def test_a_run_without_eval_data_needs_data(tmp_path):
    fake_run(tmp_path)
    fails(tmp_path, "runs/r1", expect=["runs/r1", "no eval data", "--data"])


def test_a_bad_data_file_names_the_line(tmp_path):
    fake_run(tmp_path)
    write(tmp_path / "qa.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    fails(tmp_path, "runs/r1", "--data", "qa.jsonl", expect=["qa.jsonl:2", "malformed JSON line"])


def test_a_missing_data_file(tmp_path):
    fake_run(tmp_path)
    fails(tmp_path, "runs/r1", "--data", "nothere.jsonl", expect=["--data", "nothere.jsonl", "not found"])


def test_preference_data_is_not_eval_data(tmp_path):
    fake_run(tmp_path)
    fails(tmp_path, "runs/r1", "--data", "builtin:preference", expect=["preference pairs"])


def test_dpo_run_needs_sft_data(tmp_path):
    fake_run(tmp_path, stage="dpo")
    fails(tmp_path, "runs/r1", expect=["dpo run", "preference pairs", "--data"])


def test_reward_model_runs_are_refused(tmp_path):
    fake_run(tmp_path, stage="rm")
    fails(tmp_path, "runs/r1", "--data", "builtin:alpaca", expect=["reward model", "train_pair_accuracy"])


def test_a_run_that_did_not_finish(tmp_path):
    run = fake_run(tmp_path)
    shutil.rmtree(run / "adapter")
    fails(tmp_path, "runs/r1", "--data", "builtin:alpaca", expect=["no adapter/ or model/"])
