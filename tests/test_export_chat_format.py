"""The render-based recogniser of a model's own chat template (template: model): for every real chat template in
llama.cpp's assets, the Ollama TEMPLATE it returns renders — through an independent Go-template interpreter, the
way Ollama runs it — exactly the text the jinja renders; or it refuses with one line. Which templates are
recognised, and as what, is pinned, so a regression to "refuse everything" (or "accept anything") fails."""

from __future__ import annotations

import datetime as dt

import pytest
from export_helpers import go_render, ollama_prompt
from llamacpp_assets import SKIP_REASON, assets_dir, chat_templates

from llfarm.errors import ExportError
from llfarm.export.chat_format import ollama_form, render_jinja
from llfarm.templates import load_template

BOS, EOS = "<s>", "</s>"
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is 2+2?"}],
    "system and user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "multi turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Name a colour."}],
    "system, multi turn, newlines": [
        {"role": "system", "content": "You answer\nin two lines."},
        {"role": "user", "content": "first line\n\nsecond line"}, {"role": "assistant", "content": "one\ntwo"},
        {"role": "user", "content": "again"}],
    "seven messages": [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 3 + ["user"], "abcdefg")],
}
# Real templates and what they are recognised as: (family, where the system prompt goes). Everything not listed
# must be refused, with a reason.
EXPECTED = {
    "meta-llama-Llama-3.1-8B-Instruct": ("Llama 3", "own"), "meta-llama-Llama-3.2-3B-Instruct": ("Llama 3", "own"),
    "meta-llama-Llama-3.3-70B-Instruct": ("Llama 3", "own"), "Qwen-Qwen2.5-7B-Instruct": ("ChatML", "own"),
    "Qwen-Qwen3-0.6B": ("ChatML", "own"), "Qwen-QwQ-32B": ("ChatML", "own"), "Qwen3.5-4B": ("ChatML", "own"),
    "Qwen3-Coder": ("ChatML", "own"), "HuggingFaceTB-SmolLM3-3B": ("ChatML", "own"),
    "google-gemma-2-2b-it": ("Gemma", "none"), "microsoft-Phi-3.5-mini-instruct": ("Phi-3", "own"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("Mistral", "last_user"),
    "Mistral-Small-3.2-24B-Instruct-2506": ("Mistral", "own"), "unsloth-mistral-Devstral-Small-2507": ("Mistral", "own"),
    "mistralai-Ministral-3-14B-Reasoning-2512": ("Mistral", "own"),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("DeepSeek", "own"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("DeepSeek", "own"),
    "ibm-granite-granite-3.3-2B-Instruct": ("Granite", "own"), "ibm-granite-granite-4.0": ("Granite", "own"),
}
REFUSED = {  # tool-use variants that need a tools list; firefunction needs its `functions` variable
    "CohereForAI-c4ai-command-r-plus-tool_use", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "fireworks-ai-llama-3-firefunction-v2",
}
TODAY = dt.date(2026, 11, 22)

needs_assets = pytest.mark.skipif(assets_dir() is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def forms() -> dict[str, tuple[str, object]]:
    """template name → (jinja, OllamaForm or the ExportError), each recognised once."""
    out = {}
    for name, jinja in chat_templates().items():
        try:
            out[name] = (jinja, ollama_form(jinja, bos_token=BOS, eos_token=EOS, today=TODAY))
        except ExportError as exc:
            out[name] = (jinja, exc)
    return out


def expected_text(jinja: str, messages: list[dict[str, str]], adds_bos: bool) -> str:
    text = render_jinja(jinja, messages, bos_token=BOS, eos_token=EOS, today=TODAY)
    return text.removeprefix(BOS) if adds_bos else text


@needs_assets
def test_every_real_template_is_recognised_or_refused(forms):
    outcomes = {}
    for name, (_, form) in forms.items():
        if isinstance(form, ExportError):
            assert "\n" not in form.render() and form.where == "chat template", name
            outcomes[name] = None
        else:
            outcomes[name] = (form.family, form.system)
    assert len(outcomes) >= 60
    assert {n for n, o in outcomes.items() if o is None} == REFUSED
    for name, expected in EXPECTED.items():
        assert outcomes[name] == expected, name


@needs_assets
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_recognised_templates_render_like_their_jinja_in_ollama(forms, conversation):
    """Go TEMPLATE through the Go interpreter == jinja, for every recognised real template; and with the Modelfile's
    SYSTEM injected the way Ollama does, == jinja with a leading system message."""
    messages = CONVERSATIONS[conversation]
    checked = 0
    for name, (jinja, form) in forms.items():
        if isinstance(form, ExportError):
            continue
        has_system = any(m["role"] == "system" for m in messages)
        if has_system and form.system == "none":
            continue  # the jinja raises on a system message
        assert ollama_prompt(form.template, messages, None) == expected_text(jinja, messages, form.adds_bos), name
        if not has_system and form.system != "none":
            with_system = [{"role": "system", "content": "You are terse."}, *messages]
            assert ollama_prompt(form.template, messages, "You are terse.") == \
                expected_text(jinja, with_system, form.adds_bos), name
        checked += 1
    assert checked >= 60


@needs_assets
def test_recognised_stops_and_bos(forms):
    t = {name: jinja for name, (jinja, _) in forms.items()}
    llama = ollama_form(t["meta-llama-Llama-3.2-3B-Instruct"], bos_token="<|begin_of_text|>", eos_token=EOS,
                        today=TODAY)
    assert llama.adds_bos and llama.end_of_turn == "<|eot_id|>"
    assert set(llama.stops) == {"<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"}
    assert any("date" in n for n in llama.notes)  # "Today Date: ..." (strftime_now) is the export day's
    assert "Today Date: 22 Nov 2026" in ollama_prompt(llama.template, CONVERSATIONS["one user turn"], None)
    qwen = ollama_form(t["Qwen-Qwen2.5-7B-Instruct"], bos_token=None, eos_token="<|im_end|>")
    assert not qwen.adds_bos and set(qwen.stops) == {"<|im_start|>", "<|im_end|>"}
    # Qwen 2.5's default system prompt is there when the conversation brings none, and replaced by one
    assert "You are Qwen" in ollama_prompt(qwen.template, CONVERSATIONS["one user turn"], None)
    assert "You are Qwen" not in ollama_prompt(qwen.template, CONVERSATIONS["one user turn"], "Mine.")
    gemma = ollama_form(t["google-gemma-2-2b-it"], bos_token="<bos>", eos_token="<eos>")
    assert gemma.adds_bos and any("trims" in n for n in gemma.notes) and any("system" in n for n in gemma.notes)


@pytest.mark.parametrize("name, family", [("chatml", "ChatML"), ("llama3", "Llama 3")])
def test_shipped_templates_are_recognised_as_their_ollama_form(name, family):
    """No assets needed: llfarm's own chatml/llama3 jinja is recognised, and renders like its hand-written form."""
    tpl = load_template(name)
    form = ollama_form(tpl.jinja, bos_token="<|begin_of_text|>", eos_token=EOS)
    assert form.family == family and form.adds_bos == (name == "llama3")
    assert set(form.stops) == set(tpl.ollama_stop)
    for messages in CONVERSATIONS.values():
        assert ollama_prompt(form.template, messages, None) == ollama_prompt(tpl.ollama, messages, None)


@pytest.mark.parametrize("jinja, reason", [
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "rewrites message text"),
    (("{% for m in messages %}{% if loop.index is even %}<a>{% else %}<b>{% endif %}{{ m['content'] }}{% endfor %}"
      "{% if add_generation_prompt %}<b>{% endif %}"), "not one llfarm can write"),
    ("{{ raise_exception('no') }}", "fails on a plain user/assistant conversation"),
    ("{% for m in messages|reverse %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", "not one llfarm can write"),
])
def test_unrecognisable_templates_are_refused_with_a_reason(jinja, reason):
    with pytest.raises(ExportError, match=reason) as exc:
        ollama_form(jinja, bos_token=BOS, eos_token=EOS)
    assert "--no-template" in exc.value.hint


def test_go_interpreter_variables_len_slice():
    """The reference interpreter itself: range with $i, variable declaration/assignment, len/slice, and/or."""
    tpl = ('{{ $first := true }}{{ range $i, $m := .L }}{{ if and $first $.S }}[{{ $.S }}]{{ end }}{{ $first = false }}'
           '{{ if eq (len (slice $.L $i)) 1 }}last:{{ end }}{{ $m }};{{ end }}')
    assert go_render(tpl, {"L": ["a", "b", "c"], "S": "s"}) == "[s]a;b;last:c;"
    assert go_render(tpl, {"L": ["a"], "S": ""}) == "last:a;"
