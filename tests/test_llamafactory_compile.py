"""The LlamaFactory backend's compile step (no training): the YAML and dataset_info.json it writes for
sft/dpo/rm × lora/full/freeze (key by key), LlamaFactory's own parser (`get_train_args`) accepting every one of
them, the shipped key/template data matching the installed LlamaFactory, the template parity simulation matching
LlamaFactory's real templates, and the errors it raises before anything runs.

LlamaFactory is imported once, in one subprocess (the "oracle"), never in the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, llfarm, write
from llfarm.backends import llamafactory as lf
from llfarm.backends.llamafactory import keys, parity
from llfarm.backends.llamafactory.config import DEFAULTS, OWNED, TRAIN_YAML
from llfarm.backends.llamafactory.data import DATASET_INFO

from llfarm.errors import DataError, StrategyError, UnsupportedError
from llfarm.platform import detect
from llfarm.runner import create_run, prepare_run
from llfarm.strategy import resolve

STAGES = ("sft", "dpo", "rm")
METHODS = ("lora", "full", "freeze")

BASE = """\
name: lfc
model: {path: "builtin:tiny-llama"}
template: chatml
stage: sft
method: {type: lora, r: 8, alpha: 16, dropout: 0.1, target_modules: [q_proj, v_proj], trainable_layers: 1}
data: {train: "builtin:messages", eval_split: 0.25, max_length: 96}
training: {epochs: 2, batch_size: 4, grad_accum: 2, learning_rate: 1.0e-3, scheduler: linear, warmup_ratio: 0.1,
           seed: 7, save_every: 5, keep_checkpoints: 3, logging_steps: 2, eval_every: 3, optimizer: adamw_torch,
           attention: sdpa}
preference: {beta: 0.2, loss: hinge}
backend_options: {llamafactory: {enable_liger_kernel: false}}
"""


def overrides_for(stage: str, method: str) -> list[str]:
    out = [f"stage={stage}", f"method.type={method}"]
    if stage != "sft":
        out.append("data.train=builtin:preference")
    return out


def compile_case(tmp: Path, stage: str, method: str, extra: list[str] = (), text: str = BASE):
    strategy = write(tmp / "lfc.yaml", text)
    prep = prepare_run(resolve(strategy, [*overrides_for(stage, method), *extra]), "llamafactory")
    ctx, plan = create_run(prep, tmp / "runs", run_id=f"{stage}-{method}")
    config = yaml.safe_load((ctx.run.native / TRAIN_YAML).read_text())
    info = json.loads((ctx.run.native / DATASET_INFO).read_text())
    return ctx, plan, config, info


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every stage × method compiled once (on this machine's platform: cpu here)."""
    out = {}
    for stage in STAGES:
        for method in METHODS:
            tmp = tmp_path_factory.mktemp(f"{stage}-{method}")
            out[(stage, method)] = compile_case(tmp, stage, method)
    return out


ORACLE = r"""
import copy, json, os, sys
os.environ["DISABLE_VERSION_CHECK"] = "1"
import yaml
req = json.loads(open(sys.argv[1]).read())
out = {}
from llfarm.backends.llamafactory.keys import installed
from llfarm.backends.llamafactory.parity import SAMPLES
out["installed"] = installed()
from llamafactory.hparams import get_train_args
out["parsed"] = {}
for path in req["yamls"]:
    try:
        m, d, t, f, g = get_train_args(yaml.safe_load(open(path)))
        out["parsed"][path] = {"ok": True, "stage": f.stage, "finetuning_type": f.finetuning_type,
            "template": d.template, "dataset": d.dataset, "eval_dataset": d.eval_dataset,
            "lora_rank": f.lora_rank, "lora_alpha": f.lora_alpha, "lora_target": f.lora_target,
            "freeze_trainable_layers": f.freeze_trainable_layers, "pref_beta": f.pref_beta, "pref_loss": f.pref_loss,
            "bf16": t.bf16, "fp16": t.fp16, "use_cpu": t.use_cpu, "output_dir": t.output_dir,
            "max_steps": t.max_steps, "learning_rate": t.learning_rate,
            "optim": getattr(t.optim, "value", str(t.optim)),
            "flash_attn": getattr(m.flash_attn, "value", str(m.flash_attn)),
            "overwrite_output_dir": t.overwrite_output_dir,
            "resume_from_checkpoint": t.resume_from_checkpoint, "report_to": list(t.report_to or [])}
    except Exception as exc:
        out["parsed"][path] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
from transformers import AutoTokenizer
from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
base = AutoTokenizer.from_pretrained(req["tokenizer"])
vocab = base.get_vocab()
out["renders"] = {}
for name, tpl in TEMPLATES.items():
    if type(tpl).__name__ != "Template":
        continue
    slots = [s for f in (tpl.format_prefix, tpl.format_system, tpl.format_user, tpl.format_assistant) for s in f.slots]
    if any(isinstance(s, dict) and s.get("token") not in vocab for s in slots):
        continue  # a model-specific token the tiny tokenizer lacks would decode as <unk>
    for case, msgs in SAMPLES.items():
        tok = copy.deepcopy(base)
        t = get_template_and_fix_tokenizer(tok, DataArguments(template=name, default_system=""))
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        pairs = t.encode_multiturn(tok, msgs[1:] if system else msgs, system)
        prompt = [i for p, r in pairs[:-1] for i in p + r] + pairs[-1][0]
        answer = pairs[-1][1] + ([tok.eos_token_id] if t.efficient_eos else [])
        dec = lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out["renders"][f"{name}|{case}"] = [dec(prompt), dec(answer)]
open(req["out"], "w").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def oracle(compiled, tmp_path_factory):
    """Ask the installed LlamaFactory (one subprocess): its keys/templates, get_train_args on every compiled
    YAML, and what its templates render."""
    tmp = tmp_path_factory.mktemp("oracle")
    req = {"yamls": [str(ctx.run.native / TRAIN_YAML) for ctx, _, _, _ in compiled.values()],
           "tokenizer": str(REPO / "llfarm" / "builtin" / "tiny-llama"), "out": str(tmp / "out.json")}
    (tmp / "req.json").write_text(json.dumps(req))
    proc = subprocess.run([sys.executable, "-c", ORACLE, str(tmp / "req.json")], capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "DISABLE_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


def normalize(text: str, ctx) -> str:
    return (text.replace(str(ctx.run.root.resolve()), "$RUN").replace(str(ctx.run.root), "$RUN")
            .replace(ctx.model_path, "$MODEL"))


# ---------------------------------------------------------------- key by key

@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("method", METHODS)
def test_keys(compiled, stage, method):
    ctx, plan, c, info = compiled[(stage, method)]
    run = ctx.run
    assert c["model_name_or_path"] == ctx.model_path and c["trust_remote_code"] is False
    assert c["stage"] == stage and c["do_train"] is True
    assert c["finetuning_type"] == method
    if method == "lora":
        assert (c["lora_rank"], c["lora_alpha"], c["lora_dropout"], c["lora_target"]) == (8, 16, 0.1, "q_proj,v_proj")
    else:
        assert not any(k.startswith("lora_") for k in c)
    if method == "freeze":
        assert c["freeze_trainable_layers"] == 1 and c["freeze_trainable_modules"] == "all"
    if stage == "dpo":
        assert (c["pref_beta"], c["pref_loss"]) == (0.2, "hinge")
    else:
        assert "pref_beta" not in c
    assert "quantization_bit" not in c
    # data: the core's normalized files, registered with absolute paths
    assert c["dataset"] == "llfarm_train" and c["eval_dataset"] == "llfarm_eval" and "val_size" not in c
    assert c["dataset_dir"] == str(run.native) and Path(c["dataset_dir"]).is_absolute()
    assert c["template"] == "chatml" and c["default_system"] == "" and c["cutoff_len"] == 96
    assert c.get("mask_history", False) is (stage == "sft")
    # output: LlamaFactory writes into checkpoints/; llfarm decides resume
    assert c["output_dir"] == str(run.checkpoints)
    assert c["overwrite_output_dir"] is True and c["resume_from_checkpoint"] is None
    assert c["report_to"] == "none" and c["logging_steps"] == 2 and c["logging_first_step"] is True
    assert (c["save_steps"], c["save_total_limit"]) == (5, 3)
    # training
    assert (c["per_device_train_batch_size"], c["gradient_accumulation_steps"]) == (4, 2)
    assert (c["learning_rate"], c["lr_scheduler_type"], c["warmup_ratio"]) == (1.0e-3, "linear", 0.1)
    assert (c["num_train_epochs"], c["max_steps"], c["seed"], c["data_seed"]) == (2.0, -1, 7, 7)
    assert c["disable_gradient_checkpointing"] is True
    assert (c["eval_strategy"], c["eval_steps"], c["per_device_eval_batch_size"]) == ("steps", 3, 4)
    # fp32 on CPU: neither bf16 nor fp16
    assert c["bf16"] is False and c["fp16"] is False and c["use_cpu"] is True
    # every key written is declared once (OWNED / DEFAULTS) or came from backend_options
    assert set(c) - set(OWNED) - set(DEFAULTS) == {"enable_liger_kernel"}
    # strategy keys reach LlamaFactory's names; a raw key passes through
    assert (c["optim"], c["flash_attn"]) == ("adamw_torch", "sdpa") and c["enable_liger_kernel"] is False
    # dataset_info.json
    assert set(info) == {"llfarm_train", "llfarm_eval"}
    for name, split in (("llfarm_train", "train"), ("llfarm_eval", "eval")):
        entry = info[name]
        assert Path(entry["file_name"]).is_absolute() and Path(entry["file_name"]).is_file()
        assert entry["formatting"] == "sharegpt"
        assert entry["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant", "system_tag": "system"}
        normalized = Path(ctx.data.train_path if split == "train" else ctx.data.eval_path)
        if stage == "sft":
            assert entry["file_name"] == str(normalized), "LlamaFactory reads the core's cached files: no copy"
            assert entry["columns"] == {"messages": "messages"} and "ranking" not in entry
        else:
            assert entry["ranking"] is True
            assert entry["columns"] == {"messages": "messages", "chosen": "chosen", "rejected": "rejected"}
            rows = [json.loads(x) for x in Path(entry["file_name"]).read_text().splitlines()]
            src = [json.loads(x) for x in normalized.read_text().splitlines()]
            assert len(rows) == len(src) > 0
            assert rows[0] == {"messages": src[0]["prompt"],
                               "chosen": {"role": "assistant", "content": src[0]["chosen"]},
                               "rejected": {"role": "assistant", "content": src[0]["rejected"]}}
    # the command: the entry module, no torchrun, version check off, offline for a local model
    assert plan.argv[1:4] == ["-m", "llfarm.backends.llamafactory.entry", str(run.native / TRAIN_YAML)]
    assert plan.env == {"DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"} and plan.cwd == run.root
    cmd = (run.native / "command.txt").read_text()
    assert "llfarm.backends.llamafactory.entry" in cmd and "FORCE_TORCHRUN" not in cmd
    assert plan.files == [run.native / TRAIN_YAML, run.native / DATASET_INFO]


# ---------------------------------------------------------------- LlamaFactory's own parser

@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("method", METHODS)
def test_get_train_args_accepts_the_compiled_yaml(compiled, oracle, stage, method):
    ctx, _, c, _ = compiled[(stage, method)]
    parsed = oracle["parsed"][str(ctx.run.native / TRAIN_YAML)]
    assert parsed["ok"], parsed.get("error")
    assert (parsed["stage"], parsed["finetuning_type"], parsed["template"]) == (stage, method, "chatml")
    assert parsed["dataset"] == ["llfarm_train"] and parsed["eval_dataset"] == ["llfarm_eval"]
    assert parsed["output_dir"] == c["output_dir"] and parsed["overwrite_output_dir"] is True
    assert parsed["use_cpu"] is True and not parsed["bf16"] and not parsed["fp16"]
    assert (parsed["optim"], parsed["flash_attn"]) == ("adamw_torch", "sdpa")
    assert parsed["report_to"] in ([], ["none"])
    if method == "lora":
        assert (parsed["lora_rank"], parsed["lora_alpha"], parsed["lora_target"]) == (8, 16, ["q_proj", "v_proj"])
    if stage == "dpo":
        assert (parsed["pref_beta"], parsed["pref_loss"]) == (0.2, "hinge")


def test_shipped_key_data_matches_installed_llamafactory(oracle):
    shipped = keys.known()
    installed = oracle["installed"]
    regenerate = "regenerate: python -m llfarm.backends.llamafactory.keys --write"
    assert shipped["llamafactory"] == installed["llamafactory"], regenerate
    assert shipped["keys"] == installed["keys"], regenerate
    assert shipped["types"] == installed["types"], regenerate
    assert shipped["templates"] == installed["templates"], regenerate


def test_key_data_ships_as_package_data():
    import fnmatch
    tomllib = pytest.importorskip("tomllib")            # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["llfarm.backends.llamafactory"]
    assert any(fnmatch.fnmatch("keys.json", p) for p in patterns)


def test_template_simulation_matches_llamafactory(oracle):
    """lf_render (used before launch, without LlamaFactory) renders what LlamaFactory's templates tokenize."""
    specs = keys.known()["templates"]
    print(f"{len(oracle['renders'])} template x conversation cases")
    assert len(oracle["renders"]) > 150
    for key, real in oracle["renders"].items():
        name, case = key.split("|")
        assert list(parity.lf_render(specs[name], parity.SAMPLES[case])) == real, key


def test_shipped_templates_are_recognised_by_rendering(oracle):
    """chatml and llama3 find their LlamaFactory twin for every conversation shape; alpaca only without a system
    message; plain has none. The twin's real rendering (the oracle) equals llfarm's."""
    from llfarm.templates import load_template
    every = list(parity.SAMPLES)
    for name in ("chatml", "llama3"):
        assert parity.lf_template_for(load_template(name), every) == name
        for case, msgs in parity.SAMPLES.items():
            assert list(parity.llfarm_render(load_template(name), msgs)) == oracle["renders"][f"{name}|{case}"]
    alpaca = load_template("alpaca")
    assert parity.lf_template_for(alpaca, ["single", "multi-turn"]) == "alpaca"
    with pytest.raises(UnsupportedError, match="for a system conversation llfarm's 'alpaca' trains on"):
        parity.lf_template_for(alpaca, every)
    with pytest.raises(UnsupportedError, match="template 'plain' has no LlamaFactory equivalent"):
        parity.lf_template_for(load_template("plain"), ["single"])


# ---------------------------------------------------------------- other mappings

@pytest.fixture
def on_cuda(monkeypatch):
    """Plan as if on a CUDA machine (compile is pure: nothing needs the GPU)."""
    monkeypatch.setenv("LLFARM_PLATFORM", "cuda")
    detect.cache_clear()
    yield
    monkeypatch.delenv("LLFARM_PLATFORM")
    detect.cache_clear()


def test_precision_on_cpu(tmp_path):
    _, _, c, _ = compile_case(tmp_path / "bf16", "sft", "lora", ["training.precision=bf16"])
    assert c["bf16"] is True and c["use_cpu"] is True and c["fp16"] is False
    _, _, c, _ = compile_case(tmp_path / "fp16", "sft", "lora", ["training.precision=fp16"])
    assert c["fp16"] is True and c["use_cpu"] is True and c["bf16"] is False


def test_cuda_qlora_bf16_and_torchrun(tmp_path, on_cuda, monkeypatch):
    monkeypatch.setattr("llfarm.distributed.cuda_device_count", lambda: 2)     # as if the machine had 2 GPUs
    ctx, plan, c, _ = compile_case(tmp_path / "q", "sft", "qlora", ["distributed.launcher=torchrun",
                                                                   "distributed.nproc_per_node=2"])
    assert ctx.precision == "bf16" and c["bf16"] is True and c["use_cpu"] is False
    assert (c["finetuning_type"], c["quantization_bit"], c["quantization_method"]) == ("lora", 4, "bnb")
    assert c["quantization_type"] == "nf4" and c["double_quantization"] is True
    assert plan.argv[1:6] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--standalone"]
    assert plan.argv[plan.argv.index("-m", 3):][:2] == ["-m", "llfarm.backends.llamafactory.entry"]
    assert plan.env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"   # as LlamaFactory's launcher sets
    assert c["ddp_find_unused_parameters"] is False and "ddp_backend" not in c    # nccl: transformers' default
    _, _, c, _ = compile_case(tmp_path / "q8", "sft", "lora", ["model.quantization=8bit"])
    assert c["quantization_bit"] == 8


def test_resume_is_explicit(tmp_path):
    from llfarm.backend import CompileContext
    ctx, _, _, _ = compile_case(tmp_path, "sft", "lora")
    ckpt = ctx.run.checkpoints / "checkpoint-5"
    ckpt.mkdir()
    resumed = CompileContext(**{**ctx.__dict__, "resume_from": ckpt})
    lf.backend.compile(resumed)
    c = yaml.safe_load((ctx.run.native / TRAIN_YAML).read_text())
    assert c["resume_from_checkpoint"] == str(ckpt) and c["overwrite_output_dir"] is True


def test_rm_resume_is_refused(tmp_path):
    ctx, _, _, _ = compile_case(tmp_path, "rm", "lora")
    with pytest.raises(UnsupportedError, match="cannot resume a stage 'rm' run: .*value head"):
        lf.backend.check_resume(ctx.strategy)
    lf.backend.check_resume(compile_case(tmp_path / "sft", "sft", "lora")[0].strategy)


def test_multi_turn_and_system_data(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4."}]}] * 4
    data = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _, _, c, info = compile_case(tmp_path, "sft", "lora", [f"data.train={data}", "data.eval_split=0.0"])
    assert c["mask_history"] is True and "eval_dataset" not in c and set(info) == {"llfarm_train"}


def test_turns_llamafactory_would_drop_are_refused(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4."}]}] * 4
    data = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="alternate user/assistant"):
        compile_case(tmp_path, "sft", "lora", [f"data.train={data}", "data.eval_split=0.0"])
    assert not (tmp_path / "runs" / "sft-lora").exists()


def test_option_checks_import_nothing_heavy():
    code = ("import sys\nfrom llfarm.strategy import resolve\nfrom llfarm.platform import detect\n"
            "from llfarm.backends.llamafactory import backend\n"
            "backend.check(resolve('quickstart').strategy, detect())\n"
            "heavy = [m for m in ('torch', 'transformers', 'llamafactory') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("option,message", [
    ("lora_rnk=4", "unknown key 'backend_options.llamafactory.lora_rnk' (did you mean 'lora_rank'?)"),
    ("output_dir=/x", "'backend_options.llamafactory.output_dir' is llfarm's to set"),
    ("lora_rank=4", "'backend_options.llamafactory.lora_rank' comes from the strategy field method.r"),
    ("learning_rate=0.1", "comes from the strategy field training.learning_rate"),
])
def test_backend_option_errors(option, message):
    """Options are checked when the strategy is resolved, like any strategy key (and before anything runs)."""
    with pytest.raises(StrategyError) as exc:
        resolve("quickstart", [f"backend_options.llamafactory.{option}"])
    assert message in str(exc.value)


# ---------------------------------------------------------------- bad input through the CLI: one line, exit 2

def fails(tmp_path: Path, *args: str, expect: list[str]) -> str:
    out = tmp_path / "runs"
    proc = llfarm("run", *args, "--backend", "llamafactory", "-o", str(out), cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit {proc.returncode}: {err}"
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for piece in expect:
        assert piece in err, f"{piece!r} not in: {err}"
    assert not out.exists() or not any(out.iterdir()), "a run directory was left behind"
    return err


def test_cli_unknown_llamafactory_key(tmp_path):
    fails(tmp_path, "quickstart", "--set", "backend_options.llamafactory.learning_rat=0.1",
          expect=["backend_options.llamafactory.learning_rat", "did you mean 'learning_rate'"])


def test_a_users_template_is_matched_by_what_it_renders(tmp_path):
    """A template of the user's own (another name, ChatML's text) runs on LlamaFactory's chatml."""
    from llfarm.templates import load_template
    src = yaml.safe_load(load_template("chatml").path.read_text())
    src["name"] = "my-chat"
    tpl = write(tmp_path / "mine.yaml", yaml.safe_dump(src))
    _, _, c, _ = compile_case(tmp_path / "ok", "sft", "lora", [f"template={tpl}"])
    assert c["template"] == "chatml"
    src["jinja"] = src["jinja"].replace("<|im_start|>", "<|turn|>")
    odd = write(tmp_path / "odd.yaml", yaml.safe_dump(src))
    fails(tmp_path, "quickstart", "--set", f"template={odd}",
          expect=["template 'my-chat' has no LlamaFactory equivalent", "odd.yaml", "--backend pytorch"])


def test_cli_template_that_renders_differently(tmp_path):
    fails(tmp_path, "quickstart", "--set", "template=plain",
          expect=["template 'plain' has no LlamaFactory equivalent", "--backend pytorch"])
    fails(tmp_path, "quickstart", "--set", "template=alpaca", "--set", "data.system=Be brief.",
          expect=["system conversation", "'alpaca'"])


def test_cli_qlora_without_gpu(tmp_path):
    fails(tmp_path, "quickstart", "--set", "method.type=qlora", expect=["needs a CUDA GPU"])


def test_cli_quantized_full_finetuning(tmp_path, on_cuda):
    err = fails(tmp_path, "quickstart", "--set", "method.type=full", "--set", "model.quantization=8bit",
                expect=["only for LoRA"])
    assert "model.quantization" in err


def test_cli_model_dtype_llamafactory_cannot_honour(tmp_path):
    fails(tmp_path, "quickstart", "--set", "model.dtype=bfloat16", expect=["model.dtype", "training.precision: bf16"])
    _, _, c, _ = compile_case(tmp_path / "ok", "sft", "lora", ["model.dtype=float32"])
    assert c["bf16"] is False
