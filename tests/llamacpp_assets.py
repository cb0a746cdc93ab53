"""llama.cpp's reference material for the export tests (fetched by ``tests/fetch-llamacpp-assets``, never by a
test): real vocab-only tokenizer GGUFs, their tokenizer test vectors, real chat templates, and the reference
converters ``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py``.

    assets_dir()                 the llama.cpp folder, or None (tests skip, naming the fetch command)
    tokenizer_dir("llama-bpe")   a Hugging Face tokenizer folder rebuilt from that family's vocab GGUF
    tiny_model(dir, "qwen3", tok) a tiny random model of an architecture with that tokenizer
    reference_convert(model, out, "f16")  run convert_hf_to_gguf.py

Tokenizer folders are cached under ~/.cache/llfarm/llamacpp-fixtures/ (rebuilding the large ones takes seconds).
A rebuilt tokenizer is only used after it reproduces every .inp/.out vector of its family
(``test_export_vocab.py::test_rebuilt_tokenizers_match_llamacpp_vectors``), and its identifying hash is the one
llama.cpp's table gives that family; families we cannot rebuild faithfully are not listed here.

``python tests/llamacpp_assets.py --write-pre-table`` regenerates llfarm/export/pre_hashes.py from the reference.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

VERSION = "0.3.36"  # llama-cpp-python sdist the assets come from
FETCH = "tests/fetch-llamacpp-assets"
SKIP_REASON = f"needs llama.cpp's reference assets (run {FETCH}; it downloads the llama-cpp-python {VERSION} sdist)"
CACHE = Path(os.environ.get("LLFARM_TEST_CACHE", Path.home() / ".cache" / "llfarm")) / "llamacpp-fixtures" / VERSION


def assets_dir() -> Path | None:
    for base in (os.environ.get("LLAMACPP_ASSETS"), Path.home() / ".cache" / "llamacpp-assets"):
        if base and (Path(base) / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
            return Path(base) / "llama.cpp"
    return None


def vocab_gguf(family: str) -> Path:
    return assets_dir() / "models" / f"ggml-vocab-{family}.gguf"


def vectors(family: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors: (text, ids without BOS)."""
    models = assets_dir() / "models"
    inp = (models / f"ggml-vocab-{family}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = (models / f"ggml-vocab-{family}.gguf.out").read_text(encoding="utf-8").split("\n")
    inp = inp[:-1] if inp and inp[-1] == "" else inp
    return [(text, [int(x) for x in out[i].split()]) for i, text in enumerate(inp)]


def chat_templates() -> dict[str, str]:
    """Every real chat template of the assets, by file stem."""
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted((assets_dir() / "models" / "templates").glob("*.jinja"))}


# ---- reference tables ---------------------------------------------------------------------------------------------

def reference_pre_table() -> tuple[str, dict[str, tuple[str, list[str]]]]:
    """(chktxt, {hash: (pre, refs)}) from get_vocab_base_pre() of the reference; later entries win, as its `if`s do."""
    src = (assets_dir() / "conversion" / "base.py").read_text(encoding="utf-8")
    body = src.split("Marker: Start get_vocab_base_pre")[1].split("Marker: End get_vocab_base_pre")[0]
    chktxt = ast.literal_eval(re.search(r"chktxt = ('.*')\n", body).group(1))
    table = {}
    for h, refs, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\n((?:\s*#.*\n)*)\s*res = "([^"]+)"', body):
        table[h] = (name, re.findall(r"ref:\s*(\S+)", refs))
    return chktxt, table


def write_pre_table(path: Path) -> None:
    chktxt, table = reference_pre_table()
    header = (f'''"""tokenizer.ggml.pre for byte-level BPE tokenizers, identified the way llama.cpp's convert_hf_to_gguf.py does:
the sha256 of str(token ids of CHKTXT) (the tokenizer's encode, special tokens added) looked up in PRE_BY_HASH.

Generated from get_vocab_base_pre() in llama.cpp's conversion/base.py as vendored by llama-cpp-python {VERSION}
(tests/test_export_vocab.py checks this table still equals the reference's when the assets are present).
Do not edit by hand; regenerate with: python tests/llamacpp_assets.py --write-pre-table
"""
''')
    lines = [header, f"CHKTXT = {chktxt!r}", "", "PRE_BY_HASH = {"]
    lines += [f'    "{h}": "{name}",  # {refs[0] if refs else ""}'.rstrip() for h, (name, refs) in table.items()]
    path.write_text("\n".join(lines + ["}"]) + "\n", encoding="utf-8")


# ---- Hugging Face tokenizers rebuilt from the vocab GGUFs ---------------------------------------------------------

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def _bl(regex: bool = True) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": regex}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _seq(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": list(steps)}


_DIGITS = {"type": "Digits", "individual_digits": True}
_NFC = {"type": "NFC"}
# family → how its original tokenizer.json pre-tokenizes (and normalizes, and whether encode adds BOS). Not here:
# qwen35 (a rebuild passes its vectors but hashes like qwen2: the real tokenizer differs in a way the vocab GGUF
# does not show), deepseek-llm (its Latin character classes are not reproduced), the non-BPE/SPM families.
BPE_FAMILIES: dict[str, dict[str, Any]] = {
    "gpt-2": {"pre": _bl()},
    "llama-bpe": {"pre": _seq(_split(LLAMA3), _bl(False)), "ignore_merges": True, "bos": True},
    "qwen2": {"pre": _seq(_split(QWEN2), _bl(False)), "normalizer": _NFC},
    "starcoder": {"pre": _seq(_DIGITS, _bl())},
    "refact": {"pre": _seq(_DIGITS, _bl())},
    "mpt": {"pre": _bl(), "normalizer": _NFC},
    "command-r": {"pre": _seq(_DIGITS, _bl()), "normalizer": _NFC, "bos": True},
    "falcon": {"pre": _seq({"type": "Punctuation", "behavior": "Contiguous"}, _bl(),
                           {"type": "Digits", "individual_digits": False}, _split("[0-9][0-9][0-9]"))},
    "deepseek-coder": {"pre": _seq(_split("[\r\n]"), _split(r"\s?\p{L}+"), _split(r"\s?\p{P}+"),
                                   _split("[一-龥ࠀ-一가-퟿]+"), _DIGITS, _bl(False)), "bos": True},
}
SPM_FAMILIES = ("llama-spm", "phi-3")
SPM_BASE_PIECES = 32000  # both are Llama 2's SentencePiece model (Phi-3 adds tokens above it)


def read_gguf(path: Path, tensors: bool = True) -> tuple[dict[str, Any], dict[str, tuple[int, tuple[int, ...], bytes]]]:
    """(metadata, {tensor name: (GGML type, shape in ggml order, raw bytes)}) of a GGUF v3 file. A direct reader:
    GGUFReader takes ~10 s on the 280k-merge vocabularies (it builds a numpy view per array element)."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n:pos].decode("utf-8")

    def value(kind: int) -> Any:
        if kind == 8:
            return string()
        if kind == 9:
            sub, n = take("<I"), take("<Q")
            return [value(sub) for _ in range(n)]
        return take(scalar[kind])

    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3
    pos = 8
    n_tensors, n_kv = take("<Q"), take("<Q")
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("<I"))
    out: dict[str, tuple[int, tuple[int, ...], bytes]] = {}
    if tensors:
        infos = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(take("<Q") for _ in range(take("<I")))
            infos.append((name, shape, take("<I"), take("<Q")))
        align = fields.get("general.alignment", 32)
        start = (pos + align - 1) // align * align
        for name, shape, kind, offset in infos:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            n = 1
            for d in shape:
                n *= d
            out[name] = (kind, shape, data[start + offset:start + offset + n // block * size])
    return fields, out


def _gguf_fields(path: Path) -> dict[str, Any]:
    return {k: v for k, v in read_gguf(path, tensors=False)[0].items() if k.startswith("tokenizer.")}


def gguf_differences(ours: Path, ref: Path) -> dict[str, str]:
    """{metadata key or 'tensor NAME': what differs} between two GGUFs; {} when they are equal."""
    fa, ta = read_gguf(ours)
    fb, tb = read_gguf(ref)
    diffs = {}
    for key in sorted(set(fa) | set(fb)):
        a, b = fa.get(key), fb.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            idx = [i for i in range(len(a)) if a[i] != b[i]]
            diffs[key] = f"{len(idx)} of {len(a)} items differ, e.g. [{idx[0]}]: {a[idx[0]]!r} vs {b[idx[0]]!r}"
        else:
            diffs[key] = f"ours {str(a)[:60]!r} vs reference {str(b)[:60]!r}"
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            diffs[f"tensor {name}"] = "only in " + ("ours" if name in ta else "the reference")
        elif ta[name][:2] != tb[name][:2]:
            diffs[f"tensor {name}"] = f"type/shape {ta[name][:2]} vs {tb[name][:2]}"
        elif ta[name][2] != tb[name][2]:
            diffs[f"tensor {name}"] = "bytes differ"
    return diffs


def tokenizer_dir(family: str) -> Path:
    """A Hugging Face tokenizer folder for ``family`` (cached): tokenizer.json + tokenizer_config.json, and for
    SentencePiece families tokenizer.model too."""
    out = CACHE / family
    if (out / "tokenizer_config.json").is_file():
        return out
    tmp = CACHE / f".{family}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    f = _gguf_fields(vocab_gguf(family))
    if family in SPM_FAMILIES:
        _build_spm(f, tmp)
    else:
        _build_bpe(family, f, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _special_config(f: dict[str, Any], tokens: list[str], add_bos: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {"add_bos_token": add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                           "model_max_length": 4096}
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                     ("pad", "padding_token_id")):
        if (tid := f.get(f"tokenizer.ggml.{key}")) is not None:
            cfg[f"{typ}_token"] = tokens[tid]
    if f.get("tokenizer.chat_template"):
        cfg["chat_template"] = f["tokenizer.chat_template"]
    return cfg


def _build_bpe(family: str, f: dict[str, Any], out: Path) -> None:
    spec = BPE_FAMILIES[family]
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    padding = {i for i, t in enumerate(tokens) if t == f"[PAD{i}]"}  # the old converter's padding, not tokens
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": ty == 4, "special": ty == 3} for i, ty in enumerate(types)
             if ty in (3, 4) and i not in padding]
    bos = f.get("tokenizer.ggml.bos_token_id")
    post: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if spec.get("bos"):
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": tokens[bos], "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": spec.get("normalizer"), "pre_tokenizer": spec["pre"], "post_processor": post,
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                    "ignore_merges": bool(spec.get("ignore_merges")),
                    "vocab": {t: i for i, t in enumerate(tokens) if i not in padding},
                    "merges": [m.split(" ", 1) for m in f["tokenizer.ggml.merges"]]}}
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cfg = _special_config(f, tokens, bool(spec.get("bos")))
    cfg.update(tokenizer_class="PreTrainedTokenizerFast",
               added_tokens_decoder={str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                     "single_word", "special")} for a in added})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1), encoding="utf-8")


def _build_spm(f: dict[str, Any], out: Path) -> None:
    """tokenizer.model (Llama 2's SentencePiece BPE model with the GGUF's pieces/scores), the tokenizer.json
    transformers converts it to, and a tokenizer_config.json with the GGUF's added tokens above the model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    model = pb.ModelProto()
    for i in range(SPM_BASE_PIECES):
        piece = model.pieces.add()
        piece.piece = tokens[i]
        piece.score = 0.0 if i < 3 else scores[i]  # Llama 2's <unk> <s> </s>: score 0, types UNKNOWN, CONTROL
        piece.type = {0: 2, 1: 3, 2: 3}.get(i, types[i] if types[i] in (1, 6) else 1)
    ts = model.trainer_spec
    ts.model_type, ts.vocab_size, ts.byte_fallback = 2, SPM_BASE_PIECES, True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ns = model.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", True, False, True
    (out / "tokenizer.model").write_bytes(model.SerializeToString())
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3} for i in range(SPM_BASE_PIECES, len(tokens))
             if types[i] in (3, 4) and tokens[i] != f"[PAD{i}]"]
    cfg = _special_config(f, tokens, True)
    cfg.update(tokenizer_class="LlamaTokenizer", legacy=False, added_tokens_decoder={
        str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True} for i in range(3)} | {
        str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for a in added})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1), encoding="utf-8")
    from transformers import AutoTokenizer  # tokenizer.json as transformers writes it for a SentencePiece model

    AutoTokenizer.from_pretrained(out).save_pretrained(out / "hf")
    shutil.move(out / "hf" / "tokenizer.json", out / "tokenizer.json")
    shutil.rmtree(out / "hf")


# ---- tiny random models and the reference converter ---------------------------------------------------------------

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "tie_word_embeddings": False,
                "head_dim": 16, "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "tie_word_embeddings": True,
              "head_dim": 16},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 16,
               "query_pre_attn_scalar": 16, "sliding_window": 128, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 16,
               "query_pre_attn_scalar": 16, "sliding_window": 64, "num_hidden_layers": 6,  # llama.cpp's pattern:
               "layer_types": ["sliding_attention"] * 5 + ["full_attention"],  # 5 sliding, 1 full
               "final_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh"},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "tie_word_embeddings": False,
             "original_max_position_embeddings": 256, "sliding_window": None},
}


def tiny_model(out: Path, arch: str, tok_dir: Path, *, seed: int = 0, dtype: str = "float32",
               config: dict[str, Any] | None = None) -> Path:
    """A random ``arch`` model whose vocabulary is the tokenizer's, saved with that tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok_cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    n_vocab = _n_tokens(tok_dir)
    spec = {**TINY, **ARCH_CONFIGS[arch], **(config or {}), "vocab_size": n_vocab}
    ids = _special_ids(tok_dir, tok_cfg)
    spec.update({f"{k}_token_id": v for k, v in ids.items()})
    cfg = AutoConfig.for_model(spec.pop("model_type"), **{k: v for k, v in spec.items() if k != "architectures"})
    cfg.architectures = spec["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():  # random norms too, so the Gemma +1 and every copy is really checked
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "gemma" in arch else 1.0))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for p in tok_dir.iterdir():
        if p.is_file():
            shutil.copy(p, out / p.name)
    return out


def _n_tokens(tok_dir: Path) -> int:
    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(tj["model"]["vocab"].values()) + [a["id"] for a in tj.get("added_tokens", [])]
    return max(ids) + 1


def _special_ids(tok_dir: Path, cfg: dict[str, Any]) -> dict[str, int]:
    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj.get("added_tokens", [])}}
    return {typ: vocab[cfg[f"{typ}_token"]] for typ in ("bos", "eos", "pad") if cfg.get(f"{typ}_token") in vocab}


def reference_convert(model_dir: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its own gguf-py), in a subprocess."""
    return _run_reference(["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out), "--outtype", outtype], out)


def reference_convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str) -> Path:
    return _run_reference(["convert_lora_to_gguf.py", str(adapter_dir), "--base", str(base_dir), "--outfile",
                           str(out), "--outtype", outtype], out)


def _run_reference(args: list[str], out: Path) -> Path:
    root = assets_dir()
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(root / args[0]), *args[1:]], cwd=root, env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-pre-table"]:
        write_pre_table(Path(__file__).resolve().parent.parent / "llfarm" / "export" / "pre_hashes.py")
    else:
        sys.exit("usage: python tests/llamacpp_assets.py --write-pre-table")
