"""The tokenizer half of a GGUF, read the way llama.cpp's ``convert_hf_to_gguf.py`` reads it, without torch or
transformers (the ``tokenizers`` library and a small protobuf reader are enough).

- **Byte-level BPE** (``tokenizer.ggml.model = gpt2``): the token list, types and merges of ``tokenizer.json``;
  ``tokenizer.ggml.pre`` is identified as llama.cpp identifies it, by hashing the token ids of a fixed text
  (:mod:`.pre_hashes`). Where the hash is unknown, a tokenizer whose pre-tokenizer is exactly one llama.cpp
  implements (GPT-2, Llama 3, Qwen2, Tekken) is accepted by its structure; anything else is refused.
- **SentencePiece** (``tokenizer.ggml.model = llama``): from ``tokenizer.model`` when there is one (pieces, scores,
  types exactly as the reference writes them), else from a SentencePiece-converted ``tokenizer.json`` (BPE with
  byte fallback), with scores derived from the merge order so llama.cpp merges in the same order as the tokenizer.
  Models llama.cpp's SentencePiece tokenizer cannot run (Unigram, a normalization charsmap, whitespace collapsing)
  are refused.
- **Special tokens** (ids, add_bos/add_eos, merges, chat template) follow gguf-py's ``SpecialVocab`` of the same
  llama.cpp version: a tokenizer.json post-processor wins over tokenizer_config's ``add_*_token``.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ..errors import ExportError
from .pre_hashes import CHKTXT, PRE_BY_HASH

HINT_UPSTREAM = "export --format merged, then convert exports/merged with llama.cpp's convert_hf_to_gguf.py"
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (gguf.TokenType.NORMAL, gguf.TokenType.UNKNOWN,
                                                      gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
                                                      gguf.TokenType.UNUSED, gguf.TokenType.BYTE)
SPM_SPACE = "\u2581"  # ▁

# Pre-tokenizers llama.cpp implements, as `tokenizers` writes them (regex of a Split, then a regex-free ByteLevel),
# accepted by structure when the hash is unknown (a fine-tune that changed the vocab, a tokenizer built for a test).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
STRUCTURAL_PRE = {  # regex -> (tokenizer.ggml.pre, ignore_merges llama.cpp assumes for it)
    GPT2_REGEX: ("gpt-2", False),
    LLAMA3_REGEX: ("llama-bpe", True),
    LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"): ("qwen2", False),
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("tekken", False),  # Mistral Nemo
}


@dataclass
class SpecialTokens:
    """What gguf-py's SpecialVocab finds: special token ids, add_*_token flags, merges, the chat template."""

    ids: dict[str, int] = field(default_factory=dict)
    add: dict[str, bool] = field(default_factory=dict)
    merges: list[str] = field(default_factory=list)
    chat_template: str | list[dict[str, str]] | None = None
    lowercase: bool | None = None
    strip_accents: bool | None = None


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str | bytes]
    types: list[int]
    special: SpecialTokens
    scores: list[float] | None = None
    add_space_prefix: bool | None = None  # written only when set
    source: str = ""  # where it came from, for messages: tokenizer.model, tokenizer.json (hash|structure)

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        sp = self.special
        if sp.merges:
            w.add_token_merges(sp.merges)
        for typ, tid in sp.ids.items():
            if hasattr(w, f"add_{typ}_token_id"):
                getattr(w, f"add_{typ}_token_id")(tid)
        for typ, value in sp.add.items():
            if hasattr(w, f"add_add_{typ}_token"):
                getattr(w, f"add_add_{typ}_token")(value)
        if sp.chat_template is not None:
            w.add_chat_template(sp.chat_template)
        if sp.lowercase is not None:  # keys of llama.cpp newer than gguf-py 0.19's constants
            w.add_bool("tokenizer.ggml.normalizer_lowercase", sp.lowercase)
        if sp.strip_accents is not None:
            w.add_bool("tokenizer.ggml.normalizer_strip_accents", sp.strip_accents)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path.name}: {exc}".splitlines()[0], where=str(path)) from None
    if not isinstance(data, dict):
        raise ExportError(f"{path.name} is not a JSON object", where=str(path))
    return data


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


# ---- special tokens (gguf-py SpecialVocab, llama.cpp's current version) ------------------------------------------

def read_special_tokens(tok_dir: Path, *, load_merges: bool, n_vocab: int | None,
                        types: tuple[str, ...] = SPECIAL_TYPES) -> SpecialTokens:
    sp = SpecialTokens()
    tj = _optional_json(tok_dir / "tokenizer.json")
    cfg = _optional_json(tok_dir / "tokenizer_config.json")
    types = list(types)

    def set_id(typ: str, tid: Any) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0 and (n_vocab is None or tid < n_vocab):
            sp.ids.setdefault(typ, tid)

    if tj:
        merges = (tj.get("model") or {}).get("merges") if load_merges else None
        if merges and isinstance(merges[0], str):
            sp.merges = list(merges)
        elif merges:  # [["a", "b"], ...] since transformers 4.45; spaces encoded as U+0120 as gguf-py does
            sp.merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                         for pair in merges]
        _normalizer_flags(sp, tj.get("normalizer") or {})
        bos, cls, eos, sep = (cfg.get(k) for k in ("bos_token", "cls_token", "eos_token", "sep_token"))
        if not bos and cls and cfg:
            cfg["bos_token"] = bos = cls
        if not eos and sep and cfg:
            cfg["eos_token"] = eos = sep
        post = tj.get("post_processor") or {}
        for proc in post.get("processors", [post]) if post else []:
            kind = proc.get("type")
            if kind == "ByteLevel":
                sp.add.setdefault("bos", False)
                sp.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                sp.add.update(bos=True, eos=True, sep=True)
                if not cls and cfg:
                    cfg["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and cfg:
                    cfg["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                single = proc.get("single", [])
                first = last = None
                if len(single) > 1:
                    first = single[0].get("SpecialToken", {}).get("id")
                    if first:
                        if not cfg:
                            bos = first
                        elif first not in (bos, cls):
                            if not bos:
                                cfg["bos_token"] = bos = first
                            if not cls:
                                cfg["cls_token"] = cls = first
                        sp.add["bos"] = first in (bos, cls)
                    last = single[-1].get("SpecialToken", {}).get("id")
                    if last:
                        if not cfg:
                            eos = last
                        elif last != eos:
                            extra = "eot" if "eot" not in types else "eom" if "eom" not in types else None
                            if extra:
                                types.append(extra)
                                cfg[f"{extra}_token"] = eos
                            cfg["eos_token"] = eos = last
                        sp.add["eos"] = last == eos
                pair = proc.get("pair", [])
                if pair:  # A [sep] [eos] B, between the leading/trailing specials of the single template
                    start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
                    stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
                    pair = pair[start:stop]
                    if pair and pair[0].get("Sequence", {}).get("id") == "A" \
                            and pair[-1].get("Sequence", {}).get("id") == "B" and (middle := pair[1:-1]):
                        ids = [m.get("SpecialToken", {}).get("id") for m in middle[:2]]
                        sp.add["sep"] = bool(ids[0] and ids[0] in (sep, eos) and not last) or \
                            bool(len(ids) == 2 and ids[1] and ids[1] in (sep, eos))
                        if sp.add["sep"] and not sep and cfg:
                            cfg["sep_token"] = eos
    if cfg:
        sp.chat_template = _chat_template(tok_dir, cfg)
        added = tj.get("added_tokens") or []
        for typ in types:
            flag = cfg.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                sp.add.setdefault(typ, flag)
            entry = cfg.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str):
                set_id(typ, next((a.get("id") for a in added if a.get("content") == content), None))
    config = _optional_json(tok_dir / "config.json")
    for typ in types:
        tid = config.get(f"{typ}_token_id")
        if tid is None and isinstance(config.get("text_config"), dict):
            tid = config["text_config"].get(f"{typ}_token_id")
        set_id(typ, tid)
    sp.ids = {t: sp.ids[t] for t in types if t in sp.ids}  # gguf-py's order
    return sp


def _normalizer_flags(sp: SpecialTokens, norm: dict[str, Any]) -> None:
    kind = norm.get("type")
    if kind == "Lowercase":
        sp.lowercase = True
    elif kind == "StripAccents":
        sp.strip_accents = True
    elif kind == "BertNormalizer":
        sp.lowercase = norm.get("lowercase", sp.lowercase)
        sp.strip_accents = norm.get("strip_accents", sp.strip_accents)
    elif kind == "Sequence":
        for n in norm.get("normalizers", []):
            _normalizer_flags(sp, n)


def _chat_template(tok_dir: Path, cfg: dict[str, Any]) -> str | list[dict[str, str]] | None:
    alt: Any = None
    jinja = tok_dir / "chat_template.jinja"
    if jinja.is_file():
        alt = jinja.read_text(encoding="utf-8")
        extra = sorted((tok_dir / "additional_chat_templates").glob("*.jinja"))
        if extra:
            alt = [{"name": "default", "template": alt}] + [
                {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
    elif (tok_dir / "chat_template.json").is_file():
        alt = read_json(tok_dir / "chat_template.json").get("chat_template")
    template = cfg.get("chat_template", alt)
    return template if template is None or isinstance(template, (str, list)) else None


def chat_template_text(tok_dir: Path) -> str | None:
    """The tokenizer's own (default) jinja chat template, or None."""
    template = _chat_template(tok_dir, _optional_json(tok_dir / "tokenizer_config.json"))
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


# ---- byte-level BPE -------------------------------------------------------------------------------------------------

def looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens that ought to be CONTROL."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _load_tokenizers(path: Path, where: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise ExportError(f"the tokenizers library cannot load tokenizer.json: {exc}".splitlines()[0],
                          where=where, hint=HINT_UPSTREAM) from None


def pre_tokenizer_hash(tok) -> str:
    """llama.cpp's chkhsh: sha256 of str(ids) for CHKTXT, encoded with special tokens as transformers' encode does."""
    ids = tok.encode(CHKTXT, add_special_tokens=True).ids
    return hashlib.sha256(str(ids).encode()).hexdigest()


def identify_pre(tok, tj: dict[str, Any], where: str) -> tuple[str, str]:
    """(tokenizer.ggml.pre, how) for a byte-level BPE tokenizer; ExportError when llama.cpp cannot run it."""
    chkhsh = pre_tokenizer_hash(tok)
    if chkhsh in PRE_BY_HASH:
        return PRE_BY_HASH[chkhsh], "hash"
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex = None
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True) \
            and not steps[0].get("add_prefix_space"):
        regex = GPT2_REGEX
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
          and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel"
          and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        regex = (steps[0].get("pattern") or {}).get("Regex")
    known = STRUCTURAL_PRE.get(regex)
    model = tj.get("model") or {}
    if known is None or tj.get("normalizer") or bool(model.get("ignore_merges")) != known[1]:
        raise ExportError(f"the tokenizer's pre-tokenizer is not one llama.cpp knows (its identifying hash "
                          f"{chkhsh[:12]}… is not in llama.cpp's table, and its pre-tokenizer is not exactly "
                          f"GPT-2's, Llama 3's, Qwen2's or Tekken's); llama.cpp's converter refuses it too",
                          where=where, hint="use a tokenizer llama.cpp supports, or add it upstream "
                                            "(convert_hf_to_gguf_update.py)")
    return known[0], "structure"


def bpe_vocab(tok_dir: Path, n_vocab: int | None, where: str) -> Vocab:
    """The reference's _set_vocab_gpt2 (get_vocab_base + SpecialVocab with merges)."""
    tj = read_json(tok_dir / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"expected a byte-level BPE tokenizer, got {model.get('type')}"
                          f"{' with byte fallback' if model.get('byte_fallback') else ''}", where=where,
                          hint=HINT_UPSTREAM)
    tok = _load_tokenizers(tok_dir / "tokenizer.json", where)
    vocab = tok.get_vocab(with_added_tokens=True)
    n_vocab = n_vocab or len(vocab)
    top = max(vocab.values(), default=-1)
    if top >= n_vocab:
        raise ExportError(f"the tokenizer has token id {top} but the model has only {n_vocab} embedding rows",
                          where=where, hint="resize the embeddings to the tokenizer (model.resize_token_embeddings)")
    pre, how = identify_pre(tok, tj, where)
    cfg = _optional_json(tok_dir / "tokenizer_config.json")
    added = tok.get_added_tokens_decoder()
    added_contents = {a.content for a in added.values()}
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str | bytes] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = reverse[i]
        if token in added_contents:
            at = added.get(i)
            if at is not None and not at.normalized:  # llama.cpp assumes added tokens are pre-normalized
                token = _clean_up(tok.decode(tok.encode(token, add_special_tokens=False).ids,
                                             skip_special_tokens=False), cfg)
            if (at is not None and at.special) or looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace(SPM_SPACE, " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    special = read_special_tokens(tok_dir, load_merges=True, n_vocab=None)
    return Vocab("gpt2", pre, tokens, types, special, source=f"tokenizer.json ({how})")


def _clean_up(text: str, cfg: dict[str, Any]) -> str:
    """transformers' clean_up_tokenization, applied by decode when the tokenizer asks for it."""
    if not cfg.get("clean_up_tokenization_spaces"):
        return text
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# ---- SentencePiece --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpmModel:
    pieces: list[tuple[str, float, int]]  # (piece, score, type) with SentencePiece's type numbers (= GGUF's)
    model_type: int  # 1 unigram, 2 BPE
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    has_charsmap: bool
    whitespace_suffix: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value is bytes for length-delimited fields."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, value


def read_spm_model(path: Path) -> SpmModel:
    """The parts of a sentencepiece ModelProto llama.cpp uses (sentencepiece_model.proto field numbers)."""
    try:
        pieces, trainer, normalizer = [], {}, {}
        for num, _, value in _fields(path.read_bytes()):
            if num == 1:
                piece = {1: b"", 2: 0.0, 3: 1}
                for n, wire, v in _fields(value):
                    piece[n] = struct.unpack("<f", v)[0] if n == 2 and wire == 5 else v
                pieces.append((piece[1].decode("utf-8"), float(piece[2]), int(piece[3])))
            elif num == 2:
                trainer = {n: v for n, _, v in _fields(value)}
            elif num == 3:
                normalizer = {n: v for n, _, v in _fields(value)}
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise ExportError(f"tokenizer.model is not a SentencePiece model ({exc})", where=str(path)) from None
    return SpmModel(pieces, model_type=int(trainer.get(3, 1)), add_dummy_prefix=bool(normalizer.get(3, 1)),
                    remove_extra_whitespaces=bool(normalizer.get(4, 1)), has_charsmap=bool(normalizer.get(2)),
                    whitespace_suffix=bool(trainer.get(24, 0)))


def _check_spm(m: SpmModel, where: str) -> None:
    problem = ("it is a Unigram model (llama.cpp's SentencePiece tokenizer merges pieces by score, BPE-style)"
               if m.model_type != 2 else
               "it normalizes text with a precompiled charsmap, which llama.cpp's 'llama' tokenizer does not"
               if m.has_charsmap else
               "it collapses extra whitespace, which llama.cpp's 'llama' tokenizer does not"
               if m.remove_extra_whitespaces else
               "it treats whitespace as a suffix" if m.whitespace_suffix else None)
    if problem:
        raise ExportError(f"llama.cpp cannot run this SentencePiece tokenizer: {problem}", where=where,
                          hint=HINT_UPSTREAM)


def spm_vocab(tok_dir: Path, model_file: Path | None, n_vocab: int | None, where: str, *,
              phi3: bool = False) -> Vocab:
    """The reference's _set_vocab_sentencepiece (Phi-3's variant with ``phi3``) from ``model_file``, else the same
    vocabulary from a SentencePiece-converted tokenizer.json."""
    if model_file is not None:
        m = read_spm_model(model_file)
        _check_spm(m, str(model_file))
        pieces, add_dummy_prefix, source = m.pieces, m.add_dummy_prefix, "tokenizer.model"
    else:
        pieces, add_dummy_prefix = _spm_pieces_from_json(tok_dir, where)
        source = "tokenizer.json (SentencePiece BPE; scores from the merge order)"
    n_vocab = n_vocab or len(pieces)
    tokens: list[str | bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i, (piece, score, kind) in enumerate(pieces[:n_vocab]):
        tokens[i], scores[i] = piece.encode("utf-8"), score
        types[i] = kind if kind in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL
    added = _optional_json(tok_dir / "added_tokens.json")
    for text, tid in added.items():
        if isinstance(tid, int) and tid < n_vocab:
            tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, USER_DEFINED
    cfg = _optional_json(tok_dir / "tokenizer_config.json")
    entries = [(int(k), v) for k, v in (cfg.get("added_tokens_decoder") or {}).items()]
    if phi3:  # Phi-3's converter also takes tokenizer.json's added tokens, and ignores does_token_look_special
        entries += [(int(a["id"]), a) for a in _optional_json(tok_dir / "tokenizer.json").get("added_tokens", [])]
    for tid, data in entries:
        if tid >= n_vocab:
            continue
        text = data["content"]
        if data.get("special") or (not phi3 and looks_special(text)):
            types[tid] = CONTROL
        else:
            text = text if phi3 else text.replace(SPM_SPACE, " ")
            types[tid] = USER_DEFINED
        tokens[tid], scores[tid] = text.encode("utf-8"), -1000.0
    special = read_special_tokens(tok_dir, load_merges=False, n_vocab=len(tokens))
    vocab = Vocab("llama", "default", tokens, types, special, scores=scores, source=source)
    if not add_dummy_prefix:  # llama.cpp's default is True: say so when the tokenizer adds no '▁' prefix
        vocab.add_space_prefix = False
    return vocab


def _spm_pieces_from_json(tok_dir: Path, where: str) -> tuple[list[tuple[str, float, int]], bool]:
    """SentencePiece pieces (with scores llama.cpp can merge by) from a converted tokenizer.json."""
    tj = read_json(tok_dir / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ExportError("expected a SentencePiece BPE tokenizer (tokenizer.json BPE with byte_fallback)",
                          where=where, hint=HINT_UPSTREAM)
    add_prefix = _spm_json_prefix(tj, where)
    vocab: dict[str, int] = model.get("vocab") or {}
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for pair in merges:
        a, b = pair.split(" ", 1) if isinstance(pair, str) else pair
        rank.setdefault(a + b, len(rank))
    special = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
    unk = model.get("unk_token")
    pieces: list[tuple[str, float, int]] = [("", 0.0, UNUSED)] * (max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        if piece == unk:
            kind, score = UNKNOWN, 0.0
        elif piece in special:
            kind, score = CONTROL, 0.0
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            kind, score = BYTE, 0.0
        else:  # a merged piece ranks by its first merge; pieces no merge makes come last (SentencePiece's -1e9)
            kind, score = NORMAL, -float(rank[piece]) if piece in rank else (0.0 if len(piece) == 1 else -1e9)
        pieces[i] = (piece, score, kind)
    return pieces, add_prefix


def _spm_json_prefix(tj: dict[str, Any], where: str) -> bool:
    """Whether a SentencePiece-converted tokenizer.json adds the dummy '▁' prefix; refuse what llama.cpp cannot run."""
    norm, pre = tj.get("normalizer") or {}, tj.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm] if norm else []
    kinds = [s.get("type") for s in steps]
    if pre.get("type") == "Metaspace" and not steps and not pre.get("split", True):
        return pre.get("prepend_scheme", "always") != "never"
    if not pre and kinds in (["Prepend", "Replace"], ["Replace"]) \
            and steps[-1].get("content") == SPM_SPACE and (steps[-1].get("pattern") or {}).get("String") == " ":
        return kinds[0] == "Prepend"
    raise ExportError(f"llama.cpp cannot run this SentencePiece tokenizer's normalization "
                      f"(normalizer {kinds or None}, pre-tokenizer {pre.get('type')})", where=where,
                      hint=HINT_UPSTREAM)


def is_spm_json(tok_dir: Path) -> bool:
    model = (_optional_json(tok_dir / "tokenizer.json").get("model") or {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))
