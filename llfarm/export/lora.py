"""A PEFT LoRA adapter as a GGUF LoRA adapter (what llama.cpp's ``convert_lora_to_gguf.py`` writes), for
``llama-cli --lora`` or an Ollama ``ADAPTER`` line: a few MB instead of a merged model.

Tensors ``blk.N.<name>.weight.lora_a`` (r × in) and ``.lora_b`` (out × r), named with the base model's GGUF map;
B's rows get the base architecture's row changes (the Q/K permutation of ``llama``); metadata
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``. llama.cpp scales by alpha / r; a
rank-stabilised adapter (``use_rslora``: alpha / sqrt(r)) is written with alpha·sqrt(r) so the scale is the same
(the reference writes alpha unchanged, which applies such an adapter at the wrong strength).

Refused with a reason: DoRA, per-module rank/alpha patterns, modules_to_save (full tensors, not a LoRA),
embedding and lm_head LoRA, anything but a causal-LM LoRA.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ExportError
from .archs import Arch, Config, architecture_for
from .gguf_convert import QUANT_TYPES, SourceTensor, read_safetensors_header, tensor_type

ADAPTER_QUANTS = ("f32", "f16", "bf16", "q8_0")  # what the reference writes for adapters


@dataclass(frozen=True)
class LoraPair:
    gguf_name: str  # base tensor's GGUF name, e.g. blk.0.attn_q.weight
    hf_name: str  # base tensor's HF name
    a: SourceTensor
    b: SourceTensor


@dataclass(frozen=True)
class AdapterInfo:
    arch: Arch
    cfg: Config
    alpha: float
    rank: int
    pairs: list[LoraPair]


def inspect_adapter(adapter_dir: Path, base_config: dict[str, Any], where: str) -> AdapterInfo:
    """Everything the adapter export needs, checked; ExportError (one line) when llama.cpp could not apply it."""
    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise ExportError("no adapter_config.json + adapter_model.safetensors (a PEFT LoRA adapter)", where=where,
                          hint="export --format gguf (merged) instead")
    lcfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    problem = (f"it is a {lcfg.get('peft_type')} adapter, not LoRA" if lcfg.get("peft_type", "LORA") != "LORA" else
               f"its task is {lcfg.get('task_type')}, not a causal LM"
               if lcfg.get("task_type") not in (None, "CAUSAL_LM") else
               "it is DoRA (weight-decomposed), which GGUF adapters cannot express" if lcfg.get("use_dora") else
               "it has per-module ranks or alphas (rank_pattern/alpha_pattern); a GGUF adapter has one alpha"
               if lcfg.get("rank_pattern") or lcfg.get("alpha_pattern") else
               f"it trains full modules ({', '.join(lcfg['modules_to_save'])}), which are not a LoRA"
               if lcfg.get("modules_to_save") else None)
    if problem:
        raise ExportError(f"this adapter cannot be a GGUF LoRA adapter: {problem}", where=where,
                          hint="export --format gguf (a merged model) instead")
    arch = architecture_for(base_config, where)
    cfg = Config(base_config)
    n_layer = int(cfg.find(["n_layers", "num_hidden_layers", "n_layer", "num_layers"]))
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, n_layer)
    halves: dict[str, dict[str, SourceTensor]] = {}
    for name, st in read_safetensors_header(weights).items():
        base = name.removeprefix("base_model.model.")
        if ".lora_A." in base or ".lora_B." in base:
            half = "A" if ".lora_A." in base else "B"
            base = base.replace(f".lora_{half}.weight", ".weight").replace(f".lora_{half}.default.weight", ".weight")
        elif "lora_embedding" in base:
            raise ExportError("the adapter trains the token embeddings (lora_embedding_A/B); llfarm's GGUF adapter "
                              "export does not write embedding LoRA", where=where, hint="export --format gguf")
        else:
            raise ExportError(f"unexpected tensor {name} in the adapter (not a lora_A/lora_B)", where=where,
                              hint="export --format gguf")
        halves.setdefault(base, {})[half] = st
    pairs = []
    for base, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{base} has only lora_{''.join(ab)}", where=where)
        if base in arch.skip or base.endswith(("lm_head.weight", "embed_tokens.weight")):
            raise ExportError(f"the adapter trains {base.rsplit('.', 1)[0]}, which llama.cpp does not apply as an "
                              "adapter", where=where, hint="export --format gguf")
        new = name_map.get_name(base, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"{base} has no GGUF name for arch {arch.name}", where=where)
        pairs.append(LoraPair(new, base, ab["A"], ab["B"]))
    if not pairs:
        raise ExportError("the adapter has no LoRA tensors", where=where)
    rank = int(lcfg.get("r") or pairs[0].a.shape[0])
    alpha = float(lcfg.get("lora_alpha", rank))
    if lcfg.get("use_rslora"):
        alpha *= math.sqrt(rank)  # PEFT scales by alpha/sqrt(r), llama.cpp by alpha/r
    return AdapterInfo(arch, cfg, alpha, rank, pairs)


def _read(st: SourceTensor, other: SourceTensor) -> np.ndarray:
    data = st.read()
    return data.astype(np.float32) if st.dtype != other.dtype else data  # the reference widens mixed pairs


def convert_adapter(adapter_dir: Path, base_config: dict[str, Any], out_path: Path, *, quant: str,
                    name: str) -> Path:
    """Write ``out_path`` (a GGUF LoRA adapter) from the PEFT adapter in ``adapter_dir``."""
    if quant not in ADAPTER_QUANTS:
        raise ExportError(f"an adapter GGUF is written as one of {', '.join(ADAPTER_QUANTS)}, not {quant}",
                          where="--quant", hint="use --quant f16 for the adapter")
    info = inspect_adapter(adapter_dir, base_config, str(adapter_dir))
    wanted, _ = QUANT_TYPES[quant]
    w = gguf.GGUFWriter(out_path, info.arch.name)
    planned = []
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_name(name)
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, info.alpha)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for pair in info.pairs:
            for suffix, st in ((".lora_a", pair.a), (".lora_b", pair.b)):
                qtype = tensor_type(pair.gguf_name + suffix, st.shape, wanted, False)
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                w.add_tensor_info(pair.gguf_name + suffix, gguf.quants.quant_shape_to_byte_shape(st.shape, qtype),
                                  np.dtype(np.uint8), math.prod(st.shape) // block * size, raw_dtype=qtype)
                planned.append((pair, suffix, qtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for pair, suffix, qtype in planned:
            if suffix == ".lora_a":
                data = _read(pair.a, pair.b)
            else:  # B's rows are the base weight's rows: they get its row permutation
                data = info.arch.transform(info.cfg, pair.hf_name, _read(pair.b, pair.a))
            w.write_tensor_data(np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(data), qtype)))
    finally:
        w.close()
    return out_path
