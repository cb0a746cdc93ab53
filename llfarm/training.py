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

from .schema import Section

if TYPE_CHECKING:
    from .backend import CompileContext
    from .schema import Strategy

NEVER = 10**9                       # save_steps when training.save_every is null: only the final save
TRAINERS = {"sft": ("SFTTrainer", "SFTConfig"), "dpo": ("DPOTrainer", "DPOConfig"),
            "rm": ("RewardTrainer", "RewardConfig")}
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
}
# TrainingArguments llfarm sets to its own defaults; a backend's raw options may override them.
HF_DEFAULTS: dict[str, Any] = {
    "logging_first_step": True,                 # metrics.jsonl starts at step 1
    "report_to": "none",                        # llfarm's own metrics.jsonl, no tracker unless asked
    "disable_tqdm": True,                       # llfarm draws the progress bar
    "dataloader_num_workers": 0,
    "remove_unused_columns": False,             # the datasets carry exactly the columns the trainer needs
    "include_num_input_tokens_seen": True,      # tokens/s in metrics.jsonl
}


class TrainerOptions(Section):
    """Extra TrainingArguments a backend's ``backend_options`` may pass to a Hugging Face trainer."""
    optim: str | None = Field(None, description="Optimizer name (adamw_torch, adafactor, sgd, ...).")
    lr_scheduler_kwargs: dict[str, Any] | None = Field(None, description="Extra scheduler arguments.")
    dataloader_num_workers: int | None = Field(None, ge=0, description="Data loading processes.")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(None, description="e.g. use_reentrant.")
    torch_compile: bool | None = Field(None, description="torch.compile the model.")
    neftune_noise_alpha: float | None = Field(None, ge=0, description="NEFTune embedding noise.")
    label_smoothing_factor: float | None = Field(None, ge=0, lt=1, description="Label smoothing.")
    adam_beta1: float | None = Field(None, ge=0, lt=1, description="Adam beta1.")
    adam_beta2: float | None = Field(None, ge=0, lt=1, description="Adam beta2.")
    adam_epsilon: float | None = Field(None, gt=0, description="Adam epsilon.")

    def given(self) -> dict[str, Any]:
        """Only what the strategy set (unset options keep the library defaults)."""
        return self.model_dump(exclude_unset=True)


# ---------------------------------------------------------------- pieces

def world_size(s: Strategy) -> int:
    d = s.distributed
    return d.nproc_per_node * d.nnodes if d.launcher != "none" else 1


def total_steps(s: Strategy, n_train: int) -> int:
    """Optimizer steps the run will take (as transformers computes them)."""
    import math
    t = s.training
    if t.max_steps:
        return t.max_steps
    batches = math.ceil(n_train / (t.batch_size * world_size(s)))
    per_epoch = max(batches // t.grad_accum, 1) if batches else 0
    return math.ceil(t.epochs * per_epoch)


def examples_needed(s: Strategy) -> int | None:
    """How many training examples a run with training.max_steps sees (None: whole epochs)."""
    t = s.training
    return t.max_steps * t.batch_size * t.grad_accum * world_size(s) if t.max_steps else None


def eval_steps(s: Strategy, steps: int) -> int:
    return s.training.eval_every or max(1, steps // 5)


def model_dtype(s: Strategy, precision: str) -> str:
    """The torch dtype the weights load in: model.dtype, or (auto) the one training.precision computes in."""
    return s.model.dtype if s.model.dtype != "auto" else DTYPES[precision]


def training_arguments(ctx: CompileContext, steps: int) -> dict[str, Any]:
    """The TrainingArguments every Hugging Face–based backend gives its trainer (HF names)."""
    s, tr = ctx.strategy, ctx.strategy.training
    has_eval = ctx.data.n_eval > 0
    args: dict[str, Any] = {
        "output_dir": str(ctx.run.checkpoints),
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
        **HF_DEFAULTS,
    }
    if s.distributed.deepspeed:
        args["deepspeed"] = str(ctx.run.native / "deepspeed.json")
    assert set(args) <= set(HF_SOURCES) | set(HF_DEFAULTS), set(args) - set(HF_SOURCES) - set(HF_DEFAULTS)
    return args


def stage_arguments(s: Strategy) -> dict[str, Any]:
    """The stage's own config keys (SFTConfig / DPOConfig / RewardConfig beyond TrainingArguments)."""
    n = s.data.max_length
    if s.stage == "sft":
        # Pre-tokenized with a completion mask (llfarm.train_common): the loss is on the final answer only.
        return {"max_length": n, "completion_only_loss": True, "packing": False,
                "dataset_kwargs": {"skip_prepare_dataset": False}}
    if s.stage == "dpo":
        return {"beta": s.preference.beta, "loss_type": s.preference.loss, "max_length": n,
                "max_prompt_length": n // 2, "precompute_ref_log_probs": False}
    return {"max_length": n, "center_rewards_coefficient": None}


def lora_targets(target_modules: str | list[str]) -> str | list[str]:
    return "all-linear" if target_modules == "all" else list(target_modules)


def lora_arguments(s: Strategy) -> dict[str, Any] | None:
    """peft.LoraConfig kwargs (None unless the method trains an adapter)."""
    if not s.is_peft:
        return None
    m, rm = s.method, s.stage == "rm"
    return {"r": m.r, "lora_alpha": m.alpha, "lora_dropout": m.dropout,
            "target_modules": lora_targets(m.target_modules), "bias": "none",
            "task_type": "SEQ_CLS" if rm else "CAUSAL_LM",
            # a reward model's score head is new: it trains in full beside the adapter
            "modules_to_save": ["score"] if rm else None}


def quantization_arguments(s: Strategy) -> dict[str, Any] | None:
    """transformers.BitsAndBytesConfig kwargs for load-time quantization (None: full-precision weights)."""
    if s.quantization == "4bit":
        return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "bfloat16"}
    if s.quantization == "8bit":
        return {"load_in_8bit": True}
    return None


TOKENIZATION_VERSION = 1     # bump when llfarm.train_common changes what it makes of a row


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


def trainer_spec(ctx: CompileContext, steps: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the shared trainer child needs, as JSON: the strategy mapped once, nothing left implicit."""
    s, run = ctx.strategy, ctx.run
    trainer, config = TRAINERS[s.stage]
    return {
        "stage": s.stage, "trainer": trainer, "config": config,
        "template": s.template,
        "precision_auto": s.training.precision == "auto" and s.model.dtype == "auto",
        "model": {"path": ctx.model_path, "revision": s.model.revision,
                  "trust_remote_code": s.model.trust_remote_code, "dtype": model_dtype(s, ctx.precision),
                  "task": "sequence_classification" if s.stage == "rm" else "causal_lm",
                  "quantization": quantization_arguments(s)},
        "peft": lora_arguments(s),
        "freeze": {"trainable_layers": s.method.trainable_layers} if s.method.type == "freeze" else None,
        "args": {**training_arguments(ctx, steps), **stage_arguments(s), **(options or {})},
        "data": data_spec(ctx),
        "outputs": {"dir": str(run.adapter if s.is_peft else run.model), "metrics": str(run.metrics_path),
                    "final_metrics": str(run.native / "final_metrics.json")},
        "resume_from": str(ctx.resume_from) if ctx.resume_from else None,
        "total_steps": steps,
    }



def write_deepspeed(ctx: CompileContext) -> None:
    """distributed.deepspeed → native/deepspeed.json (what training_arguments points at): zero2 / zero3 as a
    standard DeepSpeed config with "auto" values the HF integration fills in; a user's JSON is copied as given."""
    import json

    from .errors import StrategyError
    from .rundir import atomic_write_text

    spec = ctx.strategy.distributed.deepspeed
    if spec is None:
        return
    path = ctx.run.native / "deepspeed.json"
    if spec in ("zero2", "zero3"):
        stage = int(spec[-1])
        config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                  "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
                  "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                        **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})}}
        atomic_write_text(path, json.dumps(config, indent=2) + "\n")
        return
    from pathlib import Path
    src = Path(spec)
    if not src.is_file():
        raise StrategyError([f"DeepSpeed config not found: {spec}"], where="distributed.deepspeed",
                            hint="use zero2, zero3, or a path to a DeepSpeed JSON file")
    atomic_write_text(path, src.read_text(encoding="utf-8"))
