"""export_run's newer options on fabricated run dirs: `template: model` runs (the tokenizer's own jinja in the
GGUF, the recognised Ollama TEMPLATE in the Modelfile, --no-template), GGUF LoRA adapters with FROM <base> +
ADAPTER, and the quant types beyond f32/f16/q8_0 — each with its refusals, which write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import llfarm
from export_helpers import (
    TINY_LLAMA,
    fresh,
    gguf_fields,
    gguf_tensors,
    make_run,
    ollama_prompt,
    parse_modelfile,
)

from llfarm.errors import ExportError
from llfarm.export import export_run
from llfarm.export.chat_format import render_jinja

# microsoft/Phi-3.5-mini-instruct's chat template (MIT), verbatim
PHI35 = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
         "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
         "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + "
         "'<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
         "{{ eos_token }}{% endif %}")
REVERSED = "{% for m in messages|reverse %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."}]


def model_template_run(root: Path, jinja: str, *, system: str | None = None, output_kind: str = "adapter") -> Path:
    """A run trained with `template: model`: the tokenizer saved with the run carries ``jinja``."""
    run = make_run(root, TINY_LLAMA, template="chatml", system=system, output_kind=output_kind)
    folder = run / ("adapter" if output_kind == "adapter" else "model")
    (folder / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "template": "model"}))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    return {"phi35": model_template_run(tmp / "phi35", PHI35, system="Be brief."),
            "reversed": model_template_run(tmp / "reversed", REVERSED),
            "reversed-full": model_template_run(tmp / "reversed-full", REVERSED, output_kind="model"),
            "lora": make_run(tmp / "lora", TINY_LLAMA, template="chatml", system="Be brief."),
            "full": make_run(tmp / "full", TINY_LLAMA, template="chatml", output_kind="model")}


# ---- template: model -------------------------------------------------------------------------------------------

def test_model_template_run_exports_its_own_jinja_and_a_matching_ollama_template(runs, tmp_path):
    run = fresh(runs["phi35"], tmp_path)
    gguf_path, modelfile = export_run(run, ["ollama"], quant="f16")
    assert gguf_fields(gguf_path)["tokenizer.chat_template"] == PHI35
    commands = parse_modelfile(modelfile.read_text())
    args = dict(commands)
    assert [a for c, a in commands if c == "stop"] == ["<|end|>", "<|user|>"]
    assert args["system"] == "Be brief."
    rendered = ollama_prompt(args["template"], MESSAGES, "Be brief.")  # as Ollama runs it, SYSTEM injected
    assert rendered == render_jinja(PHI35, [{"role": "system", "content": "Be brief."}, *MESSAGES])
    assert "recognised as Phi-3" in modelfile.read_text()


def test_no_template_writes_a_modelfile_without_template(runs, tmp_path):
    run = fresh(runs["reversed"], tmp_path)
    with pytest.raises(ExportError, match="not one llfarm can write") as exc:
        export_run(run, ["ollama"], quant="f16")
    assert "--no-template" in exc.value.hint and not (run / "exports").exists()
    gguf_path, modelfile = export_run(run, ["ollama"], quant="f16", ollama_template=False)
    assert [c for c, _ in parse_modelfile(modelfile.read_text())] == ["model"]
    assert gguf_fields(gguf_path)["tokenizer.chat_template"] == REVERSED  # Ollama can use the GGUF's own


def test_cli_model_template_refusal_and_no_template(runs, tmp_path):
    run = fresh(runs["reversed-full"], tmp_path)  # a full-model run: the export needs no torch
    proc = llfarm("export", str(run), "--format", "ollama", "--quant", "f16")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llfarm: error: chat template:") and "--no-template" in lines[0]
    assert not (run / "exports").exists()
    proc = llfarm("export", str(run), "--format", "ollama", "--quant", "f16", "--no-template")
    assert proc.returncode == 0, proc.stderr
    assert "TEMPLATE" not in (run / "exports" / "Modelfile").read_text().split("\n", 2)[2]


def test_model_template_without_a_jinja_is_refused(runs, tmp_path):
    run = fresh(runs["phi35"], tmp_path)
    (run / "adapter" / "chat_template.jinja").unlink()
    with pytest.raises(ExportError, match="no chat template"):
        export_run(run, ["gguf"], quant="f16")


# ---- adapters --------------------------------------------------------------------------------------------------

def test_adapter_with_an_ollama_base_writes_a_few_kb_and_from_plus_adapter(runs, tmp_path):
    run = fresh(runs["lora"], tmp_path)
    lora, modelfile = export_run(run, ["adapter", "ollama"], quant="q5_1", ollama_base="tiny-llama:latest")
    assert lora.name == "tiny-test-lora-f16.gguf" and sorted(p.name for p in lora.parent.iterdir()) == [
        "Modelfile", "tiny-test-lora-f16.gguf"]  # q5_1 is for models: an adapter GGUF is then f16
    args = parse_modelfile(modelfile.read_text())
    assert args[:2] == [("model", "tiny-llama:latest"), ("adapter", "./tiny-test-lora-f16.gguf")]
    fields = gguf_fields(lora)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    tensors = gguf_tensors(lora)
    assert len(tensors) == 2 * 7 * 2 and tensors["blk.0.attn_q.weight.lora_b"][0].shape == (64, 4)
    assert lora.stat().st_size < (TINY_LLAMA / "model.safetensors").stat().st_size / 3


def test_adapter_without_base_converts_the_base_beside_it(runs, tmp_path):
    run = fresh(runs["lora"], tmp_path)
    paths = export_run(run, ["adapter", "ollama"], quant="f16")
    assert [p.name for p in paths] == ["tiny-test-lora-f16.gguf", "tiny-llama-f16.gguf", "Modelfile"]
    args = dict(parse_modelfile(paths[2].read_text()))
    assert args["model"] == "./tiny-llama-f16.gguf" and args["adapter"] == "./tiny-test-lora-f16.gguf"
    base = gguf_tensors(paths[1])  # the unmerged base
    from safetensors.numpy import load_file

    emb = load_file(TINY_LLAMA / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(base["token_embd.weight"][0], emb.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("kwargs, match", [
    ({"formats": ["adapter"], "ollama_base": "x:1"}, "--format adapter --format ollama"),
    ({"formats": ["adapter", "ollama"], "ollama_base": "no such/model name!"}, "neither a GGUF file"),
    ({"formats": ["adapter", "ollama"], "ollama_base": "missing.gguf"}, "not a GGUF file"),
])
def test_adapter_refusals(runs, tmp_path, kwargs, match):
    run = fresh(runs["lora"], tmp_path)
    with pytest.raises(ExportError, match=match):
        export_run(run, **kwargs)
    assert not (run / "exports").exists()


def test_full_model_run_has_no_adapter(runs, tmp_path):
    run = fresh(runs["full"], tmp_path)
    with pytest.raises(ExportError, match="no LoRA adapter"):
        export_run(run, ["adapter"])


def test_dora_and_modules_to_save_are_refused(runs, tmp_path):
    run = fresh(runs["lora"], tmp_path)
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for change, match in [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "full modules")]:
        cfg_path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ExportError, match=match):
            export_run(run, ["adapter"])
    assert not (run / "exports").exists()


# ---- quant types -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant, main, ftype", [("bf16", "BF16", 32), ("q4_0", "Q4_0", 2), ("q5_1", "Q5_1", 9)])
def test_more_quant_types(runs, tmp_path, quant, main, ftype):
    """gguf-py's types: matrices at the requested type; norms F32; for 4/5-bit the output projection Q8_0 (the
    tiny model's 192-wide FFN rows fit the 32-blocks); values within the type's rounding."""
    run = fresh(runs["full"], tmp_path)
    (path,) = export_run(run, ["gguf"], quant=quant)
    assert path.name == f"tiny-test-{quant}.gguf" and gguf_fields(path)["general.file_type"] == ftype
    tensors = gguf_tensors(path)
    assert tensors["blk.0.attn_q.weight"][1] == main and tensors["blk.0.attn_norm.weight"][1] == "F32"
    assert tensors["output.weight"][1] == (main if quant == "bf16" else "Q8_0")
    from safetensors.numpy import load_file

    w = load_file(run / "model" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    g = tensors["blk.0.ffn_up.weight"][0]
    scale = np.abs(w).reshape(-1, 32).max(-1)
    err = np.abs(g - w).reshape(-1, 32).max(-1)
    assert np.all(err <= scale * {"bf16": 2**-8, "q4_0": 1 / 7, "q5_1": 1 / 15}[quant] + 1e-6)


def test_k_quant_without_llama_cpp_names_both_ways(runs, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    run = fresh(runs["full"], tmp_path)
    with pytest.raises(ExportError, match="llama.cpp's quantizer") as exc:
        export_run(run, ["ollama"], quant="q4_k_m")
    assert "llfarm[llamacpp]" in exc.value.hint and "ollama create --quantize q4_K_M" in exc.value.hint
    assert not (run / "exports").exists()


def test_cli_schema_and_export_agree_on_formats_and_quants():
    from typing import get_args

    from llfarm import cli
    from llfarm.export import FORMATS, QUANTS
    from llfarm.schema import ExportSpec

    assert cli.EXPORT_FORMATS == FORMATS and cli.EXPORT_QUANTS == QUANTS
    assert get_args(ExportSpec.model_fields["quant"].annotation) == QUANTS
    assert get_args(get_args(ExportSpec.model_fields["formats"].annotation)[0]) == FORMATS
