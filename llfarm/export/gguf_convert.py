"""Convert a Hugging Face checkpoint (safetensors) into one GGUF file, without torch, the way llama.cpp's
``convert_hf_to_gguf.py`` converts it: the same metadata keys, tokenizer and tensors (see :mod:`.archs` for the
architectures and :mod:`.vocab` for the tokenizers), written with gguf-py.

- Tensor types follow the reference's ``prepare_tensors``: 1-D tensors, norms and non-``.weight`` tensors are F32;
  the rest take the requested type, falling back to F16 where the row length does not fit its block size.
  q4_0/q4_1/q5_0/q5_1 (which the reference does not write) keep the output projection at Q8_0, as llama.cpp's own
  quantizer keeps it at a higher precision. K-quants are made by llama.cpp's quantizer from a 16-bit GGUF
  (:mod:`.kquant`).
- Tensors are streamed: every tensor's info is declared first, then each one is read from disk, converted,
  written and dropped, so peak memory is about the largest tensor, not the model.
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
from .archs import Arch, Config, architecture_for
from .vocab import HINT_UPSTREAM, Vocab

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
QUANT_TYPES = {  # --quant → (tensor type, general.file_type), written by gguf-py
    "f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16), "bf16": (Q.BF16, FT.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, FT.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, FT.MOSTLY_Q5_0), "q5_1": (Q.Q5_1, FT.MOSTLY_Q5_1),
}
LOW_BIT = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


# ---- reading the checkpoint --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    def read(self) -> np.ndarray:
        """The tensor in its own dtype (F16/F32), BF16 widened to F32 (the reference converts it so), one seek."""
        count = math.prod(self.shape)
        raw = np.fromfile(self.file, dtype=SAFETENSORS_DTYPES[self.dtype], count=count, offset=self.offset)
        if self.dtype == "BF16":  # bf16 is the top half of a float32: widen, shift in place (one extra copy only)
            wide = raw.astype(np.uint32)
            del raw
            wide <<= 16
            return wide.view(np.float32).reshape(self.shape)
        return raw.reshape(self.shape)


def read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ExportError(f"tensor {name} has dtype {info['dtype']}; expected one of F32, F16, BF16",
                              where=str(path), hint=HINT_UPSTREAM)
        tensors[name] = SourceTensor(name, path, info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
    return tensors


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
        tensors.update(read_safetensors_header(path))
    return tensors


def natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


# ---- what a model needs, checked before anything is written --------------------------------------------------------

@dataclass
class ModelInfo:
    arch: Arch
    cfg: Config
    vocab: Vocab


def inspect_model(config: dict[str, Any], tok_dir: Path, where: str, spm_model: Path | None = None) -> ModelInfo:
    """Architecture, rope scaling and tokenizer, checked; ExportError when llama.cpp could not run the result.
    Cheap (no weights read), so export runs it before any merge or write."""
    arch = architecture_for(config, where)
    cfg = Config(config)
    arch.check(cfg, where)
    if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer.model").is_file():
        raise ExportError("no tokenizer.json or tokenizer.model beside the model", where=str(tok_dir),
                          hint="save the tokenizer with save_pretrained")
    return ModelInfo(arch, cfg, arch.vocab(tok_dir, cfg, where, spm_model))


# ---- tensors -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    source: SourceTensor | None  # None: computed (rope factors)
    data: np.ndarray | None = None  # the computed values
    rows: int | None = None  # keep only the first rows (Gemma 3's out-of-vocabulary embedding rows)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def tensor_type(gguf_name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType,
                output_tensor: bool) -> gguf.GGMLQuantizationType:
    """The reference's choice for one tensor (prepare_tensors), plus the output-projection rule for 4/5-bit types."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith((".weight", ".lora_a",
                                                                                         ".lora_b")):
        return Q.F32
    if wanted in LOW_BIT and output_tensor:
        wanted = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else Q.F16  # gguf-py's QuantError → the reference falls back to F16


def plan_tensors(info: ModelInfo, source: dict[str, SourceTensor], quant: str, tok_dir: Path) -> list[PlannedTensor]:
    arch, cfg = info.arch, info.cfg
    wanted, _ = QUANT_TYPES[quant]
    n_layer = int(cfg.find(["n_layers", "num_hidden_layers", "n_layer", "num_layers"]))
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, n_layer)
    planned: list[PlannedTensor] = []
    for gname, data in arch.extra_tensors(cfg):
        planned.append(PlannedTensor(gname, data.shape, Q.F32, None, data))
    rows = arch.embedding_rows(cfg, tok_dir, info.vocab)
    named = []
    for name, st in source.items():
        if name in arch.skip or name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
            continue
        new = name_map.get_name(name.replace("language_model.", ""), try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"tensor {name} has no GGUF name for arch {arch.name}", where=str(st.file),
                              hint=HINT_UPSTREAM)
        named.append((name, new))
    names = {new for _, new in named}
    if "token_embd.weight" not in names:
        raise ExportError("the checkpoint has no token embedding (model.embed_tokens.weight)",
                          where=str(next(iter(source.values())).file))
    has_output = "output.weight" in names
    if not has_output and not cfg.get("tie_word_embeddings", True) and not arch.skip:
        raise ExportError("tie_word_embeddings is false but the checkpoint has no lm_head.weight",
                          where=str(next(iter(source.values())).file))
    for name, new in named:
        st = source[name]
        shape, keep = st.shape, None
        if new == "token_embd.weight" and rows is not None and rows < shape[0]:
            shape, keep = (rows, *shape[1:]), rows
        output = new == "output.weight" or (new == "token_embd.weight" and not has_output)
        planned.append(PlannedTensor(new, shape, tensor_type(new, shape, wanted, output), st, rows=keep))
    embd = next(p for p in planned if p.gguf_name == "token_embd.weight")
    if embd.shape[0] != len(info.vocab.tokens):
        raise ExportError(f"the tokenizer has {len(info.vocab.tokens)} tokens but the embedding has "
                          f"{embd.shape[0]} rows; llama.cpp would refuse to load the file", where=str(tok_dir),
                          hint="resize the embeddings to the tokenizer (model.resize_token_embeddings)")
    return planned


def tensor_bytes(info: ModelInfo, pt: PlannedTensor) -> np.ndarray:
    """Read, transform and quantize one tensor into the exact bytes GGUF stores."""
    if pt.source is None:
        data = pt.data
    else:
        data = pt.source.read()
        if pt.rows is not None:
            data = data[: pt.rows]
        data = info.arch.transform(info.cfg, pt.source.name, data)
    return np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(data), pt.qtype))


# ---- writing -------------------------------------------------------------------------------------------------------

def convert(model_dir: Path, out_path: Path, *, quant: str, name: str, chat_template: str | None = None,
            add_bos: bool | None = None, eot_token: str | None = None) -> Path:
    """Write ``out_path`` (GGUF) from the HF model in ``model_dir``. Streams tensor by tensor. K-quants go through
    llama.cpp's quantizer (:func:`.kquant.quantize_file`) from a 16-bit GGUF written next to ``out_path``."""
    from .kquant import KQUANTS, intermediate_type, quantize_file

    if quant in KQUANTS:
        source = read_safetensors_index(model_dir)
        tmp = out_path.with_name(out_path.name + ".tmp-16bit.gguf")
        try:
            convert(model_dir, tmp, quant=intermediate_type(source.values()), name=name,
                    chat_template=chat_template, add_bos=add_bos, eot_token=eot_token)
            quantize_file(tmp, out_path, quant)
        finally:
            tmp.unlink(missing_ok=True)
        return out_path

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    info = inspect_model(config, model_dir, str(model_dir))
    source = read_safetensors_index(model_dir)
    planned = plan_tensors(info, source, quant, model_dir)
    _, file_type = QUANT_TYPES[quant]
    vocab = info.vocab
    if chat_template is not None:
        vocab.special.chat_template = chat_template
    if add_bos:
        vocab.special.add["bos"] = True
    tokens = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in vocab.tokens]
    eot_id = tokens.index(eot_token) if eot_token in tokens else None

    w = gguf.GGUFWriter(out_path, info.arch.name)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        info.arch.write_params(w, info.cfg, file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(w)
        if eot_id is not None and eot_id != vocab.special.ids.get("eos") and "eot" not in vocab.special.ids:
            w.add_eot_token_id(eot_id)  # the template's end-of-turn marker: llama.cpp stops on it too
        for pt in planned:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(pt.shape, pt.qtype)
            w.add_tensor_info(pt.gguf_name, byte_shape, np.dtype(np.uint8), pt.nbytes, raw_dtype=pt.qtype)
        w.add_size_label(gguf.size_label(*w.get_total_parameter_count()))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for pt in planned:
            data = tensor_bytes(info, pt)
            w.write_tensor_data(data)
            del data
    finally:
        w.close()
    return out_path
