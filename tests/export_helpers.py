"""Test helpers for the export tests: fabricated run dirs, a numpy forward pass over a GGUF, and a tiny
interpreter for the subset of Go template syntax the shipped Ollama templates use.

The numpy forward and the Go interpreter are deliberately independent of llfarm.export: they are the references
the product is checked against.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from llfarm.resources import BUILTIN_MODELS

TINY_LLAMA = BUILTIN_MODELS["tiny-llama"]


# ---- base models and run directories -------------------------------------------------------------------------------

def tiny_base(tmp: Path, arch: str = "llama", rope: dict[str, Any] | None = None) -> Path:
    """A tiny base model dir: the shipped Llama, a freshly built tied-embedding Qwen2, or the Llama with ``rope``
    put into its config (same weights, other rope parameters)."""
    if arch == "qwen2":
        from llfarm.builtin.build_tiny import build

        return build(tmp / "tiny-qwen2", arch="qwen2")
    if rope is None:
        return TINY_LLAMA
    out = tmp / f"tiny-llama-{rope.get('rope_type')}"
    shutil.copytree(TINY_LLAMA, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def odd_base(tmp: Path) -> Path:
    """A random Llama with Llama-3.1 rope scaling and intermediate_size 80, with the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp / "tiny-odd"
    src = tiny_base(tmp)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(intermediate_size=80, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return out


def make_run(root: Path, base: Path, *, template: str = "chatml", system: str | None = None, stage: str = "sft",
             output_kind: str = "adapter", seed: int = 0) -> Path:
    """A run dir as training leaves it: manifest + a non-zero LoRA adapter (or a full model) + tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from llfarm.templates import load_template

    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = load_template(template).jinja
    torch.manual_seed(seed)
    if stage == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        task = "SEQ_CLS"
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        task = "CAUSAL_LM"
    if output_kind == "adapter":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"],
                         init_lora_weights=False, task_type=task)
        peft_model = get_peft_model(model, cfg)
        peft_model.save_pretrained(root / "adapter")
        tok.save_pretrained(root / "adapter")
    else:
        with torch.no_grad():  # a "trained" full model: perturb the weights so it differs from the base
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(root / "model")
        tok.save_pretrained(root / "model")
    manifest = {"model_path": str(base), "template": template, "system": system, "strategy_name": "tiny-test",
                "stage": stage, "output_kind": output_kind, "status": "completed"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def fresh(run: Path, tmp_path: Path) -> Path:
    """A private copy of a run (tests write exports into it)."""
    dst = tmp_path / run.name
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("exports"))
    return dst


def hf_logits(model_dir: Path | str, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    """transformers' logits [T, V] (float32), for a model dir or base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update({k: v.astype(np.float32) for k, v in load_file(f).items()})
    return out


def hf_to_llamacpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder rotary rows from HF's half split to llama.cpp's interleaved pairs: within each head, output row
    2i is input row i and row 2i+1 is input row i + head_dim/2."""
    head_dim = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        block = w[h * head_dim:(h + 1) * head_dim]
        half = head_dim // 2
        out[h * head_dim:(h + 1) * head_dim][0::2] = block[:half]
        out[h * head_dim:(h + 1) * head_dim][1::2] = block[half:]
    return out


def llamacpp_to_hf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`hf_to_llamacpp_rows`."""
    head_dim = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        block = w[h * head_dim:(h + 1) * head_dim]
        out[h * head_dim:h * head_dim + head_dim // 2] = block[0::2]
        out[h * head_dim + head_dim // 2:(h + 1) * head_dim] = block[1::2]
    return out


def hf_logits_with_gguf_weights(model_dir: Path, gguf_path: Path, ids: list[int],
                                names: dict[str, str]) -> np.ndarray:
    """transformers' logits after loading the GGUF's (dequantized, un-permuted) tensors into the HF model:
    isolates quantization error from conversion errors. ``names`` maps HF → GGUF tensor names."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    tensors = gguf_tensors(gguf_path)
    llama = cfg.architectures[0] == "LlamaForCausalLM"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if names[name] not in tensors:  # tied lm_head
                continue
            w = tensors[names[name]][0]
            if llama and ".q_proj." in name:
                w = llamacpp_to_hf_rows(w, cfg.num_attention_heads)
            elif llama and ".k_proj." in name:
                w = llamacpp_to_hf_rows(w, cfg.num_key_value_heads)
            param.copy_(torch.from_numpy(w))
        return model(torch.tensor([ids])).logits[0].float().numpy()


# ---- reading a GGUF and running it in numpy ------------------------------------------------------------------------

def gguf_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_tensors(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """name → (float32 array in numpy row-major order, GGML type name)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = (dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32), t.tensor_type.name)
    return out


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps)) * w


def _rope(x: np.ndarray, pos: np.ndarray, base: float, n_rot: int, neox: bool, freq_factors: np.ndarray | None,
          freq_scale: float) -> np.ndarray:
    """llama.cpp's ggml_rope: theta_i = pos * freq_scale * base^(-2i/n_rot) / freq_factors[i].
    Normal mode rotates (x[2i], x[2i+1]); NEOX mode rotates (x[i], x[i + n_rot/2])."""
    i = np.arange(n_rot // 2)
    theta = pos[:, None] * freq_scale * base ** (-2.0 * i / n_rot)
    if freq_factors is not None:
        theta = theta / freq_factors[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]  # [T, 1, n_rot/2]
    out = x.copy()
    if neox:
        a, b = x[..., : n_rot // 2], x[..., n_rot // 2: n_rot]
        out[..., : n_rot // 2] = a * cos - b * sin
        out[..., n_rot // 2: n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    return out


def gguf_forward(path: Path, ids: list[int]) -> np.ndarray:
    """Logits [T, V] computed from the GGUF's metadata and tensors alone, the way llama.cpp computes them."""
    f = gguf_fields(path)
    arch = f["general.architecture"]
    t = {k: v for k, (v, _) in gguf_tensors(path).items()}
    n_layer, n_head = f[f"{arch}.block_count"], f[f"{arch}.attention.head_count"]
    n_head_kv, eps = f[f"{arch}.attention.head_count_kv"], f[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = f[f"{arch}.rope.freq_base"]
    n_rot = f.get(f"{arch}.rope.dimension_count") or f[f"{arch}.embedding_length"] // n_head
    freq_scale = 1.0 / f[f"{arch}.rope.scaling.factor"] if f.get(f"{arch}.rope.scaling.type") == "linear" else 1.0
    neox = arch == "qwen2"  # LLAMA_ROPE_TYPE_NORM for llama, NEOX for qwen2
    x = t["token_embd.weight"][ids].astype(np.float64)
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    head_dim = x.shape[1] // n_head
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for layer in range(n_layer):
        p = f"blk.{layer}."
        h = _rms_norm(x, t[p + "attn_norm.weight"], eps)
        q = h @ t[p + "attn_q.weight"].T + t.get(p + "attn_q.bias", 0)
        k = h @ t[p + "attn_k.weight"].T + t.get(p + "attn_k.bias", 0)
        v = h @ t[p + "attn_v.weight"].T + t.get(p + "attn_v.bias", 0)
        q = _rope(q.reshape(T, n_head, head_dim), pos, base, n_rot, neox, t.get("rope_freqs.weight"), freq_scale)
        k = _rope(k.reshape(T, n_head_kv, head_dim), pos, base, n_rot, neox, t.get("rope_freqs.weight"), freq_scale)
        v = v.reshape(T, n_head_kv, head_dim)
        group = n_head // n_head_kv
        heads = []
        for hd in range(n_head):
            scores = q[:, hd] @ k[:, hd // group].T / np.sqrt(head_dim) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((scores / scores.sum(-1, keepdims=True)) @ v[:, hd // group])
        x = x + np.concatenate(heads, axis=-1) @ t[p + "attn_output.weight"].T
        h = _rms_norm(x, t[p + "ffn_norm.weight"], eps)
        gate = h @ t[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
    x = _rms_norm(x, t["output_norm.weight"], eps)
    return (x @ t.get("output.weight", t["token_embd.weight"]).T).astype(np.float32)


# ---- a tiny Go text/template interpreter (the subset llfarm's Ollama templates use) -------------------------------

_ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.DOTALL)
_WS = " \t\r\n"


def _lex(src: str) -> list[tuple[str, str]]:
    """[('text', s) | ('action', s)] with Go's {{- and -}} whitespace trimming applied."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip(_WS)
        if m.group(1):
            text = text.rstrip(_WS)
        items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    tail = src[pos:]
    items.append(("text", tail.lstrip(_WS) if trim_next else tail))
    return items


def _parse(items: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str]:
    nodes: list = []
    while i < len(items):
        kind, val = items[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        word = val.split(" ", 1)[0]
        if word in stop or (val.startswith("else") and "else" in stop):
            return nodes, i, val
        if word == "if":
            branches, default = [], None
            cond = val[3:].strip()
            while True:
                body, i, closer = _parse(items, i + 1, ("end", "else"))
                branches.append((cond, body))
                if closer == "end":
                    break
                if closer.startswith("else if "):
                    cond = closer[len("else if "):].strip()
                    continue
                default, i, closer = _parse(items, i + 1, ("end",))
                break
            nodes.append(("if", branches, default))
        elif word == "range":
            body, i, _ = _parse(items, i + 1, ("end",))
            nodes.append(("range", val[6:].strip(), body))
        else:
            nodes.append(("out", val))
        i += 1
    if stop:
        raise ValueError(f"unclosed block, expected {stop}")
    return nodes, i, ""


def _tokens(expr: str) -> list[str]:
    return re.findall(r'"(?:\\.|[^"\\])*"|[()]|:=|[^\s()]+', expr)


class _Scope:
    """Go template variables: declared in the innermost block, assignment updates the nearest declaration."""

    def __init__(self, parent: _Scope | None = None, **names: Any):
        self.parent, self.names = parent, dict(names)

    def get(self, name: str) -> Any:
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        raise ValueError(f"undefined variable ${name}")

    def set(self, name: str, value: Any) -> None:
        scope = self
        while scope is not None:
            if name in scope.names:
                scope.names[name] = value
                return
            scope = scope.parent
        raise ValueError(f"assignment to undeclared variable ${name}")


def _truth(v: Any) -> bool:
    return v not in (None, False, 0, "") and not (hasattr(v, "__len__") and len(v) == 0)


def _operand(tok: str, dot: Any, scope: _Scope) -> Any:
    if tok.startswith('"'):
        return json.loads(tok)
    if tok in ("true", "false"):
        return tok == "true"
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok == ".":
        return dot
    if tok.startswith("$"):
        name, _, field = tok[1:].partition(".")
        value = scope.get(name or "$")
        return value[field] if field else value
    if tok.startswith("."):
        return dot[tok[1:]]
    raise ValueError(f"unsupported Go template operand {tok!r}")


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
    "len": len, "slice": lambda x, *ix: x[ix[0]:ix[1]] if len(ix) > 1 else x[ix[0]:] if ix else x,
}


def _pipeline(toks: list[str], dot: Any, scope: _Scope) -> Any:
    """Evaluate one command: an operand, or a function applied to arguments (operands or (sub-pipelines))."""
    args: list[Any] = []
    i = 0
    while i < len(toks):
        if toks[i] == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(toks[j], 0)
                j += 1
            args.append(("value", _pipeline(toks[i + 1:j - 1], dot, scope)))
            i = j
        else:
            args.append(("tok", toks[i]))
            i += 1
    head_kind, head = args[0]
    if head_kind == "tok" and head in ("and", "or"):
        value = None
        for kind, a in args[1:]:  # Go evaluates and returns the deciding argument
            value = a if kind == "value" else _operand(a, dot, scope)
            if _truth(value) != (head == "and"):
                return value
        return value
    if head_kind == "tok" and head in _FUNCS:
        return _FUNCS[head](*[a if kind == "value" else _operand(a, dot, scope) for kind, a in args[1:]])
    if len(args) > 1:
        raise ValueError(f"unsupported Go template function {head!r}")
    return head if head_kind == "value" else _operand(head, dot, scope)


def _eval(expr: str, dot: Any, scope: _Scope) -> Any:
    """An action's expression, with `$x := v` declarations and `$x = v` assignments (which output nothing)."""
    toks = _tokens(expr)
    if len(toks) > 2 and toks[0].startswith("$") and toks[1] in (":=", "="):
        value = _pipeline(toks[2:], dot, scope)
        if toks[1] == ":=":
            scope.names[toks[0][1:]] = value
        else:
            scope.set(toks[0][1:], value)
        return None
    return _pipeline(toks, dot, scope)


def _exec(nodes: list, dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            val = _eval(node[1], dot, scope)
            out.append("" if val is None else str(val))
        elif node[0] == "if":
            for cond, body in node[1]:
                if _truth(_eval(cond, dot, scope)):
                    _exec(body, dot, _Scope(scope), out)
                    break
            else:
                if node[2] is not None:
                    _exec(node[2], dot, _Scope(scope), out)
        elif node[0] == "range":
            expr = node[1]
            names: list[str] = []
            if ":=" in expr:
                decl, expr = expr.split(":=", 1)
                names = [n.strip()[1:] for n in decl.split(",")]
            for i, item in enumerate(_eval(expr, dot, scope) or []):
                inner = _Scope(scope)
                if len(names) == 2:
                    inner.names.update({names[0]: i, names[1]: item})
                elif names:
                    inner.names[names[0]] = item
                _exec(node[2], item, inner, out)


def go_render(template: str, data: dict[str, Any]) -> str:
    nodes, _, _ = _parse(_lex(template))
    out: list[str] = []
    _exec(nodes, data, _Scope(None, **{"$": data}), out)
    return "".join(out)


def ollama_prompt(template: str, messages: list[dict[str, str]], modelfile_system: str | None) -> str:
    """What Ollama's chat endpoint renders: SYSTEM becomes a leading system message when the request has none;
    consecutive same-role messages are joined with a blank line (server/prompt.go, template.collate)."""
    msgs = [dict(m) for m in messages]
    if modelfile_system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": modelfile_system})
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["role"] == m["role"]:
            collated[-1]["content"] += "\n\n" + m["content"]
        else:
            collated.append(dict(m))
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    data = {"System": system, "Prompt": "", "Response": "",
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in collated]}
    return go_render(template, data)


# ---- Ollama's Modelfile parser (a port of parser/parser.go ParseFile) ----------------------------------------------

def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _next_state(r: str, state: str) -> tuple[str, str]:
    space, newline = r in " \t", r in "\r\n"
    if state == "nil":
        return ("comment", "") if r == "#" else ("nil", "") if space or newline else ("name", r)
    if state == "name":
        if r.isascii() and r.isalpha():
            return "name", r
        if space:
            return "value", ""
        raise ValueError("command must be one of from, template, system, parameter, ...")
    if state == "value":
        return ("nil", r) if space or newline else ("value", r)
    if state == "parameter":
        if (r.isascii() and r.isalnum()) or r == "_":
            return "parameter", r
        if space:
            return "value", ""
        raise ValueError("unexpected EOF in parameter")
    if state == "message":
        if r.isascii() and r.isalpha():
            return "message", r
        if space:
            return "value", ""
        raise ValueError("unexpected EOF in message")
    return ("nil", "") if newline else ("comment", "")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """[(command, args)] exactly as Ollama reads a Modelfile (FROM is reported as 'model')."""
    commands: list[tuple[str, str]] = []
    state, buf, name, role = "nil", "", "", ""
    for ch in text:
        nxt, r = _next_state(ch, state)
        if nxt != state:
            if state == "name":
                word = buf.lower()
                if word not in ("from", "license", "template", "system", "adapter", "parameter", "message"):
                    raise ValueError(f"invalid command {buf!r}")
                if word == "from":
                    name = "model"
                elif word == "parameter":
                    nxt = "parameter"
                elif word == "message":
                    nxt, name = "message", word
                else:
                    name = word
            elif state == "parameter":
                name = buf
            elif state == "message":
                role = buf
            elif state == "value":
                value, ok = _unquote(buf.strip())
                if not ok or r in (" ", "\t"):
                    buf += r
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buf, state = "", nxt
        if r and r.isprintable():
            buf += r
    if state == "value":
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ValueError("unexpected EOF: unterminated quoted value")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected EOF")
    return commands
