"""Compile tests for the Unsloth backend: they need no GPU and never import unsloth.

For every supported stage × method: ``native/trainer.json`` carries the strategy's values (the shared training
layer's TrainingArguments, plus the keyword arguments of the two Unsloth calls, each of which must exist in the
installed Unsloth), and ``native/train_unsloth.py`` is a short entry that byte-compiles, imports unsloth before
anything that imports trl/transformers/peft, and hands training to llfarm's shared trainer (no copy of it).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import py_compile
import sys
from pathlib import Path

import pytest
from conftest import write

from llfarm.backend import choose_backend, get_backend, plan_platform, planning
from llfarm.platform import Platform
from llfarm.runner import create_run, prepare_run
from llfarm.strategy import resolve

CPU = Platform("cpu", "none (test)", bf16=False)
CUDA = Platform("cuda", "NVIDIA GPU (test)", bf16=True)

# Values differ from the schema defaults, so a value that is dropped or mixed up shows.
BASE = """\
name: {name}
backend: unsloth
model: {{path: "builtin:tiny-llama"}}
template: chatml
stage: {stage}
method: {{type: {method}, r: 8, alpha: 24, dropout: 0.05, target_modules: [q_proj, v_proj]}}
data: {{train: "builtin:{data}", max_length: 80, eval_split: {eval_split}}}
training: {{max_steps: 7, batch_size: 3, grad_accum: 2, learning_rate: 3.0e-4, scheduler: linear,
           warmup_ratio: 0.1, weight_decay: 0.01, max_grad_norm: 0.5, seed: 123, logging_steps: 2,
           save_every: 5, keep_checkpoints: 3{extra_training}}}
preference: {{beta: 0.25, loss: hinge}}
"""

CASES = {
    "sft_lora": dict(stage="sft", method="lora", data="alpaca", eval_split=0.0, extra_training=""),
    "sft_qlora": dict(stage="sft", method="qlora", data="messages", eval_split=0.0, extra_training=""),
    "sft_full": dict(stage="sft", method="full", data="sharegpt", eval_split=0.0,
                     extra_training=", precision: fp32"),
    "sft_lora_eval": dict(stage="sft", method="lora", data="messages", eval_split=0.2,
                          extra_training=", eval_every: 3"),
    "dpo_lora": dict(stage="dpo", method="lora", data="preference", eval_split=0.0, extra_training=""),
    "dpo_qlora": dict(stage="dpo", method="qlora", data="preference", eval_split=0.0, extra_training=""),
    "dpo_full": dict(stage="dpo", method="full", data="preference", eval_split=0.0, extra_training=""),
}


def compile_case(tmp_path: Path, case: str, overrides: tuple[str, ...] = ()):
    """Resolve → prepare (plan mode: planned for a CUDA GPU on any machine) → create_run → backend.compile."""
    spec = write(tmp_path / f"{case}.yaml", BASE.format(name=case, **CASES[case]))
    res = resolve(str(spec), overrides)
    prep = prepare_run(res, "unsloth", plan=True)
    ctx, native = create_run(prep, tmp_path / "runs", run_id=case)
    return res.strategy, ctx, native


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("unsloth-compile")
    return {case: compile_case(root / case, case) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_entry_is_short_byte_compiles_and_delegates_training(case, compiled):
    _, ctx, native = compiled[case]
    script, spec = native.files
    assert (script.name, spec.name) == ("train_unsloth.py", "trainer.json")
    py_compile.compile(str(script), cfile=str(ctx.run.root / "check.pyc"), doraise=True)
    text = script.read_text()
    assert len(text.splitlines()) < 60, "the entry must not carry a copy of the training code"
    imported = {(n.module or "") for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"trl", "datasets", "transformers", "peft"}, imported
    assert "trainer.run(spec, load" in text


@pytest.mark.parametrize("case", list(CASES))
def test_spec_round_trips_the_strategy(case, compiled):
    s, ctx, native = compiled[case]
    cfg = json.loads(native.files[1].read_text())
    peft = s.method.type in ("lora", "qlora")
    assert (cfg["stage"], cfg["template"]) == (s.stage, "chatml")
    assert cfg["trainer"] == ("SFTTrainer" if s.stage == "sft" else "DPOTrainer")
    load = cfg["unsloth"]["from_pretrained"]
    assert load["model_name"] == ctx.model_path == cfg["model"]["path"]
    assert load["max_seq_length"] == 80
    assert load["load_in_4bit"] is (s.method.type == "qlora")
    assert load["full_finetuning"] is (s.method.type == "full")
    assert load["dtype"] == ("float32" if case == "sft_full" else "bfloat16")
    assert load["use_gradient_checkpointing"] == "unsloth"
    assert load["use_exact_model_name"] is True
    assert cfg["peft"] is None, "the adapter comes from get_peft_model, not from a LoraConfig"
    if peft:
        lora = cfg["unsloth"]["get_peft_model"]
        assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (8, 24, 0.05)
        assert lora["target_modules"] == ["q_proj", "v_proj"]
        assert lora["random_state"] == 123
    else:
        assert "get_peft_model" not in cfg["unsloth"]
    args = cfg["args"]
    assert args["max_steps"] == 7 and cfg["total_steps"] == 7 == native.total_steps
    assert args["per_device_train_batch_size"] == 3 and args["gradient_accumulation_steps"] == 2
    assert args["learning_rate"] == 3.0e-4 and args["lr_scheduler_type"] == "linear"
    assert (args["warmup_ratio"], args["weight_decay"], args["max_grad_norm"]) == (0.1, 0.01, 0.5)
    assert args["seed"] == args["data_seed"] == 123
    assert (args["logging_steps"], args["save_steps"], args["save_total_limit"]) == (2, 5, 3)
    assert (args["bf16"], args["fp16"]) == ((False, False) if case == "sft_full" else (True, False))
    assert args["output_dir"] == str(ctx.run.checkpoints)
    if case == "sft_lora_eval":
        assert cfg["data"]["eval"] and (args["eval_strategy"], args["eval_steps"]) == ("steps", 3)
    else:
        assert cfg["data"]["eval"] is None and args["eval_strategy"] == "no"
    if s.stage == "sft":
        assert (args["max_length"], args["completion_only_loss"], args["packing"]) == (80, True, False)
    else:
        assert (args["beta"], args["loss_type"]) == (0.25, "hinge")
        assert (args["max_length"], args["max_prompt_length"]) == (80, 40)
    out = cfg["outputs"]
    assert out["dir"] == str(ctx.run.adapter if peft else ctx.run.model)
    assert out["metrics"] == str(ctx.run.metrics_path)
    assert Path(cfg["data"]["train"]).is_file()


def test_same_trainer_arguments_as_the_pytorch_backend(tmp_path):
    """One training layer: for the same strategy both backends give the trainer the same arguments."""
    _, _, native = compile_case(tmp_path / "u", "sft_lora_eval")
    spec = write(tmp_path / "p" / "sft_lora_eval.yaml", BASE.format(name="sft_lora_eval", **CASES["sft_lora_eval"]))
    prep = prepare_run(resolve(str(spec), ["backend=pytorch"]), "pytorch", plan=True)
    prep.platform = CUDA            # as the unsloth plan: precision resolved for a GPU
    prep.precision = "bf16"
    _, pt = create_run(prep, tmp_path / "p" / "runs", run_id="sft_lora_eval")
    u, p = (json.loads(n.files[-1].read_text()) for n in (native, pt))
    drop = {"output_dir", "use_cpu"}  # the run directory differs; use_cpu follows the platform
    assert {k: v for k, v in u["args"].items() if k not in drop} == {k: v for k, v in p["args"].items()
                                                                     if k not in drop}


@pytest.mark.parametrize("case", list(CASES))
def test_unsloth_is_imported_first(case, compiled):
    """`import unsloth` precedes every import of trl, transformers, peft (and llfarm, which imports them)."""
    tree = ast.parse(compiled[case][2].files[0].read_text())
    order = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            order += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            order.append((node.lineno, node.module.split(".")[0]))
    third_party = [name for _, name in sorted(order) if name not in sys.stdlib_module_names]
    assert third_party[0] == "unsloth", third_party
    for lib in ("trl", "transformers", "peft", "torch", "llfarm", "datasets"):
        if lib in third_party:
            assert third_party.index(lib) > third_party.index("unsloth")


def _calls(script: Path) -> set[str]:
    """Names of the functions the script calls (FastLanguageModel.from_pretrained → 'from_pretrained')."""
    found = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name:
                found.add(name)
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_script_makes_the_unsloth_calls_and_runs_the_shared_trainer(case, compiled):
    calls = _calls(compiled[case][2].files[0])
    assert {"from_pretrained", "get_peft_model", "prepare_tokenizer", "read_spec", "run",
            "is_bfloat16_supported"} <= calls


def _unsloth_params() -> dict[str, set[str]]:
    """Parameter names of FastLanguageModel.from_pretrained and get_peft_model, read from the installed
    Unsloth's source with ast (importing unsloth fails without a GPU)."""
    spec = importlib.util.find_spec("unsloth")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("unsloth is not installed (pip install 'llfarm[unsloth]')")
    root = Path(next(iter(spec.submodule_search_locations))) / "models"
    wanted = {("loader.py", "FastLanguageModel", "from_pretrained"),
              ("llama.py", "FastLlamaModel", "get_peft_model")}
    params: dict[str, set[str]] = {}
    for file, cls, meth in wanted:
        for node in ast.walk(ast.parse((root / file).read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name == cls:
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == meth:
                        a = item.args
                        params[meth] = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    assert set(params) == {"from_pretrained", "get_peft_model"}, "Unsloth's source layout changed"
    return params


@pytest.mark.parametrize("case", list(CASES))
def test_keywords_exist_in_the_installed_unsloth(case, compiled):
    params = _unsloth_params()
    calls = json.loads(compiled[case][2].files[1].read_text())["unsloth"]
    for meth, kwargs in calls.items():
        unknown = set(kwargs) - params[meth]
        assert not unknown, f"FastLanguageModel.{meth} has no parameter(s) {unknown} in the installed Unsloth"


@pytest.mark.parametrize("case", ["sft_lora", "sft_lora_eval", "dpo_lora"])
def test_trainer_arguments_are_accepted_by_trl(case, compiled):
    """trl.<Config>(**args) as the shared trainer builds it (bf16 off: this is a CPU)."""
    fix = pytest.importorskip("llfarm.compat").fix_trl_availability_flags
    fix()
    import trl
    cfg = json.loads(compiled[case][2].files[1].read_text())
    args = dict(cfg["args"], bf16=False, fp16=False, use_cpu=True)
    config_cls = getattr(trl, cfg["config"])
    assert set(args) <= {f.name for f in dataclasses.fields(config_cls)}
    built = config_cls(**args)
    assert built.max_steps == 7 and built.learning_rate == 3.0e-4
    if cfg["stage"] == "dpo":
        assert built.beta == 0.25 and built.loss_type in ("hinge", ["hinge"])


def test_backend_options(tmp_path):
    _, _, native = compile_case(tmp_path, "sft_lora", (
        "training.optimizer=adamw_8bit", "backend_options.unsloth.use_gradient_checkpointing=false",
        "method.use_rslora=true", "backend_options.unsloth.label_smoothing_factor=0.1"))
    cfg = json.loads(native.files[1].read_text())
    assert cfg["args"]["optim"] == "adamw_8bit" and cfg["args"]["label_smoothing_factor"] == 0.1
    assert cfg["unsloth"]["from_pretrained"]["use_gradient_checkpointing"] is False
    assert cfg["unsloth"]["get_peft_model"]["use_gradient_checkpointing"] is False
    assert cfg["unsloth"]["get_peft_model"]["use_rslora"] is True
    assert "use_rslora" not in cfg["args"] and "use_gradient_checkpointing" not in cfg["args"]


def test_local_model_runs_offline_and_without_telemetry(compiled):
    _, ctx, native = compiled["sft_lora"]
    assert native.env == {"HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
                          "UNSLOTH_COMPILE_LOCATION": str(ctx.run.native / "unsloth_compiled_cache")}
    assert native.argv[1:] == [str(ctx.run.native / "train_unsloth.py"), str(ctx.run.native / "trainer.json")]
    assert native.cwd == ctx.run.root
    assert "train_unsloth.py" in (ctx.run.native / "command.txt").read_text()


def test_hub_model_keeps_the_hub_online(tmp_path):
    spec = write(tmp_path / "hub.yaml", BASE.format(name="hub", **CASES["sft_qlora"]).replace(
        "builtin:tiny-llama", "unsloth/Llama-3.2-1B-Instruct"))
    prep = prepare_run(resolve(str(spec)), "unsloth", plan=True)
    _, native = create_run(prep, tmp_path / "runs", run_id="hub")
    cfg = json.loads(native.files[1].read_text())
    assert cfg["unsloth"]["from_pretrained"]["model_name"] == "unsloth/Llama-3.2-1B-Instruct"
    assert "HF_HUB_OFFLINE" not in native.env and native.env["UNSLOTH_DISABLE_STATISTICS"] == "1"


# ---------------------------------------------------------------- choosing a backend (no subprocess)

def _strategy(tmp_path: Path, case: str, *overrides: str):
    spec = write(tmp_path / f"{case}.yaml", BASE.format(name=case, **CASES[case]))
    return resolve(str(spec), overrides).strategy


def test_auto_prefers_unsloth_on_a_gpu_and_never_picks_it_without_one(tmp_path, monkeypatch):
    monkeypatch.setattr(get_backend("unsloth"), "packages", ())   # as if `llfarm[unsloth]` were installed
    s = _strategy(tmp_path, "sft_lora")
    assert choose_backend(s, CUDA, "auto").name == "unsloth"
    assert choose_backend(s, CPU, "auto").name != "unsloth"
    assert choose_backend(_strategy(tmp_path, "dpo_qlora"), CUDA, "auto").name == "unsloth"


@pytest.mark.parametrize("override", ["stage=rm", "method.type=freeze", "model.quantization=8bit",
                                      "distributed.launcher=torchrun", "distributed.deepspeed=zero2"])
def test_auto_skips_unsloth_when_the_strategy_needs_what_it_lacks(tmp_path, override):
    s = _strategy(tmp_path, "sft_lora", override, *(["data.train=builtin:preference"] if "rm" in override else []))
    assert choose_backend(s, CUDA, "auto").name != "unsloth"


def test_plan_platform(tmp_path):
    """plan compiles for a CUDA GPU only when what was asked for cannot run here but could on one."""
    s = _strategy(tmp_path, "sft_lora")
    planned = plan_platform(s, CPU, "unsloth")
    assert planned.name == "cuda" and planned.bf16 and "planned for a CUDA GPU" in planned.accelerator
    with planning():                                     # plan needs no installed unsloth
        get_backend("unsloth").check(s, planned)         # a planned GPU passes the hardware check
    assert plan_platform(s, CPU, "auto") == CPU          # auto: pytorch runs it here, so plan what `run` picks
    assert plan_platform(s, CPU, "pytorch") == CPU
    assert plan_platform(s, CUDA, "unsloth") == CUDA
    qlora = _strategy(tmp_path, "sft_qlora")
    assert plan_platform(qlora, CPU, "auto").name == "cuda"      # nothing runs 4-bit here
    assert plan_platform(qlora, CPU, "pytorch").name == "cuda"
    rm = _strategy(tmp_path, "sft_lora", "stage=rm", "data.train=builtin:preference")
    assert plan_platform(rm, CPU, "unsloth") == CPU      # not a hardware problem: the check will say why
