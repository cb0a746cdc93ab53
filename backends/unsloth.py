"""The Unsloth fast-path backend: FastLanguageModel + LoRA/QLoRA (or full fine-tuning) + TRL, on one GPU.

compile writes two files into ``native/``:

- ``unsloth_config.json``: every value the script uses, under the names of the Unsloth and TRL arguments they
  feed (``from_pretrained``, ``get_peft_model``, ``training_args`` for SFTConfig/DPOConfig, ``sft``/``dpo``);
- ``train_unsloth.py``: a standalone, readable script (rendered from ``unsloth_script.py.tmpl``: only its
  structure depends on the strategy) that imports ``unsloth`` first and reads its values from that JSON.

The command is ``python native/train_unsloth.py native/unsloth_config.json``. ``unsloth`` is imported only in
that child process: without a GPU ``import unsloth`` raises NotImplementedError, so this module never imports
it, and ``check`` refuses a machine without a GPU before anything is written.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

from llfarm.backend import Backend, Capabilities, CompileContext, NativePlan, RunResult
from llfarm.data import total_steps
from llfarm.errors import BackendUnavailable, RunError, UnsupportedError, did_you_mean
from llfarm.platform import Platform
from llfarm.rundir import atomic_write_text, read_json
from llfarm.train_common import lora_targets

SCRIPT = "train_unsloth.py"
CONFIG = "unsloth_config.json"
TEMPLATE = Path(__file__).with_name("unsloth_script.py.tmpl")

# backend_options.unsloth: keys for FastLanguageModel (validated here) and for SFTConfig/DPOConfig
# (TrainingArguments names, passed through; transformers validates them when the script starts).
MODEL_OPTIONS = {"use_gradient_checkpointing": (True, False, "unsloth"), "use_rslora": (True, False)}
TRAINING_OPTIONS = {"optim", "lr_scheduler_kwargs", "dataloader_num_workers", "neftune_noise_alpha",
                    "adam_beta1", "adam_beta2", "adam_epsilon"}
OPTION_KEYS = set(MODEL_OPTIONS) | TRAINING_OPTIONS

ALTERNATIVES = "--backend pytorch or --backend llamafactory (both also run on CPU), or --backend auto"
NO_GPU = ("Unsloth trains only on a GPU (NVIDIA CUDA, AMD ROCm or Intel XPU): `import unsloth` fails "
          "without one")

# What the strategy asks for is checked as if on a GPU; the machine is checked after (see check()).
_ON_A_GPU = Platform("cuda", "a CUDA GPU", bf16=True)


class UnslothBackend(Backend):
    name = "unsloth"
    extra = "unsloth"
    packages = ("unsloth", "unsloth_zoo", "trl", "peft")
    capabilities = Capabilities(
        stages=frozenset({"sft", "dpo"}),
        methods=frozenset({"lora", "qlora", "full"}),
        quantization=frozenset({"none", "4bit"}),
        platforms=frozenset({"cuda"}),
        launchers=frozenset({"none"}),
        reasons={
            "stage:rm": "Unsloth has no reward-model API; use --backend pytorch or llamafactory",
            "method:freeze": "Unsloth trains LoRA adapters or the full model; freezing all but the last layers is "
                             "not an Unsloth feature; use --backend pytorch or llamafactory",
            "quantization:8bit": "llfarm's Unsloth path loads in 16 bits or 4 bits (QLoRA); 8-bit LoRA goes through "
                                 "Unsloth's generic FastModel path, which llfarm does not drive; use --backend "
                                 "pytorch",
            "platform:cpu": NO_GPU,
            "platform:mps": "Unsloth's Apple Silicon support is a separate MLX path (SFT only); llfarm drives its "
                            "CUDA path",
            "launcher:torchrun": "llfarm runs Unsloth as one process on one GPU; use --backend pytorch for "
                                 "multi-GPU",
            "launcher:accelerate": "llfarm runs Unsloth as one process on one GPU; use --backend pytorch for "
                                   "multi-GPU",
        },
    )

    # ---- check ---------------------------------------------------------------------------------
    def check(self, strategy, platform: Platform) -> None:
        """What the strategy asks for first (same answer on any machine), then this machine, then the package."""
        self.check_capabilities(strategy, _ON_A_GPU)
        if strategy.distributed.deepspeed:
            raise UnsupportedError("backend 'unsloth' does not run DeepSpeed", where="distributed.deepspeed",
                                   hint="remove distributed.deepspeed, or use --backend pytorch or llamafactory")
        check_options(strategy.backend_options.get(self.name, {}))
        if platform.name not in self.capabilities.platforms:
            why = self.capabilities.reasons.get(f"platform:{platform.name}", NO_GPU)
            raise BackendUnavailable(f"backend 'unsloth' cannot run here: {why}; this machine has "
                                     f"{platform.accelerator}", hint=f"use {ALTERNATIVES}")
        self.check_installed()

    # ---- compile -------------------------------------------------------------------------------
    def compile(self, ctx: CompileContext) -> NativePlan:
        s, run = ctx.strategy, ctx.run
        config = build_config(ctx)
        config_path, script_path = run.native / CONFIG, run.native / SCRIPT
        atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
        atomic_write_text(script_path, render_script(s.stage, s.is_peft, config["from_pretrained"]["load_in_4bit"],
                                                     s.method.type, s.name))
        env = {"UNSLOTH_DISABLE_STATISTICS": "1",   # no telemetry download from the hub on start
               # Unsloth writes the code it generates (patched trainers, compiled modules) into
               # ./unsloth_compiled_cache by default; keep the run directory's top level normalized.
               "UNSLOTH_COMPILE_LOCATION": str(run.native / "unsloth_compiled_cache")}
        if Path(ctx.model_path).is_dir():
            env["HF_HUB_OFFLINE"] = "1"
        return NativePlan(argv=[sys.executable, str(script_path), str(config_path)], env=env, cwd=run.root,
                          files=[script_path, config_path], total_steps=config["total_steps"])

    # ---- collect -------------------------------------------------------------------------------
    def collect(self, ctx: CompileContext) -> RunResult:
        run = ctx.run
        kind = "adapter" if ctx.strategy.is_peft else "model"
        out = run.adapter if kind == "adapter" else run.model
        marker = out / ("adapter_config.json" if kind == "adapter" else "config.json")
        if not marker.is_file():
            raise RunError(f"the Unsloth script exited cleanly but wrote no {marker.name}", where=str(out),
                           hint=f"see {run.logs / 'train.log'}")
        return RunResult(output_kind=kind, output_dir=out, final_metrics=read_json(run.native / "final_metrics.json"))


def check_options(options: dict) -> None:
    for key, value in options.items():
        if key not in OPTION_KEYS:
            raise UnsupportedError(f"unknown key '{key}'{did_you_mean(key, OPTION_KEYS)}",
                                   where="backend_options.unsloth",
                                   hint=f"the unsloth backend accepts {', '.join(sorted(OPTION_KEYS))}")
        if key in MODEL_OPTIONS and value not in MODEL_OPTIONS[key]:
            raise UnsupportedError(f"expected one of {', '.join(map(repr, MODEL_OPTIONS[key]))}, received {value!r}",
                                   where=f"backend_options.unsloth.{key}")


def build_config(ctx: CompileContext) -> dict:
    """The script's JSON config: keys are the Unsloth/TRL argument names they are passed as."""
    s, run = ctx.strategy, ctx.run
    tr, opts = s.training, dict(s.backend_options.get("unsloth", {}))
    steps = total_steps(s, ctx.data.n_train)
    precision = ctx.precision
    dtype = s.model.dtype if s.model.dtype != "auto" else {"bf16": "bfloat16", "fp16": "float16"}.get(
        precision, "float32")
    # Unsloth's own offloaded gradient checkpointing is on unless backend_options.unsloth says otherwise:
    # it is where most of Unsloth's memory saving comes from (training.gradient_checkpointing is not consulted).
    checkpointing = opts.pop("use_gradient_checkpointing", "unsloth")
    use_rslora = opts.pop("use_rslora", False)
    has_eval = ctx.data.eval_path is not None
    config: dict = {
        "strategy": s.name,
        "stage": s.stage,
        "method": s.method.type,
        "template": s.template,
        "precision_auto": tr.precision == "auto" and s.model.dtype == "auto",
        "total_steps": steps,
        # FastLanguageModel.from_pretrained(...)
        "from_pretrained": {
            "model_name": ctx.model_path,
            "max_seq_length": s.data.max_length,
            "dtype": dtype,
            "load_in_4bit": s.quantization == "4bit",
            "full_finetuning": s.method.type == "full",
            "use_gradient_checkpointing": checkpointing,
            "revision": s.model.revision,
            "trust_remote_code": s.model.trust_remote_code,
            "use_exact_model_name": True,
        },
        # FastLanguageModel.get_peft_model(model, ...): LoRA and QLoRA only
        **({"get_peft_model": {
            "r": s.method.r,
            "lora_alpha": s.method.alpha,
            "lora_dropout": s.method.dropout,
            "target_modules": lora_targets(s.method.target_modules),
            "bias": "none",
            "use_gradient_checkpointing": checkpointing,
            "random_state": tr.seed,
            "use_rslora": use_rslora,
        }} if s.is_peft else {}),
        "data": {"train": str(ctx.data.train_path),
                 "eval": str(ctx.data.eval_path) if has_eval else None,
                 "max_length": s.data.max_length},
        # SFTConfig / DPOConfig(**training_args, **sft | **dpo): transformers TrainingArguments names
        "training_args": {
            "output_dir": str(run.checkpoints),
            "num_train_epochs": tr.epochs,
            "max_steps": tr.max_steps or -1,
            "per_device_train_batch_size": tr.batch_size,
            "per_device_eval_batch_size": tr.batch_size,
            "gradient_accumulation_steps": tr.grad_accum,
            "learning_rate": tr.learning_rate,
            "lr_scheduler_type": tr.scheduler,
            "warmup_ratio": tr.warmup_ratio,
            "weight_decay": tr.weight_decay,
            "max_grad_norm": tr.max_grad_norm,
            "seed": tr.seed,
            "data_seed": tr.seed,
            "bf16": precision == "bf16",
            "fp16": precision == "fp16",
            "logging_steps": tr.logging_steps,
            "logging_first_step": True,
            "save_strategy": "steps",
            "save_steps": tr.save_every or 10**9,
            "save_total_limit": tr.keep_checkpoints,
            "eval_strategy": "steps" if has_eval else "no",
            "eval_steps": (tr.eval_every or max(1, steps // 5)) if has_eval else None,
            "report_to": "none",
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "remove_unused_columns": False,
            "include_num_input_tokens_seen": True,
            **opts,
        },
    }
    if s.stage == "sft":
        config["sft"] = {"max_length": s.data.max_length, "completion_only_loss": True, "packing": False}
    else:
        config["dpo"] = {"beta": s.preference.beta, "loss_type": s.preference.loss, "max_length": s.data.max_length,
                         "max_prompt_length": s.data.max_length // 2, "precompute_ref_log_probs": False}
    config["outputs"] = {"save_to": str(run.adapter if s.is_peft else run.model),
                         "metrics": str(run.metrics_path),
                         "final_metrics": str(run.native / "final_metrics.json")}
    config["resume_from"] = str(ctx.resume_from) if ctx.resume_from else None
    return config


@lru_cache(maxsize=1)
def _template():
    from jinja2 import Environment, StrictUndefined
    env = Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=StrictUndefined,
                      autoescape=False)
    return env.from_string(TEMPLATE.read_text(encoding="utf-8"))


def render_script(stage: str, peft: bool, load_4bit: bool, method: str, strategy_name: str) -> str:
    sft = stage == "sft"
    return _template().render(
        stage=stage, peft=peft, load_4bit=load_4bit, strategy_name=strategy_name,
        stage_title="SFT" if sft else "DPO",
        method_title={"lora": "LoRA", "qlora": "QLoRA (4-bit base + LoRA)", "full": "full fine-tuning"}[method]
        if not (method == "lora" and load_4bit) else "LoRA on a 4-bit base",
        trainer="SFTTrainer" if sft else "DPOTrainer",
        output_what="LoRA adapter" if peft else "full model",
        load_note=(" in 4 bits (QLoRA: bitsandbytes NF4)" if load_4bit else "") +
        ("" if peft else " for full fine-tuning (every weight trains)"),
        ref_note="the reference is the base model (adapters disabled)" if peft
        else "TRL keeps a frozen copy of the starting model as the reference",
        script_name=SCRIPT, config_name=CONFIG,
        compat_imports="fix_trl_availability_flags" if sft else "ensure_warnings_issued, fix_trl_availability_flags",
        train_common_imports="tokenize_sft, tokenizer_for_template" if sft
        else "render_preference, tokenizer_for_template",
        trl_imports="SFTConfig, SFTTrainer" if sft else "DPOConfig, DPOTrainer",
    )


backend = UnslothBackend()
