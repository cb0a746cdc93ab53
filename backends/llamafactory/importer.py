"""`llfarm import --from llamafactory`: a LlamaFactory training YAML → an llfarm strategy.

The inverse of config.py: LlamaFactory's keys back to strategy fields (the same pairs OWNED declares), its
datasets resolved through dataset_info.json to files llfarm reads (LlamaFactory's alpaca, ShareGPT, OpenAI-message
and ranking forms are all llfarm formats). Importing the YAML `llfarm plan --backend llamafactory` writes gives back
an equivalent strategy (tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llfarm.importers import (
    HF_TRAINER_RULES,
    Imported,
    Importer,
    names,
    template_name,
)

from .config import FLASH_ATTN

ATTENTION = {v: k for k, v in FLASH_ATTN.items()}


def _special(c: dict[str, Any], out: Imported, base: Path) -> None:
    ftype = c.pop("finetuning_type", "lora")
    bits = c.pop("quantization_bit", None)
    if ftype == "lora":
        out.set("method.type", "qlora" if bits == 4 else "lora")
        if bits == 8:
            out.set("model.quantization", "8bit")
    elif ftype in ("full", "freeze"):
        out.set("method.type", ftype)
    else:
        out.not_mapped["finetuning_type"] = f"llfarm's methods are lora, qlora, full, freeze; not '{ftype}'"
    bf16, fp16 = c.pop("bf16", False), c.pop("fp16", False)
    out.set("training.precision", "bf16" if bf16 else "fp16" if fp16 else "fp32")
    if "pissa_init" in c:
        if c.pop("pissa_init"):
            out.set("method.init", "pissa")
    if c.get("default_system") == "":
        c.pop("default_system")                      # what llfarm itself writes: no system prompt
    if c.get("save_steps", 0) >= 10**9:              # llfarm's "only at the end"
        c.pop("save_steps")
        out.set("training.save_every", None)
    if c.get("max_samples") is None:
        c.pop("max_samples", None)
    _stage_and_loss(c, out)
    _best(c, out)
    folder = Path(c.pop("dataset_dir", "data"))
    folder = folder if folder.is_absolute() else base / folder
    for key, target in (("dataset", "data.train"), ("eval_dataset", "data.eval")):
        if key in c:
            sources = [_source(n, folder, out, key) for n in names(c.pop(key))]
            sources = [s for s in sources if s]
            if sources:
                out.set(target, sources[0] if len(sources) == 1 else sources)


def _best(c: dict[str, Any], out: Imported) -> None:
    """early_stopping_steps, load_best_model_at_end and the metric they follow → training.early_stopping / keep_best
    (the inverse of llfarm.training.best_arguments)."""
    from llfarm.training import NATIVE_METRICS
    patience, keep = c.pop("early_stopping_steps", None), c.pop("load_best_model_at_end", None)
    metric = c.pop("metric_for_best_model", None)
    greater = c.pop("greater_is_better", None)
    c.pop("restore_callback_states_from_checkpoint", None)
    if patience is None and not keep:
        if metric is not None:
            out.not_mapped["metric_for_best_model"] = "llfarm follows a metric for early stopping or keep_best only"
        return
    metric = "eval_loss" if metric in (None, "loss") else metric
    ours = {v: k for k, v in NATIVE_METRICS.items()}.get(metric if metric.startswith("eval_") else f"eval_{metric}")
    if ours is None or (greater is not None and greater != (ours != "eval_loss")):
        out.not_mapped["metric_for_best_model"] = (f"llfarm follows {', '.join(NATIVE_METRICS)} (loss lower, the "
                                                   f"others higher is better), not {metric!r}")
        ours = "eval_loss"
    if patience is not None:
        out.set("training.early_stopping", {"patience": int(patience),
                                            **({"metric": ours} if ours != "eval_loss" else {})})
    if keep:
        out.set("training.keep_best", True)


def _source(name: str, folder: Path, out: Imported, key: str) -> str | None:
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    entry = info.get(name)
    if entry is None:
        out.not_mapped[f"{key}: {name}"] = f"not in {info_path}; set data.train to its file"
        return None
    if "hf_hub_url" in entry:
        return f"hf:{entry['hf_hub_url']}"
    if "file_name" not in entry:
        out.not_mapped[f"{key}: {name}"] = "dataset_info names no file_name or hf_hub_url"
        return None
    columns = entry.get("columns") or {}
    if out.strategy.get("stage") == "pt":       # LlamaFactory's pretraining text is its prompt column
        if columns.get("prompt", "text") != "text":
            out.set("data.columns", {"text": columns["prompt"]})
        columns = {}
    custom = {k: v for k, v in columns.items() if k in ("prompt", "query", "response") and
              v != {"prompt": "instruction", "query": "input", "response": "output"}[k]}
    if custom:
        out.set("data.columns", {{"prompt": "instruction", "query": "input", "response": "output"}[k]: v
                                 for k, v in custom.items()})
    path = Path(entry["file_name"])
    return str(path if path.is_absolute() else (folder / path).resolve())


def _stage_and_loss(c: dict[str, Any], out: Imported) -> None:
    """LlamaFactory's stage + pref_loss → llfarm's stage (the inverse of build_config: ORPO and SimPO are its dpo
    stage with another preference loss)."""
    stage, loss = c.pop("stage", None), c.pop("pref_loss", None)
    if stage is not None:
        if stage not in ("pt", "sft", "dpo", "kto", "rm"):
            why = "llfarm runs PPO on the pytorch backend (preference.reward_model: an rm run)" if stage == "ppo" \
                else f"llfarm's LlamaFactory stages are pt, sft, dpo, kto, rm; not '{stage}'"
            out.not_mapped["stage"] = why
        elif stage == "dpo" and loss in ("orpo", "simpo"):
            out.set("stage", loss)
            loss = None
        else:
            out.set("stage", stage)
    if loss is not None:
        if loss in ("sigmoid", "hinge", "ipo"):
            out.set("preference.loss", loss)
        else:
            out.not_mapped["pref_loss"] = (f"'{loss}' with stage '{stage}': llfarm's preference losses are sigmoid, "
                                           "hinge, ipo (stage dpo), or stage orpo / simpo")


def _target(v: Any) -> Any:
    return "all" if v == "all" else names(v)


IMPORTER = Importer(
    name="llamafactory",
    detect=lambda c: "finetuning_type" in c or "stage" in c and "model_name_or_path" in c or "cutoff_len" in c,
    special=_special,
    rules={
        **HF_TRAINER_RULES,
        "quantization_type": ("model.quant_type", str), "double_quantization": ("model.double_quant", bool),
        "lora_rank": ("method.r", int), "lora_alpha": ("method.alpha", int), "lora_dropout": ("method.dropout", float),
        "lora_target": ("method.target_modules", _target), "freeze_trainable_layers": ("method.trainable_layers", int),
        "loraplus_lr_ratio": ("method.loraplus_lr_ratio", float), "additional_target": ("method.modules_to_save", names),
        "pref_beta": ("preference.beta", float), "simpo_gamma": ("preference.simpo_gamma", float),
        "kto_chosen_weight": ("preference.desirable_weight", float),
        "kto_rejected_weight": ("preference.undesirable_weight", float),
        "template": ("template", template_name), "cutoff_len": ("data.max_length", int),
        "max_samples": ("data.max_samples", int), "val_size": ("data.eval_split", float),
        "default_system": ("data.system", str), "neftune_alpha": ("training.neftune_alpha", float),
        "flash_attn": ("training.attention", lambda v: ATTENTION[v]),
        "train_sampling_strategy": ("training.group_by_length", lambda v: v == "group_by_length"),
        "disable_gradient_checkpointing": ("training.gradient_checkpointing", lambda v: not v),
    },
    managed={
        "output_dir": "runs/<id>/checkpoints", "overwrite_output_dir": "llfarm decides resume", "do_train": "every run",
        "plot_loss": "loss.png", "overwrite_cache": "the data cache", "preprocessing_num_workers": "the data cache",
        "tokenized_path": "the data cache", "logging_first_step": "metrics.jsonl", "disable_tqdm": "the progress bar",
        "include_num_input_tokens_seen": "tokens/s", "resume_from_checkpoint": "`llfarm resume`",
        "save_only_model": "resumable checkpoints", "save_strategy": "training.save_every",
        "eval_strategy": "training.eval_every", "per_device_eval_batch_size": "training.batch_size",
        "use_cpu": "the platform", "ddp_timeout": "distributed", "mask_history": "the loss is on the final answer",
        "quantization_method": "bitsandbytes", "data_seed": "training.seed", "freeze_trainable_modules": "all",
        "remove_unused_columns": "llfarm's datasets", "logging_dir": "logs/ in the run directory",
    },
)

