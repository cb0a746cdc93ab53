"""Opt-in: the exported GGUF loaded by real llama.cpp (llama-cpp-python) tokenizes like the HF tokenizer and gives
the HF model's logits. Not in default CI: llama-cpp-python is source-only and takes ~15 minutes to build on 2 cores.

    pip install '.[llamacpp]' && pytest -m llamacpp tests/test_export_llamacpp.py
"""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import TINY_LLAMA, hf_logits, make_run, odd_base, tiny_base

from llfarm.export import export_run
from llfarm.templates import load_template

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(llama_cpp is None,
                                 reason="needs llama-cpp-python (opt-in: pip install '.[llamacpp]')")]

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 12 + 30? Say it twice."}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llamacpp")
    return {"llama": make_run(tmp / "llama", TINY_LLAMA, template="llama3"),
            "qwen2": make_run(tmp / "qwen2", tiny_base(tmp, "qwen2"), template="chatml"),
            # Llama-3.1 rope scaling (rope_freqs.weight) and an FFN width Q8_0 cannot block (F16 fallback)
            "odd": make_run(tmp / "odd", odd_base(tmp), template="llama3")}


def load(path):
    # F32 KV cache (the default is F16): with it, f32 logits agree to rounding, not to the cache's precision
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False,
                           type_k=0, type_v=0)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "odd"])
def test_llama_cpp_logits_match_transformers(runs, arch, quant):
    from transformers import AutoTokenizer

    run = runs[arch]
    merged, gguf_path = export_run(run, ["merged", "gguf"], quant=quant)
    tok = AutoTokenizer.from_pretrained(merged)
    template = load_template("chatml" if arch == "qwen2" else "llama3")
    text = template.render(MESSAGES, add_generation_prompt=True, bos_token=tok.bos_token)
    ids = tok(text, add_special_tokens=False)["input_ids"]

    llm = load(gguf_path)
    # llama.cpp adds BOS itself where the template starts with one (llama3), so tokenize without it
    adds_bos = template.name == "llama3"
    body = text.removeprefix(tok.bos_token) if adds_bos else text
    got_ids = llm.tokenize(body.encode(), add_bos=adds_bos, special=True)
    assert got_ids == ids
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    ref = hf_logits(merged, ids)
    print(f"{arch}-{quant}: max |llama.cpp - HF| = {np.abs(got - ref).max():.2e}, "
          f"top token {got[-1].argmax()} vs {ref[-1].argmax()}")
    if quant == "f32":
        assert np.abs(got - ref).max() <= 1e-3
    assert got[-1].argmax() == ref[-1].argmax()


# ---- real tokenizers and every architecture (needs the assets too: tests/fetch-llamacpp-assets) -----------------

from llamacpp_assets import (  # the part of this module that needs the assets
    ARCH_CONFIGS,
    BPE_FAMILIES,
    SKIP_REASON,
    SPM_FAMILIES,
    assets_dir,
    reference_convert,
    tiny_model,
    tokenizer_dir,
    vectors,
)

needs_assets = pytest.mark.skipif(assets_dir() is None, reason=SKIP_REASON)
ARCH_TOKENIZER = {"llama": "gpt-2", "mistral": "llama-spm", "qwen2": "qwen2", "qwen3": "qwen2",
                  "gemma2": "llama-spm", "gemma3": "llama-spm", "phi3": "phi-3"}
IDS = [5, 100, 2000, 31, 17, 402, 5, 12, 4, 350, 77, 1000]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch, family, **config):
        key = (arch, family, tuple(sorted(config.items())))
        if key not in cache:
            cache[key] = tiny_model(root / f"{arch}-{family}-{len(cache)}", arch, tokenizer_dir(family),
                                    config=config or None)
        return cache[key]

    return get


def tokenize_all(gguf_path, family):
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    return [(text, llm.tokenize(text.encode("utf-8"), add_bos=False, special=False), ids)
            for text, ids in vectors(family)]


@needs_assets
@pytest.mark.parametrize("family", [*BPE_FAMILIES, *SPM_FAMILIES])
def test_llama_cpp_tokenizes_the_family_vectors_from_our_gguf(tiny, tmp_path, family):
    """llama.cpp, reading llfarm's GGUF, tokenizes llama.cpp's own test inputs to the expected ids."""
    from llfarm.export.gguf_convert import convert

    arch = "phi3" if family == "phi-3" else "llama"
    path = convert(tiny(arch, family), tmp_path / "t.gguf", quant="f16", name="t")
    wrong = [(text, got, ids) for text, got, ids in tokenize_all(path, family) if got != ids]
    assert not wrong, wrong[:3]


@needs_assets
def test_sentencepiece_from_tokenizer_json_tokenizes_like_the_tokenizer(tiny, tmp_path):
    """Llama 2's tokenizer saved without tokenizer.model: llfarm's merge-ordered scores make llama.cpp tokenize
    as the tokenizer does; the reference's (-1000 everywhere) do not."""
    from tokenizers import Tokenizer

    from llfarm.export.gguf_convert import convert

    model = tmp_path / "model"
    import shutil

    shutil.copytree(tiny("llama", "llama-spm"), model)
    (model / "tokenizer.model").unlink()
    hf = Tokenizer.from_file(str(model / "tokenizer.json"))
    ours = convert(model, tmp_path / "ours.gguf", quant="f16", name="t")
    ref = reference_convert(model, tmp_path / "ref.gguf", "f16")
    texts = [text for text, _ in vectors("llama-spm") if text.strip() == text and text]  # see the note below
    expected = [hf.encode(t, add_special_tokens=False).ids for t in texts]
    llm_ours = llama_cpp.Llama(model_path=str(ours), vocab_only=True, verbose=False)
    llm_ref = llama_cpp.Llama(model_path=str(ref), vocab_only=True, verbose=False)
    ours_ok = sum(llm_ours.tokenize(t.encode(), add_bos=False, special=False) == e for t, e in zip(texts, expected))
    ref_ok = sum(llm_ref.tokenize(t.encode(), add_bos=False, special=False) == e for t, e in zip(texts, expected))
    print(f"of {len(texts)} vectors: llfarm's GGUF {ours_ok} tokenized as tokenizer.json does, reference's {ref_ok}")
    # (texts with leading/trailing spaces are left out: transformers' Metaspace and SentencePiece differ there)
    assert ours_ok == len(texts) and ref_ok < len(texts)


@needs_assets
@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_llama_cpp_logits_match_transformers_for_every_architecture(tiny, tmp_path, arch):
    from llfarm.export.gguf_convert import convert

    model = tiny(arch, ARCH_TOKENIZER[arch])
    ref = hf_logits(model, IDS)
    for quant in ("f32", "f16", "q8_0"):
        llm = load(convert(model, tmp_path / f"{quant}.gguf", quant=quant, name="t"))
        llm.eval(IDS)
        got = np.asarray(llm.scores[: len(IDS)], dtype=np.float32)
        print(f"{arch}-{quant}: max |llama.cpp - HF| = {np.abs(got - ref).max():.2e}")
        if quant == "f32":
            assert np.abs(got - ref).max() <= 1e-3, arch


@needs_assets
@pytest.mark.parametrize("quant, ftype, ktype", [("q4_k_m", 15, "Q4_K"), ("q5_k_m", 17, "Q5_K"), ("q6_k", 18, "Q6_K")])
def test_k_quants_through_llama_cpp(tiny, tmp_path, quant, ftype, ktype):
    """K-quants are made by llama.cpp's quantizer from llfarm's 16-bit GGUF: the file says so, keeps the
    tokenizer and the chat template, and its logits stay close to the f32 file's."""
    from export_helpers import gguf_fields

    from llfarm.export.gguf_convert import convert

    model = tiny("llama", "gpt-2", hidden_size=256, intermediate_size=512)  # K-quant blocks are 256 wide
    path = convert(model, tmp_path / f"{quant}.gguf", quant=quant, name="t", chat_template="{{ x }}")
    fields = gguf_fields(path)
    assert fields["general.file_type"] == ftype and fields["tokenizer.chat_template"] == "{{ x }}"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    from gguf import GGUFReader

    assert ktype in {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert not list(tmp_path.glob("*.tmp-16bit.gguf"))  # the intermediate file is gone
    f32 = load(convert(model, tmp_path / "f32.gguf", quant="f32", name="t"))
    f32.eval(IDS)
    ref = np.asarray(f32.scores[: len(IDS)], dtype=np.float32)
    llm = load(path)
    llm.eval(IDS)
    got = np.asarray(llm.scores[: len(IDS)], dtype=np.float32)
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    print(f"{quant}: cosine to f32 logits {cos:.4f}, max |Δ| {np.abs(got - ref).max():.3f}")
    assert cos > 0.95


@needs_assets
@pytest.mark.parametrize("arch, targets", [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("phi3", ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"]),
])
def test_llama_cpp_applies_our_lora_adapter_like_peft(tiny, tmp_path, arch, targets):
    """base GGUF + llfarm's GGUF adapter in llama.cpp == transformers base + PEFT adapter (f32)."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llfarm.export.gguf_convert import convert
    from llfarm.export.lora import convert_adapter

    base = tiny(arch, ARCH_TOKENIZER[arch])
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                                     task_type="CAUSAL_LM")).save_pretrained(tmp_path / "adapter")
    base_gguf = convert(base, tmp_path / "base.gguf", quant="f32", name="base")
    lora = convert_adapter(tmp_path / "adapter", json.loads((base / "config.json").read_text()),
                           tmp_path / "lora.gguf", quant="f32", name="lora")
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(lora), n_ctx=128, logits_all=True, n_threads=2,
                          verbose=False, type_k=0, type_v=0)
    llm.eval(IDS)
    got = np.asarray(llm.scores[: len(IDS)], dtype=np.float32)
    ref = hf_logits(base, IDS, adapter=tmp_path / "adapter")
    without = hf_logits(base, IDS)
    print(f"{arch}: max |llama.cpp+lora - PEFT| = {np.abs(got - ref).max():.2e}; the adapter moves logits by "
          f"{np.abs(ref - without).max():.2f}")
    assert np.abs(got - ref).max() <= 1e-3 and np.abs(ref - without).max() > 0.05
