"""Unsloth SFT with full fine-tuning, written by llfarm for strategy 'sft_full'.

Every value comes from the JSON config beside this file (unsloth_config.json): change that, not this script.
Run it by hand from the run directory (it needs a GPU that Unsloth supports and `pip install "llfarm[unsloth]"`):

    python native/train_unsloth.py native/unsloth_config.json      # native/command.txt: with its environment

What it does: load the model with Unsloth's FastLanguageModel → render
the data with the strategy's chat template (llfarm.train_common: the same text --backend pytorch trains on)
→ TRL's SFTTrainer (patched by Unsloth) → save the full model and tokenizer → write final metrics.
"""

import json
import sys
from pathlib import Path

# `import unsloth` comes before trl, transformers and peft: importing it patches them (fast kernels, and
# TRL's trainers rewritten into Unsloth<Name>Trainer). Without a usable GPU the import raises NotImplementedError.
try:
    import unsloth
    from unsloth import FastLanguageModel, is_bfloat16_supported
except NotImplementedError as exc:
    sys.exit(f"llfarm: Unsloth cannot run on this machine ({exc}); use --backend pytorch or llamafactory")

import torch
from datasets import Dataset
from transformers import set_seed

from llfarm.compat import fix_trl_availability_flags
from llfarm.metrics import trainer_callback
from llfarm.templates import load_template
from llfarm.train_common import tokenize_sft, tokenizer_for_template

fix_trl_availability_flags()  # trl 0.24 on transformers 5: optional-package flags must be booleans
from trl import SFTConfig, SFTTrainer  # noqa: E402  (after the fix above)


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


config_path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("unsloth_config.json")
cfg = json.loads(config_path.read_text(encoding="utf-8"))
load, args, out = cfg["from_pretrained"], cfg["training_args"], cfg["outputs"]
set_seed(args["seed"])

# Precision "auto" became bf16 because llfarm saw a CUDA GPU; one without bf16 (T4, V100) trains in fp16.
if cfg["precision_auto"] and args["bf16"] and not is_bfloat16_supported():
    print("llfarm: this GPU has no bf16; training in fp16 (precision: auto)")
    load["dtype"], args["bf16"], args["fp16"] = "float16", False, True

# ---- 1. Load the model for full fine-tuning (every weight trains)
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=load["model_name"],                  # the strategy's model.path (a local folder or a hub id)
    max_seq_length=load["max_seq_length"],          # data.max_length
    dtype=getattr(torch, load["dtype"]),
    load_in_4bit=load["load_in_4bit"],              # true for method qlora / model.quantization 4bit
    full_finetuning=load["full_finetuning"],        # true for method full
    use_gradient_checkpointing=load["use_gradient_checkpointing"],  # "unsloth": offloaded checkpointing
    revision=load["revision"],
    trust_remote_code=load["trust_remote_code"],
    use_exact_model_name=load["use_exact_model_name"],  # load this exact model, not an unsloth/ pre-quantized copy
)

# ---- 2. Full fine-tuning: no adapters; the optimizer updates every weight of the model

# ---- 3. Data: the normalized JSONL llfarm wrote, rendered with the strategy's chat template
template = load_template(cfg["template"])
tokenizer = tokenizer_for_template(tokenizer, template)  # the template's chat_template, end-of-turn as eos
data = cfg["data"]
train_rows = read_jsonl(data["train"])
eval_rows = read_jsonl(data["eval"]) if data["eval"] else []
# Token ids plus a completion mask: the loss is on the final assistant answer only.
train, dropped = tokenize_sft(train_rows, template, tokenizer, data["max_length"])
if not train:
    sys.exit(f"llfarm: every training example's prompt is longer than data.max_length={data['max_length']}")
if dropped:
    print(f"llfarm: dropped {dropped} examples whose prompt fills data.max_length={data['max_length']}")
train_dataset = Dataset.from_list(train)
eval_dataset = Dataset.from_list(tokenize_sft(eval_rows, template, tokenizer, data["max_length"])[0]) \
    if eval_rows else None

# ---- 4. Train with TRL's SFTTrainer
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    args=SFTConfig(**args, **cfg["sft"]),           # training_args + max_length, completion_only_loss
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    callbacks=[trainer_callback(out["metrics"])],   # metrics.jsonl in llfarm's format
)
result = trainer.train(resume_from_checkpoint=cfg["resume_from"])

# ---- 5. Save the full model with the template's tokenizer (loadable by transformers)
if getattr(model, "generation_config", None) is not None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # stop at the template's end of turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id
model.save_pretrained(out["save_to"])
tokenizer.save_pretrained(out["save_to"])

final = {"global_step": trainer.state.global_step, "train_runtime": result.metrics.get("train_runtime"),
         "num_input_tokens_seen": trainer.state.num_input_tokens_seen, "unsloth_version": unsloth.__version__}
Path(out["final_metrics"]).write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
print(f"llfarm: saved {out['save_to']}")
