"""The strategy schema: small, typed, strict. Every model forbids unknown keys.

Field docstrings (``description=``) feed the README's strategy reference and ``llfarm strategies show``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor",
              "sgd", "adagrad", "rmsprop", "lion_8bit", "paged_lion_8bit", "ademamix")
BNB_OPTIMIZERS = frozenset({"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "paged_lion_8bit"})


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(Section):
    path: str = Field("builtin:tiny-llama", description="Hub id, local directory, or builtin:NAME.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype when loading; auto follows training.precision.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load-time quantization (bitsandbytes, CUDA only). method: qlora implies 4bit.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bitsandbytes).")
    double_quant: bool = Field(True, description="4-bit: quantize the quantization constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="4-bit: dtype of the matmuls; auto = bfloat16.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off unless asked.")


class MethodSpec(Section):
    type: Literal["lora", "qlora", "full", "freeze"] = Field("lora", description="What is trained.")
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: Literal["all"] | list[str] = Field(
        "all", description="'all' linear layers, or a list of module names (q_proj, v_proj, ...).")
    trainable_layers: int = Field(2, ge=1, description="freeze: how many of the last layers are trained.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="LoRA: which biases train.")
    modules_to_save: list[str] | None = Field(None, description="LoRA: modules trained in full beside the adapter "
                                                                "(e.g. [lm_head, embed_tokens]).")
    layers_to_transform: list[int] | None = Field(None, description="LoRA: only these layer indices get adapters.")
    use_dora: bool = Field(False, description="LoRA: weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="LoRA: rank-stabilised scaling alpha / sqrt(r).")
    init: Literal["default", "pissa", "olora", "gaussian"] = Field(
        "default", description="LoRA: adapter initialisation (PEFT init_lora_weights).")
    loraplus_lr_ratio: float | None = Field(None, gt=0, le=1e4, description="LoRA+: learning rate of B over A "
                                                                            "(e.g. 16).")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must be 'all' or a non-empty list of module names")
        return v


class SourceSpec(Section):
    path: str = Field(..., description="A data file, a folder saved by datasets.save_to_disk, builtin:NAME, or a "
                                       "hub dataset hf:ORG/NAME.")
    weight: float = Field(1.0, gt=0.0, le=1000.0, description="Share of this source in the mix: 2.0 takes it twice, "
                                                               "0.5 a seeded half.")
    split: str = Field("train", description="Split of a hub dataset or a saved DatasetDict.")


Sources = str | list[str | SourceSpec]


class DataSpec(Section):
    train: Sources = Field(..., description="Training data: a file (.jsonl, .json, .jsonl.gz, .csv, .tsv, .parquet, "
                                            ".txt), a datasets.save_to_disk folder, builtin:NAME (alpaca, messages, "
                                            "sharegpt, preference), hf:ORG/NAME, or a list of sources with weights.")
    eval: Sources | None = Field(None, description="Evaluation data (same forms); overrides eval_split.")
    eval_split: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of train held out for eval.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "preference", "text"] = Field(
        "auto", description="Record format; auto detects it from the first record's keys.")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename fields: {instruction: question, "
                                                                      "output: answer} reads 'question' as instruction.")
    text_unit: Literal["line", "file"] = Field("line", description="Plain text files: one document per line or per "
                                                                   "file.")
    max_length: int = Field(256, ge=8, le=1_048_576, description="Maximum tokens per example.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training examples.")
    system: str | None = Field(None, description="Default system prompt (also the Ollama SYSTEM).")

    @field_validator("system")
    @classmethod
    def _no_secret(cls, v: str | None) -> str | None:
        return _refuse_secret(v, "the model would be trained on it")

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        known = {"instruction", "input", "output", "system", "messages", "conversations", "prompt", "chosen",
                 "rejected", "text"}
        for canonical in v:
            if canonical not in known:
                raise ValueError(f"maps unknown field '{canonical}'; fields are {', '.join(sorted(known))}")
        return v

    def sources(self, which: str = "train") -> list[SourceSpec]:
        value = self.train if which == "train" else self.eval
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        return [SourceSpec(path=i) if isinstance(i, str) else i for i in items]


# Metrics early stopping and keep_best can follow (llfarm's metrics.jsonl names), with the stages whose evaluation
# reports them on every backend, and whether higher is better.
STOP_METRICS: dict[str, tuple[frozenset[str], bool]] = {
    "eval_loss": (frozenset({"sft", "pt", "dpo", "orpo", "simpo", "kto", "rm"}), False),
    "eval_accuracy": (frozenset({"rm"}), True),
    "eval_reward_accuracy": (frozenset({"dpo", "orpo", "simpo"}), True),
    "eval_reward_margin": (frozenset({"dpo", "orpo", "simpo"}), True),
}


class EarlyStoppingSpec(Section):
    patience: int = Field(..., ge=1, le=100_000, description="Stop after this many evaluations in a row that do not "
                                                             "improve on the best one.")
    threshold: float = Field(0.0, ge=0.0, le=1e6, description="An evaluation improves only when it beats the best by "
                                                              "more than this (absolute).")
    metric: Literal[tuple(STOP_METRICS)] = Field(  # type: ignore[valid-type]
        "eval_loss", description="What is compared: eval_loss (lower is better); eval_accuracy (rm), "
                                 "eval_reward_accuracy, eval_reward_margin (dpo, orpo, simpo; higher is better).")


class TrainingSpec(Section):
    epochs: float = Field(3.0, gt=0, le=10_000, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(8, ge=1, le=65_536, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, le=65_536, description="Gradient accumulation steps.")
    learning_rate: float = Field(2.0e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "adamw_torch_fused", description="Optimizer (transformers' names; the 8-bit and paged ones need CUDA).")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, le=1.0, description="Adam epsilon.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial", "cosine_with_restarts",
                       "cosine_with_min_lr", "inverse_sqrt", "warmup_stable_decay"] = Field(
        "cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps; wins over warmup_ratio when set.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping (0 disables).")
    seed: int = Field(42, ge=0, description="Random seed for data order and initialisation.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision; auto = bf16 on a GPU that has it, else fp32.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    tf32: bool | None = Field(None, description="TF32 matmuls on Ampere+ GPUs (CUDA only); null: library default.")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; flash_attention_2 needs CUDA and the flash-attn package.")
    group_by_length: bool = Field(False, description="Batch examples of similar length together (less padding).")
    dataloader_workers: int = Field(0, ge=0, le=64, description="Data loading worker processes.")
    packing: bool = Field(False, description="SFT: pack several examples into each max_length sequence.")
    neftune_alpha: float | None = Field(None, gt=0, le=100, description="NEFTune: noise on the embeddings (e.g. 5).")
    logging_steps: int = Field(1, ge=1, description="Write a metrics.jsonl line every N steps.")
    save_every: int | None = Field(50, ge=1, description="Checkpoint every N steps (null: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (needs eval data).")
    early_stopping: EarlyStoppingSpec | None = Field(
        None, description="Stop when the eval metric has not improved for `patience` evaluations: {patience, "
                          "threshold: 0.0, metric: eval_loss}. Needs eval data and eval_every.")
    keep_best: bool = Field(False, description="The run's output (adapter/ or model/) is the best evaluation's "
                                               "checkpoint, by early_stopping.metric (else eval_loss), not the last "
                                               "step; a checkpoint is saved at every evaluation. Needs eval data.")
    oom_retries: int = Field(2, ge=0, le=16, description="On an out-of-memory error during training: back off this "
                                                         "many times (halve batch_size, grow grad_accum to keep the "
                                                         "effective batch, continue from the newest complete "
                                                         "checkpoint); 0 fails at once.")


class TrackingSpec(Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers (files under the run directory; wandb offline unless "
                                          "WANDB_MODE says otherwise).")
    project: str | None = Field(None, description="wandb project / mlflow experiment (default: the strategy name).")
    run_name: str | None = Field(None, description="Name of the run in the tracker (default: the run id).")

    @field_validator("project", "run_name")
    @classmethod
    def _no_secret(cls, v: str | None) -> str | None:
        return _refuse_secret(v, "the tracker writes it into its own files")


class PreferenceSpec(Section):
    """Knobs of the preference and reinforcement-learning stages (dpo, orpo, simpo, kto, ppo, grpo)."""
    beta: float = Field(0.1, ge=0.0, le=100.0, description="dpo/kto/ppo: KL strength; orpo: odds-ratio weight; "
                                                          "simpo: reward scale; grpo: KL to the reference (0: none).")
    loss: Literal["sigmoid", "hinge", "ipo"] = Field("sigmoid", description="DPO loss variant.")
    simpo_gamma: float = Field(0.5, ge=0.0, le=100.0, description="simpo: target reward margin.")
    desirable_weight: float = Field(1.0, gt=0.0, le=100.0, description="kto: weight of desirable completions.")
    undesirable_weight: float = Field(1.0, gt=0.0, le=100.0, description="kto: weight of undesirable completions.")
    unpair: bool = Field(False, description="kto: read preference pairs as unpaired feedback (chosen → desirable, "
                                            "rejected → undesirable).")
    reward_model: str | None = Field(None, description="ppo: the reward model, an llfarm rm run directory.")
    rewards: list[str] = Field(default_factory=list, description="grpo: reward functions — exact_match, length, "
                                                                 "format:<regex>, or file.py:function / "
                                                                 "package.module:function (your code, run in training).")
    num_generations: int = Field(4, ge=2, le=256, description="grpo: completions sampled per prompt.")
    max_new_tokens: int = Field(32, ge=1, le=65_536, description="ppo/grpo: tokens generated per completion.")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="ppo/grpo: sampling temperature.")


class DistributedSpec(Section):
    launcher: Literal["none", "torchrun", "accelerate", "deepspeed"] = Field(
        "none", description="Multi-process launcher: torchrun (torch.distributed.run), accelerate launch, or "
                            "DeepSpeed's own launcher. none = one process.")
    nproc_per_node: int = Field(1, ge=1, le=1024, description="Processes per node (one per GPU; on CPU each "
                                                              "process is a gloo rank).")
    nnodes: int = Field(1, ge=1, le=4096, description="Number of nodes.")
    node_rank: int = Field(0, ge=0, le=4095, description="This node's rank; node 0 is the head: it owns the run "
                                                         "directory and hosts the rendezvous.")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the head node's torchrun c10d rendezvous "
                                                        "(needed when nnodes > 1).")
    master_addr: str | None = Field(None, description="The head node's address (the other spelling of "
                                                      "rdzv_endpoint, as HOST with master_port).")
    master_port: int | None = Field(None, ge=1, le=65535, description="The head node's rendezvous port (default "
                                                                      "29500 with master_addr).")
    deepspeed: str | None = Field(None, description="DeepSpeed config: zero2, zero3, or a JSON path.")
    offload: list[Literal["optimizer", "param"]] = Field(
        default_factory=list, description="DeepSpeed ZeRO offload to CPU memory: optimizer (zero2, zero3), "
                                          "param (zero3).")
    fsdp: Literal["none", "full_shard", "shard_grad_op"] = Field(
        "none", description="FSDP2 through accelerate (launcher: accelerate): full_shard reshards parameters "
                            "after forward, shard_grad_op keeps them gathered until backward.")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be HOST:PORT (e.g. 10.0.0.1:29500), received '{v}'")
        return v

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes if self.launcher != "none" else 1

    @property
    def endpoint(self) -> str | None:
        """HOST:PORT of the rendezvous (rdzv_endpoint, or master_addr:master_port)."""
        if self.rdzv_endpoint:
            return self.rdzv_endpoint
        if self.master_addr:
            return f"{self.master_addr}:{self.master_port or 29500}"
        return None

    def problems(self) -> list[tuple[str, str]]:
        """(key, problem) for every combination of distributed keys that cannot run."""
        out: list[tuple[str, str]] = []

        def add(key: str, problem: str) -> None:
            out.append((f"distributed.{key}", problem))

        d = self
        if d.launcher == "none":
            for key in ("nproc_per_node", "nnodes"):
                if getattr(d, key) > 1:
                    add(key, f"is {getattr(d, key)}, but distributed.launcher is 'none' (one process): set "
                             "distributed.launcher: torchrun")
        if d.nnodes > 1 and d.endpoint is None:
            add("rdzv_endpoint", f"is needed: nnodes is {d.nnodes}, and every node must reach the head's "
                                 "rendezvous; set distributed.rdzv_endpoint: HEAD_HOST:29500 (or master_addr and "
                                 "master_port)")
        if d.rdzv_endpoint and (d.master_addr or d.master_port):
            add("master_addr" if d.master_addr else "master_port",
                "and distributed.rdzv_endpoint say the same thing: set only one of them")
        elif d.master_port and not d.master_addr:
            add("master_port", "needs distributed.master_addr (the head node's address)")
        if d.node_rank >= d.nnodes:
            add("node_rank", f"is {d.node_rank}, but nnodes is {d.nnodes}: node ranks are 0..{d.nnodes - 1}")
        if d.offload and d.deepspeed not in ("zero2", "zero3"):
            add("offload", "configures llfarm's zero2/zero3 DeepSpeed configs: set distributed.deepspeed: zero2 or "
                           "zero3" + (" (a JSON config sets its own offload)" if d.deepspeed else ""))
        elif "param" in d.offload and d.deepspeed != "zero3":
            add("offload", "'param' offloads ZeRO-3's partitioned parameters: set distributed.deepspeed: zero3, or "
                           "offload only the optimizer")
        if d.launcher == "deepspeed" and not d.deepspeed:
            add("deepspeed", "is needed by launcher 'deepspeed': set zero2, zero3 or a JSON path")
        if d.launcher == "deepspeed" and d.nnodes > 1:
            add("launcher", "'deepspeed' starts one node here (its multi-node mode needs pdsh and a hostfile): use "
                            "launcher: torchrun with distributed.deepspeed for several nodes")
        if d.fsdp != "none" and d.launcher != "accelerate":
            add("fsdp", f"runs through accelerate, not launcher '{d.launcher}': set distributed.launcher: "
                        "accelerate")
        if d.fsdp != "none" and d.deepspeed:
            add("fsdp", "and distributed.deepspeed both shard the model: choose one")
        return out


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

    @field_validator("name")
    @classmethod
    def _no_secret(cls, v: str | None) -> str | None:
        return _refuse_secret(v, "it would name the exported files")


class Strategy(Section):
    name: str = Field(..., min_length=1, max_length=100, description="Short name; used in run ids.")
    description: str = Field("", description="One line about what this strategy does.")
    extends: str | None = Field(None, description="Inherit another strategy (shipped name or path).")
    backend: str = Field(default_factory=lambda: _default_backend(),
                         description="A backend from `llfarm backends`, or auto (default: the default backend).")
    model: ModelSpec = Field(default_factory=ModelSpec)
    template: str = Field("chatml", description="Chat template name (templates/) or a template YAML path.")
    stage: Literal["sft", "pt", "dpo", "orpo", "simpo", "kto", "rm", "ppo", "grpo"] = Field(
        "sft", description="sft; pt (continued pretraining); dpo, orpo, simpo (preference pairs); kto (unpaired "
                           "feedback); rm (reward model); ppo (from an rm run); grpo (reward functions).")
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    preference: PreferenceSpec = Field(default_factory=PreferenceSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    backend_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Raw native keys per backend, checked by that backend.")

    @field_validator("backend_options", mode="before")
    @classmethod
    def _empty_options(cls, v: Any) -> Any:
        """A backend block with nothing under it (YAML null) means no options."""
        return {k: ({} if o is None else o) for k, o in v.items()} if isinstance(v, dict) else v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        from .redact import redact_text
        from .rundir import name_problem
        problem = name_problem(v)
        if problem:
            shown = redact_text(v if len(v) <= 60 else v[:57] + "...")
            raise ValueError(f"{problem} (it names the run directory), received {shown!r}")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> Strategy:
        if self.training.packing and self.stage not in ("sft", "pt"):
            raise combination("training.packing", f"packs SFT and pretraining examples; stage '{self.stage}' pairs, "
                                                  "scores or samples whole sequences and cannot pack")
        lora_only = [k for k in ("use_dora", "use_rslora", "loraplus_lr_ratio", "modules_to_save",
                                 "layers_to_transform") if getattr(self.method, k) not in (False, None)]
        if lora_only and not self.is_peft:
            raise combination(f"method.{lora_only[0]}", f"is a LoRA setting; method.type is '{self.method.type}'")
        if self.method.init != "default" and not self.is_peft:
            raise combination("method.init", f"initialises LoRA adapters; method.type is '{self.method.type}'")
        p = self.preference
        if self.stage == "ppo" and not p.reward_model:
            raise combination("preference.reward_model", "is required for stage ppo: the directory of an llfarm rm "
                                                         "run (llfarm run reward_model)")
        if self.stage == "grpo" and not p.rewards:
            raise combination("preference.rewards", "is required for stage grpo: e.g. [exact_match], or "
                                                    "[my_rewards.py:score]")
        for key, stages in (("reward_model", ("ppo",)), ("rewards", ("grpo",))):
            if getattr(p, key) and self.stage not in stages:
                raise combination(f"preference.{key}", f"is for stage {' or '.join(stages)}, not '{self.stage}'")
        self._check_best_and_stopping()
        if p.unpair and self.stage != "kto":
            raise combination("preference.unpair", f"turns pairs into KTO data; stage is '{self.stage}'")
        for key, problem in self.distributed.problems()[:1]:
            raise combination(key, problem)
        return self

    def _check_best_and_stopping(self) -> None:
        t, d = self.training, self.data
        stop = t.early_stopping
        for key, on in (("training.early_stopping", stop is not None), ("training.keep_best", t.keep_best)):
            if not on:
                continue
            if self.stage in ("ppo", "grpo"):
                raise combination(key, f"follows an evaluation metric; stage '{self.stage}' evaluates by sampling "
                                       "with rewards, which llfarm does not compare (remove it)")
            if d.eval is None and d.eval_split == 0:
                raise combination(key, "needs evaluation data: set data.eval (a file) or data.eval_split "
                                       "(e.g. 0.1)")
        if stop is not None:
            if t.eval_every is None:
                raise combination("training.early_stopping", "counts patience in evaluations: set "
                                                             "training.eval_every (e.g. 10)")
            stages, _ = STOP_METRICS[stop.metric]
            if self.stage not in stages:
                raise combination("training.early_stopping.metric",
                                  f"is '{stop.metric}', which stage '{self.stage}' does not report when it "
                                  f"evaluates (it is for stage {', '.join(sorted(stages))}; eval_loss works for "
                                  "every stage)")

    @property
    def stop_metric(self) -> str:
        """The metric early stopping and keep_best follow."""
        return self.training.early_stopping.metric if self.training.early_stopping else "eval_loss"

    @property
    def is_peft(self) -> bool:
        return self.method.type in ("lora", "qlora")

    @property
    def quantization(self) -> str:
        return "4bit" if self.method.type == "qlora" else self.model.quantization


def _refuse_secret(value: str | None, why: str) -> str | None:
    """A secret where redacting it would change what the user asked for (training text, a name) is refused."""
    from .redact import find_secret
    secret = find_secret(value)
    if secret:
        raise ValueError(f"holds {secret}; {why}, so llfarm refuses rather than write or redact it")
    return value


def _default_backend() -> str:
    from .backend import default_backend
    return default_backend()


def combination(key: str, problem: str) -> PydanticCustomError:
    """A rule between keys, reported like a key's own error: '<key>' <problem>, with the key's file:line."""
    return PydanticCustomError("llfarm_combination", "{problem}", {"key": key, "problem": problem})
