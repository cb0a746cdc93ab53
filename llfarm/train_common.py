"""Training pieces shared by every trainer process (llfarm.trainer, and LlamaFactory's entry for the tokenizer).

Rendering uses the strategy's template (templates/), so training, generation and export agree on the text.
Loss is on the answer only: SFT examples become token ids plus a completion mask (the final assistant turn).
"""

from __future__ import annotations

from typing import Any

from .templates import ChatTemplate


def tokenizer_for_template(tokenizer, template: ChatTemplate):
    """Give the tokenizer the template's chat_template and, when it is one token, its end-of-turn as eos."""
    tokenizer.chat_template = template.jinja
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if template.eos and template.eos in tokenizer.get_vocab():
        tokenizer.eos_token = template.eos
    return tokenizer


def split_sft(template: ChatTemplate, messages: list[dict[str, str]], tokenizer) -> tuple[str, str]:
    """(prompt text, completion text): everything up to the last assistant turn, and that turn."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    full = template.render(messages, bos_token=bos, eos_token=eos)
    prompt = template.render(messages[:-1], add_generation_prompt=True, bos_token=bos, eos_token=eos)
    if not full.startswith(prompt):
        # Templates whose generation prompt is part of the user turn (alpaca) render identically here;
        # anything else means the template cannot be split safely.
        raise ValueError(f"template {template.name!r} does not render the prompt as a prefix of the conversation")
    return prompt, full[len(prompt):]


def tokenize_sft_batch(batch: dict[str, list], template: ChatTemplate, tokenizer, max_length: int
                       ) -> dict[str, list[list[int]]]:
    """``datasets.map(batched=True)``: messages → input_ids + completion_mask (1 on the final answer's tokens),
    truncated to max_length. One tokenizer call per batch: the same ids as one call per example."""
    prompts, completions = [], []
    for messages in batch["messages"]:
        prompt, completion = split_sft(template, messages, tokenizer)
        prompts.append(prompt)
        completions.append(completion)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    ids, masks = [], []
    for p, c in zip(p_ids, c_ids, strict=True):
        ids.append((p + c)[:max_length])
        masks.append(([0] * len(p) + [1] * len(c))[:max_length])
    return {"input_ids": ids, "completion_mask": masks}


def render_preference_batch(batch: dict[str, list], template: ChatTemplate, tokenizer, max_length: int = 0
                            ) -> dict[str, list[str]]:
    """prompt/chosen/rejected strings for TRL's DPOTrainer (which tokenizes them and appends eos to each answer)."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    return {"prompt": [template.render(p, add_generation_prompt=True, bos_token=bos, eos_token=eos)
                       for p in batch["prompt"]],
            "chosen": list(batch["chosen"]), "rejected": list(batch["rejected"])}


def render_turns_batch(batch: dict[str, list], template: ChatTemplate, tokenizer, max_length: int = 0
                       ) -> dict[str, list[str]]:
    """ORPO/SimPO: the prompt rendered up to the answer and each answer as the template renders the assistant turn
    (its end of turn included, e.g. ``Paris.<|im_end|>\\n``): the text SFT and LlamaFactory train on. The trainer
    tokenizes them apart and adds nothing (``llfarm.trainer.template_tokenized``)."""
    prompts, chosen, rejected = [], [], []
    for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True):
        prompt, answer = split_sft(template, [*p, {"role": "assistant", "content": c}], tokenizer)
        prompts.append(prompt)
        chosen.append(answer)
        rejected.append(split_sft(template, [*p, {"role": "assistant", "content": r}], tokenizer)[1])
    return {"prompt": prompts, "chosen": chosen, "rejected": rejected}


def tokenize_pairs_batch(batch: dict[str, list], template: ChatTemplate, tokenizer, max_length: int
                         ) -> dict[str, list[list[int]]]:
    """chosen/rejected token ids (prompt + answer + end of turn) for TRL's RewardTrainer."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    out: dict[str, list[list[int]]] = {}
    for k in ("chosen", "rejected"):
        texts = [template.render([*p, {"role": "assistant", "content": a}], bos_token=bos, eos_token=eos)
                 for p, a in zip(batch["prompt"], batch[k], strict=True)]
        out[f"{k}_input_ids"] = [ids[:max_length] for ids in
                                 tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return out


def tokenize_text_batch(batch: dict[str, list], template: ChatTemplate, tokenizer, max_length: int
                        ) -> dict[str, list[list[int]]]:
    """Continued pretraining: each document's tokens and the eos, every one trained on (no template, no mask)."""
    ids = tokenizer(list(batch["text"]), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return {"input_ids": [(x + eos)[:max_length] for x in ids]}


def render_kto_batch(batch: dict[str, list], template: ChatTemplate, tokenizer, max_length: int = 0
                     ) -> dict[str, list]:
    """prompt (rendered up to the answer) / completion / label for TRL's KTOTrainer."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    return {"prompt": [template.render(p, add_generation_prompt=True, bos_token=bos, eos_token=eos)
                       for p in batch["prompt"]],
            "completion": list(batch["completion"]), "label": list(batch["label"])}


def render_prompts_batch(batch: dict[str, list], template: ChatTemplate, tokenizer, max_length: int = 0
                         ) -> dict[str, list[str]]:
    """GRPO: the prompt rendered up to the answer, and the reference answer (for reward functions)."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    return {"prompt": [template.render(m[:-1], add_generation_prompt=True, bos_token=bos, eos_token=eos)
                       for m in batch["messages"]],
            "answer": [m[-1]["content"] for m in batch["messages"]]}


def tokenize_prompts_batch(batch: dict[str, list], template: ChatTemplate, tokenizer, max_length: int
                           ) -> dict[str, list[list[int]]]:
    """PPO: the prompt's token ids (the policy generates the rest)."""
    prompts = render_prompts_batch(batch, template, tokenizer)["prompt"]
    return {"input_ids": [x[-max_length:] for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]}


BATCH_FUNCTIONS = {"sft": tokenize_sft_batch, "pt": tokenize_text_batch, "dpo": render_preference_batch,
                   "orpo": render_turns_batch, "simpo": render_turns_batch, "kto": render_kto_batch,
                   "rm": tokenize_pairs_batch, "grpo": render_prompts_batch, "ppo": tokenize_prompts_batch}


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}


def tokenize_sft(rows: list[dict[str, Any]], template: ChatTemplate, tokenizer, max_length: int
                 ) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids with a completion mask; returns (examples, number dropped because the prompt filled max_length)."""
    if not rows:
        return [], 0
    b = tokenize_sft_batch(_columns(rows), template, tokenizer, max_length)
    out = [{"input_ids": i, "completion_mask": m} for i, m in zip(b["input_ids"], b["completion_mask"], strict=True)
           if any(m)]
    return out, len(rows) - len(out)


def tokenize_pairs(rows: list[dict[str, Any]], template: ChatTemplate, tokenizer, max_length: int
                   ) -> list[dict[str, list[int]]]:
    if not rows:
        return []
    b = tokenize_pairs_batch(_columns(rows), template, tokenizer, max_length)
    return [dict(zip(b, v, strict=True)) for v in zip(*b.values(), strict=True)]


def freeze_all_but_last(model, n_layers: int) -> list[str]:
    """freeze: train only the last ``n_layers`` decoder layers (and nothing else). Returns trained names."""
    import re
    n_total = model.config.num_hidden_layers
    keep = {str(i) for i in range(max(n_total - n_layers, 0), n_total)}
    trained = []
    for name, param in model.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.", name)
        param.requires_grad = bool(m and m.group(1) in keep)
        if param.requires_grad:
            trained.append(name)
    return trained
