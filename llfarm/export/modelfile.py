"""The Ollama Modelfile written beside the GGUF: FROM, TEMPLATE (the run's chat template), stops, SYSTEM."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from ..errors import ExportError
from ..templates import ChatTemplate

EOS_PLACEHOLDER = "{{ eos_token }}"  # in a template's `ollama:` field; replaced by the model's EOS text


def ollama_template(template: ChatTemplate, eos_token: str | None) -> str:
    """The Go TEMPLATE for Ollama, with the model's EOS text put where the template asks for it."""
    if template.ollama is None:
        raise ExportError(f"template '{template.name}' has no Ollama form, so a Modelfile would not match training",
                          where="template", hint="export --format merged or gguf, or train with chatml/llama3/alpaca")
    text = template.ollama
    if EOS_PLACEHOLDER in text:
        if not eos_token:
            raise ExportError(f"template '{template.name}' needs the tokenizer's eos_token, which is not set",
                              where="tokenizer_config.json", hint="set eos_token on the tokenizer")
        text = text.replace(EOS_PLACEHOLDER, eos_token)
    return text


def quote(value: str, what: str) -> str:
    """A Modelfile string: "..." on one line, \"\"\"...\"\"\" otherwise (Ollama's parser has no escapes)."""
    if '"""' in value:
        raise ExportError(f"the {what} contains '\"\"\"', which a Modelfile cannot quote", where="Modelfile")
    if "\n" in value or '"' in value:
        return f'"""{value}"""'
    return f'"{value}"'


def render_modelfile(gguf_name: str, template: ChatTemplate, *, eos_token: str | None, system: str | None,
                     model_name: str) -> str:
    lines = [f"# Written by llfarm export. Create the model with: ollama create {model_name} -f Modelfile",
             f"FROM ./{gguf_name}",
             f"TEMPLATE {quote(ollama_template(template, eos_token), 'TEMPLATE')}"]
    lines += [f"PARAMETER stop {quote(stop, 'stop string')}" for stop in template.ollama_stop]
    if system:
        lines.append(f"SYSTEM {quote(system, 'system prompt')}")
    return "\n".join(lines) + "\n"


def model_name(name: str) -> str:
    """A name Ollama accepts and files can carry: lower case; anything but letters, digits, ``.``, ``_``, ``-``
    becomes ``-``."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", str(name).lower()).strip("-.")
    if not slug:
        raise ExportError(f"'{name}' gives an empty model name", where="--name", hint="use letters, digits, . _ -")
    return slug


def ollama_create_command(modelfile: Path, name: str) -> str:
    """The shell command that registers an exported model with Ollama (``name`` made valid by model_name)."""
    return f"ollama create {model_name(name)} -f {shlex.quote(str(modelfile))}"
