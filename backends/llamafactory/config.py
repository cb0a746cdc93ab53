"""One strategy → LlamaFactory's flat training YAML (``native/llamafactory_train.yaml``).

Every key llfarm writes is declared once, here: :data:`OWNED` (from a strategy field or llfarm's run wiring:
``backend_options.llamafactory`` may not set them) and :data:`DEFAULTS` (llfarm's defaults, which raw options may
override). ``build_config`` writes nothing else, and the options model refuses the owned keys, so the config and
the refusal cannot drift apart. The TrainingArguments come from llfarm's shared training layer
(``llfarm.training.training_arguments``): LlamaFactory trains with the same values as the other backends.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from llfarm.data import token_cache_dir
from llfarm.models import tokenizer_fingerprint
from llfarm.training import HF_DEFAULTS, HF_SOURCES, refusing, training_arguments

from .data import EVAL_DATASET, TRAIN_DATASET
from .keys import known

TRAIN_YAML = "llamafactory_train.yaml"

# Shared TrainingArguments LlamaFactory does not take from llfarm: it has its own switch (disable_gradient_
# checkpointing, neftune_alpha) or sets them itself.
NOT_SHARED = {"gradient_checkpointing", "remove_unused_columns", "neftune_noise_alpha"}
# training.attention → LlamaFactory's flash_attn
FLASH_ATTN = {"auto": "auto", "sdpa": "sdpa", "eager": "disabled", "flash_attention_2": "fa2"}

# LlamaFactory keys that come from a strategy field or from llfarm's wiring of the run directory.
OWNED: dict[str, str] = {
    **{k: v for k, v in HF_SOURCES.items() if k not in NOT_SHARED},
    "model_name_or_path": "model.path", "model_revision": "model.revision",
    "trust_remote_code": "model.trust_remote_code", "quantization_bit": "method.type (qlora) or model.quantization",
    "stage": "stage", "do_train": "llfarm (every run trains)", "finetuning_type": "method.type",
    "lora_rank": "method.r", "lora_alpha": "method.alpha", "lora_dropout": "method.dropout",
    "lora_target": "method.target_modules", "freeze_trainable_layers": "method.trainable_layers",
    "pref_beta": "preference.beta", "pref_loss": "preference.loss (and the stage: orpo, simpo)",
    "simpo_gamma": "preference.simpo_gamma", "kto_chosen_weight": "preference.desirable_weight",
    "kto_rejected_weight": "preference.undesirable_weight",
    "dataset": "data.train", "eval_dataset": "data.eval", "dataset_dir": "data.train (the run's native/)",
    "template": "template", "cutoff_len": "data.max_length", "default_system": "data.system",
    "tokenized_path": "llfarm's data cache (keyed by the data, tokenizer, template, cutoff_len and stage)",
    "mask_history": "llfarm (the loss is on the final answer, as on every backend)",
    "disable_gradient_checkpointing": "training.gradient_checkpointing",
    "flash_attn": "training.attention", "neftune_alpha": "training.neftune_alpha", "packing": "training.packing",
    "quantization_type": "model.quant_type", "double_quantization": "model.double_quant",
    "use_dora": "method.use_dora", "use_rslora": "method.use_rslora", "pissa_init": "method.init",
    "loraplus_lr_ratio": "method.loraplus_lr_ratio", "additional_target": "method.modules_to_save",
    "early_stopping_steps": "training.early_stopping (its patience)",
    "overwrite_output_dir": "llfarm (resume is explicit)", "resume_from_checkpoint": "`llfarm resume RUN_DIR`",
    # never written (the core does their job once, for every backend), refused all the same
    "max_samples": "data.max_samples", "val_size": "data.eval_split", "logging_dir": "the run directory",
}
# Keys llfarm writes with its own default values; raw options may override these.
DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in HF_DEFAULTS.items() if k not in NOT_SHARED},
    "quantization_method": "bnb",
    "freeze_trainable_modules": "all", "overwrite_cache": True, "save_only_model": False, "plot_loss": False,
    "ddp_timeout": 180000000, "preprocessing_num_workers": None,
}
KEEP_NULL = {"resume_from_checkpoint"}   # written even when null: LlamaFactory must never resume on its own


_OPTIONS: type[BaseModel] | None = None


_SIMPLE: dict[str, Any] = {"bool": bool, "int": int, "float": float, "str": str, "null": type(None),
                           "dict": dict[str, Any], "list": list[Any], "any": Any}


def option_type(spec: list[Any]) -> Any:
    """The pydantic type of a LlamaFactory key from its keys.json ``types`` entry (alternatives; an enum is a
    Literal of its values). int before float, so 8 stays 8; bool first, so true is not read as 1."""
    import functools
    import operator
    from typing import Literal
    if "any" in spec:
        return Any
    order = ["bool", "int", "float", "str", "dict", "list", "null"]
    simple = sorted((t for t in spec if isinstance(t, str)), key=order.index)
    alternatives = [_SIMPLE[t] for t in simple]
    alternatives += [Literal[tuple(t["enum"])] for t in spec if isinstance(t, dict)]
    return functools.reduce(operator.or_, alternatives)


def options_model() -> type[BaseModel]:
    """backend_options.llamafactory: any LlamaFactory 0.9.5 config key (keys.json), typed as LlamaFactory declares
    it, except those llfarm owns."""
    global _OPTIONS
    if _OPTIONS is None:
        types = known().get("types", {})
        fields: dict[str, Any] = {key: (option_type(types.get(key, ["any"])) | None, None)
                                  for key in known()["keys"]}
        fields.update(refusing(OWNED))
        _OPTIONS = create_model("LlamaFactoryOptions", __config__=ConfigDict(extra="forbid"), **fields)
        _OPTIONS.HINT = (f"keys are LlamaFactory {known()['llamafactory']}'s config keys "
                         "(backends/llamafactory/keys.json)")
    return _OPTIONS


class Config:
    """The config in the sections LlamaFactory's examples use (the file itself is one flat namespace)."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, Any]] = {}

    def put(self, section: str, key: str, value: Any) -> None:
        assert key in OWNED or key in DEFAULTS, f"{key} is written but not declared in OWNED or DEFAULTS"
        if value is not None or key in KEEP_NULL:
            self.sections.setdefault(section, {})[key] = value

    def default(self, section: str, key: str) -> None:
        self.put(section, key, DEFAULTS[key])

    def flat(self) -> dict[str, Any]:
        return {k: v for section in self.sections.values() for k, v in section.items()}


def build_config(ctx, steps: int, template_name: str, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    s, run = ctx.strategy, ctx.run
    m, d = s.method, s.data
    c = Config()
    c.put("model", "model_name_or_path", ctx.model_path)
    c.put("model", "trust_remote_code", s.model.trust_remote_code)
    c.put("model", "model_revision", s.model.revision)
    if s.quantization != "none":
        c.put("model", "quantization_bit", 4 if s.quantization == "4bit" else 8)
        c.default("model", "quantization_method")
        if s.quantization == "4bit":
            c.put("model", "quantization_type", s.model.quant_type)
            c.put("model", "double_quantization", s.model.double_quant)
    c.put("model", "flash_attn", FLASH_ATTN[s.training.attention])

    # LlamaFactory runs ORPO and SimPO as its dpo stage with another preference loss
    c.put("method", "stage", {"orpo": "dpo", "simpo": "dpo"}.get(s.stage, s.stage))
    c.put("method", "do_train", True)
    c.put("method", "finetuning_type", "lora" if s.is_peft else m.type)
    if s.is_peft:
        c.put("method", "lora_rank", m.r)
        c.put("method", "lora_alpha", m.alpha)
        c.put("method", "lora_dropout", m.dropout)
        c.put("method", "lora_target", "all" if m.target_modules == "all" else ",".join(m.target_modules))
        if m.use_dora:
            c.put("method", "use_dora", True)
        if m.use_rslora:
            c.put("method", "use_rslora", True)
        if m.init == "pissa":
            c.put("method", "pissa_init", True)
        c.put("method", "loraplus_lr_ratio", m.loraplus_lr_ratio)
        if m.modules_to_save:
            c.put("method", "additional_target", ",".join(m.modules_to_save))
    elif m.type == "freeze":
        c.put("method", "freeze_trainable_layers", m.trainable_layers)
        c.default("method", "freeze_trainable_modules")
    p = s.preference
    if s.stage in ("dpo", "orpo", "simpo", "kto"):
        c.put("method", "pref_beta", p.beta)
    if s.stage in ("dpo", "orpo", "simpo"):
        c.put("method", "pref_loss", p.loss if s.stage == "dpo" else s.stage)
    if s.stage == "simpo":
        c.put("method", "simpo_gamma", p.simpo_gamma)
    if s.stage == "kto":
        c.put("method", "kto_chosen_weight", p.desirable_weight)
        c.put("method", "kto_rejected_weight", p.undesirable_weight)

    c.put("dataset", "dataset", TRAIN_DATASET)
    if ctx.data.eval_path is not None:
        c.put("dataset", "eval_dataset", EVAL_DATASET)
    c.put("dataset", "dataset_dir", str(run.native))
    c.put("dataset", "template", template_name)
    # llfarm templates have no built-in system prompt (data.system is already in the data); some LlamaFactory
    # templates have one, so it is switched off for every template.
    c.put("dataset", "default_system", "")
    c.put("dataset", "cutoff_len", d.max_length)
    if s.stage == "sft":
        c.put("dataset", "mask_history", True)   # the loss is on the final answer only, as on the other backends
    if s.stage in ("sft", "pt"):                # explicit: LlamaFactory would pack pt data unless told
        c.put("dataset", "packing", s.training.packing)
    c.default("dataset", "overwrite_cache")
    if ctx.data.n_train >= 10_000:              # LlamaFactory tokenizes in one process unless told
        c.put("dataset", "preprocessing_num_workers", max(1, min(os.cpu_count() or 1, 8)))

    for key, value in training_arguments(ctx, steps).items():
        if key not in NOT_SHARED:
            c.put("training (llfarm's shared TrainingArguments)", key, value)
    # LlamaFactory turns gradient checkpointing on by default; llfarm's default is off.
    c.put("training (llfarm's shared TrainingArguments)", "disable_gradient_checkpointing",
          not s.training.gradient_checkpointing)
    c.put("training (llfarm's shared TrainingArguments)", "neftune_alpha", s.training.neftune_alpha)
    if s.distributed.launcher == "torchrun":
        c.default("training (llfarm's shared TrainingArguments)", "ddp_timeout")
    if s.training.early_stopping is not None:   # LlamaFactory adds transformers' EarlyStoppingCallback(patience)
        c.put("training (llfarm's shared TrainingArguments)", "early_stopping_steps", s.training.early_stopping.patience)

    c.put("output", "overwrite_output_dir", True)
    c.put("output", "resume_from_checkpoint", str(ctx.resume_from) if ctx.resume_from else None)
    c.default("output", "save_only_model")
    c.default("output", "plot_loss")

    raw = dict(options)
    for section in c.sections.values():          # a raw option overrides one of llfarm's defaults
        for key in list(section):
            if key in raw:
                section[key] = raw.pop(key)
    if raw:
        c.sections["backend_options.llamafactory"] = raw
    # LlamaFactory keeps its tokenized dataset here and reuses it: keyed by everything that decides the tokens
    # (the data selection, the tokenizer, the dataset keys, the stage, the raw options, LlamaFactory's version).
    decides = {k: v for k, v in c.sections["dataset"].items() if k != "dataset_dir"}
    c.put("dataset", "tokenized_path", str(token_cache_dir(
        "llamafactory", ctx.data, tokenizer_fingerprint(ctx.model_path, s.model.revision), decides, s.stage,
        sorted(options.items()), known()["llamafactory"])))
    return c.sections


def by_hand_env(distributed) -> str:
    """The environment LlamaFactory's own launcher (FORCE_TORCHRUN) reads to start the same processes."""
    d = distributed
    if d is None or d.launcher == "none":
        return "DISABLE_VERSION_CHECK=1"
    env = f"FORCE_TORCHRUN=1 NPROC_PER_NODE={d.nproc_per_node}"
    if d.nnodes > 1:
        host, _, port = (d.endpoint or "").rpartition(":")
        env += f" NNODES={d.nnodes} NODE_RANK={d.node_rank} MASTER_ADDR={host} MASTER_PORT={port}"
    return env + " DISABLE_VERSION_CHECK=1"


def render_yaml(config: dict[str, dict[str, Any]], distributed=None) -> str:
    import yaml
    parts = [(f"# LlamaFactory {known()['llamafactory']} training config written by llfarm (one flat namespace; "
              "the ### lines are comments)."),
             f"# By hand: {by_hand_env(distributed)} llamafactory-cli train <this file>",
             "# llfarm's own command (the same training, plus metrics.jsonl and the run directory): command.txt"]
    for title, section in config.items():
        parts.append(f"\n### {title}")
        parts.append(yaml.safe_dump(section, sort_keys=False, default_flow_style=False, allow_unicode=True,
                                    width=1000).rstrip("\n"))
    return "\n".join(parts) + "\n"
