"""The trainer child shared by every Hugging Face–based backend:

    python -m llfarm.trainer native/trainer.json          # the transformers + PEFT loader (load_transformers)
    python native/train_unsloth.py native/trainer.json    # the Unsloth backend: the same run(), its own loader

``trainer.json`` is the spec ``llfarm.training.trainer_spec`` computed at compile time (``llfarm plan`` shows it).
Only the model loader differs between backends; everything else is here, once:
setup → load (the backend's loader) → data (rendered with the strategy's template) → TRL trainer → train → save →
final metrics. metrics.jsonl is written while it trains.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .train_common import tokenizer_for_template as prepare_tokenizer  # (light) for loaders: template + eos

# (spec, template) -> (model, tokenizer, peft_config or None when the loader already added the adapter)
Loader = Callable[[dict[str, Any], Any], tuple[Any, Any, Any]]


def read_spec(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def run(spec: dict[str, Any], load: Loader | None = None, *, extra_final: dict[str, Any] | None = None) -> int:
    from . import lifeline
    lifeline.guard()                    # die with the llfarm process that started us (and take our group along)

    from transformers import set_seed

    from .checkpoints import completeness_callback, instrument_saves
    from .compat import ensure_warnings_issued, fix_trl_availability_flags
    from .metrics import trainer_callback
    from .templates import load_template

    instrument_saves()                  # a failed save names its file and disk (+ tests' fault injection)
    fix_trl_availability_flags()        # before any trl trainer module is imported
    set_seed(spec["args"]["seed"])
    template = load_template(spec["template"])
    model, tokenizer, peft_config = (load or load_transformers)(spec, template)
    ensure_warnings_issued(model)
    if spec["freeze"]:
        from .train_common import freeze_all_but_last
        freeze_all_but_last(model, spec["freeze"]["trainable_layers"])
    train_rows = read_jsonl(spec["data"]["train"])
    eval_rows = read_jsonl(spec["data"]["eval"]) if spec["data"]["eval"] else []
    trainer = build_trainer(spec, model, tokenizer, template, train_rows, eval_rows, peft_config,
                            [trainer_callback(spec["outputs"]["metrics"]), completeness_callback()])
    result = trainer.train(resume_from_checkpoint=spec["resume_from"])
    save(spec, trainer, tokenizer)
    final = {"global_step": trainer.state.global_step, "train_runtime": result.metrics.get("train_runtime"),
             "num_input_tokens_seen": trainer.state.num_input_tokens_seen, **(extra_final or {})}
    if spec["stage"] == "rm":
        final["train_pair_accuracy"] = rm_accuracy(trainer.model, tokenizer, template, train_rows,
                                                   spec["data"]["max_length"])
    Path(spec["outputs"]["final_metrics"]).write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------- loading: transformers + PEFT

def load_transformers(spec: dict[str, Any], template) -> tuple[Any, Any, Any]:
    """transformers' Auto classes, bitsandbytes when asked; the adapter is a LoraConfig TRL applies."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    m = spec["model"]
    tokenizer = AutoTokenizer.from_pretrained(m["path"], revision=m["revision"],
                                              trust_remote_code=m["trust_remote_code"])
    tokenizer = prepare_tokenizer(tokenizer, template)
    kwargs: dict[str, Any] = {"revision": m["revision"], "trust_remote_code": m["trust_remote_code"],
                              "dtype": getattr(torch, m["dtype"])}
    quant = m["quantization"]
    if quant:
        from transformers import BitsAndBytesConfig
        q = dict(quant)
        if "bnb_4bit_compute_dtype" in q:
            q["bnb_4bit_compute_dtype"] = getattr(torch, q["bnb_4bit_compute_dtype"])
        kwargs["quantization_config"] = BitsAndBytesConfig(**q)
    if m["task"] == "sequence_classification":
        model = AutoModelForSequenceClassification.from_pretrained(m["path"], num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(m["path"], **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if quant:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec["args"]["gradient_checkpointing"])
    peft_config = None
    if spec["peft"]:
        from peft import LoraConfig
        peft_config = LoraConfig(**spec["peft"])
    return model, tokenizer, peft_config


# ---------------------------------------------------------------- data and trainer

def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_trainer(spec, model, tokenizer, template, train_rows, eval_rows, peft_config, callbacks):
    import trl
    from datasets import Dataset

    from . import train_common as tc

    stage, max_len = spec["stage"], spec["data"]["max_length"]
    if stage == "sft":
        train, dropped = tc.tokenize_sft(train_rows, template, tokenizer, max_len)
        if not train:
            raise SystemExit(f"llfarm: every training example's prompt is longer than data.max_length={max_len}; "
                             "raise data.max_length")
        if dropped:
            print(f"llfarm: dropped {dropped} examples whose prompt fills data.max_length={max_len}")
        evals = tc.tokenize_sft(eval_rows, template, tokenizer, max_len)[0] if eval_rows else None
    elif stage == "dpo":       # prompt rendered up to the answer / chosen / rejected; TRL appends eos
        train = tc.render_preference(train_rows, template, tokenizer)
        evals = tc.render_preference(eval_rows, template, tokenizer) if eval_rows else None
    else:                      # rm: chosen/rejected token ids
        train = tc.tokenize_pairs(train_rows, template, tokenizer, max_len)
        evals = tc.tokenize_pairs(eval_rows, template, tokenizer, max_len) if eval_rows else None
    trainer_cls, config_cls = getattr(trl, spec["trainer"]), getattr(trl, spec["config"])
    extra = {"ref_model": None} if stage == "dpo" else {}   # dpo: the reference is the base (adapter disabled)
    return trainer_cls(model=model, args=config_cls(**spec["args"]), train_dataset=Dataset.from_list(train),
                       eval_dataset=Dataset.from_list(evals) if evals else None, processing_class=tokenizer,
                       peft_config=peft_config, callbacks=callbacks, **extra)


# ---------------------------------------------------------------- outputs

def save(spec, trainer, tokenizer) -> None:
    """The adapter (PEFT) or the full model, with the template's tokenizer and a matching eos."""
    gen = getattr(trainer.model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
    trainer.save_model(spec["outputs"]["dir"])
    tokenizer.save_pretrained(spec["outputs"]["dir"])


def rm_accuracy(model, tokenizer, template, rows, max_length) -> float:
    """The share of training pairs whose chosen answer the reward model scores above the rejected one."""
    import torch

    from .train_common import tokenize_pairs
    model.eval()
    device = next(model.parameters()).device
    right = 0
    with torch.no_grad():
        for pair in tokenize_pairs(rows, template, tokenizer, max_length):
            scores = [model(input_ids=torch.tensor([pair[k]], device=device)).logits[0, 0].item()
                      for k in ("chosen_input_ids", "rejected_input_ids")]
            right += scores[0] > scores[1]
    return round(right / max(len(rows), 1), 4)


def main(argv: list[str]) -> int:
    from .checkpoints import CheckpointSaveError
    try:
        return run(read_spec(argv[0]))
    except CheckpointSaveError as exc:       # the traceback for the log, then the one line that says what happened
        import traceback
        traceback.print_exc()
        print(exc, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
