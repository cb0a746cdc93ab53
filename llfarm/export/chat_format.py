"""Recognise a model's own jinja chat template by rendering it, and write the Ollama TEMPLATE that renders the
same text.

    form = ollama_form(jinja, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    form.template, form.stops, form.adds_bos, form.family

The shapes llfarm knows are "turns": each message wrapped in role markers (ChatML/Qwen, Llama 3.x, Gemma,
Phi-3, Mistral's [INST], Granite, DeepSeek, ...), a system message either as its own turn or merged into the first
or last user message (with the separator the template uses), an optional default system block when the
conversation has none, and the generation prompt. The markers are found by rendering probe conversations with
sentinel contents, not by the template's name; a candidate is accepted only when it renders every probe
conversation exactly as the jinja does (BOS excepted: llama.cpp adds it from the GGUF's add_bos_token). Anything
else raises ExportError with the reason.

The jinja runs in the environment transformers' apply_chat_template uses (trim_blocks, lstrip_blocks, loop
controls, ``raise_exception``, ``strftime_now`` at today's date, ``tojson``, ``{% generation %}``).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import ExportError

SYS, U1, U2, U3, A1, A2 = ("SYSTEM probe: be terse.", "USER one says hi", "USER two asks\nover two lines",
                           "USER three", "ASSISTANT one replies", "ASSISTANT two\nreplies")
HINT = "export with --no-template (Ollama then guesses from the GGUF's own template), or train with a named template"
SPECIAL_PIECE = re.compile(r"<\|[^|<>\s]+\|>|<\uff5c[^<>]+\uff5c>|<[A-Za-z_/][\w.-]*>|\[/?[A-Z_]+\]")


class TemplateError(Exception):
    """The jinja failed to render a probe (raise_exception, a missing variable...)."""


@dataclass(frozen=True)
class Shape:
    bos: str
    default: str  # emitted when there is no system message
    system: str  # own | first_user | last_user | none
    bs: str
    es: str
    sep: str
    bu: str
    eu: str
    ba: str
    ea: str
    gen: str

    def render(self, messages: list[dict[str, str]]) -> str:
        """Exactly what :meth:`go_template` renders in Ollama (without BOS)."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        out = [self.default] if not system or self.system == "none" else []
        first = True
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "system" and self.system == "own":
                out.append(self.bs + content + self.es)
            elif role == "user":
                merged = system and ((self.system == "first_user" and first) or
                                     (self.system == "last_user" and i == len(messages) - 1))
                out.append(self.bu + (system + self.sep if merged else "") + content + self.eu)
                first = False
            elif role == "assistant":
                out.append(self.ba + content + self.ea)
        return "".join(out) + self.gen

    def go_template(self) -> str:
        parts = []
        if self.default and self.system == "none":
            parts.append(self.default)
        elif self.default:
            parts.append("{{ if not .System }}" + self.default + "{{ end }}")
        if self.system == "first_user":
            parts.append("{{ $first := true }}")
        parts.append("{{ range $i, $m := .Messages }}")
        if self.system == "own":
            parts.append('{{ if eq .Role "system" }}' + self.bs + "{{ .Content }}" + self.es + "{{ else ")
        else:
            parts.append("{{ ")
        parts.append('if eq .Role "user" }}' + self.bu)
        if self.system == "first_user":
            parts.append("{{ if and $first $.System }}{{ $.System }}" + self.sep + "{{ end }}{{ $first = false }}")
        elif self.system == "last_user":
            parts.append("{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}" + self.sep +
                         "{{ end }}")
        parts.append("{{ .Content }}" + self.eu + '{{ else if eq .Role "assistant" }}' + self.ba + "{{ .Content }}" +
                     self.ea + "{{ end }}{{ end }}" + self.gen)
        return "".join(parts)


@dataclass(frozen=True)
class OllamaForm:
    family: str
    template: str  # Go template for the Modelfile's TEMPLATE
    stops: tuple[str, ...]
    adds_bos: bool  # the jinja starts with BOS: the GGUF must set add_bos_token
    system: str  # how the system prompt is placed: own | first_user | last_user | none
    end_of_turn: str | None  # the special piece that ends an answer (for tokenizer.ggml.eot_token_id)
    notes: tuple[str, ...] = field(default_factory=tuple)
    shape: Shape | None = None


# ---- rendering the jinja as transformers does ----------------------------------------------------------------------

@lru_cache(maxsize=256)
def _compile(source: str):
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError as JinjaError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} marks assistant text; it renders its body
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise JinjaError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render_jinja(jinja: str, messages: list[dict[str, str]], *, bos_token: str = "", eos_token: str = "",
                 add_generation_prompt: bool = True, today: _dt.date | None = None) -> str:
    """The text transformers' apply_chat_template renders (tokenize=False)."""
    day = today or _dt.date.today()
    try:
        template = _compile(jinja)
        return template.render(messages=messages, tools=None, documents=None, bos_token=bos_token,
                               eos_token=eos_token, add_generation_prompt=add_generation_prompt,
                               strftime_now=lambda fmt: _dt.datetime.combine(day, _dt.time()).strftime(fmt))
    except Exception as exc:  # noqa: BLE001 - any jinja failure means "this conversation does not render"
        raise TemplateError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


# ---- recognition --------------------------------------------------------------------------------------------------

def _msgs(*items: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in items]


PROBES = [
    _msgs(("user", U1)),
    _msgs(("user", U1), ("assistant", A1), ("user", U2)),
    _msgs(("user", U1), ("assistant", A1), ("user", U2), ("assistant", A2), ("user", U3)),
]
SYSTEM_PROBES = [
    _msgs(("system", SYS), ("user", U1)),
    _msgs(("system", SYS), ("user", U1), ("assistant", A1), ("user", U2)),
    _msgs(("system", SYS), ("user", U1), ("assistant", A1), ("user", U2), ("assistant", A2), ("user", U3)),
]


def _between(text: str, a: str, b: str) -> str:
    i = text.index(a) + len(a)
    return text[i:text.index(b, i)]


def _inside_pieces(text: str) -> set[int]:
    """Positions that fall inside a special piece (<|eot_id|>, [INST] ...) of ``text``: no marker splits there."""
    return {i for m in SPECIAL_PIECE.finditer(text) for i in range(m.start() + 1, m.end())}


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def ollama_form(jinja: str, *, bos_token: str | None = None, eos_token: str | None = None,
                today: _dt.date | None = None) -> OllamaForm:
    """The Ollama TEMPLATE and stops for ``jinja``, or ExportError with the reason llfarm cannot give one."""
    bos, eos = bos_token or "", eos_token or ""

    def render(messages: list[dict[str, str]]) -> str:
        return render_jinja(jinja, messages, bos_token=bos, eos_token=eos, today=today)

    try:
        plain = [render(m) for m in PROBES]
    except TemplateError as exc:
        raise ExportError(f"the model's chat template fails on a plain user/assistant conversation ({exc})",
                          where="chat template", hint=HINT) from None
    for text, probe in zip(plain, PROBES):
        missing = [m["content"] for m in probe if m["content"] not in text]
        if missing:
            raise ExportError(f"the model's chat template drops or rewrites message text ({missing[0]!r} is not in "
                              "its output), which an Ollama TEMPLATE cannot reproduce", where="chat template",
                              hint=HINT)
    adds_bos = bool(bos) and all(t.startswith(bos) for t in plain)
    body = [t[len(bos):] if adds_bos else t for t in plain]
    try:
        with_system = [render(m) for m in SYSTEM_PROBES]
    except TemplateError:
        with_system = None  # the template refuses a system message (Gemma 2, Mistral v0.1 ...)
    if with_system is not None and adds_bos:
        with_system = [t.removeprefix(bos) for t in with_system]
    shape = _find_shape(body, with_system, bos if adds_bos else "")
    if shape is None:
        raise ExportError("the model's chat template is not one llfarm can write as an Ollama TEMPLATE (not a "
                          "turn-per-message shape with fixed role markers)", where="chat template", hint=HINT)
    notes = []
    padded = _msgs(("user", "  " + U1 + "\n"), ("assistant", "\n" + A1 + " "), ("user", U2 + "\n\n"))
    try:
        if render(padded).removeprefix(bos if adds_bos else "") != shape.render(padded):
            notes.append("the jinja trims message text; Ollama passes it as sent, so send messages without "
                         "leading/trailing whitespace")
    except TemplateError:
        pass
    if with_system is None:
        notes.append("the template has no system role: a SYSTEM prompt is dropped")
    if render(PROBES[0]) != render_jinja(jinja, PROBES[0], bos_token=bos, eos_token=eos, today=_dt.date(2001, 2, 3)):
        notes.append(f"the template writes today's date; the TEMPLATE keeps the export day's "
                     f"({(today or _dt.date.today()).isoformat()})")
    return OllamaForm(family=_family(shape), template=shape.go_template(), stops=_stops(shape), adds_bos=adds_bos,
                      system=shape.system, end_of_turn=_end_of_turn(shape), notes=tuple(notes), shape=shape)


def _find_shape(body: list[str], with_system: list[str] | None, bos: str) -> Shape | None:
    r1, r2 = body[0], body[1]
    head, tail = r1[:r1.index(U1)], r1[r1.index(U1) + len(U1):]
    try:  # the contents must come in conversation order
        mid1, mid2 = _between(r2, U1, A1), _between(r2, A1, U2)
    except ValueError:
        return None
    if r2[r2.index(U2) + len(U2):] != tail:
        return None
    candidates = []
    inside = {text: _inside_pieces(text) for text in (head, mid2, tail, mid1)}
    for nb in range(min(_common_suffix(head, mid2), len(head)), -1, -1):
        for ne in range(min(_common_prefix(tail, mid1), len(tail)), -1, -1):
            bu, eu = head[len(head) - nb:], tail[:ne]
            ea, gen, ba = mid2[:len(mid2) - nb], tail[ne:], mid1[ne:]
            # prefer: markers split at special-piece boundaries, an answer that ends with a marker, symmetric ends
            cuts = ((len(head) - nb) in inside[head]) + ((len(mid2) - nb) in inside[mid2]) + (ne in inside[tail]) + \
                (ne in inside[mid1])
            cost = 4 * cuts + 2 * (ea == "") + (ea != eu) + (gen != ba)
            candidates.append((cost, -nb, -ne, Shape("", head[:len(head) - nb], "none", "", "", "", bu, eu, ba, ea,
                                                    gen)))
    candidates.sort(key=lambda c: c[:3])
    for *_, shape in candidates:
        if any(shape.render(p) != t for p, t in zip(PROBES, body)):
            continue
        if with_system is None:
            return shape
        for system_shape in _system_variants(shape, with_system[0]):
            if all(system_shape.render(p) == t for p, t in zip(SYSTEM_PROBES, with_system)) and \
                    all(system_shape.render(p) == t for p, t in zip(PROBES, body)):
                return system_shape
    return None


def _system_variants(shape: Shape, r3: str) -> list[Shape]:
    """Ways the system probe can sit in ``r3``: its own turn (bs … es before the first user turn), or merged
    into the first or the last user message with a separator."""
    if SYS not in r3:
        return [shape]  # ignored: the Go template ignores it too
    before, after = r3[:r3.index(SYS)], r3[r3.index(SYS) + len(SYS):]
    out = []
    if U1 in after:
        between = after[:after.index(U1)]
        if between.endswith(shape.bu):
            out.append(_replace(shape, system="own", bs=before, es=between[:len(between) - len(shape.bu)]))
        if before == shape.bu:
            out.append(_replace(shape, system="first_user", sep=between))
            out.append(_replace(shape, system="last_user", sep=between))
    return out


def _replace(shape: Shape, **changes: str) -> Shape:
    from dataclasses import replace

    return replace(shape, **changes)


def _pieces(text: str) -> list[str]:
    return SPECIAL_PIECE.findall(text)


def _end_of_turn(shape: Shape) -> str | None:
    pieces = _pieces(shape.ea)
    return pieces[0] if pieces else None


def _stops(shape: Shape) -> tuple[str, ...]:
    stops = _pieces(shape.ea) + _pieces(shape.bu)
    if not stops:
        stops = [s for s in (shape.ea.strip(), shape.bu.strip()) if s]
    return tuple(dict.fromkeys(stops))


def _family(shape: Shape) -> str:
    text = shape.bu + shape.ba + shape.gen
    for marker, name in (("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama 3"),
                         ("<start_of_turn>", "Gemma"), ("[INST]", "Mistral"), ("<|user|>", "Phi-3"),
                         ("<|start_of_role|>", "Granite"), ("<\uff5cUser\uff5c>", "DeepSeek")):
        if marker in text:
            return name
    return "turns"
