"""The LlamaFactory backend (LlamaFactory 0.9.5): one strategy → LlamaFactory's flat training YAML.

    keys.py + keys.json   what LlamaFactory accepts (config keys, what each chat template renders), as data
    parity.py             which LlamaFactory template trains on exactly the text llfarm's template renders
    data.py               dataset_info.json and the normalized data in the forms LlamaFactory reads
    config.py             the config builder; every key it writes declared once (OWNED / DEFAULTS)
    entry.py              the training process: LlamaFactory's run_exp + llfarm's metrics callback

compile writes ``native/llamafactory_train.yaml`` (runnable by hand with ``llamafactory-cli train``) and
``native/dataset_info.json``; the command is ``python -m llfarm.backends.llamafactory.entry <yaml> ...``.
LlamaFactory's ``output_dir`` is ``checkpoints/``, so ``checkpoint-N/`` land where ``llfarm resume`` looks even when
a run is interrupted; collect moves the final adapter/model to ``adapter/`` or ``model/`` and LlamaFactory's own
records (trainer_log.jsonl, trainer_state.json, all_results.json, ...) to ``native/output/``.
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

from llfarm.backend import Backend, Capabilities, CompileContext, NativePlan, RunResult, launcher_argv, offline_env
from llfarm.distributed import launch_env, write_launcher_files
from llfarm.errors import RunError, UnsupportedError
from llfarm.redact import SECRET_OPTIONS_ENV, split_secret_options
from llfarm.rundir import atomic_write_text, read_json
from llfarm.training import DTYPES, total_steps

from .config import TRAIN_YAML, build_config, options_model, render_yaml
from .data import DATASET_INFO, check_turns, write_datasets
from .importer import IMPORTER
from .parity import conversation_cases, lf_template_for

__all__ = ["DATASET_INFO", "TRAIN_YAML", "LlamaFactoryBackend", "backend"]

# What LlamaFactory writes into output_dir besides the model: kept in native/output/.
LF_RECORDS = {"all_results.json", "train_results.json", "eval_results.json", "predict_results.json",
              "trainer_state.json", "trainer_log.jsonl", "generated_predictions.jsonl", "running_log.txt"}
PRECISION_OF = {v: k for k, v in DTYPES.items()}


class LlamaFactoryBackend(Backend):
    name = "llamafactory"
    summary = "LlamaFactory 0.9.5 (its own training YAML, run through run_exp); CPU and CUDA"
    priority = 30
    extra = "llamafactory"
    packages = ("llamafactory", "torch", "transformers", "peft", "trl")
    distributions = ("llamafactory",)
    capabilities = Capabilities(
        stages=frozenset({"sft", "pt", "dpo", "orpo", "simpo", "kto", "rm"}),
        methods=frozenset({"lora", "qlora", "full", "freeze"}),
        quantization=frozenset({"none", "4bit", "8bit"}),
        platforms=frozenset({"cpu", "cuda"}),
        launchers=frozenset({"none", "torchrun"}),
        resumable=frozenset({"sft", "pt", "dpo", "orpo", "simpo", "kto"}),
        unsupported={
            "method.bias": "LlamaFactory 0.9.5 trains LoRA without biases",
            "method.layers_to_transform": "LlamaFactory 0.9.5 puts adapters on every layer it targets",
            "method.init=olora": "LlamaFactory 0.9.5 initialises LoRA by default or with PiSSA only",
            "method.init=gaussian": "LlamaFactory 0.9.5 initialises LoRA by default or with PiSSA only",
        },
        reasons={
            "platform:mps": "llfarm has not verified LlamaFactory 0.9.5 on Apple MPS; the pytorch backend has",
            "launcher:accelerate": "LlamaFactory launches multi-process training through torchrun (its "
                                   "FORCE_TORCHRUN path); use distributed.launcher: torchrun",
            "launcher:deepspeed": "LlamaFactory launches multi-process training through torchrun (its "
                                  "FORCE_TORCHRUN path), DeepSpeed included; use distributed.launcher: torchrun "
                                  "with distributed.deepspeed",
            # LlamaFactory drops resume_from_checkpoint for rm full/freeze ("Cannot resume from checkpoint in
            # current stage") and does not restore the value head of an rm LoRA checkpoint.
            "resume:rm": "LlamaFactory 0.9.5 does not restore a reward model's value head from a checkpoint; "
                         "start a new run",
            "stage:ppo": "LlamaFactory 0.9.5's PPO says: 'Incompatible TRL version detected. LLaMA-Factory ppo "
                         "requires TRL version >=0.8.6,<=0.9.6' — the pinned stack has trl 0.24.0",
            "stage:grpo": "LlamaFactory 0.9.5 has no GRPO stage (its stages are pt, sft, rm, ppo, dpo, kto)",
        },
    )

    importer = IMPORTER                 # `llfarm import --from llamafactory`

    @property
    def options(self):                  # built from keys.json on first use
        return options_model()

    # ---- check: everything this backend refuses, found without importing LlamaFactory ---------------
    def check(self, strategy, platform, data=None) -> None:
        from llfarm.platform import resolve_precision
        from llfarm.templates import load_template

        super().check(strategy, platform, data)
        s = strategy
        if s.quantization != "none" and s.method.type not in ("lora", "qlora"):
            raise UnsupportedError(f"LlamaFactory quantizes the base model only for LoRA, not method "
                                   f"'{s.method.type}'", where="model.quantization",
                                   hint="use method.type: lora (or qlora), or model.quantization: none")
        precision = resolve_precision(s.training.precision, platform)
        # LlamaFactory loads the checkpoint's dtype, keeps trainable weights in float32 and computes in
        # training.precision; model.dtype can only say the same.
        if s.model.dtype not in ("auto", "float32", DTYPES[precision]):
            raise UnsupportedError(
                f"LlamaFactory computes in training.precision ({precision}) with float32 trainable weights; it has "
                f"no setting for model.dtype '{s.model.dtype}'", where="model.dtype",
                hint=f"set model.dtype: auto, or training.precision: {PRECISION_OF[s.model.dtype]}, or use "
                     "--backend pytorch")
        if s.model.compute_dtype not in ("auto", DTYPES[precision]):
            raise UnsupportedError(f"LlamaFactory computes 4-bit layers in training.precision ({precision}), not "
                                   f"model.compute_dtype '{s.model.compute_dtype}'", where="model.compute_dtype",
                                   hint=f"set model.compute_dtype: auto or {DTYPES[precision]}, or --backend pytorch")
        if s.method.init == "pissa" and s.quantization != "none":
            raise UnsupportedError("LlamaFactory 0.9.5 cannot initialise PiSSA on a quantized model (its own "
                                   "scripts/pissa_init.py does that first)", where="method.init",
                                   hint="use method.init: default with QLoRA, or --backend pytorch")
        stop = s.training.early_stopping
        if stop is not None and stop.threshold != 0:
            raise UnsupportedError("LlamaFactory 0.9.5's early_stopping_steps makes transformers' "
                                   "EarlyStoppingCallback with its patience only, so any improvement counts",
                                   where="training.early_stopping.threshold",
                                   hint="remove the threshold (0), or --backend pytorch")
        if s.training.keep_best and s.stage == "rm":
            raise UnsupportedError("LlamaFactory 0.9.5 refuses load_best_model_at_end for stage rm ('RM and PPO "
                                   "stages do not support `load_best_model_at_end`')", where="training.keep_best",
                                   hint="remove training.keep_best, or --backend pytorch")
        template = load_template(s.template)
        lf_template_for(template, conversation_cases(data) if data is not None else ["single"])
        if data is not None:
            check_turns(data)

    # ---- compile ------------------------------------------------------------------------------
    def compile(self, ctx: CompileContext) -> NativePlan:
        from llfarm.templates import load_template

        s, run = ctx.strategy, ctx.run
        steps = total_steps(s, ctx.data.n_train)
        template = lf_template_for(load_template(s.template), conversation_cases(ctx.data))
        datasets = write_datasets(ctx.data, run.native)
        launcher_files = write_launcher_files(ctx)
        options, secrets = split_secret_options(self.option_values(s))   # secrets travel by environment only
        config = build_config(ctx, steps, template, options)
        yaml_path = run.native / TRAIN_YAML
        atomic_write_text(yaml_path, render_yaml(config, s.distributed))
        out = run.head                  # outputs go to the head node's run directory
        entry = ["-m", "llfarm.backends.llamafactory.entry", str(yaml_path), "--metrics", str(out.metrics_path),
                 "--final", str(out.final_metrics_path), "--template", s.template]
        return NativePlan(argv=launcher_argv(ctx, [sys.executable], entry),
                          env={"DISABLE_VERSION_CHECK": "1", **offline_env(ctx), **launch_env(ctx)}, cwd=run.root,
                          files=[yaml_path, datasets, *launcher_files], total_steps=steps,
                          secret_env={SECRET_OPTIONS_ENV: json.dumps(secrets)} if secrets else {},
                          trainer=f"llamafactory run_exp(stage {s.stage}) with {TRAIN_YAML}")

    # ---- collect ------------------------------------------------------------------------------
    def collect(self, ctx: CompileContext) -> RunResult:
        run = ctx.run
        kind = "adapter" if ctx.strategy.is_peft else "model"
        dest = run.adapter if kind == "adapter" else run.model
        records = run.native / "output"
        weights = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
        src = run.checkpoints
        if not (src / weights).is_file() and not any(src.glob("model*.safetensors")):
            raise RunError(f"LlamaFactory finished without writing {weights} into {run.show(src)}", where=str(run),
                           hint=f"see {run.show(run.logs / 'train.log')}")
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
    out.update(read_json(run.final_metrics_path))
    return out


backend = LlamaFactoryBackend()
