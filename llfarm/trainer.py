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

    from . import oom
    from .checkpoints import completeness_callback, instrument_saves
    from .compat import ensure_warnings_issued, fix_trl_availability_flags
    from .metrics import trainer_callback
    from .stopping import early_stopping_callback, outcome_callback, outcome_path
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
    train = tokenized(spec, "train", template, tokenizer)
    evals = tokenized(spec, "eval", template, tokenizer) if spec["data"]["eval"] else None
    native = Path(spec["outputs"]["final_metrics"]).parent
    callbacks = [trainer_callback(spec["outputs"]["metrics"]), completeness_callback(), oom.watch(native)]
    stopper = early_stopping_callback(spec.get("early_stopping"))
    if stopper is not None:
        callbacks.append(stopper)
    callbacks.append(outcome_callback(outcome_path(spec["outputs"]["final_metrics"]), callbacks))
    trainer = build_trainer(spec, model, tokenizer, train, evals, peft_config, callbacks)
    check_parallelism(spec, trainer)
    if spec.get("loraplus_lr_ratio"):
        trainer.optimizer = loraplus_optimizer(trainer, spec["loraplus_lr_ratio"])
    try:
        # TRL's PPOTrainer.train takes no checkpoint (its backend refuses to resume a ppo run)
        result = trainer.train() if spec["stage"] == "ppo" else \
            trainer.train(resume_from_checkpoint=spec["resume_from"])
    except Exception as exc:
        if oom.report(exc):              # the runner backs off (llfarm.oom): a smaller batch, from a checkpoint
            return oom.EXIT_CODE
        raise
    save(spec, trainer, tokenizer)
    if not trainer.is_world_process_zero():    # under a launcher only global rank 0 writes the run's outputs
        return 0
    metrics = getattr(result, "metrics", None) or {}
    final = {"global_step": trainer.state.global_step, "train_runtime": metrics.get("train_runtime"),
             "train_loss": metrics.get("train_loss"),
             "num_input_tokens_seen": trainer.state.num_input_tokens_seen, **(extra_final or {}),
             **distributed_final(trainer.args, trainer)}
    if spec["stage"] == "rm":
        final["train_pair_accuracy"], final["train_pair_accuracy_n"] = rm_accuracy(trainer.model, train)
    Path(spec["outputs"]["final_metrics"]).write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    return 0


def check_parallelism(spec: dict[str, Any], trainer) -> None:
    """The launcher set up what the strategy asked for, or the run stops before training (never a silent
    fallback, e.g. FSDP quietly trained as DDP)."""
    want = spec.get("distributed") or {}
    got = str(trainer.accelerator.distributed_type).rpartition(".")[2]
    expected = "FSDP" if want.get("fsdp") else "DEEPSPEED" if want.get("deepspeed") else None
    if expected and got != expected:
        raise SystemExit(f"llfarm: the strategy asks for {expected}, but accelerate set up {got}")
    if want.get("world_size", 1) != trainer.args.world_size:
        raise SystemExit(f"llfarm: the strategy asks for {want['world_size']} processes, but the trainer sees "
                         f"{trainer.args.world_size} (was it started by the launcher in native/command.txt?)")


def distributed_final(args, trainer=None) -> dict[str, Any]:
    """How many processes trained together, as the trainer saw them (world_size 1 for a single process), and how
    (accelerate's distributed type: MULTI_CPU / MULTI_GPU for DDP, FSDP, DEEPSPEED)."""
    import os
    out: dict[str, Any] = {"world_size": args.world_size}
    if args.world_size > 1:
        import torch.distributed as dist
        out["ddp_backend"] = dist.get_backend() if dist.is_initialized() else args.ddp_backend
        out["nnodes"] = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if trainer is not None:
        out["distributed_type"] = str(trainer.accelerator.distributed_type).rpartition(".")[2]
        if out["distributed_type"] == "FSDP":
            out["fsdp_version"] = trainer.accelerator.state.fsdp_plugin.fsdp_version
    return out


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
    if m.get("attn_implementation"):
        kwargs["attn_implementation"] = m["attn_implementation"]
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

TOKENIZED = "llfarm-tokenized.json"     # written last into a token cache entry: it is complete


def tokenized(spec: dict[str, Any], which: str, template, tokenizer):
    """The split as the trainer takes it (sft: input_ids + completion_mask; dpo: rendered prompt/chosen/rejected;
    rm: chosen/rejected ids), from the token cache when an earlier run made it, else made with ``datasets.map``
    (``num_proc`` workers for large data) and kept there: keyed by the data selection, the tokenizer, the template,
    max_length and the stage (see ``llfarm.training.data_spec``)."""
    import os
    import shutil

    from datasets import Dataset, load_from_disk

    from .train_common import BATCH_FUNCTIONS

    d, stage = spec["data"], spec["stage"]
    cache = Path(d["token_cache"]) / which
    if (cache / TOKENIZED).is_file():
        info = json.loads((cache / TOKENIZED).read_text(encoding="utf-8"))
        print(f"llfarm: {which} data: {info['rows']} tokenized examples from the token cache {cache}")
        return load_from_disk(str(cache))
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        raw = Dataset.from_json(d[which], cache_dir=str(tmp / "json"))
        ds = raw.map(BATCH_FUNCTIONS[stage], batched=True, batch_size=256, remove_columns=raw.column_names,
                     num_proc=d["num_proc"] if d["num_proc"] > 1 and len(raw) >= 4 * 256 * d["num_proc"] else None,
                     fn_kwargs={"template": template, "tokenizer": tokenizer, "max_length": d["max_length"]},
                     desc=f"llfarm: tokenizing {which}")
        dropped = 0
        if stage == "sft":
            kept = ds.filter(any, input_columns="completion_mask", desc=f"llfarm: {which} examples with an answer")
            dropped = len(ds) - len(kept)
            if not len(kept):
                raise SystemExit(f"llfarm: every {which} example's prompt is longer than data.max_length="
                                 f"{d['max_length']}; raise data.max_length")
            if dropped:
                print(f"llfarm: dropped {dropped} {which} examples whose prompt fills data.max_length={d['max_length']}")
            ds = kept
        ds.save_to_disk(str(tmp / "data"))
        (tmp / "data" / TOKENIZED).write_text(json.dumps({"rows": len(ds), "dropped": dropped, "source": d[which]}),
                                              encoding="utf-8")
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp / "data", cache)
        except OSError:                     # another run made it first: use theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(cache))


def build_trainer(spec, model, tokenizer, train, evals, peft_config, callbacks):
    import trl

    stage = spec["stage"]
    trainer_cls, config_cls = getattr(trl, spec["trainer"]), getattr(trl, spec["config"])
    args = config_cls(**spec["args"])
    common = {"args": args, "train_dataset": train, "processing_class": tokenizer, "peft_config": peft_config,
              "callbacks": callbacks}
    if stage == "ppo":
        return ppo_trainer(spec, model, tokenizer, train, peft_config, callbacks, args)
    if stage == "grpo":
        from .rewards import load
        return trainer_cls(model=model, reward_funcs=[load(r) for r in spec["rewards"]], eval_dataset=evals, **common)
    extra = {"ref_model": None} if stage in ("dpo", "kto") else {}   # the reference is the base (adapter off)
    if stage in ("orpo", "simpo"):
        trainer_cls = template_tokenized(trainer_cls)
    return trainer_cls(model=model, eval_dataset=evals, **common, **extra)


def template_tokenized(trainer_cls):
    """ORPOTrainer/CPOTrainer that take the template's text as it is: the rendered prompt and each rendered answer
    (``render_turns_batch``) tokenized apart, nothing added. TRL's own ``tokenize_row`` puts the tokenizer's bos
    before the prompt and its eos after the bare answer, so its answers lacked the template's text after the end of
    turn and its prompts began with a bos the template (and SFT, and generation) never uses: 18.5% apart from
    LlamaFactory's SimPO loss on the same data. Truncation follows TRL's (keep the prompt's end, then cut the
    answers)."""

    class TemplateTokenized(trainer_cls):
        def tokenize_row(self, feature, model=None) -> dict:
            tok = self.processing_class
            prompt = tok(feature["prompt"], add_special_tokens=False)["input_ids"]
            answers = {k: tok(feature[k], add_special_tokens=False)["input_ids"] for k in ("chosen", "rejected")}
            longest = max(len(a) for a in answers.values())
            if len(prompt) + longest > self.max_length:
                prompt = prompt[-self.max_prompt_length:] if self.truncation_mode == "keep_end" \
                    else prompt[:self.max_prompt_length]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for k, ids in answers.items():
                if len(prompt) + longest > self.max_length:
                    ids = ids[:self.max_length - self.max_prompt_length]
                row[f"{k}_input_ids"] = prompt + ids
                row[f"{k}_attention_mask"] = [1] * (len(prompt) + len(ids))
                row[f"{k}_labels"] = [self.label_pad_token_id] * len(prompt) + ids
            return row

    TemplateTokenized.__name__ = TemplateTokenized.__qualname__ = trainer_cls.__name__
    return TemplateTokenized


def ppo_trainer(spec, model, tokenizer, train, peft_config, callbacks, args):
    """TRL's PPOTrainer: the policy, the reward model of the llfarm rm run (its adapter merged onto its base), a value
    model started from the reward model, and the reference = the policy with its adapter disabled (PEFT)."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import PPOTrainer

    from .compat import ensure_warnings_issued

    rm = spec["reward_model"]
    dtype = getattr(torch, spec["model"]["dtype"])
    if rm["kind"] == "adapter":
        from peft import PeftModel
        base = AutoModelForSequenceClassification.from_pretrained(rm["base"], num_labels=1, dtype=dtype)
        reward = PeftModel.from_pretrained(base, rm["path"]).merge_and_unload()
    else:
        reward = AutoModelForSequenceClassification.from_pretrained(rm["path"], num_labels=1, dtype=dtype)
    reward.config.pad_token_id = tokenizer.pad_token_id
    value = copy.deepcopy(reward)
    for m in (reward, value):
        ensure_warnings_issued(m)
    ref = None if peft_config is not None else copy.deepcopy(model)
    return PPOTrainer(args=args, processing_class=tokenizer, model=model, ref_model=ref, reward_model=reward,
                      train_dataset=train, value_model=value, callbacks=callbacks, peft_config=peft_config)


def loraplus_optimizer(trainer, ratio: float):
    """LoRA+ (PEFT's create_loraplus_optimizer): the adapters' B matrices learn ``ratio`` times faster than A, with
    the optimizer class and arguments training.optimizer names. The trainer builds its scheduler around it."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model=trainer.model, optimizer_cls=cls, lr=trainer.args.learning_rate,
                                     loraplus_lr_ratio=ratio, weight_decay=trainer.args.weight_decay, **kwargs)


# ---------------------------------------------------------------- outputs

def save(spec, trainer, tokenizer) -> None:
    """The adapter (PEFT) or the full model, with the template's tokenizer and a matching eos."""
    gen = getattr(trainer.model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
    trainer.save_model(spec["outputs"]["dir"])          # (the trainer saves on global rank 0 only)
    if trainer.args.should_save:
        tokenizer.save_pretrained(spec["outputs"]["dir"])


def rm_accuracy(model, pairs, limit: int = 1000) -> tuple[float, int]:
    """The share of training pairs (at most ``limit``) whose chosen answer the reward model scores above the
    rejected one, and how many pairs that is."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    n = min(len(pairs), limit)
    right = 0
    with torch.no_grad():
        for pair in pairs.select(range(n)):
            scores = [model(input_ids=torch.tensor([pair[k]], device=device)).logits[0, 0].item()
                      for k in ("chosen_input_ids", "rejected_input_ids")]
            right += scores[0] > scores[1]
    return round(right / max(n, 1), 4), n


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
