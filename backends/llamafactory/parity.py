"""Template parity: which LlamaFactory template trains on exactly the text llfarm's template renders.

LlamaFactory keeps its own template registry. Instead of a name map, the backend renders a few sample
conversations with the strategy's template and with LlamaFactory's templates (simulated from ``keys.json``, no
import) and picks the one that gives the same prompt and the same answer (the tokens with a loss) — the
same-named template first. Only the conversation shapes the data holds are compared (a system message,
several turns), so a template that differs only for shapes the data lacks is accepted for that data.
"""

from __future__ import annotations

from typing import Any

from llfarm.errors import UnsupportedError
from llfarm.resources import templates_dir

from .keys import known

BOS, EOS = "<s>", "</s>"     # stand-ins for the tokenizer's own bos/eos when rendering

SAMPLES = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
               {"role": "assistant", "content": "4."}],
    "multi-turn": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
}


def lf_render(spec: dict[str, Any], messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt, answer) as LlamaFactory's Template builds them for training, as text (default_system is ''
    because llfarm writes default_system: ''; the answer is the last assistant message, as with mask_history)."""
    eos = spec["stop_words"][0] if spec["replace_eos"] and spec["stop_words"] else EOS

    def fill(slots: list[Any], content: str, idx: str = "0") -> str:
        out = []
        for slot in slots:
            if isinstance(slot, str):
                out.append(slot.replace("{{content}}", content, 1).replace("{{idx}}", idx, 1))
            elif "special" in slot:     # LlamaFactory turns {"bos_token"}/{"eos_token"} into ids, others into nothing
                out.append({"bos_token": BOS, "eos_token": eos}.get(slot["special"], ""))
            else:
                out.append(slot["token"] or "")
        return "".join(out)

    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    body = messages[1:] if system or messages[0]["role"] == "system" else messages
    turns = []
    for i, msg in enumerate(body):
        text = ""
        if i == 0:
            text += fill(spec["prefix"], "")
            if system:
                text += fill(spec["system"], system)
        text += fill(spec["user"] if msg["role"] == "user" else spec["assistant"], msg["content"], str(i // 2))
        turns.append(text)
    answer = turns[-1] + (eos if spec["efficient_eos"] else "")
    return "".join(turns[:-1]), answer


def llfarm_render(template, messages: list[dict[str, str]]) -> tuple[str, str] | None:
    """(prompt, answer) as the other backends train on them; None when the template cannot be split."""
    eos = template.eos or EOS
    full = template.render(messages, bos_token=BOS, eos_token=eos)
    prompt = template.render(messages[:-1], add_generation_prompt=True, bos_token=BOS, eos_token=eos)
    return (prompt, full[len(prompt):]) if full.startswith(prompt) else None


def conversation_cases(data) -> list[str]:
    """Which sample conversations matter for this data: single always, system and multi-turn when the data has
    them (counted when the data was read)."""
    shapes = data.shapes
    return ["single", *(case for case in ("system", "multi-turn") if shapes.get(case))]


def lf_template_for(template, cases: list[str]) -> str:
    """The LlamaFactory template that renders the llfarm template's prompt and answer for these conversation
    shapes, or one clear error saying why none does."""
    shipped = template.path is None or template.path.parent == templates_dir()
    where = "template" if shipped else f"template ({template.path})"
    ours = {case: llfarm_render(template, SAMPLES[case]) for case in cases}
    if any(v is None for v in ours.values()):
        raise UnsupportedError(f"template '{template.name}' does not render a prompt as a prefix of the "
                               "conversation, so LlamaFactory cannot mask it", where=where, hint="--backend pytorch")
    specs = known()["templates"]
    simulated = {name: spec for name, spec in specs.items() if spec["class"] == "Template"}
    for name in sorted(simulated, key=lambda n: (n != template.name, n)):
        if all(lf_render(simulated[name], SAMPLES[case]) == ours[case] for case in cases):
            return name
    reason = "no LlamaFactory template renders the same text"
    if template.name in simulated:
        reason = difference(template, template.name, cases, ours) or reason
    raise UnsupportedError(f"template '{template.name}' has no LlamaFactory equivalent: {reason}", where=where,
                           hint="use a template LlamaFactory has (chatml, llama3, ...), or --backend pytorch")


def difference(template, lf_name: str, cases: list[str], ours: dict[str, tuple[str, str] | None]) -> str | None:
    """How LlamaFactory's same-named template differs from llfarm's, for the first conversation shape that shows it."""
    spec = known()["templates"][lf_name]
    for case in cases:
        theirs = lf_render(spec, SAMPLES[case])
        mine = ours[case]
        if mine is not None and mine != theirs:
            what = "text" if "".join(mine) != "".join(theirs) else "answer (the tokens with a loss)"
            a, b = ("".join(mine), "".join(theirs)) if what == "text" else (mine[1], theirs[1])
            return (f"for a {case} conversation llfarm's '{template.name}' trains on the {what} {a!r}, "
                    f"LlamaFactory's '{lf_name}' on {b!r}")
    return None
