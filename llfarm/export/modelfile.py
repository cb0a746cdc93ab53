"""The Ollama Modelfile written beside the GGUF: FROM (+ ADAPTER), TEMPLATE and stops (the run's chat template),
SYSTEM."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError
from ..templates import ChatTemplate

EOS_PLACEHOLDER = "{{ eos_token }}"  # in a template's `ollama:` field; replaced by the model's EOS text
OLLAMA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9._-]+)?")


@dataclass(frozen=True)
class OllamaTemplate:
    """What the Modelfile says about prompting: the Go TEMPLATE and its stop strings."""

    text: str
    stops: tuple[str, ...]
    notes: tuple[str, ...] = ()  # written as comments (e.g. the jinja trims message text)


def ollama_template(template: ChatTemplate, eos_token: str | None) -> str:
    """The Go TEMPLATE for Ollama, with the model's EOS text put where the template asks for it."""
    if template.ollama is None:
        raise ExportError(f"template '{template.name}' has no Ollama form, so a Modelfile would not match training",
                          where="template", hint="export --format merged or gguf, or --no-template, or train with "
                                                 "chatml/llama3/alpaca")
    text = template.ollama
    if EOS_PLACEHOLDER in text:
        if not eos_token:
            raise ExportError(f"template '{template.name}' needs the tokenizer's eos_token, which is not set",
                              where="tokenizer_config.json", hint="set eos_token on the tokenizer")
        text = text.replace(EOS_PLACEHOLDER, eos_token)
    return text


def named_template(template: ChatTemplate, eos_token: str | None) -> OllamaTemplate:
    return OllamaTemplate(ollama_template(template, eos_token), tuple(template.ollama_stop))


def quote(value: str, what: str) -> str:
    """A Modelfile string: "..." on one line, \"\"\"...\"\"\" otherwise (Ollama's parser has no escapes)."""
    if '"""' in value:
        raise ExportError(f"the {what} contains '\"\"\"', which a Modelfile cannot quote", where="Modelfile")
    if "\n" in value or '"' in value:
        return f'"""{value}"""'
    return f'"{value}"'


def from_line(base: str) -> str:
    """FROM for an existing base: a GGUF path (made absolute) or an Ollama model name."""
    path = Path(base).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise ExportError(f"{base} is not a GGUF file", where="--ollama-base",
                              hint="give a base GGUF file or the name of an Ollama model")
        return str(path.resolve())
    if not OLLAMA_NAME.fullmatch(base):
        raise ExportError(f"'{base}' is neither a GGUF file nor an Ollama model name", where="--ollama-base",
                          hint="e.g. --ollama-base llama3.2:1b or --ollama-base ./base-f16.gguf")
    return base


def render_modelfile(source: str, *, template: OllamaTemplate | None, system: str | None, model_name: str,
                     adapter: str | None = None) -> str:
    """``source``: what FROM names (``./x.gguf`` beside the Modelfile, a path, or an Ollama model);
    ``adapter``: a GGUF LoRA beside the Modelfile; ``template`` None writes no TEMPLATE (--no-template)."""
    lines = [f"# Written by llfarm export. Create the model with: ollama create {model_name} -f Modelfile"]
    if template is None:
        lines.append("# No TEMPLATE (--no-template): Ollama uses the chat template stored in the GGUF, if any.")
    else:
        lines += [f"# Note: {note}" for note in template.notes]
    lines.append(f"FROM {source}")
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter}")
    if template is not None:
        lines.append(f"TEMPLATE {quote(template.text, 'TEMPLATE')}")
        lines += [f"PARAMETER stop {quote(stop, 'stop string')}" for stop in template.stops]
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
