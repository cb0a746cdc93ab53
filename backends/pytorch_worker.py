"""The pytorch backend's training process: ``python -m llfarm.backends.pytorch_worker train_config.json``.

Reads the config written by ``compile`` (see backends/pytorch.py), trains with TRL (SFTTrainer, DPOTrainer,
RewardTrainer), streams metrics.jsonl, and saves the adapter or model with the template's tokenizer.
Order: setup → data → model → trainer → train → save → final metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
    import torch
    from transformers import AutoTokenizer, set_seed

    from llfarm.compat import fix_trl_availability_flags
    from llfarm.metrics import trainer_callback

    fix_trl_availability_flags()
    from llfarm.templates import load_template
    from llfarm.train_common import tokenizer_for_template

    tr = cfg["training"]
    set_seed(tr["seed"])
    if cfg["platform"] == "cpu":
        torch.set_num_threads(max(torch.get_num_threads(), 1))
    template = load_template(cfg["template"])
    m = cfg["model"]
    tokenizer = AutoTokenizer.from_pretrained(m["path"], revision=m["revision"],
                                              trust_remote_code=m["trust_remote_code"])
    tokenizer = tokenizer_for_template(tokenizer, template)
    train_rows = read_jsonl(cfg["data"]["train"])
    eval_rows = read_jsonl(cfg["data"]["eval"]) if cfg["data"]["eval"] else []

    model = load_model(cfg, tokenizer)
    peft_config = make_peft_config(cfg) if cfg["method"]["type"] in ("lora", "qlora") else None
    if cfg["method"]["type"] == "freeze":
        from llfarm.train_common import freeze_all_but_last
        freeze_all_but_last(model, cfg["method"]["trainable_layers"])

    trainer = build_trainer(cfg, model, tokenizer, template, train_rows, eval_rows, peft_config,
                            [trainer_callback(cfg["outputs"]["metrics"])])
    trainer.train(resume_from_checkpoint=cfg["resume_from"])
    save(cfg, trainer, tokenizer)
    final = final_metrics(cfg, trainer, tokenizer, template, train_rows)
    Path(cfg["outputs"]["final"]).write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------- setup

def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def torch_dtype(cfg: dict[str, Any]):
    import torch
    requested = cfg["model"]["dtype"]
    if requested == "auto":
        requested = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg["training"]["precision"], "float32")
    return getattr(torch, requested)


def load_model(cfg: dict[str, Any], tokenizer):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = cfg["model"]
    kwargs: dict[str, Any] = {"revision": m["revision"], "trust_remote_code": m["trust_remote_code"],
                              "dtype": torch_dtype(cfg)}
    if m["quantization"] in ("4bit", "8bit"):
        import torch
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
            if m["quantization"] == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    if cfg["stage"] == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(m["path"], num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(m["path"], **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    from llfarm.compat import ensure_warnings_issued
    ensure_warnings_issued(model)
    if m["quantization"] in ("4bit", "8bit"):
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg["training"]["gradient_checkpointing"])
    return model


def make_peft_config(cfg: dict[str, Any]):
    from peft import LoraConfig

    from llfarm.train_common import lora_targets

    me = cfg["method"]
    rm = cfg["stage"] == "rm"
    return LoraConfig(r=me["r"], lora_alpha=me["alpha"], lora_dropout=me["dropout"],
                      target_modules=lora_targets(me["target_modules"]), bias="none",
                      task_type="SEQ_CLS" if rm else "CAUSAL_LM", modules_to_save=["score"] if rm else None)


def training_args(cfg: dict[str, Any]) -> dict[str, Any]:
    tr = cfg["training"]
    has_eval = bool(cfg["data"]["eval"])
    args: dict[str, Any] = dict(
        output_dir=cfg["outputs"]["checkpoints"], overwrite_output_dir=False,
        num_train_epochs=tr["epochs"], max_steps=tr["max_steps"] or -1,
        per_device_train_batch_size=tr["batch_size"], per_device_eval_batch_size=tr["batch_size"],
        gradient_accumulation_steps=tr["grad_accum"], learning_rate=tr["learning_rate"],
        lr_scheduler_type=tr["scheduler"], warmup_ratio=tr["warmup_ratio"], weight_decay=tr["weight_decay"],
        max_grad_norm=tr["max_grad_norm"], seed=tr["seed"], data_seed=tr["seed"],
        logging_steps=tr["logging_steps"], logging_first_step=True,
        save_strategy="steps", save_steps=tr["save_every"] or 10**9, save_total_limit=tr["keep_checkpoints"],
        eval_strategy="steps" if has_eval else "no",
        eval_steps=tr["eval_every"] or max(1, (cfg["total_steps"] or 10) // 5) if has_eval else None,
        bf16=tr["precision"] == "bf16", fp16=tr["precision"] == "fp16",
        use_cpu=cfg["platform"] == "cpu", gradient_checkpointing=tr["gradient_checkpointing"],
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        include_num_input_tokens_seen=True,
    )
    if cfg.get("deepspeed"):
        args["deepspeed"] = cfg["deepspeed"]
    args.update(cfg.get("options") or {})
    args.pop("overwrite_output_dir", None)
    return args


def build_trainer(cfg, model, tokenizer, template, train_rows, eval_rows, peft_config, callbacks):
    from datasets import Dataset

    from llfarm import train_common as tc

    stage, max_len = cfg["stage"], cfg["data"]["max_length"]
    args = training_args(cfg)
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer
        train, dropped = tc.tokenize_sft(train_rows, template, tokenizer, max_len)
        if not train:
            raise SystemExit(f"llfarm: every training example's prompt is longer than data.max_length={max_len}; "
                             "raise data.max_length")
        if dropped:
            print(f"llfarm: dropped {dropped} examples whose prompt fills data.max_length={max_len}")
        evals = tc.tokenize_sft(eval_rows, template, tokenizer, max_len)[0] if eval_rows else None
        config = SFTConfig(**args, max_length=max_len, completion_only_loss=True, packing=False,
                           dataset_kwargs={"skip_prepare_dataset": False})
        return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                          eval_dataset=Dataset.from_list(evals) if evals else None,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer
        pref = cfg["preference"]
        config = DPOConfig(**args, beta=pref["beta"], loss_type=pref["loss"], max_length=max_len,
                           max_prompt_length=max_len // 2, precompute_ref_log_probs=False)
        train = tc.render_preference(train_rows, template, tokenizer)
        evals = tc.render_preference(eval_rows, template, tokenizer) if eval_rows else None
        return DPOTrainer(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(train),
                          eval_dataset=Dataset.from_list(evals) if evals else None,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if stage == "rm":
        from trl import RewardConfig, RewardTrainer
        config = RewardConfig(**args, max_length=max_len, center_rewards_coefficient=None)
        train = tc.tokenize_pairs(train_rows, template, tokenizer, max_len)
        evals = tc.tokenize_pairs(eval_rows, template, tokenizer, max_len) if eval_rows else None
        return RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                             eval_dataset=Dataset.from_list(evals) if evals else None,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    raise SystemExit(f"llfarm: unknown stage {stage}")


# ---------------------------------------------------------------- outputs

def save(cfg, trainer, tokenizer) -> None:
    """The adapter (PEFT) or the full model, with the template's tokenizer and a matching eos."""
    out = cfg["outputs"]["adapter"] if cfg["method"]["type"] in ("lora", "qlora") else cfg["outputs"]["model"]
    gen = getattr(trainer.model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
    trainer.save_model(out)
    tokenizer.save_pretrained(out)


def final_metrics(cfg, trainer, tokenizer, template, train_rows) -> dict[str, Any]:
    """Numbers the run directory promises: for rm, accuracy on the training pairs."""
    out: dict[str, Any] = {"global_step": trainer.state.global_step}
    if cfg["stage"] == "rm":
        out["train_pair_accuracy"] = rm_accuracy(trainer.model, tokenizer, template, train_rows,
                                                 cfg["data"]["max_length"])
    return out


def rm_accuracy(model, tokenizer, template, rows, max_length) -> float:
    import torch

    from llfarm.train_common import tokenize_pairs
    model.eval()
    device = next(model.parameters()).device
    right = 0
    with torch.no_grad():
        for pair in tokenize_pairs(rows, template, tokenizer, max_length):
            scores = [model(input_ids=torch.tensor([pair[k]], device=device)).logits[0, 0].item()
                      for k in ("chosen_input_ids", "rejected_input_ids")]
            right += scores[0] > scores[1]
    return round(right / max(len(rows), 1), 4)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
