"""The Unsloth fast-path backend: FastLanguageModel + LoRA/QLoRA (or full fine-tuning) + TRL, on one GPU.

compile writes two files into ``native/``:

- ``trainer.json``: the spec of llfarm's shared training layer (the same TrainingArguments/SFTConfig as the
  pytorch backend), plus an ``unsloth`` section holding the keyword arguments of ``FastLanguageModel.from_pretrained``
  and ``FastLanguageModel.get_peft_model``;
- ``train_unsloth.py``: a short, readable entry that imports ``unsloth`` first, loads the model with those two calls,
  and hands it to llfarm's shared trainer (``llfarm.trainer.run``: data, TRL trainer, metrics, saving — the code the
  pytorch backend runs). Only the loader differs.

The command is ``python native/train_unsloth.py native/trainer.json``. ``unsloth`` is imported only in that child:
without a GPU ``import unsloth`` raises NotImplementedError, so this module never imports it, and ``check`` refuses
a machine without a GPU before anything is written.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

from pydantic import Field

from llfarm.backend import Backend, Capabilities, CompileContext, NativePlan, RunResult, offline_env
from llfarm.errors import BackendUnavailable, RunError, UnsupportedError
from llfarm.platform import Platform
from llfarm.rundir import atomic_write_text, read_json
from llfarm.training import TrainerFields, options_model, total_steps, trainer_spec

SCRIPT = "train_unsloth.py"
SPEC = "trainer.json"
ALTERNATIVES = "--backend pytorch or --backend llamafactory (both also run on CPU), or --backend auto"
NO_GPU = ("Unsloth trains only on a GPU (NVIDIA CUDA, AMD ROCm or Intel XPU): `import unsloth` fails "
          "without one")

# What the strategy asks for is checked as if on a GPU; the machine is checked after (see check()).
_ON_A_GPU = Platform("cuda", "a CUDA GPU", bf16=True)


class UnslothFields(TrainerFields):
    """backend_options.unsloth: Unsloth's loader switch, and the TrainingArguments the trainer takes."""
    use_gradient_checkpointing: Literal[True, False, "unsloth"] = Field(
        "unsloth", description="Unsloth's offloaded gradient checkpointing (\"unsloth\"), plain (true) or off.")


UnslothOptions = options_model("UnslothOptions", UnslothFields, moved={"use_rslora": "method.use_rslora"})
LOADER_OPTIONS = ("use_gradient_checkpointing",)

ENTRY = '''\
"""Unsloth {stage} with {method}, written by llfarm for strategy '{name}'.

Run it by hand from the run directory (it needs a GPU Unsloth supports and `pip install "llfarm[unsloth]"`):

    python native/{script} native/{spec}      # native/command.txt: the same, with its environment

Every value is in {spec}. The two Unsloth calls below take theirs from its "unsloth" section; everything after
loading (the data rendered with the strategy's chat template, TRL's {trainer}, metrics.jsonl, saving the
{output} and tokenizer) is llfarm's shared trainer, llfarm.trainer.run: the code `--backend pytorch` runs.
"""

import sys

# `import unsloth` comes before trl, transformers and peft: importing it patches them (fast kernels, and TRL's
# trainers rewritten into Unsloth<Name>Trainer). Without a usable GPU the import raises NotImplementedError.
try:
    import unsloth
    from unsloth import FastLanguageModel, is_bfloat16_supported
except NotImplementedError as exc:
    sys.exit(f"llfarm: Unsloth cannot run on this machine ({{exc}}); use --backend pytorch or llamafactory")

import torch

from llfarm import trainer


def load(spec, template):
    """Unsloth's loader: FastLanguageModel.from_pretrained, then get_peft_model for LoRA/QLoRA."""
    calls = spec["unsloth"]
    model, tokenizer = FastLanguageModel.from_pretrained(
        **{{**calls["from_pretrained"], "dtype": getattr(torch, calls["from_pretrained"]["dtype"])}})
    if "get_peft_model" in calls:
        model = FastLanguageModel.get_peft_model(model, **calls["get_peft_model"])
    # the template's chat_template and end-of-turn eos; the adapter is already on the model (no peft_config)
    return model, trainer.prepare_tokenizer(tokenizer, template), None


spec = trainer.read_spec(sys.argv[1])
# Precision "auto" became bf16 because llfarm saw a CUDA GPU; one without bf16 (T4, V100) trains in fp16.
if spec["precision_auto"] and spec["args"]["bf16"] and not is_bfloat16_supported():
    print("llfarm: this GPU has no bf16; training in fp16 (precision: auto)")
    spec["args"].update(bf16=False, fp16=True)
    spec["unsloth"]["from_pretrained"]["dtype"] = "float16"
sys.exit(trainer.run(spec, load, extra_final={{"unsloth_version": unsloth.__version__}}))
'''


class UnslothBackend(Backend):
    name = "unsloth"
    summary = "Unsloth's FastLanguageModel + TRL: the fast path on one CUDA GPU"
    priority = 10                # --backend auto prefers it wherever it can run (a GPU)
    extra = "unsloth"
    packages = ("unsloth", "unsloth_zoo", "trl", "peft")
    distributions = ("unsloth", "unsloth_zoo")
    options = UnslothOptions
    capabilities = Capabilities(
        stages=frozenset({"sft", "pt", "dpo", "orpo", "simpo", "kto", "grpo"}),
        methods=frozenset({"lora", "qlora", "full"}),
        quantization=frozenset({"none", "4bit"}),
        platforms=frozenset({"cuda"}),
        launchers=frozenset({"none"}),
        reasons={
            "stage:rm": "Unsloth has no reward-model API; use --backend pytorch or llamafactory",
            "stage:ppo": "PPO needs a reward and a value model beside the policy; llfarm runs it with TRL's PPOTrainer "
                         "on --backend pytorch",
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
            "launcher:deepspeed": "llfarm runs Unsloth as one process on one GPU; use --backend pytorch for "
                                  "DeepSpeed",
        },
        unsupported={
            "method.use_dora": "Unsloth's fast LoRA kernels do not implement DoRA",
            "training.attention": "Unsloth picks its own attention kernels",
            "model.quant_type=fp4": "Unsloth's 4-bit loading is NF4",
            "model.double_quant": "Unsloth's 4-bit loading always double-quantizes",
        },
    )

    # ---- check ---------------------------------------------------------------------------------
    def check(self, strategy, platform: Platform, data=None) -> None:
        """What the strategy asks for first (same answer on any machine), then this machine, then the package."""
        self.check_capabilities(strategy, _ON_A_GPU)
        from llfarm.platform import resolve_precision
        from llfarm.training import model_dtype
        dtype = model_dtype(strategy, resolve_precision(strategy.training.precision, _ON_A_GPU))
        if strategy.model.compute_dtype not in ("auto", dtype):
            raise UnsupportedError(f"backend 'unsloth' computes 4-bit layers in the model dtype ({dtype}), not "
                                   f"model.compute_dtype '{strategy.model.compute_dtype}'", where="model.compute_dtype",
                                   hint="set model.compute_dtype: auto, or --backend pytorch")
        if strategy.distributed.deepspeed:
            raise UnsupportedError("backend 'unsloth' does not run DeepSpeed", where="distributed.deepspeed",
                                   hint="remove distributed.deepspeed, or use --backend pytorch or llamafactory")
        if platform.name not in self.capabilities.platforms:
            why = self.capabilities.reasons.get(f"platform:{platform.name}", NO_GPU)
            raise BackendUnavailable(f"backend 'unsloth' cannot run here: {why}; this machine has "
                                     f"{platform.accelerator}", hint=f"use {ALTERNATIVES}")
        self.check_installed()

    # ---- compile -------------------------------------------------------------------------------
    def compile(self, ctx: CompileContext) -> NativePlan:
        s, run = ctx.strategy, ctx.run
        steps = total_steps(s, ctx.data.n_train)
        options = self.option_values(s)
        loader = {k: options.pop(k) for k in LOADER_OPTIONS if k in options}
        spec = trainer_spec(ctx, steps, options)
        spec["unsloth"] = unsloth_calls(spec, s, loader)
        spec["peft"] = None                  # the adapter comes from get_peft_model, not from a LoraConfig
        spec_path, script_path = run.native / SPEC, run.native / SCRIPT
        atomic_write_text(spec_path, json.dumps(spec, indent=2) + "\n")
        atomic_write_text(script_path, render_entry(s, spec))
        env = {"UNSLOTH_DISABLE_STATISTICS": "1",   # no telemetry download from the hub on start
               # Unsloth writes the code it generates (patched trainers, compiled modules) into
               # ./unsloth_compiled_cache by default; keep the run directory's top level normalized.
               "UNSLOTH_COMPILE_LOCATION": str(run.native / "unsloth_compiled_cache"), **offline_env(ctx)}
        return NativePlan(argv=[sys.executable, str(script_path), str(spec_path)], env=env, cwd=run.root,
                          files=[script_path, spec_path], total_steps=steps,
                          trainer=f"unsloth-patched trl.{spec['trainer']}(args=trl.{spec['config']}(**{SPEC}['args']))")

    # ---- collect -------------------------------------------------------------------------------
    def collect(self, ctx: CompileContext) -> RunResult:
        run = ctx.run
        kind = "adapter" if ctx.strategy.is_peft else "model"
        out = run.adapter if kind == "adapter" else run.model
        marker = out / ("adapter_config.json" if kind == "adapter" else "config.json")
        if not marker.is_file():
            raise RunError(f"the Unsloth script exited cleanly but wrote no {marker.name}", where=run.show(out),
                           hint=f"see {run.show(run.logs / 'train.log')}")
        return RunResult(output_kind=kind, output_dir=out, final_metrics=read_json(run.native / "final_metrics.json"))


def unsloth_calls(spec: dict[str, Any], s, loader: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of FastLanguageModel.from_pretrained and get_peft_model, from the shared spec."""
    # Unsloth's own offloaded gradient checkpointing is on unless backend_options.unsloth says otherwise:
    # it is where most of Unsloth's memory saving comes from (training.gradient_checkpointing is not consulted).
    checkpointing = loader.get("use_gradient_checkpointing", "unsloth")
    m = spec["model"]
    calls: dict[str, Any] = {"from_pretrained": {
        "model_name": m["path"],
        "max_seq_length": spec["data"]["max_length"],
        "dtype": m["dtype"],
        "load_in_4bit": s.quantization == "4bit",
        "full_finetuning": s.method.type == "full",
        "use_gradient_checkpointing": checkpointing,
        "revision": m["revision"],
        "trust_remote_code": m["trust_remote_code"],
        "use_exact_model_name": True,       # load this exact model, not an unsloth/ pre-quantized copy
    }}
    lora = spec["peft"]
    if lora:
        calls["get_peft_model"] = {
            "r": lora["r"], "lora_alpha": lora["lora_alpha"], "lora_dropout": lora["lora_dropout"],
            "target_modules": lora["target_modules"], "bias": lora["bias"],
            "use_gradient_checkpointing": checkpointing, "random_state": spec["args"]["seed"],
            "use_rslora": lora["use_rslora"], "modules_to_save": lora["modules_to_save"],
            "layers_to_transform": lora["layers_to_transform"], "init_lora_weights": lora["init_lora_weights"]}
    return calls


def render_entry(s, spec: dict[str, Any]) -> str:
    peft = s.is_peft
    method = {"lora": "LoRA", "qlora": "QLoRA (4-bit base + LoRA)", "full": "full fine-tuning"}[s.method.type]
    if s.method.type == "lora" and s.quantization == "4bit":
        method = "LoRA on a 4-bit base"
    return ENTRY.format(stage=s.stage.upper(), method=method, name=s.name, script=SCRIPT, spec=SPEC,
                        trainer=spec["trainer"], output="LoRA adapter" if peft else "full model")


backend = UnslothBackend()
