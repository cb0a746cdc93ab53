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

import yaml

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
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StrategyError([f"malformed template YAML: {exc}".splitlines()[0]], where=str(path)) from None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        raise StrategyError([f"a template needs the keys {', '.join(REQUIRED)}"], where=str(path),
                            hint="copy one from templates/ (chatml.yaml) and edit it")
    return ChatTemplate(
        name=str(data["name"]), jinja=str(data["jinja"]), description=str(data.get("description", "")),
        eos=data.get("eos"), ollama=data.get("ollama"), ollama_stop=tuple(data.get("ollama_stop") or ()),
        path=path.resolve(),
    )
