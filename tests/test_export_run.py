"""export_run on fabricated run dirs: the merged model, the Modelfile, refusals (before anything is written),
nothing half-written on failure, and the `llfarm export` CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import llfarm
from export_helpers import TINY_LLAMA, fresh, gguf_fields, hf_logits, make_run, parse_modelfile

from llfarm.errors import ExportError
from llfarm.export import export_name, export_run, ollama_create_command
from llfarm.templates import load_template

IDS = [4, 93, 117, 260, 31, 17, 402, 5]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    system = 'Answer in "one" line.\nNever more.'
    return {
        "chatml": make_run(tmp / "chatml", TINY_LLAMA, template="chatml", system=system),
        "alpaca": make_run(tmp / "alpaca", TINY_LLAMA, template="alpaca", system="Be brief."),
        "plain": make_run(tmp / "plain", TINY_LLAMA, template="plain"),
        "rm": make_run(tmp / "rm", TINY_LLAMA, template="chatml", stage="rm"),
        "full": make_run(tmp / "full", TINY_LLAMA, template="llama3", output_kind="model"),
    }


def test_merged_equals_base_plus_adapter(runs, tmp_path):
    from transformers import AutoTokenizer

    run = fresh(runs["chatml"], tmp_path)
    (merged,) = export_run(run, ["merged"])
    assert merged == run / "exports" / "merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert not (merged / "adapter_config.json").exists()  # folded in, not an adapter any more
    ref = hf_logits(TINY_LLAMA, IDS, adapter=run / "adapter")
    got = hf_logits(merged, IDS)
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(got - hf_logits(TINY_LLAMA, IDS)).max() > 0.1  # and the adapter mattered
    assert AutoTokenizer.from_pretrained(merged).chat_template == load_template("chatml").jinja
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["merged"]  # no staging left behind


def test_full_model_run_is_copied_and_converted(runs, tmp_path):
    from safetensors.numpy import load_file

    run = fresh(runs["full"], tmp_path)
    merged, gguf_path = export_run(run, ["merged", "gguf"], quant="f32")
    for name, value in load_file(run / "model" / "model.safetensors").items():
        np.testing.assert_array_equal(load_file(merged / "model.safetensors")[name], value)
    fields = gguf_fields(gguf_path)
    assert fields["tokenizer.chat_template"] == load_template("llama3").jinja
    assert fields["tokenizer.ggml.add_bos_token"] is True


def test_ollama_export_writes_gguf_and_modelfile(runs, tmp_path):
    run = fresh(runs["chatml"], tmp_path)
    paths = export_run(run, ["ollama"], name="My Model")
    assert [p.name for p in paths] == ["my-model-q8_0.gguf", "Modelfile"]
    gguf_path, modelfile = paths
    commands = parse_modelfile(modelfile.read_text())  # read exactly as Ollama's parser reads it
    assert [c for c, _ in commands] == ["model", "template", "stop", "stop", "system"]
    args = dict(commands)
    assert (modelfile.parent / args["model"]).resolve() == gguf_path.resolve()
    tpl = load_template("chatml")
    assert args["template"] == tpl.ollama
    assert [a for c, a in commands if c == "stop"] == list(tpl.ollama_stop)
    assert args["system"] == json.loads((run / "manifest.json").read_text())["system"]
    assert gguf_fields(gguf_path)["general.file_type"] == 7  # q8_0 by default
    assert ollama_create_command(modelfile, "my-model") == f"ollama create my-model -f {modelfile}"


def test_alpaca_modelfile_carries_the_models_eos(runs, tmp_path):
    run = fresh(runs["alpaca"], tmp_path)
    _, modelfile = export_run(run, ["ollama"], quant="f16", out=tmp_path / "elsewhere")
    assert modelfile.parent == tmp_path / "elsewhere" and not (run / "exports").exists()
    args = dict(parse_modelfile(modelfile.read_text()))
    assert args["template"] == load_template("alpaca").ollama.replace("{{ eos_token }}", "</s>")
    assert args["system"] == "Be brief."
    assert (modelfile.parent / args["model"]).name == "tiny-test-f16.gguf"


def test_plain_template_is_refused_for_ollama_before_writing(runs, tmp_path):
    run = fresh(runs["plain"], tmp_path)
    with pytest.raises(ExportError, match="no Ollama form"):
        export_run(run, ["merged", "ollama"])
    assert not (run / "exports").exists()
    (gguf_path,) = export_run(run, ["gguf"], quant="f16")  # a GGUF alone is fine: it carries the jinja template
    assert gguf_fields(gguf_path)["tokenizer.chat_template"] == load_template("plain").jinja


@pytest.mark.parametrize("formats", [["gguf"], ["ollama"], ["merged", "gguf"]])
def test_reward_model_is_refused_for_gguf(runs, tmp_path, formats):
    run = fresh(runs["rm"], tmp_path)
    with pytest.raises(ExportError, match="reward model"):
        export_run(run, formats)
    assert not (run / "exports").exists()


def test_reward_model_merged_keeps_its_score_head(runs, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = fresh(runs["rm"], tmp_path)
    (merged,) = export_run(run, ["merged"])
    ids = torch.tensor([IDS])
    with torch.no_grad():
        got = AutoModelForSequenceClassification.from_pretrained(merged).eval()(ids).logits
        base = AutoModelForSequenceClassification.from_pretrained(TINY_LLAMA, num_labels=1)
        ref = PeftModel.from_pretrained(base, run / "adapter").eval()(ids).logits
    assert got.shape == (1, 1) and torch.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"formats": ["ggfu"]}, "did you mean 'gguf'"),
    ({"formats": []}, "no export format"),
    ({"formats": ["gguf"], "quant": "q4_k"}, "unknown quantization"),
])
def test_bad_arguments(runs, tmp_path, kwargs, match):
    run = fresh(runs["chatml"], tmp_path)
    with pytest.raises(ExportError, match=match):
        export_run(run, **kwargs)
    assert not (run / "exports").exists()


def test_failure_leaves_previous_exports_intact(runs, tmp_path, monkeypatch):
    import llfarm.export.gguf_convert as gc

    run = fresh(runs["chatml"], tmp_path)
    first = export_run(run, ["merged", "ollama"], quant="f16")
    before = {p: p.stat().st_mtime_ns for p in first}

    def broken(model_dir, out_path, **kw):
        out_path.write_bytes(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(gc, "convert", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(run, ["merged", "ollama"], quant="f16")
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["Modelfile", "merged", "tiny-test-f16.gguf"]
    assert {p: p.stat().st_mtime_ns for p in first} == before
    assert gguf_fields(first[1])["general.name"] == "tiny-test"


def test_export_twice_replaces_merged(runs, tmp_path):
    run = fresh(runs["chatml"], tmp_path)
    export_run(run, ["merged"])
    (merged,) = export_run(run, ["merged"])
    assert (merged / "config.json").is_file()
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["merged"]


def test_export_name():
    assert export_name(Path("/nonexistent/20260101-x"), "Tiny Test/v2") == "tiny-test-v2"
    with pytest.raises(ExportError):
        export_name(Path("."), "///")


def test_ollama_create_command_quotes_paths():
    assert ollama_create_command(Path("/a b/Modelfile"), "m") == "ollama create m -f '/a b/Modelfile'"
    # the same name the files and the Modelfile's own comment use, valid for Ollama
    assert ollama_create_command(Path("Modelfile"), "My Model") == "ollama create my-model -f Modelfile"


def test_cli_refusals_exit_2_with_one_line(runs, tmp_path):
    run = fresh(runs["plain"], tmp_path)
    proc = llfarm("export", str(run), "--format", "ollama")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no Ollama form" in lines[0] and "Traceback" not in proc.stderr
    rm = fresh(runs["rm"], tmp_path)
    proc = llfarm("export", str(rm), "--format", "gguf")
    assert proc.returncode == 2 and "reward model" in proc.stderr
    assert not (run / "exports").exists() and not (rm / "exports").exists()


def test_cli_export_prints_paths_and_ollama_create(runs, tmp_path):
    """In-process (CliRunner): a subprocess would re-import torch for ~10 s; refusals above use a real process."""
    from click.testing import CliRunner

    from llfarm.cli import cli

    run = fresh(runs["chatml"], tmp_path)
    result = CliRunner().invoke(cli, ["export", str(run), "--format", "ollama", "--quant", "f16", "--name", "tiny"])
    assert result.exit_code == 0, result.output
    out = result.output + (getattr(result, "stderr", "") or "")
    assert str(run / "exports" / "tiny-f16.gguf") in out and str(run / "exports" / "Modelfile") in out
    assert f"ollama create tiny -f {run / 'exports' / 'Modelfile'}" in out
