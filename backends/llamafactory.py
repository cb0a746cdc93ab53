"""The LlamaFactory backend (LlamaFactory 0.9.5): one strategy → LlamaFactory's flat training YAML.

compile writes, under ``native/``:

  llamafactory_train.yaml   the whole LlamaFactory config (model, method, dataset, output, train, eval keys);
                            runnable by hand with ``llamafactory-cli train native/llamafactory_train.yaml``
  dataset_info.json         the datasets it names, with absolute paths (``dataset_dir`` is ``native/``, absolute)
  data/llamafactory_*.jsonl preference pairs in LlamaFactory's ShareGPT ranking form (dpo/rm only)

Data: LlamaFactory reads the core's normalized files (one data path for every backend: format detection, eval
split, max_samples and data.system are done once, in the core). SFT rows ``{"messages": [...]}`` are registered
as ``formatting: sharegpt`` with OpenAI tags (role/content/user/assistant/system); preference rows are rewritten
as ``{"messages": prompt, "chosen": {role, content}, "rejected": {role, content}}`` with ``ranking: true``.

The command is ``python -m llfarm.backends.llamafactory_entry native/llamafactory_train.yaml ...``: a small
entry module that calls LlamaFactory's ``run_exp`` with llfarm's metrics callback (metrics.jsonl while it
trains), turns a config LlamaFactory rejects into one line, and saves the tokenizer with the llfarm template.

LlamaFactory's ``output_dir`` is ``checkpoints/``, so ``checkpoint-N/`` land where ``llfarm resume`` looks even
when a run is interrupted; collect moves the final adapter/model to ``adapter/`` or ``model/`` and LlamaFactory's
own records (trainer_log.jsonl, trainer_state.json, all_results.json, ...) to ``native/output/``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from llfarm.backend import Backend, Capabilities, CompileContext, NativePlan, RunResult
from llfarm.data import total_steps
from llfarm.errors import DataError, RunError, StrategyError, UnsupportedError, did_you_mean
from llfarm.rundir import atomic_write_text, read_json

KEYS_FILE = Path(__file__).with_name("llamafactory_keys.txt")
TRAIN_YAML = "llamafactory_train.yaml"
DATASET_INFO = "dataset_info.json"
TRAIN_DATASET, EVAL_DATASET = "llfarm_train", "llfarm_eval"
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}

# LlamaFactory keys that llfarm sets from a strategy field: give the field instead (one source of truth).
FROM_STRATEGY = {
    "model_name_or_path": "model.path", "model_revision": "model.revision",
    "trust_remote_code": "model.trust_remote_code", "quantization_bit": "method.type: qlora or model.quantization",
    "stage": "stage", "finetuning_type": "method.type", "template": "template",
    "lora_rank": "method.r", "lora_alpha": "method.alpha", "lora_dropout": "method.dropout",
    "lora_target": "method.target_modules", "freeze_trainable_layers": "method.trainable_layers",
    "pref_beta": "preference.beta", "pref_loss": "preference.loss", "cutoff_len": "data.max_length",
    "max_samples": "data.max_samples", "default_system": "data.system", "num_train_epochs": "training.epochs",
    "max_steps": "training.max_steps", "per_device_train_batch_size": "training.batch_size",
    "per_device_eval_batch_size": "training.batch_size", "gradient_accumulation_steps": "training.grad_accum",
    "learning_rate": "training.learning_rate", "lr_scheduler_type": "training.scheduler",
    "warmup_ratio": "training.warmup_ratio", "weight_decay": "training.weight_decay",
    "max_grad_norm": "training.max_grad_norm", "seed": "training.seed", "data_seed": "training.seed",
    "bf16": "training.precision", "fp16": "training.precision", "use_cpu": "training.precision",
    "disable_gradient_checkpointing": "training.gradient_checkpointing",
    "logging_steps": "training.logging_steps", "save_steps": "training.save_every",
    "save_total_limit": "training.keep_checkpoints", "eval_steps": "training.eval_every",
    "deepspeed": "distributed.deepspeed",
}
# Keys that wire LlamaFactory to the run directory: llfarm owns them.
MANAGED = {
    "dataset": "data.train", "eval_dataset": "data.eval", "dataset_dir": "data.train", "val_size": "data.eval_split",
    "output_dir": "the run directory (checkpoints/)", "overwrite_output_dir": "llfarm (resume is explicit)",
    "resume_from_checkpoint": "`llfarm resume RUN_DIR`", "do_train": "llfarm", "save_strategy": "training.save_every",
    "eval_strategy": "training.eval_every", "logging_dir": "the run directory",
}
# What LlamaFactory writes into output_dir besides the model: kept in native/output/.
LF_RECORDS = {"all_results.json", "train_results.json", "eval_results.json", "predict_results.json",
              "trainer_state.json", "trainer_log.jsonl", "generated_predictions.jsonl", "running_log.txt"}
PRECISIONS = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}
DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PRECISION_OF = {v: k for k, v in DTYPE_OF.items()}


# ---------------------------------------------------------------- the shipped key list

def _read_key_file(path: Path = KEYS_FILE) -> dict[str, Any]:
    """{'keys': {names}, 'templates': {name: spec}} from llamafactory_keys.txt: a '[keys]' section with one key
    a line and a '[templates]' section with 'name {json spec}' lines (see ``template_spec``)."""
    keys: set[str] = set()
    templates: dict[str, dict[str, Any]] = {}
    current = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == "keys":
            keys.add(line)
        elif current == "templates":
            name, _, spec = line.partition(" ")
            templates[name] = json.loads(spec)
    return {"keys": keys, "templates": templates}


_KNOWN: dict[str, Any] | None = None


def known() -> dict[str, Any]:
    """LlamaFactory's config keys and template names, from the shipped list (or, if it is missing, from the
    installed package in a subprocess: slower, same answer)."""
    global _KNOWN
    if _KNOWN is None:
        if KEYS_FILE.is_file():
            _KNOWN = _read_key_file()
        else:  # a packaging problem: ask the installed LlamaFactory
            import os
            import subprocess
            out = subprocess.run([sys.executable, "-m", "llfarm.backends.llamafactory", "--print-keys"],
                                 capture_output=True, text=True, check=False,
                                 env={**os.environ, "DISABLE_VERSION_CHECK": "1"})
            if out.returncode != 0:
                raise UnsupportedError("cannot read LlamaFactory's config keys (llamafactory_keys.txt is missing "
                                       "and the installed package could not be asked)",
                                       hint=(out.stderr.strip().splitlines() or ["reinstall llfarm"])[-1])
            found = json.loads(out.stdout.strip().splitlines()[-1])
            _KNOWN = {"keys": set(found["keys"]), "templates": found["templates"]}
    return _KNOWN


def installed_keys() -> dict[str, Any]:
    """Read the key list and template specs from the installed LlamaFactory (imports it: tests and
    `--write-keys` only)."""
    import dataclasses

    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )
    keys: set[str] = set()
    # The same classes, and the same rule (init fields), as HfArgumentParser.parse_dict in get_train_args.
    for cls in (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments):
        keys |= {f.name for f in dataclasses.fields(cls) if f.init}
    return {"keys": sorted(keys), "templates": {name: template_spec(TEMPLATES[name]) for name in sorted(TEMPLATES)}}


def _slots(formatter) -> list[Any]:
    out: list[Any] = []
    for slot in formatter.slots:
        if isinstance(slot, str):
            out.append(slot)
        elif isinstance(slot, set):
            out.append({"special": min(slot)})
        else:
            out.append({"token": slot.get("token")})
    return out


def template_spec(t) -> dict[str, Any]:
    """What LlamaFactory's Template does with system/user/assistant text: enough to render it as a string
    (``lf_render``) without importing LlamaFactory. 'class' other than Template means not simulated."""
    return {"class": type(t).__name__, "prefix": _slots(t.format_prefix), "system": _slots(t.format_system),
            "user": _slots(t.format_user), "assistant": _slots(t.format_assistant),
            "default_system": t.default_system, "stop_words": list(t.stop_words), "replace_eos": t.replace_eos,
            "efficient_eos": t.efficient_eos}


def render_key_file(found: dict[str, Any]) -> str:
    from importlib.metadata import version
    lines = [f"# LlamaFactory {version('llamafactory')}: every key get_train_args accepts (init fields of",
             "# ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments),",
             "# and every registered template with what it renders (name, then a JSON spec; see lf_render).",
             "# Regenerate: python -m llfarm.backends.llamafactory --write-keys",
             "# (tests/test_llamafactory_compile.py checks this file against the installed package).",
             "[keys]", *found["keys"], "", "[templates]",
             *(f"{name} {json.dumps(spec, ensure_ascii=False)}" for name, spec in found["templates"].items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- template parity

BOS, EOS = "<s>", "</s>"     # stand-ins for the tokenizer's own bos/eos when rendering


def lf_render(spec: dict[str, Any], messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt, answer) as LlamaFactory's Template builds them for training, as text (default_system is ''
    because llfarm writes default_system: ''; the answer is the last assistant message, as with mask_history)."""
    eos = spec["stop_words"][0] if spec["replace_eos"] and spec["stop_words"] else EOS

    def fill(slots: list[Any], content: str, idx: str = "0") -> str:
        out = []
        for slot in slots:
            if isinstance(slot, str):
                out.append(slot.replace("{{content}}", content, 1).replace("{{idx}}", idx, 1))
            elif "special" in slot:     # LlamaFactory turns {"bos_token"}/{"eos_token"} into ids, others into nothing
                out.append({"bos_token": BOS, "eos_token": eos}.get(slot["special"], ""))
            else:
                out.append(slot["token"] or "")
        return "".join(out)

    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    body = messages[1:] if system or messages[0]["role"] == "system" else messages
    turns = []
    for i, msg in enumerate(body):
        text = ""
        if i == 0:
            text += fill(spec["prefix"], "")
            if system:
                text += fill(spec["system"], system)
        text += fill(spec["user"] if msg["role"] == "user" else spec["assistant"], msg["content"], str(i // 2))
        turns.append(text)
    answer = turns[-1] + (eos if spec["efficient_eos"] else "")
    return "".join(turns[:-1]), answer


def llfarm_render(template, messages: list[dict[str, str]]) -> tuple[str, str] | None:
    """(prompt, answer) as the pytorch backend trains on them; None when the template cannot be split."""
    eos = template.eos or EOS
    full = template.render(messages, bos_token=BOS, eos_token=eos)
    prompt = template.render(messages[:-1], add_generation_prompt=True, bos_token=BOS, eos_token=eos)
    return (prompt, full[len(prompt):]) if full.startswith(prompt) else None


SAMPLES = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
               {"role": "assistant", "content": "4."}],
    "multi-turn": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
}


def template_difference(template, lf_name: str, cases: list[str]) -> str | None:
    """Why LlamaFactory's template would train on other text than the llfarm template, or None."""
    spec = known()["templates"].get(lf_name)
    if spec is None or spec["class"] != "Template":
        return None              # Llama2/reasoning templates are not simulated here
    for case in cases:
        ours = llfarm_render(template, SAMPLES[case])
        if ours is None:
            return None
        theirs = lf_render(spec, SAMPLES[case])
        if ours != theirs:
            what = "text" if "".join(ours) != "".join(theirs) else "answer (the tokens with a loss)"
            a, b = ("".join(ours), "".join(theirs)) if what == "text" else (ours[1], theirs[1])
            return (f"for a {case} conversation llfarm's '{template.name}' trains on the {what} {a!r}, "
                    f"LlamaFactory's '{lf_name}' on {b!r}")
    return None


def conversation_cases(data) -> list[str]:
    """Which sample conversations matter for this data: single always, system and multi-turn when present."""
    cases = {"single"}
    for row in data.train_rows + data.eval_rows:
        msgs = row["messages"] if "messages" in row else [*row["prompt"], {"role": "assistant", "content": ""}]
        if msgs[0]["role"] == "system":
            cases.add("system")
        if sum(m["role"] == "user" for m in msgs) > 1:
            cases.add("multi-turn")
    return [c for c in SAMPLES if c in cases]


# ---------------------------------------------------------------- the backend

class LlamaFactoryBackend(Backend):
    name = "llamafactory"
    extra = "llamafactory"
    packages = ("llamafactory", "torch", "transformers", "peft", "trl")
    capabilities = Capabilities(
        stages=frozenset({"sft", "dpo", "rm"}),
        methods=frozenset({"lora", "qlora", "full", "freeze"}),
        quantization=frozenset({"none", "4bit", "8bit"}),
        platforms=frozenset({"cpu", "cuda"}),
        launchers=frozenset({"none", "torchrun"}),
        reasons={
            "platform:mps": "llfarm has not verified LlamaFactory 0.9.5 on Apple MPS; the pytorch backend has",
            "launcher:accelerate": "LlamaFactory launches multi-process training through torchrun; "
                                   "use distributed.launcher: torchrun",
        },
    )

    # ---- check ------------------------------------------------------------------------------
    def check(self, strategy, platform) -> None:
        super().check(strategy, platform)
        self.check_strategy(strategy, platform)

    def check_strategy(self, strategy, platform) -> None:
        """Everything this backend refuses, found without importing LlamaFactory."""
        from llfarm.platform import resolve_precision
        from llfarm.templates import load_template

        s = strategy
        self.check_options(s.backend_options.get(self.name) or {})
        lf_template(load_template(s.template))
        if s.quantization != "none" and s.method.type not in ("lora", "qlora"):
            raise UnsupportedError(f"LlamaFactory quantizes the base model only for LoRA, not method "
                                   f"'{s.method.type}'", where="model.quantization",
                                   hint="use method.type: lora (or qlora), or model.quantization: none")
        precision = resolve_precision(s.training.precision, platform)
        # LlamaFactory loads the checkpoint's dtype, keeps trainable weights in float32 and computes in
        # training.precision; model.dtype can only say the same.
        if s.model.dtype not in ("auto", "float32", DTYPE_OF[precision]):
            raise UnsupportedError(
                f"LlamaFactory computes in training.precision ({precision}) with float32 trainable weights; it has "
                f"no setting for model.dtype '{s.model.dtype}'", where="model.dtype",
                hint=f"set model.dtype: auto, or training.precision: {PRECISION_OF[s.model.dtype]}, or use "
                     "--backend pytorch")
        if s.distributed.deepspeed:
            raise UnsupportedError("llfarm does not write DeepSpeed configs for LlamaFactory yet",
                                   where="distributed.deepspeed",
                                   hint="remove distributed.deepspeed, or run LlamaFactory by hand with "
                                        "`deepspeed:` added to native/llamafactory_train.yaml")
        if s.distributed.launcher == "torchrun" and platform.name != "cuda":
            raise UnsupportedError("multi-process LlamaFactory training needs CUDA GPUs here",
                                   where="distributed.launcher", hint="use distributed.launcher: none on CPU")

    def check_options(self, options: dict[str, Any]) -> None:
        if not isinstance(options, dict):
            raise StrategyError([f"expected a mapping of LlamaFactory keys, received {type(options).__name__}"],
                                where=f"backend_options.{self.name}")
        keys = known()["keys"]
        for key in options:
            where = f"backend_options.{self.name}.{key}"
            if key in MANAGED:
                raise StrategyError([f"'{key}' is set by llfarm from {MANAGED[key]}"], where=where,
                                    hint="remove it from backend_options")
            if key in FROM_STRATEGY:
                raise StrategyError([f"'{key}' comes from the strategy field {FROM_STRATEGY[key]}"], where=where,
                                    hint=f"set {FROM_STRATEGY[key]} instead of backend_options.{self.name}.{key}")
            if key not in keys:
                raise StrategyError([f"LlamaFactory 0.9.5 has no config key '{key}'{did_you_mean(key, keys)}"],
                                    where=where, hint="keys are fields of LlamaFactory's Model/Data/Training/"
                                                      "Finetuning/GeneratingArguments; see backends/"
                                                      "llamafactory_keys.txt")

    # ---- compile ------------------------------------------------------------------------------
    def compile(self, ctx: CompileContext) -> NativePlan:
        s, run = ctx.strategy, ctx.run
        self.check_strategy(s, ctx.platform)
        if ctx.resume_from and s.stage == "rm":
            # LlamaFactory drops resume_from_checkpoint for rm full/freeze ("Cannot resume from checkpoint in
            # current stage") and does not restore the value head of an rm LoRA checkpoint.
            raise UnsupportedError("LlamaFactory 0.9.5 cannot resume reward-model training from a checkpoint",
                                   where=str(ctx.resume_from), hint="start a new run (or --backend pytorch)")
        from llfarm.templates import load_template
        template = load_template(s.template)
        difference = template_difference(template, lf_template(template), conversation_cases(ctx.data))
        if difference:
            raise UnsupportedError(f"LlamaFactory's template renders differently: {difference}", where="template",
                                   hint="use a template whose backends.llamafactory renders the same text (chatml, "
                                        "llama3), or --backend pytorch")
        world = s.distributed.nproc_per_node * s.distributed.nnodes
        steps = total_steps(s, ctx.data.n_train, world)
        datasets = write_datasets(ctx)
        config = build_config(ctx, steps)
        yaml_path = run.native / TRAIN_YAML
        atomic_write_text(yaml_path, render_yaml(config))
        entry = ["-m", "llfarm.backends.llamafactory_entry", str(yaml_path), "--metrics", str(run.metrics_path),
                 "--final", str(run.native / "final_metrics.json"), "--template", s.template]
        argv = [sys.executable, *entry]
        d = s.distributed
        if d.launcher == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={d.nproc_per_node}",
                    f"--nnodes={d.nnodes}", *entry]
        env = {"DISABLE_VERSION_CHECK": "1"}
        if Path(ctx.model_path).is_dir():
            env["HF_HUB_OFFLINE"] = "1"
        return NativePlan(argv=argv, env=env, cwd=run.root, files=[yaml_path, datasets], total_steps=steps)

    # ---- collect ------------------------------------------------------------------------------
    def collect(self, ctx: CompileContext) -> RunResult:
        run = ctx.run
        kind = "adapter" if ctx.strategy.is_peft else "model"
        dest = run.adapter if kind == "adapter" else run.model
        records = run.native / "output"
        weights = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
        src = run.checkpoints
        if not (src / weights).is_file() and not any(src.glob("model*.safetensors")):
            raise RunError(f"LlamaFactory finished without writing {weights} into {src}", where=str(run),
                           hint=f"see {run.logs / 'train.log'}")
        for d in (dest, records):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        for item in sorted(src.iterdir()):
            if item.is_dir() and item.name.startswith("checkpoint-"):
                continue                                    # resumable checkpoints stay in checkpoints/
            if item.name == "README.md":                    # the trainer's model card stays with the checkpoints
                if kind == "adapter":
                    shutil.copy2(item, dest / item.name)    # (and is the adapter's card, as PEFT writes one)
                continue
            if item.name in LF_RECORDS or item.suffix == ".png" or item.is_dir():
                shutil.move(str(item), records / item.name)
            else:
                shutil.move(str(item), dest / item.name)
        return RunResult(output_kind=kind, output_dir=dest, final_metrics=final_metrics(run))


def final_metrics(run) -> dict[str, Any]:
    """global_step and runtime from LlamaFactory's records, eval metrics, and the child's train_pair_accuracy."""
    records = run.native / "output"
    out: dict[str, Any] = {}
    state = read_json(records / "trainer_state.json")
    if "global_step" in state:
        out["global_step"] = state["global_step"]
    results = read_json(records / "all_results.json")
    for k, v in results.items():
        if k == "train_runtime" or k.startswith("eval_"):
            out[k] = v
    out.update(read_json(run.native / "final_metrics.json"))
    return out


# ---------------------------------------------------------------- compile pieces

def lf_template(template) -> str:
    """The LlamaFactory template name for an llfarm template, or one clear error."""
    name = template.backend_name("llamafactory")
    where = f"template ({template.path})" if template.path else "template"
    if not name:
        raise UnsupportedError(f"template '{template.name}' has no LlamaFactory equivalent", where=where,
                               hint="add `backends: {llamafactory: <LlamaFactory template name>}` to the template "
                                    "YAML, or use --backend pytorch")
    names = known()["templates"]
    if name not in names:
        raise UnsupportedError(f"LlamaFactory 0.9.5 has no template '{name}'{did_you_mean(name, names)} "
                               f"(named by template '{template.name}')", where=where,
                               hint="fix backends.llamafactory in the template YAML")
    return name


def build_config(ctx: CompileContext, steps: int) -> dict[str, dict[str, Any]]:
    """The LlamaFactory config, in the sections its examples use (the file itself is flat)."""
    from llfarm.templates import load_template

    s, run = ctx.strategy, ctx.run
    m, tr, d = s.method, s.training, s.data
    model: dict[str, Any] = {"model_name_or_path": ctx.model_path, "trust_remote_code": s.model.trust_remote_code}
    if s.model.revision:
        model["model_revision"] = s.model.revision
    if s.quantization == "4bit":
        model.update(quantization_bit=4, quantization_method="bnb", quantization_type="nf4",
                     double_quantization=True)
    elif s.quantization == "8bit":
        model.update(quantization_bit=8, quantization_method="bnb")

    method: dict[str, Any] = {"stage": s.stage, "do_train": True,
                              "finetuning_type": "lora" if s.is_peft else m.type}
    if s.is_peft:
        method.update(lora_rank=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout,
                      lora_target="all" if m.target_modules == "all" else ",".join(m.target_modules))
    elif m.type == "freeze":
        method.update(freeze_trainable_layers=m.trainable_layers, freeze_trainable_modules="all")
    if s.stage == "dpo":
        method.update(pref_beta=s.preference.beta, pref_loss=s.preference.loss)

    has_eval = ctx.data.eval_path is not None
    dataset: dict[str, Any] = {
        "dataset": TRAIN_DATASET, "dataset_dir": str(run.native.resolve()),
        "template": lf_template(load_template(s.template)),
        # llfarm templates have no built-in system prompt (data.system is already in the data);
        # LlamaFactory's alpaca template has one, so it is switched off for every template.
        "default_system": "",
        "cutoff_len": d.max_length,
        "overwrite_cache": True, "dataloader_num_workers": 0,
    }
    if s.stage == "sft":
        # The loss is on the final answer only, as in the pytorch backend (not on earlier assistant turns).
        dataset["mask_history"] = True
    if has_eval:
        dataset["eval_dataset"] = EVAL_DATASET

    output = {"output_dir": str(run.checkpoints.resolve()), "overwrite_output_dir": True,
              "logging_steps": tr.logging_steps, "logging_first_step": True,
              "save_strategy": "steps", "save_steps": tr.save_every or 10**9,
              "save_total_limit": tr.keep_checkpoints, "save_only_model": False,
              "plot_loss": False, "report_to": "none", "disable_tqdm": True}

    train: dict[str, Any] = {
        "per_device_train_batch_size": tr.batch_size, "gradient_accumulation_steps": tr.grad_accum,
        "learning_rate": tr.learning_rate, "num_train_epochs": float(tr.epochs),
        "max_steps": tr.max_steps or -1, "lr_scheduler_type": tr.scheduler, "warmup_ratio": tr.warmup_ratio,
        "weight_decay": tr.weight_decay, "max_grad_norm": tr.max_grad_norm,
        "seed": tr.seed, "data_seed": tr.seed,
        # LlamaFactory turns gradient checkpointing on by default; llfarm's default is off.
        "disable_gradient_checkpointing": not tr.gradient_checkpointing,
        "include_num_input_tokens_seen": True,
        **PRECISIONS[ctx.precision],
        "resume_from_checkpoint": str(ctx.resume_from.resolve()) if ctx.resume_from else None,
    }
    if ctx.platform.name == "cpu":
        train["use_cpu"] = True          # also what lets bf16 run on a CPU
    if s.distributed.launcher == "torchrun":
        train["ddp_timeout"] = 180000000

    evaluation: dict[str, Any] = {}
    if has_eval:
        evaluation = {"per_device_eval_batch_size": tr.batch_size, "eval_strategy": "steps",
                      "eval_steps": tr.eval_every or max(1, steps // 5)}

    options = dict(s.backend_options.get("llamafactory") or {})
    sections = {"model": model, "method": method, "dataset": dataset, "output": output, "train": train,
                "eval": evaluation}
    for section in sections.values():       # a raw key overrides the value llfarm would write
        for key in list(section):
            if key in options:
                section[key] = options.pop(key)
    if options:
        sections["backend_options.llamafactory"] = options
    return {k: v for k, v in sections.items() if v}


def flat(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {k: v for section in config.values() for k, v in section.items()}


def render_yaml(config: dict[str, dict[str, Any]]) -> str:
    import yaml
    parts = ["# LlamaFactory 0.9.5 training config written by llfarm (one flat namespace; the ### lines are comments).",
             "# By hand: DISABLE_VERSION_CHECK=1 llamafactory-cli train <this file>",
             "# llfarm's own command (the same training, plus metrics.jsonl and the run directory): command.txt"]
    for title, section in config.items():
        parts.append(f"\n### {title}")
        parts.append(yaml.safe_dump(section, sort_keys=False, default_flow_style=False, allow_unicode=True,
                                    width=1000).rstrip("\n"))
    return "\n".join(parts) + "\n"


def write_datasets(ctx: CompileContext) -> Path:
    """dataset_info.json (absolute paths) and, for preference data, the pairs in LlamaFactory's ranking form."""
    data, native = ctx.data, ctx.run.native
    info: dict[str, Any] = {}
    for name, path in ((TRAIN_DATASET, data.train_path), (EVAL_DATASET, data.eval_path)):
        if path is None:
            continue
        path = Path(path).resolve()
        if data.kind == "preference":
            out = path.with_name(f"llamafactory_{path.stem}.jsonl")
            convert_preference(path, out)
            info[name] = {"file_name": str(out), "formatting": "sharegpt", "ranking": True,
                          "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                          "tags": dict(OPENAI_TAGS)}
        else:
            check_sft_turns(path)
            info[name] = {"file_name": str(path), "formatting": "sharegpt", "columns": {"messages": "messages"},
                          "tags": dict(OPENAI_TAGS)}
    out_path = native / DATASET_INFO
    atomic_write_text(out_path, json.dumps(info, indent=2) + "\n")
    return out_path


def _turn_problem(messages: list[dict[str, str]], last: str) -> str | None:
    """Why LlamaFactory's ShareGPT reader would skip this conversation (it drops such rows with a warning)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, msg in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            return (f"message {i + 1 + (len(messages) - len(body))} is '{msg['role']}' where LlamaFactory needs "
                    f"'{want}' (turns must alternate user/assistant after one optional leading system message)")
    if not body or body[-1]["role"] != last:
        return f"the conversation must end with a '{last}' message"
    return None


def check_sft_turns(path: Path) -> None:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                problem = _turn_problem(json.loads(line)["messages"], "assistant")
                if problem:
                    raise DataError(problem, where=f"{path}:{n} (normalized)",
                                    hint="merge consecutive messages of one role, or use --backend pytorch")


def convert_preference(src: Path, out: Path) -> None:
    rows = []
    with open(src, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            problem = _turn_problem(r["prompt"], "user")
            if problem:
                raise DataError(problem, where=f"{src}:{n} (normalized)",
                                hint="merge consecutive messages of one role, or use --backend pytorch")
            rows.append({"messages": r["prompt"], "chosen": {"role": "assistant", "content": r["chosen"]},
                         "rejected": {"role": "assistant", "content": r["rejected"]}})
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


backend = LlamaFactoryBackend()


if __name__ == "__main__":  # python -m llfarm.backends.llamafactory --write-keys | --print-keys
    found = installed_keys()
    if "--write-keys" in sys.argv:
        KEYS_FILE.write_text(render_key_file(found), encoding="utf-8")
        print(f"wrote {KEYS_FILE} ({len(found['keys'])} keys, {len(found['templates'])} templates)")
    else:
        print(json.dumps(found))
