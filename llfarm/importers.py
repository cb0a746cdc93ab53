"""`llfarm import`: a peer's training config → an llfarm strategy, saying what did not carry over.

An importer is a table of rules: each peer key names the strategy key it becomes (and how its value converts), or
is known to be run plumbing llfarm sets itself (output folders, caches, resume). Whatever no rule covers is listed
for the user, key by key. Axolotl and TRL (its `trl sft`/`trl dpo` YAML) are here; a backend that has a config
format of its own registers its importer on the backend object (``Backend.importer``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StrategyError, did_you_mean, one_of


class Skip(Exception):
    """A peer value with no llfarm equivalent (the reason is shown to the user)."""


class Unset(Exception):
    """A peer value that means 'the default' (e.g. max_steps: -1): nothing to set, nothing to report."""


Convert = Callable[[Any], Any] | None
Rules = dict[str, tuple[str, Convert]]


@dataclass
class Imported:
    strategy: dict[str, Any] = field(default_factory=dict)
    not_mapped: dict[str, str] = field(default_factory=dict)      # peer key → why it has no equivalent
    left_to_llfarm: dict[str, str] = field(default_factory=dict)  # peer key → what llfarm does instead

    def set(self, key: str, value: Any) -> None:
        from .strategy import set_path
        set_path(self.strategy, key, value)


@dataclass
class Importer:
    name: str
    detect: Callable[[dict[str, Any]], bool]
    rules: Rules
    managed: dict[str, str]                                   # peer keys llfarm sets itself, and how
    special: Callable[[dict[str, Any], Imported, Path], None] | None = None   # pops keys it handles itself

    def convert(self, config: dict[str, Any], base: Path) -> Imported:
        out = Imported()
        config = copy.deepcopy(config)
        if self.special is not None:
            self.special(config, out, base)
        for key, value in config.items():
            if value is None or value == "":             # an empty key in a peer's template: not set
                continue
            if key in self.managed:
                out.left_to_llfarm[key] = self.managed[key]
                continue
            rule = self.rules.get(key)
            if rule is None:
                out.not_mapped[key] = "no llfarm equivalent"
                continue
            target, fn = rule
            try:
                out.set(target, fn(value) if fn else value)
            except Unset:
                pass
            except Skip as exc:
                out.not_mapped[key] = str(exc)
            except (TypeError, ValueError) as exc:
                out.not_mapped[key] = f"cannot convert {value!r:.40} ({exc})"
        return out


# ---------------------------------------------------------------- conversions shared by the tables

def one_of_values(values: tuple[str, ...], rename: dict[str, str] | None = None) -> Callable[[Any], str]:
    def convert(v: Any) -> str:
        v = (rename or {}).get(str(v), str(v))
        if v not in values:
            raise Skip(f"'{v}' is not one of llfarm's {one_of(values)}")
        return v
    return convert


def positive_or_none(v: Any) -> int | None:
    v = int(v)
    if v <= 0:
        raise Unset
    return v


def names(v: Any) -> list[str]:
    return [x.strip() for x in v.split(",")] if isinstance(v, str) else list(v)


def template_name(v: Any) -> str:
    from .templates import shipped_templates
    if str(v) in shipped_templates():
        return str(v)
    raise Skip(f"llfarm ships no template '{v}'{did_you_mean(str(v), shipped_templates())} (templates: "
               f"{one_of(shipped_templates())}); set template: yourself")


def report_to(v: Any) -> list[str]:
    wanted = names(v) if not isinstance(v, list) else v
    kept = [x for x in wanted if x in ("tensorboard", "wandb", "mlflow")]
    if [x for x in wanted if x not in kept and x not in ("none", "all")]:
        raise Skip(f"llfarm reports to tensorboard, wandb, mlflow; not {', '.join(x for x in wanted if x not in kept)}")
    return kept


def optimizer(v: Any) -> str:
    from .schema import OPTIMIZERS
    return one_of_values(OPTIMIZERS, {"adamw_bnb_8bit": "adamw_8bit"})(v)


def scheduler(v: Any) -> str:
    from .schema import TrainingSpec
    choices = TrainingSpec.model_fields["scheduler"].annotation.__args__
    return one_of_values(tuple(choices))(v)


# ---------------------------------------------------------------- Hugging Face TrainingArguments (TRL, LlamaFactory)

# The model and TrainingArguments keys that TRL's configs and LlamaFactory's YAML both take under transformers' names.
HF_TRAINER_RULES: Rules = {
    "model_name_or_path": ("model.path", None), "model_revision": ("model.revision", None),
    "trust_remote_code": ("model.trust_remote_code", bool), "use_dora": ("method.use_dora", bool),
    "use_rslora": ("method.use_rslora", bool), "packing": ("training.packing", bool),
    "num_train_epochs": ("training.epochs", float), "max_steps": ("training.max_steps", positive_or_none),
    "per_device_train_batch_size": ("training.batch_size", int),
    "gradient_accumulation_steps": ("training.grad_accum", int), "learning_rate": ("training.learning_rate", float),
    "lr_scheduler_type": ("training.scheduler", scheduler), "warmup_ratio": ("training.warmup_ratio", float),
    "warmup_steps": ("training.warmup_steps", int), "weight_decay": ("training.weight_decay", float),
    "max_grad_norm": ("training.max_grad_norm", float), "seed": ("training.seed", int),
    "gradient_checkpointing": ("training.gradient_checkpointing", bool), "optim": ("training.optimizer", optimizer),
    "adam_beta1": ("training.adam_beta1", float), "adam_beta2": ("training.adam_beta2", float),
    "adam_epsilon": ("training.adam_epsilon", float), "tf32": ("training.tf32", bool),
    "dataloader_num_workers": ("training.dataloader_workers", int), "deepspeed": ("distributed.deepspeed", str),
    "logging_steps": ("training.logging_steps", int), "save_steps": ("training.save_every", int),
    "save_total_limit": ("training.keep_checkpoints", int), "eval_steps": ("training.eval_every", int),
    "report_to": ("tracking.report_to", report_to), "run_name": ("tracking.run_name", str),
}


# ---------------------------------------------------------------- Axolotl

def _axolotl_special(c: dict[str, Any], out: Imported, base: Path) -> None:
    adapter = c.pop("adapter", None)
    four, eight = c.pop("load_in_4bit", False), c.pop("load_in_8bit", False)
    out.set("method.type", "qlora" if adapter == "qlora" or (adapter == "lora" and four) else
            "lora" if adapter == "lora" else "full")
    if eight:
        out.set("model.quantization", "8bit")
    if c.pop("lora_target_linear", False):
        out.set("method.target_modules", "all")
    if "rl" in c:
        rl = c.pop("rl")
        if rl in ("dpo", "ipo", "orpo", "kto", "simpo", "grpo"):
            out.set("stage", "dpo" if rl == "ipo" else rl)
            if rl == "ipo":
                out.set("preference.loss", "ipo")
        else:
            out.not_mapped["rl"] = f"llfarm's preference stages are dpo, ipo, orpo, kto, simpo, grpo; not '{rl}'"
        trl = c.pop("trl", None) or {}
        for key, value in trl.items() if isinstance(trl, dict) else ():
            if key == "beta":
                out.set("preference.beta", float(value))
            elif key == "reward_funcs" and rl == "grpo":
                # Axolotl names module.function; llfarm's form is module:function (or a built-in)
                out.set("preference.rewards", [f if ":" in f else ":".join(f.rsplit(".", 1)) for f in names(value)])
            elif key == "num_generations":
                out.set("preference.num_generations", int(value))
            elif key == "max_completion_length":
                out.set("preference.max_new_tokens", int(value))
            else:
                out.not_mapped[f"trl.{key}"] = "no llfarm equivalent"
    if c.pop("reward_model", False):
        out.set("stage", "rm")
    bf16, fp16 = c.pop("bf16", None), c.pop("fp16", None)
    if bf16 in (True, "auto"):
        out.set("training.precision", "bf16" if bf16 is True else "auto")
    elif fp16:
        out.set("training.precision", "fp16")
    if c.pop("flash_attention", False):
        out.set("training.attention", "flash_attention_2")
    elif c.pop("sdp_attention", False):
        out.set("training.attention", "sdpa")
    project = c.pop("wandb_project", None)
    if project:
        out.set("tracking.report_to", ["wandb"])
        out.set("tracking.project", project)
    sources = []
    for d in c.pop("datasets", None) or []:
        path = d.get("path", "")
        local = (base / path) if not Path(path).is_absolute() else Path(path)
        sources.append(str(local.resolve()) if local.exists() else f"hf:{path}" if path.count("/") == 1 else path)
        kind = str(d.get("type") or "")
        if d.get("field_messages"):
            out.set("data.columns", {"messages": d["field_messages"]})
        if kind.split(".")[0] not in ("", "alpaca", "sharegpt", "chat_template", "completion"):
            out.not_mapped[f"datasets[{path}].type"] = f"prompt strategy '{kind}': llfarm detects alpaca, " \
                                                       "messages, ShareGPT and preference records"
    if sources:
        out.set("data.train", sources[0] if len(sources) == 1 else sources)


AXOLOTL = Importer(
    name="axolotl",
    detect=lambda c: "base_model" in c or "micro_batch_size" in c or "datasets" in c and "sequence_len" in c,
    special=_axolotl_special,
    rules={
        "base_model": ("model.path", None), "revision_of_model": ("model.revision", None),
        "trust_remote_code": ("model.trust_remote_code", bool), "chat_template": ("template", template_name),
        "lora_r": ("method.r", int), "lora_alpha": ("method.alpha", int), "lora_dropout": ("method.dropout", float),
        "lora_target_modules": ("method.target_modules", names), "lora_modules_to_save": ("method.modules_to_save", names),
        "peft_use_dora": ("method.use_dora", bool), "peft_use_rslora": ("method.use_rslora", bool),
        "loraplus_lr_ratio": ("method.loraplus_lr_ratio", float),
        "sequence_len": ("data.max_length", int), "val_set_size": ("data.eval_split", float),
        "sample_packing": ("training.packing", bool), "num_epochs": ("training.epochs", float),
        "max_steps": ("training.max_steps", positive_or_none), "micro_batch_size": ("training.batch_size", int),
        "gradient_accumulation_steps": ("training.grad_accum", int), "learning_rate": ("training.learning_rate", float),
        "lr_scheduler": ("training.scheduler", scheduler), "warmup_steps": ("training.warmup_steps", int),
        "warmup_ratio": ("training.warmup_ratio", float), "weight_decay": ("training.weight_decay", float),
        "max_grad_norm": ("training.max_grad_norm", float), "optimizer": ("training.optimizer", optimizer),
        "adam_beta1": ("training.adam_beta1", float), "adam_beta2": ("training.adam_beta2", float),
        "adam_epsilon": ("training.adam_epsilon", float), "tf32": ("training.tf32", bool),
        "gradient_checkpointing": ("training.gradient_checkpointing", bool), "seed": ("training.seed", int),
        "logging_steps": ("training.logging_steps", int), "save_steps": ("training.save_every", int),
        "save_total_limit": ("training.keep_checkpoints", int), "eval_steps": ("training.eval_every", int),
        "neftune_noise_alpha": ("training.neftune_alpha", float), "group_by_length": ("training.group_by_length", bool),
        "dataloader_num_workers": ("training.dataloader_workers", int), "deepspeed": ("distributed.deepspeed", str),
        "wandb_name": ("tracking.run_name", str), "dpo_beta": ("preference.beta", float),
        "rl_beta": ("preference.beta", float), "orpo_alpha": ("preference.beta", float),
        "simpo_gamma": ("preference.simpo_gamma", float),
        "kto_desirable_weight": ("preference.desirable_weight", float),
        "kto_undesirable_weight": ("preference.undesirable_weight", float),
        "attn_implementation": ("training.attention", lambda v: one_of_values(("sdpa", "eager",
                                                                                 "flash_attention_2"))(v)),
    },
    managed={"output_dir": "runs/<id>/", "dataset_prepared_path": "the data cache (LLFARM_CACHE)",
             "base_model_config": "model.path", "model_type": "transformers' Auto classes", "tokenizer_type":
             "transformers' Auto classes", "strict": "llfarm refuses unknown keys", "resume_from_checkpoint":
             "`llfarm resume`", "auto_resume_from_checkpoints": "`llfarm resume`", "special_tokens": "the chat template",
             "wandb_log_model": "llfarm keeps the model in the run directory", "wandb_watch": "-",
             "wandb_entity": "WANDB_ENTITY", "train_on_inputs": "llfarm trains on the answer only",
             "evals_per_epoch": "training.eval_every", "saves_per_epoch": "training.save_every",
             "logging_dir": "logs/ in the run directory", "debug": "-", "xformers_attention": "training.attention",
             "pad_to_sequence_len": "llfarm pads per batch", "eval_sample_packing": "training.packing",
             "dataset_processes": "the data cache"},
)


# ---------------------------------------------------------------- TRL (the YAML of `trl sft` / `trl dpo`)

def _trl_special(c: dict[str, Any], out: Imported, base: Path) -> None:
    if "beta" in c or "loss_type" in c and c.get("loss_type") in ("sigmoid", "hinge", "ipo"):
        out.set("stage", "dpo")
    if c.pop("use_peft", False):
        out.set("method.type", "qlora" if c.pop("load_in_4bit", False) else "lora")
    else:
        c.pop("load_in_4bit", None)
        out.set("method.type", "full")
    if c.pop("bf16", False):
        out.set("training.precision", "bf16")
    elif c.pop("fp16", False):
        out.set("training.precision", "fp16")
    name = c.pop("dataset_name", None)
    if name:
        local = base / name
        out.set("data.train", str(local.resolve()) if local.exists() else f"hf:{name}")
        split = c.pop("dataset_train_split", "train")
        if split != "train" and not local.exists():
            out.set("data.train", [{"path": f"hf:{name}", "split": split}])


TRL = Importer(
    name="trl",
    detect=lambda c: "dataset_name" in c or "use_peft" in c or "lora_r" in c and "model_name_or_path" in c,
    special=_trl_special,
    rules={
        **HF_TRAINER_RULES,
        "lora_r": ("method.r", int), "lora_alpha": ("method.alpha", int), "lora_dropout": ("method.dropout", float),
        "lora_target_modules": ("method.target_modules", lambda v: "all" if v == "all-linear" else names(v)),
        "max_length": ("data.max_length", int), "max_seq_length": ("data.max_length", int),
        "beta": ("preference.beta", float), "loss_type": ("preference.loss", one_of_values(("sigmoid", "hinge", "ipo"))),
        "neftune_noise_alpha": ("training.neftune_alpha", float), "attn_implementation":
            ("training.attention", one_of_values(("sdpa", "eager", "flash_attention_2"))),
    },
    managed={"output_dir": "runs/<id>/", "push_to_hub": "-", "hub_model_id": "-", "logging_strategy": "steps",
             "eval_strategy": "training.eval_every", "save_strategy": "training.save_every",
             "dataset_test_split": "data.eval", "per_device_eval_batch_size": "training.batch_size",
             "torch_dtype": "model.dtype / training.precision", "dtype": "model.dtype / training.precision",
             "bnb_4bit_quant_type": "model.quant_type", "use_bnb_nested_quant": "model.double_quant",
             "completion_only_loss": "llfarm trains on the answer only", "assistant_only_loss":
             "llfarm trains on the answer only"},
)


# ---------------------------------------------------------------- the registry and the command

def importers() -> dict[str, Importer]:
    from .backend import registry
    found = {i.name: i for i in (AXOLOTL, TRL)}
    for b in registry().values():
        imp = getattr(b, "importer", None)
        if imp is not None:
            found[imp.name] = imp
    return found


def import_file(path: Path, source: str | None, name: str | None) -> tuple[Importer, Imported]:
    """The strategy a peer config becomes (checked by llfarm's schema), or one clear error."""
    from .strategy import read_yaml, validate
    config, _ = read_yaml(path)
    known = importers()
    if source is None:
        found = [i for i in known.values() if i.detect(config)]
        if not found:
            raise StrategyError(["cannot tell which tool this config is for"], where=str(path),
                                hint=f"pass --from ({one_of(known)})")
        importer = found[0]
    elif source not in known:
        raise StrategyError([f"unknown config source '{source}'{did_you_mean(source, known)}"], where="--from",
                            hint=one_of(known))
    else:
        importer = known[source]
    out = importer.convert(config, path.parent)
    out.strategy = {"name": name or path.stem.split(".")[0], "description": f"imported from {importer.name}: "
                    f"{path.name}", **{k: v for k, v in out.strategy.items()}}
    if "data" not in out.strategy or "train" not in out.strategy["data"]:
        raise StrategyError(["the config names no training data llfarm can read"], where=str(path),
                            hint="point data.train at a file in the strategy this writes (see `llfarm import --help`)")
    validate(out.strategy, file=path)
    out.strategy = in_schema_order(out.strategy)
    return importer, out


def in_schema_order(data: dict[str, Any], model=None) -> dict[str, Any]:
    """The strategy's keys in the order the schema (and the README's reference) lists them."""
    from pydantic import BaseModel

    from .schema import Strategy
    model = model or Strategy
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name in data:
            ann = info.annotation
            nested = isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(data[name], dict)
            out[name] = in_schema_order(data[name], ann) if nested else data[name]
    return out
