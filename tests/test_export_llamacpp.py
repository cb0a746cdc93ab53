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
