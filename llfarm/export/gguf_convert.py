"""Convert a Hugging Face Llama/Mistral/Qwen2 checkpoint (safetensors) into one GGUF file, without torch.

Built on gguf-py (``GGUFWriter``, the tensor name map, ``gguf.quants``, ``SpecialVocab``) and follows what
llama.cpp's ``convert_hf_to_gguf.py`` does for ``LlamaModel`` and ``Qwen2Model``:

- Q/K rows are permuted for arch ``llama`` only (llama.cpp rotates adjacent pairs, HF rotates halves);
- 1-D tensors and norms stay F32; a Q8_0 tensor whose rows are not a multiple of 32 falls back to F16;
- the token list is padded to the embedding rows; ``tokenizer.ggml.pre`` is chosen from the tokenizer's own
  pre-tokenizer regex, and only values llama.cpp implements are written;
- tied embeddings write no ``output.weight``; Llama-3.1 ``rope_type: llama3`` adds ``rope_freqs.weight``.

Tensors are streamed: every tensor's info is declared first, then each one is read from disk, converted,
written and dropped, so peak memory is about one tensor, not the model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ExportError

ARCHITECTURES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
}
QUANT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Pre-tokenizer regexes as they appear in tokenizer.json, and the tokenizer.ggml.pre value llama.cpp runs them
# under (src/llama-vocab.cpp keeps each original regex as a comment beside its own rewrite).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
SPLIT_REGEX_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    GPT2_REGEX: "gpt-2",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "tekken",  # Mistral Nemo
}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
HINT_UPSTREAM = "export --format merged, then convert exports/merged with llama.cpp's convert_hf_to_gguf.py"


# ---- reading the checkpoint --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    def read(self) -> np.ndarray:
        """The tensor as float32 (BF16 widened through a uint16 view), read with one seek."""
        count = math.prod(self.shape)
        raw = np.fromfile(self.file, dtype=SAFETENSORS_DTYPES[self.dtype], count=count, offset=self.offset)
        if self.dtype == "BF16":  # bf16 is the top half of a float32: widen, shift in place (one extra copy only)
            wide = raw.astype(np.uint32)
            del raw
            wide <<= 16
            return wide.view(np.float32).reshape(self.shape)
        return raw.astype(np.float32, copy=False).reshape(self.shape)


def read_safetensors_index(model_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, from the file headers only."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("model*.safetensors"))  # not e.g. an adapter_model.safetensors beside it
    if not files:
        raise ExportError("no *.safetensors weights found (pytorch_model.bin is not supported)", where=str(model_dir),
                          hint="re-save the model with save_pretrained(..., safe_serialization=True)")
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ExportError(f"tensor {name} has dtype {info['dtype']}; expected one of F32, F16, BF16",
                                  where=str(path), hint=HINT_UPSTREAM)
            tensors[name] = SourceTensor(name, path, info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
    return tensors


# ---- hyperparameters -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HParams:
    arch: gguf.MODEL_ARCH
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    n_vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any]
    explicit_head_dim: bool
    tied: bool

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def read_hparams(config: dict[str, Any], where: str) -> HParams:
    archs = config.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ExportError(f"architecture {archs or '(none)'} is not supported by the GGUF export; expected one of "
                          f"{', '.join(ARCHITECTURES)}", where=where, hint=HINT_UPSTREAM)
    # transformers 5 keeps rope_theta (and the scaling) in rope_parameters; older configs at the top level.
    rope_params = dict(config.get("rope_parameters") or {})
    rope_scaling = dict(config.get("rope_scaling") or rope_params)
    if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
        rope_scaling = {}
    n_head = int(config["num_attention_heads"])
    return HParams(
        arch=arch, n_layer=int(config["num_hidden_layers"]), n_embd=int(config["hidden_size"]),
        n_ff=int(config["intermediate_size"]), n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // n_head),
        n_ctx=int(config.get("max_position_embeddings") or 2048), n_vocab=int(config["vocab_size"]),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
        rope_scaling=rope_scaling, explicit_head_dim=config.get("head_dim") is not None,
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Per-frequency divisors for Llama-3.1 rope scaling, as convert_hf_to_gguf.py computes them."""
    rs = hp.rope_scaling
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ---- tokenizer -----------------------------------------------------------------------------------------------------

def detect_pre(tokenizer_json: dict[str, Any], where: str) -> str:
    """The tokenizer.ggml.pre value for a byte-level BPE tokenizer, from its pre-tokenizer regex."""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ExportError(f"only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, Tekken) are supported; got "
                          f"{model.get('type')} with a {decoder.get('type')} decoder", where=where, hint=HINT_UPSTREAM)
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        regex = GPT2_REGEX
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
          and not steps[1].get("use_regex", True)):
        regex = (steps[0].get("pattern") or {}).get("Regex")
    else:
        regex = None
    if regex not in SPLIT_REGEX_PRE:
        raise ExportError("the tokenizer's pre-tokenizer is not one llama.cpp is known to implement "
                          "(known: GPT-2, Llama 3, Qwen2, Tekken)", where=where, hint=HINT_UPSTREAM)
    return SPLIT_REGEX_PRE[regex]


def vocab_tokens(tokenizer_json: dict[str, Any], n_vocab: int, where: str) -> tuple[list[str], list[int]]:
    """Token texts and types, padded with unused [PADn] tokens up to the embedding rows."""
    by_id = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tokenizer_json.get("added_tokens") or []}
    top = max([*by_id, *added], default=-1)
    if top >= n_vocab:
        raise ExportError(f"the tokenizer has token id {top} but the model has only {n_vocab} embedding rows",
                          where=where, hint="resize the embeddings to the tokenizer (model.resize_token_embeddings)")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types


def load_tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError("no tokenizer.json (a fast tokenizer) beside the model", where=str(model_dir),
                          hint="save the tokenizer with save_pretrained from a fast tokenizer")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ModelInfo:
    hp: HParams
    pre: str
    tokens: list[str]
    types: list[int]


def inspect_model(config: dict[str, Any], tokenizer_json: dict[str, Any], where: str) -> ModelInfo:
    """What the converter needs from config.json and tokenizer.json; ExportError when it cannot convert them.
    Cheap, so export runs it before any merge or write."""
    hp = read_hparams(config, where)
    kind = hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type"))
    if kind not in (None, "linear", "yarn", "llama3"):
        raise ExportError(f"rope scaling '{kind}' is not supported by the GGUF export (linear, yarn, llama3 are)",
                          where=where, hint=HINT_UPSTREAM)
    pre = detect_pre(tokenizer_json, where)
    tokens, types = vocab_tokens(tokenizer_json, hp.n_vocab, where)
    return ModelInfo(hp, pre, tokens, types)


# ---- tensors -------------------------------------------------------------------------------------------------------

def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split rotary rows → llama.cpp adjacent-pair rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class PlannedTensor:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    source: SourceTensor | None  # None: computed (rope_freqs)

    @property
    def nbytes(self) -> int:
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return math.prod(self.shape) * 4
        if self.qtype == gguf.GGMLQuantizationType.F16:
            return math.prod(self.shape) * 2
        return math.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype))


def plan_tensors(hp: HParams, source: dict[str, SourceTensor], quant: str) -> list[PlannedTensor]:
    wanted, _ = QUANT_TYPES[quant]
    name_map = gguf.get_tensor_name_map(hp.arch, hp.n_layer)
    planned: list[PlannedTensor] = []
    for name in sorted(source, key=_natural_key):
        st = source[name]
        if name.endswith(".rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and hp.tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"tensor {name} has no GGUF name for arch {hp.arch_name}", where=str(st.file),
                              hint=HINT_UPSTREAM)
        if len(st.shape) == 1 or name.endswith("norm.weight") or wanted == gguf.GGMLQuantizationType.F32:
            qtype = gguf.GGMLQuantizationType.F32
        elif wanted == gguf.GGMLQuantizationType.Q8_0 and st.shape[-1] % 32 != 0:
            qtype = gguf.GGMLQuantizationType.F16  # llama.cpp's fallback for rows Q8_0 cannot block
        else:
            qtype = wanted
        planned.append(PlannedTensor(new, st.shape, qtype, st))
    names = {p.gguf_name for p in planned}
    if "token_embd.weight" not in names:
        raise ExportError("the checkpoint has no model.embed_tokens.weight", where=str(next(iter(source.values())).file))
    if not hp.tied and "output.weight" not in names:
        raise ExportError("tie_word_embeddings is false but the checkpoint has no lm_head.weight",
                          where=str(next(iter(source.values())).file))
    if hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type")) == "llama3":
        planned.append(PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", (hp.head_dim // 2,),
                                     gguf.GGMLQuantizationType.F32, None))
    return planned


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def tensor_data(hp: HParams, pt: PlannedTensor) -> np.ndarray:
    """Read, permute and quantize one tensor into the exact bytes GGUF stores."""
    if pt.source is None:
        data = llama3_rope_factors(hp)
    else:
        data = pt.source.read()
        if hp.arch == gguf.MODEL_ARCH.LLAMA:
            if pt.source.name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_qk(data, hp.n_head)
            elif pt.source.name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_qk(data, hp.n_head_kv)
    out = gguf.quants.quantize(np.ascontiguousarray(data), pt.qtype)
    return np.ascontiguousarray(out)


# ---- writing -------------------------------------------------------------------------------------------------------

def convert(model_dir: Path, out_path: Path, *, quant: str, name: str, chat_template: str | None = None,
            add_bos: bool | None = None, eot_token: str | None = None) -> Path:
    """Write ``out_path`` (GGUF) from the HF model in ``model_dir``. Streams tensor by tensor."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    info = inspect_model(config, load_tokenizer_json(model_dir), str(model_dir))
    hp, tokens = info.hp, info.tokens
    source = read_safetensors_index(model_dir)
    planned = plan_tensors(hp, source, quant)
    _, file_type = QUANT_TYPES[quant]

    w = gguf.GGUFWriter(out_path, hp.arch_name)
    w.add_type("model")
    w.add_name(name)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_vocab_size(hp.n_vocab)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.explicit_head_dim:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    _add_rope_scaling(w, hp)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(info.pre)
    w.add_token_list(tokens)
    w.add_token_types(info.types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=hp.n_vocab)
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_special_token["bos"] = bool(add_bos) or bool(special.add_special_token.get("bos", False))
    special.add_to_gguf(w, quiet=True)
    eot_id = tokens.index(eot_token) if eot_token in tokens else None
    if eot_id is not None and eot_id != special.special_token_ids.get("eos"):
        w.add_eot_token_id(eot_id)  # the template's end-of-turn marker: llama.cpp stops on it too

    for pt in planned:
        if pt.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if pt.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            w.add_tensor_info(pt.gguf_name, pt.shape, dtype, pt.nbytes, raw_dtype=pt.qtype)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(pt.shape, pt.qtype)
            w.add_tensor_info(pt.gguf_name, byte_shape, np.dtype(np.uint8), pt.nbytes, raw_dtype=pt.qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for pt in planned:
            data = tensor_data(hp, pt)
            w.write_tensor_data(data)
            del data
    finally:
        w.close()
    return out_path


def _add_rope_scaling(w: gguf.GGUFWriter, hp: HParams) -> None:
    rs = hp.rope_scaling
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear" and "factor" in rs:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    elif kind == "yarn" and "factor" in rs:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings") or hp.n_ctx))

