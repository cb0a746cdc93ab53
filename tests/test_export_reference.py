"""Opt-in: llfarm's GGUF against llama.cpp's own converters on the same model, key by key and tensor by tensor.

    tests/fetch-llamacpp-assets && pytest -m reference tests/test_export_reference.py     (~10 min on 2 cores)

For every architecture and every tokenizer family the assets let us rebuild, a tiny random model is converted by
llfarm and by ``convert_hf_to_gguf.py`` (run from the assets with its own gguf-py) at f16 and q8_0; the two files
must be equal in every metadata key and every tensor's type, shape and bytes — except the keys listed in
EXPECTED_DIFFERENCES, each with its reason. The same for PEFT adapters against ``convert_lora_to_gguf.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from llamacpp_assets import (
    BPE_FAMILIES,
    SKIP_REASON,
    assets_dir,
    gguf_differences,
    reference_convert,
    reference_convert_lora,
    tiny_model,
    tokenizer_dir,
)

pytestmark = [
    pytest.mark.reference,
    pytest.mark.skipif(assets_dir() is None, reason=SKIP_REASON),
    pytest.mark.skipif("'reference' not in config.getoption('markexpr')",
                       reason="opt-in (runs llama.cpp's converter ~70 times): pytest -m reference"),
]

# Keys that differ, and why. general.name: the reference derives it from the folder (here "Model"); llfarm writes
# the export name. Nothing else may differ.
NAME_ONLY = {"general.name"}
CASES = ([("llama", family) for family in [*BPE_FAMILIES, "llama-spm"]]
         + [("mistral", "llama-spm"), ("qwen2", "qwen2"), ("qwen3", "qwen2"), ("gemma2", "llama-spm"),
            ("gemma3", "llama-spm"), ("phi3", "phi-3")])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    cache: dict[tuple[str, str, str], Path] = {}

    def get(arch: str, family: str, dtype: str = "float32") -> Path:
        key = (arch, family, dtype)
        if key not in cache:
            cache[key] = tiny_model(root / f"{arch}-{family}-{dtype}", arch, tokenizer_dir(family), dtype=dtype)
        return cache[key]

    return get


def both(model: Path, tmp: Path, quant: str) -> dict[str, str]:
    from llfarm.export.gguf_convert import convert

    ours = convert(model, tmp / f"ours-{quant}.gguf", quant=quant, name="tiny")
    ref = reference_convert(model, tmp / f"ref-{quant}.gguf", quant)
    return gguf_differences(ours, ref)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize("arch, family", CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_same_as_convert_hf_to_gguf(models, tmp_path, arch, family, quant):
    diffs = both(models(arch, family), tmp_path, quant)
    print(f"{arch} + {family} @ {quant}: {diffs}")
    assert set(diffs) == NAME_ONLY, diffs


@pytest.mark.parametrize("quant", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("arch, family", [("llama", "llama-bpe"), ("gemma2", "llama-spm")])
def test_bf16_checkpoint_same_as_reference(models, tmp_path, arch, family, quant):
    """BF16 safetensors (read without torch through a uint16 view); Gemma's +1 on its norms in float32."""
    diffs = both(models(arch, family, "bfloat16"), tmp_path, quant)
    assert set(diffs) == NAME_ONLY, diffs


def test_sentencepiece_from_tokenizer_json_alone(models, tmp_path):
    """A SentencePiece model saved by transformers 5 (tokenizer.json, no tokenizer.model). The reference falls
    back to LlamaHfVocab: every score -1000, so llama.cpp's SentencePiece tokenizer has no merge order left;
    llfarm orders the scores by tokenizer.json's merges. The scores are the only difference (the opt-in llama.cpp
    test shows which of the two tokenizes like the tokenizer)."""
    model = tmp_path / "model"
    shutil.copytree(models("llama", "llama-spm"), model)
    (model / "tokenizer.model").unlink()
    diffs = both(model, tmp_path, "f16")
    assert set(diffs) == NAME_ONLY | {"tokenizer.ggml.scores"}, diffs


def make_adapter(base: Path, out: Path, target_modules: list[str], seed: int = 0, **lora) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=lora.pop("r", 8), lora_alpha=lora.pop("lora_alpha", 16), target_modules=target_modules,
                     init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("quant", ["f16", "f32", "q8_0"])
@pytest.mark.parametrize("arch, family, targets", [
    ("llama", "gpt-2", LLAMA_TARGETS),  # Q/K row permutation applied to lora_b
    ("qwen2", "qwen2", LLAMA_TARGETS),
    ("phi3", "phi-3", ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"]),  # fused projections
])
def test_adapter_same_as_convert_lora_to_gguf(models, tmp_path, arch, family, targets, quant):
    from llfarm.export.lora import convert_adapter

    base = models(arch, family)
    adapter = make_adapter(base, tmp_path / "adapter", targets)
    config = json.loads((base / "config.json").read_text())
    ours = convert_adapter(adapter, config, tmp_path / "ours.gguf", quant=quant, name="tiny")
    ref = reference_convert_lora(adapter, base, tmp_path / "ref.gguf", quant)
    diffs = gguf_differences(ours, ref)
    # The reference also writes descriptive general.* keys from the adapter's model card (base_model.*, tags,
    # name from the folder); everything else — adapter.*, architecture, type, tensors — must be equal.
    assert all(k.startswith("general.") for k in diffs), diffs
    assert not {"general.architecture", "general.type", "general.quantization_version"} & set(diffs), diffs


def test_rslora_adapter_alpha(models, tmp_path):
    """A rank-stabilised adapter: llfarm writes alpha·sqrt(r) (llama.cpp scales by alpha/r, PEFT by
    alpha/sqrt(r)); the reference writes alpha itself — the one intended difference."""
    from llfarm.export.lora import convert_adapter

    base = models("llama", "gpt-2")
    adapter = make_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj"], r=16, lora_alpha=8, use_rslora=True)
    ours = convert_adapter(adapter, json.loads((base / "config.json").read_text()), tmp_path / "o.gguf",
                           quant="f16", name="tiny")
    ref = reference_convert_lora(adapter, base, tmp_path / "r.gguf", "f16")
    diffs = gguf_differences(ours, ref)
    assert "adapter.lora.alpha" in diffs and "32.0" in diffs["adapter.lora.alpha"], diffs
    assert {k for k in diffs if not k.startswith("general.")} == {"adapter.lora.alpha"}, diffs
