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


def tokenize_sft(rows: list[dict[str, Any]], template: ChatTemplate, tokenizer, max_length: int
                 ) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids with a completion mask; returns (examples, number dropped because the prompt filled max_length)."""
    out, dropped = [], 0
    for row in rows:
        prompt, completion = split_sft(template, row["messages"], tokenizer)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = (p + c)[:max_length]
        mask = ([0] * len(p) + [1] * len(c))[:max_length]
        if sum(mask) == 0:
            dropped += 1
            continue
        out.append({"input_ids": ids, "completion_mask": mask})
    return out, dropped


def render_preference(rows: list[dict[str, Any]], template: ChatTemplate, tokenizer) -> list[dict[str, str]]:
    """prompt/chosen/rejected strings for TRL's DPOTrainer (which appends eos to each answer)."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    return [{"prompt": template.render(r["prompt"], add_generation_prompt=True, bos_token=bos, eos_token=eos),
             "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def tokenize_pairs(rows: list[dict[str, Any]], template: ChatTemplate, tokenizer, max_length: int
                   ) -> list[dict[str, list[int]]]:
    """chosen/rejected token ids (prompt + answer + end of turn) for TRL's RewardTrainer."""
    out = []
    for r in rows:
        pair = {}
        for k in ("chosen", "rejected"):
            msgs = [*r["prompt"], {"role": "assistant", "content": r[k]}]
            text = template.render(msgs, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
            pair[f"{k}_input_ids"] = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        out.append(pair)
    return out


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
