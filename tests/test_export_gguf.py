"""GGUF export: metadata and tensors round-trip through GGUFReader, and a numpy forward pass over the GGUF alone
(llama.cpp's conventions) reproduces transformers' logits of the merged model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from export_helpers import (
    gguf_fields,
    gguf_forward,
    gguf_tensors,
    hf_logits,
    hf_logits_with_gguf_weights,
    hf_state_dict,
    hf_to_llamacpp_rows,
    make_run,
    odd_base,
    tiny_base,
)

from llfarm.errors import ExportError
from llfarm.export import export_run
from llfarm.templates import load_template

QUANTS = ("f32", "f16", "q8_0")
# llama: the shipped tiny Llama (untied); qwen2: tied embeddings + q/k/v biases; odd: Llama-3.1 rope scaling and
# an FFN width (80) that Q8_0 cannot block, so ffn_down falls back to F16.
CASES = ("llama", "qwen2", "odd")
IDS = [4, 93, 117, 260, 31, 17, 402, 5, 12, 4, 350, 77]

HF_TO_GGUF = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
]


def gguf_name(hf: str) -> str:
    for pat, rep in HF_TO_GGUF:
        if re.fullmatch(pat, hf):
            return re.sub(pat, rep, hf)
    raise AssertionError(f"unexpected HF tensor {hf}")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict]:
    """case → {run, merged, gguf: {quant: path}, template}; one LoRA run per case, exported at every quant."""
    tmp = tmp_path_factory.mktemp("gguf")
    bases = {"llama": tiny_base(tmp), "qwen2": tiny_base(tmp, "qwen2"), "odd": odd_base(tmp)}
    templates = {"llama": "chatml", "qwen2": "chatml", "odd": "llama3"}
    out = {}
    for case in CASES:
        run = make_run(tmp / f"run-{case}", bases[case], template=templates[case])
        paths = export_run(run, ["merged", "gguf"], quant="f32")
        ggufs = {"f32": paths[1]}
        for quant in QUANTS[1:]:
            ggufs[quant] = export_run(run, ["gguf"], quant=quant)[0]
        out[case] = {"run": run, "merged": paths[0], "gguf": ggufs, "template": templates[case]}
    return out


@pytest.mark.parametrize("case", CASES)
def test_metadata_round_trip(exports, case):
    from transformers import AutoTokenizer

    e = exports[case]
    cfg = json.loads((e["merged"] / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(e["merged"])
    tok_json = json.loads((e["merged"] / "tokenizer.json").read_text())
    for quant, path in e["gguf"].items():
        f = gguf_fields(path)
        arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg["architectures"][0]]
        assert f["general.architecture"] == arch
        assert f["general.name"] == "tiny-test"
        assert f["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[quant]
        assert f[f"{arch}.context_length"] == cfg["max_position_embeddings"]
        assert f[f"{arch}.embedding_length"] == cfg["hidden_size"]
        assert f[f"{arch}.block_count"] == cfg["num_hidden_layers"]
        assert f[f"{arch}.feed_forward_length"] == cfg["intermediate_size"]
        assert f[f"{arch}.attention.head_count"] == cfg["num_attention_heads"]
        assert f[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]
        assert f[f"{arch}.rope.freq_base"] == cfg["rope_parameters"]["rope_theta"]
        assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)
        if arch == "llama":  # as convert_hf_to_gguf.py: LlamaModel writes these two, Qwen2Model does not
            assert f[f"{arch}.rope.dimension_count"] == cfg["hidden_size"] // cfg["num_attention_heads"]
            assert f[f"{arch}.vocab_size"] == cfg["vocab_size"]
        else:
            assert f"{arch}.rope.dimension_count" not in f and f"{arch}.vocab_size" not in f
        # tokenizer: every id the tokenizer knows, then unused padding up to the embedding rows
        tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
        assert len(tokens) == len(types) == cfg["vocab_size"]
        n = len(tok)
        assert tokens[:n] == tok.convert_ids_to_tokens(list(range(n)))
        assert tokens[n:] == [f"[PAD{i}]" for i in range(n, cfg["vocab_size"])]
        for added in tok_json["added_tokens"]:  # special → CONTROL (3), other added → USER_DEFINED (4)
            assert types[added["id"]] == (3 if added["special"] else 4), added
        assert set(types[:n]) - {3, 4} == {1}  # the rest NORMAL
        assert set(types[n:]) == {5}  # UNUSED
        assert f["tokenizer.ggml.model"] == "gpt2"
        assert f["tokenizer.ggml.pre"] == "gpt-2"  # the tiny tokenizer is GPT-2 style byte-level BPE
        assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in tok_json["model"]["merges"]]
        assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
        assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
        assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
        tpl = load_template(e["template"])
        assert f["tokenizer.chat_template"] == tpl.jinja
        assert f["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids(tpl.eos)
        # llama3's template starts with BOS, so llama.cpp/Ollama must add it; chatml's does not
        assert f["tokenizer.ggml.add_bos_token"] is (e["template"] == "llama3")


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("case", CASES)
def test_tensors_round_trip(exports, case, quant):
    e = exports[case]
    cfg = json.loads((e["merged"] / "config.json").read_text())
    hf = hf_state_dict(e["merged"])
    got = gguf_tensors(e["gguf"][quant])
    expected_names = {gguf_name(k) for k in hf}
    if cfg.get("tie_word_embeddings"):
        assert "output.weight" not in got  # llama.cpp reuses token_embd
        expected_names.discard("output.weight")
    rope_freqs = got.pop("rope_freqs.weight", None)
    assert set(got) == expected_names
    llama = cfg["architectures"][0] == "LlamaForCausalLM"
    for name, w in hf.items():
        if gguf_name(name) not in got:
            assert name == "lm_head.weight" and cfg.get("tie_word_embeddings")
            continue
        g, gtype = got[gguf_name(name)]
        if llama and ".q_proj." in name:
            w = hf_to_llamacpp_rows(w, cfg["num_attention_heads"])
        elif llama and ".k_proj." in name:
            w = hf_to_llamacpp_rows(w, cfg["num_key_value_heads"])
        assert g.shape == w.shape, name
        if w.ndim == 1 or quant == "f32":
            assert gtype == "F32", name
            np.testing.assert_array_equal(g, w, err_msg=name)
        elif quant == "f16" or w.shape[-1] % 32:
            assert gtype == "F16", name
            np.testing.assert_array_equal(g, w.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            assert gtype == "Q8_0", name
            step = np.abs(w.reshape(-1, 32)).max(-1) / 127  # one quantization step per 32-block
            err = np.abs(g - w).reshape(-1, 32).max(-1)
            assert np.all(err <= step * 0.57 + 1e-8), name  # half a step, plus the f16 scale's rounding
    if case == "odd":
        assert got["blk.0.ffn_down.weight"][1] == ("F16" if quant == "q8_0" else quant.upper())
        rs = cfg["rope_parameters"]
        freqs = 10000.0 ** (-np.arange(0, 16, 2) / 16)
        wavelen = 2 * np.pi / freqs
        lo, hi = rs["original_max_position_embeddings"] / 1.0, rs["original_max_position_embeddings"] / 4.0
        assert rope_freqs is not None and rope_freqs[1] == "F32"
        assert rope_freqs[0][wavelen < hi] == pytest.approx(1.0)
        assert rope_freqs[0][wavelen > lo] == pytest.approx(rs["factor"])
        mid = (wavelen >= hi) & (wavelen <= lo)
        assert mid.any() and np.all((rope_freqs[0][mid] > 1) & (rope_freqs[0][mid] < rs["factor"]))
    else:
        assert rope_freqs is None


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("case", CASES)
def test_numpy_forward_matches_transformers(exports, case, quant):
    """f32: logits equal at every position. f16/q8_0: the same next token; and the GGUF's forward equals
    transformers run on the GGUF's own (dequantized) weights, so the only difference left is rounding."""
    e = exports[case]
    ref = hf_logits(e["merged"], IDS)
    got = gguf_forward(e["gguf"][quant], IDS)
    assert got.shape == ref.shape
    if quant == "f32":
        assert np.abs(got - ref).max() <= 1e-3
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    else:
        assert got[-1].argmax() == ref[-1].argmax()
        names = {k: gguf_name(k) for k in hf_state_dict(e["merged"])} | {"lm_head.weight": "output.weight"}
        same_weights = hf_logits_with_gguf_weights(e["merged"], e["gguf"][quant], IDS, names)
        assert np.abs(got - same_weights).max() <= 1e-3


def test_merged_differs_from_base(exports):
    """The adapter really changed the model (so equality above is about the merge, not about a no-op)."""
    e = exports["llama"]
    base = json.loads((e["run"] / "manifest.json").read_text())["model_path"]
    assert np.abs(hf_logits(base, IDS) - hf_logits(e["merged"], IDS)).max() > 0.1


def write_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("rope, expected", [
    ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
     {"type": "yarn", "factor": 4.0, "original_context_length": 128}),
])
def test_rope_scaling_metadata(exports, tmp_path, rope, expected):
    from llfarm.export.gguf_convert import convert

    model = write_config(exports["llama"]["merged"], tmp_path / "m", rope_parameters={"rope_theta": 5e5, **rope})
    f = gguf_fields(convert(model, tmp_path / "x.gguf", quant="f16", name="x"))
    assert f["llama.rope.freq_base"] == 5e5
    for key, value in expected.items():
        assert f[f"llama.rope.scaling.{key}"] == value


def test_rope_linear_numerics(exports, tmp_path):
    """Linear rope scaling reaches llama.cpp's freq_scale: the numpy forward over the GGUF still matches HF."""
    from llfarm.export.gguf_convert import convert

    model = write_config(exports["llama"]["merged"], tmp_path / "m",
                         rope_parameters={"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0})
    got = gguf_forward(convert(model, tmp_path / "x.gguf", quant="f32", name="x"), IDS)
    assert np.abs(got - hf_logits(model, IDS)).max() <= 1e-3


def test_legacy_config_keys(exports, tmp_path):
    """transformers 4 configs keep rope_theta and rope_scaling at the top level."""
    from llfarm.export.gguf_convert import convert

    model = write_config(exports["llama"]["merged"], tmp_path / "m", rope_theta=123456.0,
                         rope_scaling={"type": "linear", "factor": 2.0})
    cfg = json.loads((model / "config.json").read_text())
    del cfg["rope_parameters"]
    (model / "config.json").write_text(json.dumps(cfg))
    f = gguf_fields(convert(model, tmp_path / "x.gguf", quant="f16", name="x"))
    assert f["llama.rope.freq_base"] == 123456.0
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == 2.0


def test_bf16_checkpoint(exports, tmp_path):
    """BF16 safetensors (no numpy dtype) are read through a uint16 view: values equal torch's bf16 → f32."""
    import torch
    from safetensors.torch import load_file, save_file

    from llfarm.export.gguf_convert import convert

    src = exports["qwen2"]["merged"]
    model = tmp_path / "bf16"
    shutil.copytree(src, model)
    state = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    got = gguf_tensors(convert(model, tmp_path / "x.gguf", quant="f32", name="x"))
    emb = state["model.embed_tokens.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(got["token_embd.weight"][0], emb)


def test_unsupported_architecture_is_refused(exports, tmp_path):
    from llfarm.export.gguf_convert import convert

    model = write_config(exports["llama"]["merged"], tmp_path / "m", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ExportError, match="GPTNeoXForCausalLM"):
        convert(model, tmp_path / "x.gguf", quant="f16", name="x")
    assert not (tmp_path / "x.gguf").exists()


def test_unknown_pre_tokenizer_is_refused(exports, tmp_path):
    from llfarm.export.gguf_convert import convert

    model = tmp_path / "m"
    shutil.copytree(exports["llama"]["merged"], model)
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,5}|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match="pre-tokenizer"):
        convert(model, tmp_path / "x.gguf", quant="f16", name="x")


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("regex, pre", [(LLAMA3_REGEX, "llama-bpe"),
                                        (LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"), "qwen2"),
                                        (None, "gpt-2")])
def test_pre_tokenizer_by_structure(regex, pre):
    """A tokenizer llama.cpp's hash table does not know (here: an empty vocabulary) is accepted when its
    pre-tokenizer is exactly one llama.cpp implements, as `tokenizers` writes it; Llama 3's needs ignore_merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from llfarm.export.vocab import identify_pre

    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.decoder = decoders.ByteLevel()
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert identify_pre(tok, json.loads(tok.to_str()), "x") == (pre, "structure")
    if pre == "llama-bpe":  # without ignore_merges llama.cpp's llama-bpe would tokenize differently: refused
        tj = json.loads(tok.to_str())
        tj["model"]["ignore_merges"] = False
        with pytest.raises(ExportError, match="pre-tokenizer"):
            identify_pre(Tokenizer.from_str(json.dumps(tj)), tj, "x")
