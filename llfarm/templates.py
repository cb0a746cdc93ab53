"""Chat templates: one definition per name in ``templates/``, shared by training, generation and export.

A template YAML holds the Hugging Face chat template (jinja), the Ollama TEMPLATE (Go syntax, or null when
there is no faithful Ollama form) and the end-of-turn marker. Backends with a template registry of their own find
their equivalent by rendering, not by name. ``template:`` in a strategy is a shipped name or a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import StrategyError, did_you_mean, one_of
from .resources import templates_dir

REQUIRED = ("name", "jinja")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    description: str = ""
    eos: str | None = None
    ollama: str | None = None
    ollama_stop: tuple[str, ...] = ()
    path: Path | None = None

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
               bos_token: str = "", eos_token: str = "") -> str:
        """Render messages exactly as the tokenizer's chat template would (no torch needed)."""
        return _compile(self.jinja).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           bos_token=bos_token, eos_token=eos_token)


@lru_cache(maxsize=32)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    return env.from_string(source)


def shipped_templates() -> dict[str, Path]:
    return {p.stem: p for p in sorted(templates_dir().glob("*.yaml"))}


@lru_cache(maxsize=32)
def load_template(ref: str) -> ChatTemplate:
    """A template by shipped name or by path to a template YAML."""
    shipped = shipped_templates()
    path = shipped.get(ref)
    if path is None:
        candidate = Path(ref)
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            path = candidate
        else:
            raise StrategyError([f"unknown template '{ref}'{did_you_mean(ref, shipped)}"], where="template",
                                hint=f"shipped templates: {one_of(shipped)}; or give a template YAML path")
    from .yamlload import load, read_text
    data: Any = load(read_text(path), str(path))[0]
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        raise StrategyError([f"a template needs the keys {', '.join(REQUIRED)}"], where=str(path),
                            hint="copy one from templates/ (chatml.yaml) and edit it")
    bad = [k for k in ("name", "jinja", "description", "eos", "ollama") if data.get(k) is not None
           and not isinstance(data[k], str)]
    if bad or not isinstance(data.get("ollama_stop") or [], list):
        raise StrategyError([f"template key '{(bad or ['ollama_stop'])[0]}' must be "
                             f"{'text' if bad else 'a list of strings'}"], where=str(path),
                            hint="copy one from templates/ (chatml.yaml) and edit it")
    template = ChatTemplate(
        name=str(data["name"]), jinja=str(data["jinja"]), description=str(data.get("description", "")),
        eos=data.get("eos"), ollama=data.get("ollama"), ollama_stop=tuple(str(x) for x in data.get("ollama_stop") or ()),
        path=path.resolve(),
    )
    _check_syntax(template)
    return template


def _check_syntax(template: ChatTemplate) -> None:
    """A template whose jinja does not compile is refused where it is loaded (plan, validate and run alike)."""
    from jinja2 import TemplateSyntaxError
    try:
        _compile(template.jinja)
    except TemplateSyntaxError as exc:
        line = _jinja_line(template, exc.lineno)
        raise StrategyError([f"template '{template.name}': jinja syntax error: {exc.message}"],
                            where=f"{template.path}:{line}" if line else str(template.path),
                            hint="fix the jinja field (it is the Hugging Face chat template)") from None


def _jinja_line(template: ChatTemplate, lineno: int | None) -> int | None:
    """The template file's line of line ``lineno`` of its jinja field (a block scalar starts after 'jinja:')."""
    if template.path is None or not lineno:
        return None
    lines = template.path.read_text(encoding="utf-8", errors="replace").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("jinja:")), None)
    if start is None:
        return None
    first = start + 2 if lines[start].rstrip().endswith(("|", "|-", "|+", ">", ">-")) else start + 1
    return first + lineno - 1


def check_renders(template: ChatTemplate, rows: list[dict[str, Any]], *, bos: str = "", eos: str = "",
                  what: str = "data.train") -> None:
    """Render the first examples the way the training process will (llfarm.train_common), so a template that fails
    on this data — an undefined variable, raise_exception, a prompt that is not a prefix of the conversation — is
    refused before anything is written. ``rows`` are normalized records (messages, or prompt/chosen/rejected; plain
    text rows use no template)."""
    for i, row in enumerate(rows, 1):
        try:
            if "messages" in row:
                messages = row["messages"]
                full = template.render(messages, bos_token=bos, eos_token=eos)
                prompt = template.render(messages[:-1], add_generation_prompt=True, bos_token=bos, eos_token=eos)
                if not full.startswith(prompt):
                    raise ValueError("the prompt it renders (up to the answer) is not the start of the whole "
                                     "conversation it renders, so the answer cannot be told from the prompt")
            elif {"prompt", "chosen", "rejected"} <= set(row):
                template.render(row["prompt"], add_generation_prompt=True, bos_token=bos, eos_token=eos)
                for k in ("chosen", "rejected"):
                    template.render([*row["prompt"], {"role": "assistant", "content": row[k]}], bos_token=bos,
                                    eos_token=eos)
        except Exception as exc:  # noqa: BLE001 - jinja raises many kinds; each is the template's problem here
            msg = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise StrategyError([f"template '{template.name}' cannot render {what} example {i}: {msg}"],
                                where=str(template.path or "template"),
                                hint="fix the template's jinja (try it with `llfarm validate`), or use a shipped "
                                     "template (chatml, llama3, alpaca)") from None
