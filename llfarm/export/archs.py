"""What each supported architecture adds to the generic conversion, following the classes of llama.cpp's
``convert_hf_to_gguf.py`` (``LlamaModel``, ``Qwen2Model``, ``Qwen3Model``, ``Gemma2Model``, ``Gemma3Model``,
``Phi3MiniModel``): the hyperparameter keys each writes, its tokenizer rule, and its tensor changes.

    arch = architecture_for(config, where)      # ExportError for an architecture not listed here
    arch.write_params(writer, cfg, file_type)
    arch.vocab(tokenizer_dir, cfg, where)
    arch.transform(hf_name, array)              # Q/K permutation (llama), RMSNorm +1 (Gemma)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ExportError
from .vocab import HINT_UPSTREAM, Vocab, bpe_vocab, is_spm_json, read_json, spm_vocab

MISSING = object()


class Config(dict):
    """config.json with the reference's find_hparam and its normalised rope parameters (TextModel.__init__)."""

    def __init__(self, data: dict[str, Any]):
        super().__init__(data)
        if isinstance(data.get("text_config"), dict):
            self.update(data["text_config"])
        rope = dict(self.get("rope_parameters", self.get("rope_scaling")) or {})
        if "full_attention" not in rope and "sliding_attention" not in rope:
            local = self.find(["local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                               "rope_local_base_freq"], None)
            theta = self.find(["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                               "rotary_emb_base"], None)
            if local is not None:
                rope["sliding_attention"] = {"rope_theta": local}
            if "rope_theta" not in rope and theta is not None:
                rope["rope_theta"] = theta
            if "rope_type" not in rope and rope.get("type") is not None:
                rope["rope_type"] = rope["type"]
            for key, names in (("partial_rotary_factor", ["partial_rotary_factor", "rope_pct", "rope_percent"]),
                               ("original_max_position_embeddings", ["original_max_position_embeddings"])):
                if key not in rope and (value := self.find(names, None)) is not None:
                    rope[key] = value
        self.rope = rope

    def find(self, keys: list[str], default: Any = MISSING) -> Any:
        for key in keys:
            if key in self:
                return self[key]
        if default is MISSING:
            raise ExportError(f"config.json has none of {', '.join(keys)}", where="config.json", hint=HINT_UPSTREAM)
        return default

    @property
    def full_rope(self) -> dict[str, Any]:
        return self.rope.get("full_attention", self.rope)

    @property
    def rope_type(self) -> str | None:
        kind = self.full_rope.get("rope_type")
        return None if kind in (None, "default") else str(kind).lower()

    @property
    def n_head(self) -> int:
        return int(self.find(["num_attention_heads", "n_head", "n_heads"]))

    @property
    def n_head_kv(self) -> int:
        return int(self.find(["num_key_value_heads", "n_kv_heads"], self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim") or self["hidden_size"] // self.n_head)


def _tokenizer_class(tok_dir: Path) -> str | None:
    path = tok_dir / "tokenizer_config.json"
    return read_json(path).get("tokenizer_class") if path.is_file() else None


@dataclass(frozen=True)
class Arch:
    """The generic text model (the reference's TextModel); subclasses add their specifics."""

    hf_names: tuple[str, ...] = ()
    gguf_arch: gguf.MODEL_ARCH = gguf.MODEL_ARCH.LLAMA
    permute_qk: bool = False
    norm_shift: bool = False  # Gemma's RMSNorm multiplies by (1 + weight)
    skip: tuple[str, ...] = ()  # HF tensors the reference does not write
    supported_rope: tuple[str | None, ...] = (None, "linear", "yarn")

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def check(self, cfg: Config, where: str) -> None:
        if cfg.rope_type not in self.supported_rope:
            raise ExportError(f"rope scaling '{cfg.rope_type}' is not supported for {self.name} (supported: "
                              f"{', '.join(str(r or 'none') for r in self.supported_rope)})", where=where,
                              hint=HINT_UPSTREAM)

    # -- metadata
    def write_params(self, w: gguf.GGUFWriter, cfg: Config, file_type: int) -> None:
        """TextModel.set_gguf_parameters (the keys our architectures can have)."""
        w.add_block_count(int(cfg.find(["n_layers", "num_hidden_layers", "n_layer", "num_layers"])))
        if (n_ctx := cfg.find(["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                               "max_sequence_length", "model_max_length"], None)) is not None:
            w.add_context_length(n_ctx)
        if (n_embd := cfg.find(["hidden_size", "n_embd", "dim"], None)) is not None:
            w.add_embedding_length(n_embd)
        if (n_ff := cfg.find(["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                              "n_inner", "hidden_dim"], None)) is not None:
            w.add_feed_forward_length(n_ff)
        if (n_head := cfg.find(["num_attention_heads", "n_head", "n_heads"], None)) is not None:
            w.add_head_count(n_head)
        if (n_head_kv := cfg.find(["num_key_value_heads", "n_kv_heads"], None)) is not None:
            w.add_head_count_kv(n_head_kv)
        if cfg.get("is_causal") is False:
            w.add_causal_attention(False)
        rope = cfg.full_rope
        kind, factor = cfg.rope_type, rope.get("factor")
        if kind == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif kind == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if rope.get(key) is not None:
                    add(rope[key])
            if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(attn)
        elif kind in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        if (theta := rope.get("rope_theta")) is not None:
            w.add_rope_freq_base(theta)
        if (swa_theta := cfg.rope.get("sliding_attention", {}).get("rope_theta")) is not None:
            w.add_rope_freq_base_swa(swa_theta)
        if (eps := cfg.find(["rms_norm_eps", "norm_eps"], None)) is not None:
            w.add_layer_norm_rms_eps(eps)
        if (eps := cfg.find(["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"], None)) is not None:
            w.add_layer_norm_eps(eps)
        if (head_dim := cfg.get("head_dim")) is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_file_type(file_type)

    # -- tokenizer
    def vocab(self, tok_dir: Path, cfg: Config, where: str, spm_model: Path | None = None) -> Vocab:
        """TextModel.set_vocab: byte-level BPE. ``spm_model``: a tokenizer.model to use when ``tok_dir`` has none
        (the base model's, for an adapter run whose saved tokenizer has only tokenizer.json)."""
        return bpe_vocab(tok_dir, cfg.get("vocab_size"), where)

    def _spm_or_bpe(self, tok_dir: Path, cfg: Config, where: str, spm_model: Path | None, *,
                    json_spm: bool = True, phi3: bool = False) -> Vocab:
        """SentencePiece from tokenizer.model; else a SentencePiece-converted tokenizer.json (where the reference
        would fall back to byte-level BPE and refuse it, or write every score as -1000); else byte-level BPE."""
        model = tok_dir / "tokenizer.model" if (tok_dir / "tokenizer.model").is_file() else spm_model
        if model is not None and model.is_file():
            return spm_vocab(tok_dir, model, cfg.get("vocab_size"), where, phi3=phi3)
        if json_spm and is_spm_json(tok_dir):
            return spm_vocab(tok_dir, None, cfg.get("vocab_size"), where, phi3=phi3)
        return bpe_vocab(tok_dir, cfg.get("vocab_size"), where)

    # -- tensors
    def transform(self, cfg: Config, name: str, data: np.ndarray) -> np.ndarray:
        if self.permute_qk:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_qk(data, cfg.n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_qk(data, cfg.n_head_kv)
        if self.norm_shift and name.endswith("norm.weight"):
            data = data + data.dtype.type(1)  # in the source dtype, as the reference adds 1 to the torch tensor
        return data

    def embedding_rows(self, cfg: Config, tok_dir: Path, vocab: Vocab) -> int | None:
        """How many rows of embed_tokens to keep (None: all)."""
        return None

    def extra_tensors(self, cfg: Config) -> list[tuple[str, np.ndarray]]:
        return []


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split rotary rows → llama.cpp adjacent-pair rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Llama(Arch):
    hf_names: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM")
    permute_qk: bool = True
    supported_rope: tuple[str | None, ...] = (None, "linear", "yarn", "llama3")

    def write_params(self, w, cfg, file_type):
        super().write_params(w, cfg, file_type)
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg.head_dim)

    def vocab(self, tok_dir, cfg, where, spm_model=None):
        vocab = self._spm_or_bpe(tok_dir, cfg, where, spm_model)
        cfg_path = tok_dir / "tokenizer_config.json"
        prefix = read_json(cfg_path).get("add_prefix_space") if cfg_path.is_file() else None
        if prefix is not None:
            vocab.add_space_prefix = bool(prefix)
        if cfg.get("vocab_size", 32000) == 32016:  # CodeLlama's infill tokens
            vocab.special.ids.update(prefix=32007, suffix=32008, middle=32009, eot=32010)
        if cfg.get("vocab_size", 32000) == 49152:  # the reference's rule for small Granite models
            vocab.special.add["bos"] = False
        return vocab

    def extra_tensors(self, cfg):
        if cfg.rope_type != "llama3":
            return []
        rope = cfg.full_rope
        base, dim = rope.get("rope_theta", 10000.0), cfg.head_dim
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = rope.get("factor", 8.0)
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old_ctx = rope.get("original_max_position_embeddings", 8192)
        out = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old_ctx / high:
                out.append(1)
            elif wavelen > old_ctx / low:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.asarray(out, dtype=np.float32))]


@dataclass(frozen=True)
class Qwen2(Arch):
    hf_names: tuple[str, ...] = ("Qwen2ForCausalLM",)
    gguf_arch: gguf.MODEL_ARCH = gguf.MODEL_ARCH.QWEN2

    def vocab(self, tok_dir, cfg, where, spm_model=None):
        return self._spm_or_bpe(tok_dir, cfg, where, spm_model, json_spm=False)


@dataclass(frozen=True)
class Qwen3(Qwen2):
    hf_names: tuple[str, ...] = ("Qwen3ForCausalLM",)
    gguf_arch: gguf.MODEL_ARCH = gguf.MODEL_ARCH.QWEN3


@dataclass(frozen=True)
class Gemma2(Arch):
    hf_names: tuple[str, ...] = ("Gemma2ForCausalLM",)
    gguf_arch: gguf.MODEL_ARCH = gguf.MODEL_ARCH.GEMMA2
    norm_shift: bool = True
    skip: tuple[str, ...] = ("lm_head.weight",)  # tied; llama.cpp reuses token_embd
    supported_rope: tuple[str | None, ...] = (None,)
    swa_period: int = 2  # llama.cpp hard-codes the sliding/full layer pattern: every n-th layer is full attention

    def check(self, cfg, where):
        super().check(cfg, where)
        layers = cfg.get("layer_types")
        expected = ["full_attention" if (i + 1) % self.swa_period == 0 else "sliding_attention"
                    for i in range(len(layers or []))]
        if layers and layers != expected:
            raise ExportError(f"layer_types is not {self.name}'s fixed pattern (one full-attention layer in "
                              f"{self.swa_period}), which llama.cpp assumes", where=where, hint=HINT_UPSTREAM)

    def write_params(self, w, cfg, file_type):
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_file_type(file_type)
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])

    def vocab(self, tok_dir, cfg, where, spm_model=None):
        vocab = self._spm_or_bpe(tok_dir, cfg, where, spm_model)
        vocab.add_space_prefix = False
        return vocab


@dataclass(frozen=True)
class Gemma3(Gemma2):
    hf_names: tuple[str, ...] = ("Gemma3ForCausalLM",)
    gguf_arch: gguf.MODEL_ARCH = gguf.MODEL_ARCH.GEMMA3
    skip: tuple[str, ...] = ()
    supported_rope: tuple[str | None, ...] = (None, "linear", "yarn")
    swa_period: int = 6

    def write_params(self, w, cfg, file_type):
        Arch.write_params(self, w, cfg, file_type)
        for key in [k for k in w.kv_data[0] if k.endswith((".context_length", ".attention.head_count",
                                                           ".layer_norm_rms_epsilon", ".key_length", ".value_length",
                                                           ".rope.freq_base", ".head_count_kv"))]:
            del w.kv_data[0][key]  # the reference sets these again below (gguf-py would warn about duplicates)
        w.add_context_length(cfg.get("max_position_embeddings", 131072))
        w.add_head_count(cfg.get("num_attention_heads", 8))
        w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
        w.add_key_length(cfg.get("head_dim", 256))
        w.add_value_length(cfg.get("head_dim", 256))
        w.add_rope_freq_base(cfg.full_rope.get("rope_theta", 1_000_000.0))
        if cfg.get("attn_logit_softcapping") is not None:
            raise ExportError("Gemma 3 with attn_logit_softcapping is not a Gemma 3 llama.cpp runs",
                              where="config.json", hint=HINT_UPSTREAM)
        if final := cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(final)
        if cfg.get("sliding_window_pattern") != 1:
            w.add_sliding_window(cfg["sliding_window"])
        w.add_head_count_kv(cfg.get("num_key_value_heads", 4))

    def embedding_rows(self, cfg, tok_dir, vocab):
        if (tok_dir / "tokenizer.model").is_file() or vocab.model == "llama":
            return len(vocab.tokens)
        tj = read_json(tok_dir / "tokenizer.json")  # the reference's count, for a byte-level tokenizer.json
        return len(tj["model"]["vocab"]) + len(tj.get("added_tokens", []))


@dataclass(frozen=True)
class Phi3(Arch):
    hf_names: tuple[str, ...] = ("Phi3ForCausalLM",)
    gguf_arch: gguf.MODEL_ARCH = gguf.MODEL_ARCH.PHI3
    supported_rope: tuple[str | None, ...] = (None, "su", "longrope")

    def _rope_dims(self, cfg: Config) -> int:
        n_embd = cfg.find(["hidden_size", "n_embd"])
        return int(cfg.rope.get("partial_rotary_factor", 1.0) * n_embd) // cfg.n_head

    def check(self, cfg, where):
        super().check(cfg, where)
        if "original_max_position_embeddings" not in cfg.rope:
            raise ExportError("Phi-3 config.json has no original_max_position_embeddings", where=where,
                              hint=HINT_UPSTREAM)

    def write_params(self, w, cfg, file_type):
        w.add_context_length(cfg.find(["n_positions", "max_position_embeddings"]))
        w.add_rope_scaling_orig_ctx_len(cfg.rope["original_max_position_embeddings"])
        w.add_embedding_length(cfg.find(["hidden_size", "n_embd"]))
        w.add_feed_forward_length(cfg.find(["intermediate_size"]))
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.find(["num_key_value_heads", "n_head_kv"]))
        w.add_layer_norm_rms_eps(cfg.find(["rms_norm_eps"]))
        w.add_rope_dimension_count(self._rope_dims(cfg))
        w.add_rope_freq_base(cfg.full_rope["rope_theta"])
        w.add_file_type(file_type)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        if cfg.rope.get("long_factor"):
            w.add_rope_scaling_attn_factors(self._longrope_attn_factor(cfg))

    def _longrope_attn_factor(self, cfg: Config) -> float:
        max_pos = cfg.find(["n_positions", "max_position_embeddings"])
        orig = cfg.rope["original_max_position_embeddings"]
        scale = max_pos / orig
        return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0

    def vocab(self, tok_dir, cfg, where, spm_model=None):
        if _tokenizer_class(tok_dir) == "GPT2Tokenizer":  # Phi-4
            return bpe_vocab(tok_dir, cfg.get("vocab_size"), where)
        return self._spm_or_bpe(tok_dir, cfg, where, spm_model, phi3=True)

    def extra_tensors(self, cfg):
        long, short = cfg.rope.get("long_factor"), cfg.rope.get("short_factor")
        if not long:
            return []
        if short is None or len(long) != len(short) or len(long) != self._rope_dims(cfg) / 2:
            raise ExportError("Phi-3 long/short rope factors do not match the rope dimensions", where="config.json")
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(long, np.float32)),
                (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(short, np.float32))]


ARCHITECTURES: tuple[Arch, ...] = (Llama(), Qwen2(), Qwen3(), Gemma2(), Gemma3(), Phi3())
BY_HF_NAME = {hf: arch for arch in ARCHITECTURES for hf in arch.hf_names}


def architecture_for(config: dict[str, Any], where: str) -> Arch:
    names = config.get("architectures") or []
    arch = next((BY_HF_NAME[a] for a in names if a in BY_HF_NAME), None)
    if arch is None:
        raise ExportError(f"architecture {names or '(none)'} is not supported by the GGUF export; supported: "
                          f"{', '.join(BY_HF_NAME)}", where=where, hint=HINT_UPSTREAM)
    return arch
