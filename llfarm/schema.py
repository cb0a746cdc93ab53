"""The strategy schema: small, typed, strict. Every model forbids unknown keys.

Field docstrings (``description=``) feed the README's strategy reference and ``llfarm strategies show``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(Section):
    path: str = Field("builtin:tiny-llama", description="Hub id, local directory, or builtin:NAME.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype when loading; auto follows training.precision.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load-time quantization (bitsandbytes, CUDA only). method: qlora implies 4bit.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off unless asked.")


class MethodSpec(Section):
    type: Literal["lora", "qlora", "full", "freeze"] = Field("lora", description="What is trained.")
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: Literal["all"] | list[str] = Field(
        "all", description="'all' linear layers, or a list of module names (q_proj, v_proj, ...).")
    trainable_layers: int = Field(2, ge=1, description="freeze: how many of the last layers are trained.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must be 'all' or a non-empty list of module names")
        return v


class DataSpec(Section):
    train: str = Field(..., description="Training data: a .jsonl/.json path or builtin:NAME "
                                        "(alpaca, messages, sharegpt, preference).")
    eval: str | None = Field(None, description="Evaluation data (same formats); overrides eval_split.")
    eval_split: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of train held out for eval.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "preference"] = Field(
        "auto", description="Data format; auto detects it from the first record.")
    max_length: int = Field(256, ge=8, le=1_048_576, description="Maximum tokens per example.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training examples.")
    system: str | None = Field(None, description="Default system prompt (also the Ollama SYSTEM).")


class TrainingSpec(Section):
    epochs: float = Field(3.0, gt=0, le=10_000, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(8, ge=1, le=65_536, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, le=65_536, description="Gradient accumulation steps.")
    learning_rate: float = Field(2.0e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping (0 disables).")
    seed: int = Field(42, ge=0, description="Random seed for data order and initialisation.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision; auto = bf16 on a GPU that has it, else fp32.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    logging_steps: int = Field(1, ge=1, description="Write a metrics.jsonl line every N steps.")
    save_every: int | None = Field(50, ge=1, description="Checkpoint every N steps (null: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (needs eval data).")


class PreferenceSpec(Section):
    beta: float = Field(0.1, gt=0.0, le=100.0, description="DPO beta (strength of the KL penalty).")
    loss: Literal["sigmoid", "hinge", "ipo"] = Field("sigmoid", description="DPO loss variant.")


class DistributedSpec(Section):
    launcher: Literal["none", "torchrun", "accelerate"] = Field("none", description="Multi-process launcher.")
    nproc_per_node: int = Field(1, ge=1, le=1024, description="Processes (GPUs) per node.")
    nnodes: int = Field(1, ge=1, le=4096, description="Number of nodes.")
    deepspeed: str | None = Field(None, description="DeepSpeed config: zero2, zero3, or a JSON path.")


class ExportSpec(Section):
    formats: list[Literal["merged", "gguf", "adapter", "ollama"]] = Field(
        default_factory=list, description="What `llfarm run` exports after training (adapter: a GGUF LoRA "
                                          "adapter; ollama: a Modelfile).")
    quant: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"] = Field(
        "q8_0", description="GGUF tensor type; q4_k_m/q5_k_m/q6_k need the llamacpp extra.")
    name: str | None = Field(None, description="Ollama model name (default: the strategy name).")
    ollama_template: bool = Field(True, description="Write the Modelfile's TEMPLATE (false: like --no-template).")
    ollama_base: str | None = Field(None, description="FROM of an adapter Modelfile: an Ollama model name or a "
                                                      "base GGUF (default: convert the base beside the adapter).")


class Strategy(Section):
    name: str = Field(..., min_length=1, max_length=100, description="Short name; used in run ids.")
    description: str = Field("", description="One line about what this strategy does.")
    extends: str | None = Field(None, description="Inherit another strategy (shipped name or path).")
    backend: str = Field("pytorch", description="pytorch, llamafactory, unsloth, or auto.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    template: str = Field("chatml", description="Chat template name (templates/) or a template YAML path.")
    stage: Literal["sft", "dpo", "rm"] = Field("sft", description="sft, dpo (preference), rm (reward model).")
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    preference: PreferenceSpec = Field(default_factory=PreferenceSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    backend_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Raw native keys per backend, checked by that backend.")

    @property
    def is_peft(self) -> bool:
        return self.method.type in ("lora", "qlora")

    @property
    def quantization(self) -> str:
        return "4bit" if self.method.type == "qlora" else self.model.quantization
