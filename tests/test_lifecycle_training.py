"""Evaluation during training, early stopping, keep_best and the out-of-memory back-off (issue 11, training side).

- Early stopping and keep_best on the tiny model, from a fresh folder with a strategy file and relative paths as the
  README shows: the eval data pair the training questions with the *next* question's answer, so once the model has
  learnt the training answers its eval loss stops improving. The run must stop long before max_steps, its manifest
  must say when and why, every evaluation after the best must fail to improve on it (exactly `patience` of them),
  and adapter/ must hold the best checkpoint's weights, not the last one's. The same on LlamaFactory.
- OOM back-off: LLFARM_FAULT_OOM_AT_STEP makes the training process raise torch.OutOfMemoryError as it begins a
  step; the run must back off (half the batch, twice the grad_accum), continue from the newest complete
  checkpoint, log every step once and end with the loss of an uninterrupted run. A batch of 1 that still runs out
  fails with one line. pytorch and LlamaFactory.
- Compile: each backend gets the native keys (`llfarm plan`); bad combinations are one line, exit 2.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from conftest import llfarm, manifest, metrics, one_line_error, write

MAX_STEPS = 200
EVAL_EVERY = 2
PATIENCE = 2
STRATEGY = f"""\
name: early_stop
extends: quickstart
data: {{train: "builtin:alpaca", eval: wrong_answers.jsonl, max_length: 64}}
training:
  max_steps: {MAX_STEPS}
  learning_rate: 3.0e-2
  logging_steps: 1
  eval_every: {EVAL_EVERY}
  early_stopping: {{patience: {PATIENCE}}}
  keep_best: true
export: {{formats: []}}
"""


def wrong_answers() -> str:
    """The first 8 training questions, each with the next question's answer."""
    import llfarm
    src = Path(llfarm.__file__).parent / "builtin" / "data" / "alpaca.jsonl"
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()]
    return "".join(json.dumps({"instruction": r["instruction"], "input": "", "output": rows[i + 1]["output"]}) + "\n"
                   for i, r in enumerate(rows[:8]))


def weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "adapter_model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def early_stopped_run(tmp_path: Path, backend: str) -> Path:
    write(tmp_path / "early_stop.yaml", STRATEGY)
    write(tmp_path / "wrong_answers.jsonl", wrong_answers())
    proc = llfarm("run", "early_stop.yaml", "--backend", backend, "-o", "runs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout.strip().splitlines()[-1]
    assert shown.startswith("runs/"), shown                   # the run directory as the user named it
    ended = next(ln for ln in proc.stderr.splitlines() if " over " in ln and "steps" in ln)
    assert "; stopped early at step " in ended and "; the output is the best checkpoint (step " in ended, ended
    return tmp_path / shown


def check_early_stopping(run: Path) -> dict:
    m = manifest(run)
    rows = metrics(run)
    evals: dict[int, float] = {}
    for r in rows:                                            # the periodic evaluations (LlamaFactory evaluates
        if "eval_loss" in r:                                  # once more after training: same step, best weights)
            evals.setdefault(r["step"], r["eval_loss"])
    assert m["status"] == "completed" and m["exit_code"] == 0
    stop = m["early_stopped"]
    last_step = max(r["step"] for r in rows)
    assert stop["step"] == last_step == m["final_metrics"]["steps"]
    assert stop["step"] <= MAX_STEPS // 4, f"early stopping did not stop the run early: {stop}"
    assert stop["max_steps"] == MAX_STEPS and stop["metric"] == "eval_loss" and stop["patience"] == PATIENCE
    # evaluation happened every eval_every steps and landed in metrics.jsonl
    assert sorted(evals) == list(range(EVAL_EVERY, last_step + 1, EVAL_EVERY))
    best_step = min(evals, key=evals.get)
    assert stop["best_step"] == best_step and stop["best_metric"] == pytest.approx(evals[best_step])
    after = [evals[s] for s in evals if s > best_step]
    assert len(after) == PATIENCE and all(v >= evals[best_step] for v in after), (evals, stop)
    # keep_best: the output is the best checkpoint's weights, not the last step's
    best = m["best"]
    assert best["step"] == best_step and best["metric"] == "eval_loss" and best["output_is_best"]
    assert best["value"] == pytest.approx(evals[best_step])
    assert best["checkpoint"] == f"checkpoints/checkpoint-{best_step}"
    out = weights(run / "adapter")
    assert same(out, weights(run / best["checkpoint"]))
    assert not same(out, weights(run / "checkpoints" / f"checkpoint-{last_step}"))
    return {"stopped_at": stop["step"], "of": MAX_STEPS, "best_step": best_step,
            "eval_loss": {s: round(v, 4) for s, v in evals.items()}}


def test_early_stopping_and_keep_best_pytorch(tmp_path):
    print(check_early_stopping(early_stopped_run(tmp_path, "pytorch")))


@pytest.mark.slow
def test_early_stopping_and_keep_best_llamafactory(tmp_path):
    run = early_stopped_run(tmp_path, "llamafactory")
    assert "early_stopping_steps: 2" in (run / "native" / "llamafactory_train.yaml").read_text()
    print(check_early_stopping(run))


# ---------------------------------------------------------------- OOM back-off

OOM_STEPS = 12
OOM_SETTINGS = ["--set", f"training.max_steps={OOM_STEPS}", "--set", "training.save_every=4", "--set",
                "training.logging_steps=1", "--set", "export.formats=[]"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> float:
    out = tmp_path_factory.mktemp("oom-reference")
    proc = llfarm("run", "quickstart", "-o", str(out), "--run-id", "ref", *OOM_SETTINGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return manifest(out / "ref")["final_metrics"]["final_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "llamafactory"])
def test_oom_backoff_continues_from_the_checkpoint(tmp_path, uninterrupted, backend):
    statuses = []                                # what `llfarm runs` / `monitor` would read meanwhile

    def watch(stop):
        while not stop.is_set():
            try:
                statuses.append(json.loads((tmp_path / "r" / "manifest.json").read_text())["status"])
            except (OSError, ValueError, KeyError):
                pass
            stop.wait(0.02)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    try:
        proc = llfarm("run", "quickstart", "--backend", backend, "-o", str(tmp_path), "--run-id", "r", *OOM_SETTINGS,
                      env={"LLFARM_FAULT_OOM_AT_STEP": "7"})
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running" in statuses and "failed" not in statuses, sorted(set(statuses))
    assert ("llfarm: out of memory at step 7 with batch_size 8 × grad_accum 1: backing off to batch_size 4 × "
            "grad_accum 2 (back-off 1 of 2), from checkpoint-4") in proc.stderr
    run = tmp_path / "r"
    m = manifest(run)
    assert m["status"] == "completed" and m["exit_code"] == 0
    [b] = m["oom_backoffs"]
    assert (b["step"], b["batch_size"], b["grad_accum"], b["from_checkpoint"]) == (7, 4, 2, "checkpoint-4")
    assert b["was"] == {"batch_size": 8, "grad_accum": 1} and "OutOfMemoryError" in b["error"]
    assert m["resumed_from"] == "checkpoints/checkpoint-4"
    # every step once, the steps after the OOM included; the same effective batch gives the same training
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, OOM_STEPS + 1))
    assert m["final_metrics"]["steps"] == OOM_STEPS
    assert m["final_metrics"]["final_loss"] == pytest.approx(uninterrupted, rel=1e-4)
    spec = run / "native" / ("trainer.json" if backend == "pytorch" else "llamafactory_train.yaml")
    text = spec.read_text()
    assert ('"per_device_train_batch_size": 4' in text) or ("per_device_train_batch_size: 4" in text)
    print({"backend": backend, "final_loss": m["final_metrics"]["final_loss"], "uninterrupted": uninterrupted})


def test_oom_at_batch_size_1_fails_in_one_line(tmp_path):
    """Batch 2 runs out of memory as step 1 begins, whatever the batch: one back-off to 1 × 2 (from the beginning:
    there is no checkpoint yet), then a one-line failure."""
    proc = llfarm("run", "quickstart", "-o", str(tmp_path), "--run-id", "r", "--set", "training.max_steps=4",
                  "--set", "training.batch_size=2", "--set", "export.formats=[]",
                  env={"LLFARM_FAULT_OOM_AT_STEP": "1:0"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert ("llfarm: out of memory at step 1 with batch_size 2 × grad_accum 1: backing off to batch_size 1 × "
            "grad_accum 2 (back-off 1 of 2), from the beginning") in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("llfarm: error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("training ran out of memory at step 1 with batch size 1, the smallest (training.batch_size=2, after 1 "
            "back-off)") in last and "hint: in a new run, turn on training.gradient_checkpointing" in last, last
    m = manifest(tmp_path / "r")
    assert m["status"] == "failed" and m["exit_code"] == 75
    assert [(b["batch_size"], b["grad_accum"], b["from_checkpoint"]) for b in m["oom_backoffs"]] == [(1, 2, None)]


# ---------------------------------------------------------------- units (no training)

def test_smaller_batch_keeps_the_effective_batch():
    from llfarm.oom import smaller
    assert smaller(8, 1) == (4, 2)
    assert smaller(6, 2) == (3, 4)
    assert smaller(3, 1) == (1, 3)
    assert smaller(9, 1) == (3, 3)
    assert smaller(1, 4) is None
    for b in range(2, 65):
        nb, na = smaller(b, 3)
        assert nb <= b // 2 and nb * na == b * 3


def _failed_run(tmp_path: Path, training: dict):
    from types import SimpleNamespace

    from llfarm.rundir import RunDir
    from llfarm.schema import Strategy
    run = RunDir(tmp_path / "r")
    run.create()
    run.write_manifest({"status": "failed"})
    write(run.native / "oom.json", json.dumps({"step": 5, "batch_size": 8, "grad_accum": 1, "error": "x"}))
    strategy = Strategy(name="t", data={"train": "builtin:alpaca"}, training=training)
    return run, SimpleNamespace(run=run, strategy=strategy)


def test_no_backoff_when_oom_retries_is_0(tmp_path):
    from llfarm.errors import TrainingFailed
    from llfarm.oom import backoff
    run, ctx = _failed_run(tmp_path, {"oom_retries": 0})
    with pytest.raises(TrainingFailed, match=r"at step 5 with batch size 8 and no back-off left "
                                             r"\(training.oom_retries=0\)"):
        backoff(ctx, None, print)
    assert not (run.native / "oom.json").exists() and "oom_backoffs" not in run.read_manifest()


def test_a_failure_without_the_marker_is_not_an_oom(tmp_path):
    from llfarm.oom import backoff
    run, ctx = _failed_run(tmp_path, {})
    (run.native / "oom.json").unlink()
    assert backoff(ctx, None, print) is False


def test_an_oom_outside_training_is_not_backed_off(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from llfarm import oom
    w = SimpleNamespace(native=tmp_path, training=False, step=4, batch_size=8, grad_accum=1)   # as oom.watch keeps it
    monkeypatch.setattr(oom, "_WATCH", w)
    assert oom.report(torch.OutOfMemoryError("CUDA out of memory.")) is False      # loading, not training
    w.training = True
    assert oom.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"))
    assert oom.report(ValueError("something else")) is False
    assert oom.report(RuntimeError("wrapped")) is False
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("while training") from inner
    except RuntimeError as exc:
        assert oom.report(exc) is True
    assert json.loads((tmp_path / "oom.json").read_text())["error"].startswith("RuntimeError")


# ---------------------------------------------------------------- compile and bad input

EVAL = ["--set", "data.eval_split=0.25", "--set", "training.eval_every=3"]


@pytest.mark.parametrize("backend", ["pytorch", "llamafactory", "unsloth"])
def test_plan_shows_the_native_keys(backend):
    proc = llfarm("plan", "quickstart", "--backend", backend, *EVAL, "--set", "training.early_stopping.patience=4",
                  "--set", "training.keep_best=true", "--set", "training.save_every=50")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    if backend == "llamafactory":
        for line in ("eval_strategy: steps", "eval_steps: 3", "save_steps: 3", "metric_for_best_model: eval_loss",
                     "greater_is_better: false", "load_best_model_at_end: true", "early_stopping_steps: 4",
                     "restore_callback_states_from_checkpoint: true"):
            assert line in out, line
    else:
        for line in ('"eval_strategy": "steps"', '"eval_steps": 3', '"save_steps": 3',
                     '"metric_for_best_model": "eval_loss"', '"greater_is_better": false',
                     '"load_best_model_at_end": true', '"early_stopping_patience": 4',
                     '"early_stopping_threshold": 0.0'):
            assert line in out, line


def _strategy(stage: str = "sft", **training):
    from llfarm.strategy import validate
    data = {"train": "builtin:preference" if stage in ("dpo", "rm") else "builtin:alpaca", "eval_split": 0.25}
    return validate({"name": "t", "stage": stage, "data": data, "training": {"eval_every": 3, **training}})


def test_compiled_arguments_follow_the_metric():
    from llfarm.training import best_arguments, early_stopping_arguments
    rm = _strategy("rm", early_stopping={"patience": 2, "metric": "eval_accuracy"})
    assert best_arguments(rm, True, 3) == {"metric_for_best_model": "eval_accuracy", "greater_is_better": True,
                                           "restore_callback_states_from_checkpoint": True}   # nothing loaded at the end
    assert early_stopping_arguments(rm) == {"early_stopping_patience": 2, "early_stopping_threshold": 0.0}
    dpo = _strategy("dpo", keep_best=True, save_every=50,
                    early_stopping={"patience": 2, "metric": "eval_reward_margin", "threshold": 0.5})
    assert best_arguments(dpo, True, 3) == {"metric_for_best_model": "eval_rewards/margins", "greater_is_better": True,
                                            "load_best_model_at_end": True, "save_steps": 3,
                                            "restore_callback_states_from_checkpoint": True}
    plain = _strategy()
    assert best_arguments(plain, True, 3) == {} and early_stopping_arguments(plain) is None


@pytest.mark.parametrize("stage, training, expect", [
    ("sft", {"eval_every": None, "early_stopping": {"patience": 3}},
     "'training.early_stopping' counts patience in evaluations: set training.eval_every"),
    ("sft", {"early_stopping": {"patience": 3, "metric": "eval_accuracy"}},
     "'training.early_stopping.metric' is 'eval_accuracy', which stage 'sft' does not report"),
    ("rm", {"early_stopping": {"patience": 3, "metric": "eval_reward_margin"}},
     "which stage 'rm' does not report"),
    ("sft", {"early_stopping": {"patience": 0}}, "'training.early_stopping.patience' input should be greater"),
    ("sft", {"early_stopping": {"patiense": 3}}, "did you mean 'patience'"),
    ("sft", {"oom_retries": -1}, "'training.oom_retries' input should be greater than or equal to 0"),
    ("grpo", {"keep_best": True}, "'training.keep_best' follows an evaluation metric; stage 'grpo'"),
])
def test_bad_combinations(stage, training, expect):
    from llfarm.errors import StrategyError
    with pytest.raises(StrategyError) as err:
        extra = {"rewards": ["exact_match"]} if stage == "grpo" else {}
        from llfarm.strategy import validate
        data = {"train": "builtin:preference" if stage == "rm" else "builtin:alpaca", "eval_split": 0.25}
        validate({"name": "t", "stage": stage, "data": data, "preference": extra,
                  "training": {"eval_every": 3, **training}})
    assert expect in err.value.message, err.value.message


@pytest.mark.parametrize("args, expect", [
    (["--set", "training.early_stopping.patience=3", "--set", "training.eval_every=2"],
     ["'training.early_stopping' needs evaluation data: set data.eval", "hint:"]),
    (["--set", "training.keep_best=true"], ["'training.keep_best' needs evaluation data", "hint:"]),
    (["--backend", "llamafactory", *EVAL, "--set", "training.early_stopping.patience=3", "--set",
      "training.early_stopping.threshold=0.01"],
     ["training.early_stopping.threshold: LlamaFactory 0.9.5's early_stopping_steps", "hint:", "--backend pytorch"]),
])
def test_bad_input_is_one_line(tmp_path, args, expect):
    one_line_error(llfarm("plan", "quickstart", *args, cwd=tmp_path), expect)


def test_llamafactory_refusals():
    from llfarm.backend import get_backend
    from llfarm.errors import UnsupportedError
    from llfarm.platform import detect
    lf = get_backend("llamafactory")
    with pytest.raises(UnsupportedError, match="LlamaFactory 0.9.5 refuses load_best_model_at_end for stage rm"):
        lf.check(_strategy("rm", keep_best=True), detect())
    lf.check(_strategy("rm", early_stopping={"patience": 2, "metric": "eval_accuracy"}), detect())
    from llfarm.strategy import validate
    with pytest.raises(Exception, match="comes from the strategy field training.early_stopping"):
        validate({"name": "t", "data": {"train": "builtin:alpaca"},
                  "backend_options": {"llamafactory": {"early_stopping_steps": 3}}})


def test_import_from_llamafactory_reads_early_stopping_back(tmp_path):
    from llfarm.backends.llamafactory.importer import IMPORTER
    out = IMPORTER.convert({"early_stopping_steps": 3, "load_best_model_at_end": True,
                            "metric_for_best_model": "eval_loss", "greater_is_better": False,
                            "restore_callback_states_from_checkpoint": True}, tmp_path)
    t = out.strategy["training"]
    assert (t["early_stopping"], t["keep_best"]) == ({"patience": 3}, True) and not out.not_mapped
    out = IMPORTER.convert({"early_stopping_steps": 2, "metric_for_best_model": "accuracy"}, tmp_path)
    assert out.strategy["training"]["early_stopping"] == {"patience": 2, "metric": "eval_accuracy"}
    out = IMPORTER.convert({"early_stopping_steps": 2, "metric_for_best_model": "eval_bleu"}, tmp_path)
    assert "metric_for_best_model" in out.not_mapped
