"""The one training layer: a strategy → exactly what a Hugging Face / TRL trainer is given.

Computed at compile time (pure: no torch, transformers or backend import), written into the run's native files and
shown by ``llfarm plan``. Every Hugging Face–based backend uses it: the transformers/PEFT and Unsloth backends hand
the whole spec to the shared trainer child (``llfarm.trainer``; only the model loader differs), and LlamaFactory's config
builder takes the TrainingArguments it shares from :func:`training_arguments`. A strategy key is mapped here once.

    spec = trainer_spec(ctx, total_steps)     # JSON-able
    spec["trainer"], spec["config"]           # "SFTTrainer", "SFTConfig" (trl)
    spec["args"]                              # SFTConfig(**args): TrainingArguments + the stage's own keys
    spec["model"]                             # path, dtype, task, quantization (BitsAndBytesConfig kwargs)
    spec["peft"], spec["freeze"]              # LoraConfig kwargs | None; trainable layers | None
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from .schema import BNB_OPTIMIZERS, Section

if TYPE_CHECKING:
    from .backend import CompileContext
    from .schema import Strategy

NEVER = 10**9                       # save_steps when training.save_every is null: only the final save
TRAINERS = {"sft": ("SFTTrainer", "SFTConfig"), "pt": ("SFTTrainer", "SFTConfig"),
            "dpo": ("DPOTrainer", "DPOConfig"), "orpo": ("ORPOTrainer", "ORPOConfig"),
            "simpo": ("CPOTrainer", "CPOConfig"), "kto": ("KTOTrainer", "KTOConfig"),
            "rm": ("RewardTrainer", "RewardConfig"), "ppo": ("PPOTrainer", "PPOConfig"),
            "grpo": ("GRPOTrainer", "GRPOConfig")}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# TrainingArguments keys llfarm sets, with the strategy field (or llfarm mechanism) each comes from. A backend that
# accepts raw native keys refuses these (set the field instead).
HF_SOURCES = {
    "output_dir": "the run directory (checkpoints/)",
    "num_train_epochs": "training.epochs", "max_steps": "training.max_steps",
    "per_device_train_batch_size": "training.batch_size", "per_device_eval_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum", "learning_rate": "training.learning_rate",
    "lr_scheduler_type": "training.scheduler", "warmup_ratio": "training.warmup_ratio",
    "weight_decay": "training.weight_decay", "max_grad_norm": "training.max_grad_norm",
    "seed": "training.seed", "data_seed": "training.seed", "logging_steps": "training.logging_steps",
    "save_strategy": "training.save_every", "save_steps": "training.save_every",
    "save_total_limit": "training.keep_checkpoints",
    "eval_strategy": "training.eval_every (and eval data)", "eval_steps": "training.eval_every",
    "bf16": "training.precision", "fp16": "training.precision", "use_cpu": "training.precision (the platform)",
    "gradient_checkpointing": "training.gradient_checkpointing", "deepspeed": "distributed.deepspeed",
    "optim": "training.optimizer", "adam_beta1": "training.adam_beta1", "adam_beta2": "training.adam_beta2",
    "adam_epsilon": "training.adam_epsilon", "warmup_steps": "training.warmup_steps", "tf32": "training.tf32",
    "train_sampling_strategy": "training.group_by_length", "dataloader_num_workers": "training.dataloader_workers",
    "neftune_noise_alpha": "training.neftune_alpha", "report_to": "tracking.report_to",
    "run_name": "tracking.run_name", "total_episodes": "training.max_steps / epochs (PPO)",
    "metric_for_best_model": "training.early_stopping (its metric) or training.keep_best",
    "greater_is_better": "training.early_stopping (its metric) or training.keep_best",
    "load_best_model_at_end": "training.keep_best",
    "restore_callback_states_from_checkpoint": "training.early_stopping (resume keeps its patience count)",
    "ddp_backend": "distributed.launcher (gloo on CPU)",
    "ddp_find_unused_parameters": "distributed.launcher (llfarm: every trained parameter is used)",
}
# TrainingArguments llfarm sets to its own defaults; a backend's raw options may override them.
HF_DEFAULTS: dict[str, Any] = {
    "logging_first_step": True,                 # metrics.jsonl starts at step 1
    "disable_tqdm": True,                       # llfarm draws the progress bar
    "remove_unused_columns": False,             # the datasets carry exactly the columns the trainer needs
    "include_num_input_tokens_seen": True,      # tokens/s in metrics.jsonl
}
# Values that need CUDA (bitsandbytes optimizers, TF32, flash attention), refused elsewhere before anything starts.
CUDA_ONLY = {
    "training.optimizer": (BNB_OPTIMIZERS, "bitsandbytes' 8-bit and paged optimizers need a CUDA GPU"),
    "training.tf32": (frozenset({True}), "TF32 is a CUDA (Ampere and newer) matmul mode"),
    "training.attention": (frozenset({"flash_attention_2"}), "flash-attention 2 needs a CUDA GPU"),
}


def refusing(sources: dict[str, str]) -> dict[str, Any]:
    """Pydantic fields for native keys llfarm sets itself: a value given for one is refused, naming the strategy
    field it comes from (or saying llfarm owns it). For a backend's options model (create_model)."""
    from typing import Annotated

    from pydantic import AfterValidator

    from .strategy import strategy_keys

    def refuse(source: str):
        def check(value: Any) -> Any:
            if source.split(" ")[0] in strategy_keys():
                raise ValueError(f"comes from the strategy field {source}: set that instead")
            raise ValueError(f"is llfarm's to set ({source}): remove it")
        return AfterValidator(check)

    return {key: (Annotated[Any, refuse(source)], Field(None, validate_default=False))
            for key, source in sources.items()}


class TrainerFields(Section):
    """Extra TrainingArguments a backend's ``backend_options`` may pass to a Hugging Face trainer."""
    lr_scheduler_kwargs: dict[str, Any] | None = Field(None, description="Extra scheduler arguments.")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(None, description="e.g. use_reentrant.")
    torch_compile: bool | None = Field(None, description="torch.compile the model.")
    label_smoothing_factor: float | None = Field(None, ge=0, lt=1, description="Label smoothing.")


def options_model(name: str, base: type[Section] = TrainerFields,
                  moved: dict[str, str] | None = None) -> type[Section]:
    """``base``'s options, and a refusal for every TrainingArguments key a strategy field sets (and for options
    that became strategy fields, ``moved``)."""
    from pydantic import create_model
    owned = {k: v for k, v in {**HF_SOURCES, **(moved or {})}.items() if k not in base.model_fields}
    return create_model(name, __base__=base, **refusing(owned))


TrainerOptions = options_model("TrainerOptions")


# ---------------------------------------------------------------- pieces

def world_size(s: Strategy) -> int:
    return s.distributed.world_size


def total_steps(s: Strategy, n_train: int) -> int:
    """Optimizer steps the run will take (as transformers computes them)."""
    import math
    t = s.training
    if t.max_steps:
        return t.max_steps
    examples = n_train * (s.preference.num_generations if s.stage == "grpo" else 1)   # grpo: completions
    batches = math.ceil(examples / (t.batch_size * world_size(s)))
    per_epoch = max(batches // t.grad_accum, 1) if batches else 0
    return math.ceil(t.epochs * per_epoch)


def examples_needed(s: Strategy) -> int | None:
    """How many training examples a run with training.max_steps sees (None: whole epochs). GRPO's batch counts
    completions: each example (prompt) gives preference.num_generations of them."""
    t = s.training
    if not t.max_steps:
        return None
    n = t.max_steps * t.batch_size * t.grad_accum * world_size(s)
    return -(-n // s.preference.num_generations) if s.stage == "grpo" else n


def eval_steps(s: Strategy, steps: int) -> int:
    return s.training.eval_every or max(1, steps // 5)


# llfarm's metric names (metrics.jsonl) → the names the trainers' evaluation reports them under
NATIVE_METRICS = {"eval_loss": "eval_loss", "eval_accuracy": "eval_accuracy",
                  "eval_reward_accuracy": "eval_rewards/accuracies", "eval_reward_margin": "eval_rewards/margins"}


def best_arguments(s: Strategy, has_eval: bool, every: int | None) -> dict[str, Any]:
    """TrainingArguments for early stopping and keep_best (both need evaluation; the schema makes sure there is
    eval data). The rule for checkpoints: keep_best saves one at every evaluation (save_steps = eval_steps, whatever
    training.save_every says), so the best evaluation's weights are on disk — transformers' load_best_model_at_end
    needs save_steps to be a multiple of eval_steps, and only a checkpoint saved at the best evaluation holds its
    weights. Early stopping alone needs no checkpoints: transformers tracks the best metric at each evaluation."""
    from .schema import STOP_METRICS
    tr = s.training
    if not has_eval or not (tr.early_stopping or tr.keep_best):
        return {}
    args: dict[str, Any] = {"metric_for_best_model": NATIVE_METRICS[s.stop_metric],
                            "greater_is_better": STOP_METRICS[s.stop_metric][1]}
    if tr.keep_best:
        args.update(load_best_model_at_end=True, save_steps=every)
    if tr.early_stopping:
        args["restore_callback_states_from_checkpoint"] = True
    return args


def early_stopping_arguments(s: Strategy) -> dict[str, Any] | None:
    """transformers.EarlyStoppingCallback kwargs (None: no early stopping)."""
    stop = s.training.early_stopping
    if stop is None:
        return None
    return {"early_stopping_patience": stop.patience, "early_stopping_threshold": stop.threshold}


def model_dtype(s: Strategy, precision: str) -> str:
    """The torch dtype the weights load in: model.dtype, or (auto) the one training.precision computes in."""
    return s.model.dtype if s.model.dtype != "auto" else DTYPES[precision]


def training_arguments(ctx: CompileContext, steps: int) -> dict[str, Any]:
    """The TrainingArguments every Hugging Face–based backend gives its trainer (HF names)."""
    s, tr = ctx.strategy, ctx.strategy.training
    has_eval = ctx.data.n_eval > 0
    args: dict[str, Any] = {
        "output_dir": str(ctx.run.head.checkpoints),
        "num_train_epochs": float(tr.epochs), "max_steps": tr.max_steps or -1,
        "per_device_train_batch_size": tr.batch_size, "per_device_eval_batch_size": tr.batch_size,
        "gradient_accumulation_steps": tr.grad_accum, "learning_rate": tr.learning_rate,
        "lr_scheduler_type": tr.scheduler, "warmup_ratio": tr.warmup_ratio, "weight_decay": tr.weight_decay,
        "max_grad_norm": tr.max_grad_norm, "seed": tr.seed, "data_seed": tr.seed,
        "logging_steps": tr.logging_steps,
        "save_strategy": "steps", "save_steps": tr.save_every or NEVER, "save_total_limit": tr.keep_checkpoints,
        "eval_strategy": "steps" if has_eval else "no", "eval_steps": eval_steps(s, steps) if has_eval else None,
        "bf16": ctx.precision == "bf16", "fp16": ctx.precision == "fp16", "use_cpu": ctx.platform.name == "cpu",
        "gradient_checkpointing": tr.gradient_checkpointing,
        "optim": tr.optimizer, "adam_beta1": tr.adam_beta1, "adam_beta2": tr.adam_beta2,
        "adam_epsilon": tr.adam_epsilon, "warmup_steps": tr.warmup_steps,
        "train_sampling_strategy": "group_by_length" if tr.group_by_length else "random",
        "dataloader_num_workers": tr.dataloader_workers,
        "report_to": list(s.tracking.report_to) or "none",
        **HF_DEFAULTS,
    }
    args.update(best_arguments(s, has_eval, args["eval_steps"]))
    if tr.tf32 is not None:
        args["tf32"] = tr.tf32
    if tr.neftune_alpha is not None:
        args["neftune_noise_alpha"] = tr.neftune_alpha
    if s.tracking.report_to:
        args["run_name"] = s.tracking.run_name or ctx.run.root.name
    if s.distributed.deepspeed:
        args["deepspeed"] = str(ctx.run.native / "deepspeed.json")
    if s.stage == "ppo":   # PPO counts episodes: steps x the prompts each step takes
        args["total_episodes"] = steps * tr.batch_size * tr.grad_accum * world_size(s)
    if s.distributed.world_size > 1:
        # gloo on CPU (nccl, transformers' default, on CUDA); every LoRA/trained parameter takes part in each step
        if ctx.platform.name == "cpu":
            args["ddp_backend"] = "gloo"
        args["ddp_find_unused_parameters"] = False
    assert set(args) <= set(HF_SOURCES) | set(HF_DEFAULTS), set(args) - set(HF_SOURCES) - set(HF_DEFAULTS)
    return args


def stage_arguments(s: Strategy) -> dict[str, Any]:
    """The stage's own config keys (SFTConfig / DPOConfig / RewardConfig beyond TrainingArguments)."""
    n = s.data.max_length
    if s.stage == "sft":
        # Pre-tokenized with a completion mask (llfarm.train_common): the loss is on the final answer only.
        # Packing: TRL's best-fit-decreasing packing of the tokenized examples into max_length sequences.
        return {"max_length": n, "completion_only_loss": True, "packing": s.training.packing,
                "dataset_kwargs": {"skip_prepare_dataset": False}}
    p = s.preference
    if s.stage == "pt":           # every token trains (no answer mask); packing is common for documents
        return {"max_length": n, "completion_only_loss": False, "packing": s.training.packing,
                "dataset_kwargs": {"skip_prepare_dataset": False}}
    if s.stage == "dpo":
        return {"beta": p.beta, "loss_type": p.loss, "max_length": n, "max_prompt_length": n // 2,
                "precompute_ref_log_probs": False}
    if s.stage == "orpo":
        return {"beta": p.beta, "max_length": n, "max_prompt_length": n // 2}
    if s.stage == "simpo":         # SimPO is CPO's simpo loss with the behaviour-cloning term off
        return {"beta": p.beta, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": p.simpo_gamma,
                "max_length": n, "max_prompt_length": n // 2}
    if s.stage == "kto":
        return {"beta": p.beta, "desirable_weight": p.desirable_weight, "undesirable_weight": p.undesirable_weight,
                "max_length": n, "max_prompt_length": n // 2, "max_completion_length": n // 2}
    if s.stage == "grpo":
        return {"beta": p.beta, "num_generations": p.num_generations, "max_prompt_length": n,
                "max_completion_length": p.max_new_tokens, "temperature": p.temperature}
    if s.stage == "ppo":           # TRL's PPO loop counts episodes (prompts), not optimizer steps
        return {"response_length": p.max_new_tokens, "temperature": p.temperature, "kl_coef": p.beta,
                "num_sample_generations": 0, "stop_token": "eos", "missing_eos_penalty": None,
                "local_rollout_forward_batch_size": s.training.batch_size, "num_ppo_epochs": 1,
                "num_mini_batches": 1}
    return {"max_length": n, "center_rewards_coefficient": None}


def lora_targets(target_modules: str | list[str]) -> str | list[str]:
    return "all-linear" if target_modules == "all" else list(target_modules)


def lora_arguments(s: Strategy) -> dict[str, Any] | None:
    """peft.LoraConfig kwargs (None unless the method trains an adapter)."""
    if not s.is_peft:
        return None
    m, rm = s.method, s.stage == "rm"
    # a reward model's score head is new: it trains in full beside the adapter
    save = [*(["score"] if rm else []), *(m.modules_to_save or [])]
    return {"r": m.r, "lora_alpha": m.alpha, "lora_dropout": m.dropout,
            "target_modules": lora_targets(m.target_modules), "bias": m.bias,
            "task_type": "SEQ_CLS" if rm else "CAUSAL_LM", "modules_to_save": save or None,
            "layers_to_transform": m.layers_to_transform, "use_dora": m.use_dora, "use_rslora": m.use_rslora,
            "init_lora_weights": LORA_INIT[m.init]}


LORA_INIT = {"default": True, "pissa": "pissa", "olora": "olora", "gaussian": "gaussian"}


def quantization_arguments(s: Strategy) -> dict[str, Any] | None:
    """transformers.BitsAndBytesConfig kwargs for load-time quantization (None: full-precision weights)."""
    m = s.model
    if s.quantization == "4bit":
        return {"load_in_4bit": True, "bnb_4bit_quant_type": m.quant_type, "bnb_4bit_use_double_quant": m.double_quant,
                "bnb_4bit_compute_dtype": "bfloat16" if m.compute_dtype == "auto" else m.compute_dtype}
    if s.quantization == "8bit":
        return {"load_in_8bit": True}
    return None


TOKENIZATION_VERSION = 2     # bump when llfarm.train_common changes what it makes of a row (2: orpo/simpo answers as rendered turns)


def data_spec(ctx: CompileContext) -> dict[str, Any]:
    """The files the trainer reads and the token cache that keeps what it makes of them (keyed by the data
    selection, the tokenizer's fingerprint, the template, max_length and the stage)."""
    import os

    from .data import token_cache_dir
    from .models import tokenizer_fingerprint
    from .templates import load_template

    s, data = ctx.strategy, ctx.data
    template = load_template(s.template)
    cache = token_cache_dir("hf", data, tokenizer_fingerprint(ctx.model_path, s.model.revision), template.jinja,
                            template.eos, s.data.max_length, s.stage, TOKENIZATION_VERSION)
    return {"train": str(data.train_path), "eval": str(data.eval_path) if data.eval_path else None,
            "max_length": s.data.max_length, "token_cache": str(cache),
            "num_proc": max(1, min(os.cpu_count() or 1, 8))}


def reward_model_spec(s: Strategy) -> dict[str, Any]:
    """PPO's reward model, from the llfarm rm run preference.reward_model names (checked by check_reward_model)."""
    import json
    from pathlib import Path
    run = Path(s.preference.reward_model or "")
    m = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    out = run / m.get("paths", {}).get("output", "adapter")
    return {"run": str(run), "base": m["model_path"], "kind": m.get("output_kind"), "path": str(out),
            "backend": m.get("backend")}


def check_reward_model(s: Strategy, value_head: bool) -> None:
    """preference.reward_model must be a completed rm run whose reward head this backend can load: a classification
    head (``value_head`` False) or LlamaFactory's value head (True)."""
    import json
    from pathlib import Path

    from .errors import StrategyError
    where = "preference.reward_model"
    run = Path(s.preference.reward_model or "")
    try:
        m = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise StrategyError([f"{run} is not an llfarm run directory (no readable manifest.json)"], where=where,
                            hint="train one with `llfarm run reward_model` and give its directory") from None
    if m.get("stage") != "rm" or m.get("status") != "completed":
        raise StrategyError([f"{run} is a {m.get('status')} {m.get('stage')} run; PPO needs a completed rm run"],
                            where=where, hint="train one with `llfarm run reward_model`")
    has_value_head = (run / "adapter" / "value_head.safetensors").is_file() or \
        (run / "model" / "value_head.safetensors").is_file()
    if has_value_head != value_head:
        have, need = ("LlamaFactory's value head", "a classification head") if has_value_head else \
            ("a classification head", "LlamaFactory's value head")
        raise StrategyError([f"the reward model of {run} ({m.get('backend')} backend) has {have}; this backend's PPO "
                             f"loads {need}"], where=where,
                            hint="train the reward model and run PPO on the same backend")


def trainer_spec(ctx: CompileContext, steps: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the shared trainer child needs, as JSON: the strategy mapped once, nothing left implicit."""
    s, out = ctx.strategy, ctx.run.head          # outputs go to the head node's run directory
    trainer, config = TRAINERS[s.stage]
    return {
        "stage": s.stage, "trainer": trainer, "config": config,
        "template": s.template,
        "precision_auto": s.training.precision == "auto" and s.model.dtype == "auto",
        "model": {"path": ctx.model_path, "revision": s.model.revision,
                  "trust_remote_code": s.model.trust_remote_code, "dtype": model_dtype(s, ctx.precision),
                  "task": "sequence_classification" if s.stage == "rm" else "causal_lm",
                  "attn_implementation": None if s.training.attention == "auto" else s.training.attention,
                  "quantization": quantization_arguments(s)},
        "loraplus_lr_ratio": s.method.loraplus_lr_ratio,
        "rewards": list(s.preference.rewards),
        "reward_model": reward_model_spec(s) if s.stage == "ppo" else None,
        "peft": lora_arguments(s),
        "freeze": {"trainable_layers": s.method.trainable_layers} if s.method.type == "freeze" else None,
        "args": {**training_arguments(ctx, steps), **stage_arguments(s), **(options or {})},
        "data": data_spec(ctx),
        "outputs": {"dir": str(out.adapter if s.is_peft else out.model), "metrics": str(out.metrics_path),
                    "final_metrics": str(out.final_metrics_path)},
        "early_stopping": early_stopping_arguments(s),
        "resume_from": str(ctx.resume_from) if ctx.resume_from else None,
        "total_steps": steps,
        "distributed": {"world_size": s.distributed.world_size, "fsdp": s.distributed.fsdp != "none",
                        "deepspeed": s.distributed.deepspeed is not None},
    }



def tracking_env(s: Strategy, run) -> dict[str, str]:
    """Where trackers write: all under the run directory (logs/), wandb offline unless WANDB_MODE says otherwise."""
    import os
    t = s.tracking
    env: dict[str, str] = {}
    if "tensorboard" in t.report_to:       # transformers 5 reads the folder from here (logging_dir is deprecated)
        env["TENSORBOARD_LOGGING_DIR"] = str(run.logs / "tensorboard")
    if "wandb" in t.report_to:
        env.update(WANDB_DIR=str(run.logs), WANDB_PROJECT=t.project or s.name, WANDB_SILENT="true")
        if "WANDB_MODE" not in os.environ:
            env["WANDB_MODE"] = "offline"
    if "mlflow" in t.report_to:
        # a local file store under the run directory (MLflow 3.17 wants the opt-in for its file store)
        env.update(MLFLOW_TRACKING_URI=(run.logs / "mlruns").as_uri(), MLFLOW_EXPERIMENT_NAME=t.project or s.name,
                   MLFLOW_ALLOW_FILE_STORE="true")
    return env
