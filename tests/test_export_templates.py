"""Each shipped Ollama TEMPLATE renders, the way Ollama runs it, exactly the text the jinja chat template renders
for training and generation: same markup, whitespace, trailing newlines and system handling."""

from __future__ import annotations

import pytest
from export_helpers import go_render, ollama_prompt

from llfarm.errors import ExportError
from llfarm.export.modelfile import ollama_template
from llfarm.templates import load_template, shipped_templates

EOS, BOS = "</s>", "<s>"
WITH_OLLAMA = [n for n in shipped_templates() if load_template(n).ollama is not None]

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is 2+2?"}],
    "system and user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "multi turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Name a colour."}],
    "system, multi turn, awkward whitespace": [
        {"role": "system", "content": "  You answer\nin two lines. "},
        {"role": "user", "content": "\nfirst line\n\nsecond line  "},
        {"role": "assistant", "content": " one\ntwo\n"},
        {"role": "user", "content": "again"}],
}


def expected(name: str, messages: list[dict[str, str]]) -> str:
    """The training/generation text, minus a leading BOS: llama.cpp adds BOS from the GGUF, not the TEMPLATE."""
    text = load_template(name).render(messages, add_generation_prompt=True, bos_token=BOS, eos_token=EOS)
    return text.removeprefix(BOS)


def test_shipped_templates_with_an_ollama_form():
    assert set(WITH_OLLAMA) == {"chatml", "llama3", "alpaca"}
    assert load_template("plain").ollama is None


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", WITH_OLLAMA)
def test_ollama_template_renders_like_jinja(name, conversation):
    messages = CONVERSATIONS[conversation]
    go = ollama_template(load_template(name), EOS)
    assert ollama_prompt(go, messages, None) == expected(name, messages)


@pytest.mark.parametrize("name", WITH_OLLAMA)
def test_modelfile_system_is_rendered_like_a_system_message(name):
    """SYSTEM in the Modelfile reaches the template as a leading role=system message (and as .System)."""
    go = ollama_template(load_template(name), EOS)
    for conversation in ("one user turn", "multi turn"):
        messages = CONVERSATIONS[conversation]
        with_system = [{"role": "system", "content": "You are terse."}, *messages]
        assert ollama_prompt(go, messages, "You are terse.") == expected(name, with_system)
        # a request that brings its own system message overrides the Modelfile's
        own = [{"role": "system", "content": "Mine."}, *messages]
        assert ollama_prompt(go, own, "You are terse.") == expected(name, own)


def test_alpaca_past_answers_end_with_the_models_eos():
    tpl = load_template("alpaca")
    text = ollama_template(tpl, "<|endoftext|>")
    assert "{{ eos_token }}" not in text
    messages = CONVERSATIONS["multi turn"]
    rendered = ollama_prompt(text, messages, None)
    assert "Hello!<|endoftext|>\n\n### Instruction:" in rendered
    assert rendered == tpl.render(messages, add_generation_prompt=True, eos_token="<|endoftext|>")


def test_template_without_ollama_form_is_refused():
    with pytest.raises(ExportError, match="no Ollama form"):
        ollama_template(load_template("plain"), EOS)


def test_go_interpreter_trims_like_go():
    """The reference interpreter itself: {{- and -}} trim all adjacent whitespace, else/else-if/range work."""
    tpl = 'a  \n{{- if .X }} yes {{- else if eq .Y "b" }}B{{ else }}no{{ end -}}\n  z{{ range .L }}[{{ . }}]{{ end }}'
    assert go_render(tpl, {"X": "", "Y": "b", "L": [1, 2]}) == "aBz[1][2]"
    assert go_render(tpl, {"X": "1", "Y": "", "L": []}) == "a yesz"
    assert go_render(tpl, {"X": "", "Y": "c", "L": []}) == "anoz"
