"""llfarm estimate: parameter counts against real models, the activation model against what autograd keeps, the
CLI (fast, no torch), one-line errors, and predicted vs measured peak memory through real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import llfarm, one_line_error, write

from llfarm.estimate import FAMILIES, Shape, activations, count_params
from llfarm.schema import MethodSpec

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
METHODS = {
    "lora-all": MethodSpec(type="lora", r=4),
    "lora-qv": MethodSpec(type="lora", r=8, target_modules=["q_proj", "v_proj"]),
    "lora-dropout": MethodSpec(type="lora", r=4, dropout=0.1),
    "full": MethodSpec(type="full"),
    "freeze": MethodSpec(type="freeze", trainable_layers=2),
}


def config_dict(model_type: str, **overrides) -> dict:
    """config.json as transformers writes it (save_pretrained's diff form: model defaults left out)."""
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    return json.loads(cfg.to_json_string(use_diff=True)), cfg


def build(model_type: str, stage: str, method: MethodSpec, *, meta: bool, **overrides):
    """The model llfarm's trainers build for this config and method (PEFT all-linear / a list; freeze_all_but_last)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from llfarm.train_common import freeze_all_but_last
    from llfarm.training import lora_targets
    data, cfg = config_dict(model_type, **overrides)
    if stage == "rm":
        cfg.num_labels = 1
    auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = auto.from_config(cfg)
    else:
        model = auto.from_config(cfg)
    if method.type == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=method.r, lora_alpha=16, lora_dropout=method.dropout, target_modules=lora_targets(method.target_modules),
            task_type="SEQ_CLS" if stage == "rm" else "CAUSAL_LM",
            modules_to_save=["score"] if stage == "rm" else None))
    elif method.type == "freeze":
        freeze_all_but_last(model, method.trainable_layers)
    return model, data


def phi3_method(model_type: str, method: MethodSpec) -> MethodSpec:
    if model_type == "phi3" and method.target_modules != "all":
        return method.model_copy(update={"target_modules": ["qkv_proj"]})
    return method


@pytest.mark.parametrize("stage", ["sft", "rm"])
@pytest.mark.parametrize("method", ["lora-all", "lora-qv", "full", "freeze"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_parameter_counts_match_real_models(model_type, method, stage):
    if stage == "rm" and model_type == "granite":
        pytest.skip("transformers has no sequence-classification head for granite")
    spec = phi3_method(model_type, METHODS[method])
    model, data = build(model_type, stage, spec, meta=True)
    shape = Shape.from_config(data, "config.json")
    counted = count_params(shape, stage, spec)
    assert counted.total == sum(p.numel() for p in model.parameters())
    assert counted.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_and_a_100m_layout(tied):
    """The ~105M model the measure test builds (hidden 768, 12 layers, GQA 12/4), tied and not."""
    over = dict(vocab_size=768, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4, head_dim=64, tie_word_embeddings=tied)
    for spec in (MethodSpec(type="lora", r=16), MethodSpec(type="full")):
        model, data = build("llama", "sft", spec, meta=True, **over)
        counted = count_params(Shape.from_config(data, "config.json"), "sft", spec)
        assert counted.total == sum(p.numel() for p in model.parameters())
        assert counted.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_builtin_tiny_model_count():
    import torch
    from transformers import AutoModelForCausalLM

    from llfarm.estimate import read_config
    from llfarm.resources import resolve_builtin_model
    path = resolve_builtin_model("builtin:tiny-llama")
    data, _ = read_config(str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert count_params(Shape.from_config(data, "x"), "sft", MethodSpec(type="full")).total == \
        sum(p.numel() for p in model.parameters())


def saved_for_backward(model, batch: int, seq: int, padded: bool, stage: str) -> int:
    """Bytes of the floating-point tensors autograd keeps after one forward pass (parameters excluded)."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and t.is_floating_point():
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    torch.manual_seed(1)
    ids = torch.randint(4, 90, (batch, seq))
    attention = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        attention[0, seq // 2:] = 0
    labels = torch.zeros(batch) if stage == "rm" else ids
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=attention, labels=labels)
    return sum(seen.values())


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_activation_model_matches_what_autograd_keeps(model_type, method, padded):
    """The per-operation activation count (elements kept for backward) against torch's own saved tensors, on
    small float32 models: within 8% for every layout (Llama, Qwen2/3, Gemma within 3%; phi3's fused projections
    within 7%)."""
    spec = phi3_method(model_type, METHODS[method])
    model, data = build(model_type, "sft", spec, meta=False)
    got = saved_for_backward(model, 4, 16, padded, "sft")
    acts = activations(Shape.from_config(data, "x"), "sft", spec, batch=4, sequence=16, element_bytes=4,
                       padded=padded)
    predicted = acts.saved_elements * 4
    assert predicted == pytest.approx(got, rel=0.08), f"{model_type} {method}: predicted {predicted}, autograd {got}"


@pytest.mark.parametrize("method", ["lora-all", "full"])
def test_activation_model_for_reward_models(method):
    spec = METHODS[method]
    model, data = build("llama", "rm", spec, meta=False)
    got = saved_for_backward(model, 4, 16, True, "rm")
    acts = activations(Shape.from_config(data, "x"), "rm", spec, batch=4, sequence=16, element_bytes=4)
    assert acts.saved_elements * 4 == pytest.approx(got, rel=0.08)


# ---------------------------------------------------------------- the command

def test_estimate_quickstart_text_and_json(tmp_path):
    proc = llfarm("estimate", "quickstart", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for piece in ("parameters  235,840", "trainable 38,912", "LoRA r=16 on q_proj, k_proj, v_proj, o_proj, gate_proj",
                  "weights", "gradients", "optimizer", "activations", "peak"):
        assert piece in out, out
    proc = llfarm("estimate", "quickstart", "--set", "method.type=full", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["params"] == data["trainable_params"] == 196_928
    assert data["predicted_peak_bytes"] == data["peak_bytes"] == (
        data["weights_bytes"] + data["optimizer_bytes"]
        + max(data["gradients_bytes"], data["activations_bytes"] + data["head_gradient_bytes"]))
    assert data["weights_bytes"] == data["gradients_bytes"] == 196_928 * 4
    assert data["optimizer_bytes"] == 2 * 196_928 * 4
    assert data["sequence"] <= 64 and data["batch"] == 8


def test_estimate_follows_precision_optimizer_and_method():
    from llfarm.estimate import predict
    from llfarm.strategy import resolve
    base = predict(resolve("quickstart", ["method.type=full"]))
    half = predict(resolve("quickstart", ["method.type=full", "training.precision=bf16"]))
    assert half.weights_bytes == base.weights_bytes // 2 and half.optimizer_bytes == base.optimizer_bytes // 2
    sgd = predict(resolve("quickstart", ["method.type=full", "training.optimizer=sgd"]))
    assert sgd.optimizer_bytes == 0 and sgd.optimizer == "sgd"
    rms = predict(resolve("quickstart", ["method.type=full", "training.optimizer=rmsprop"]))
    assert rms.optimizer_bytes == base.optimizer_bytes // 2
    ckpt = predict(resolve("quickstart", ["method.type=full", "training.gradient_checkpointing=true"]))
    assert ckpt.activations_bytes < base.activations_bytes
    frozen = predict(resolve("quickstart", ["method.type=freeze", "method.trainable_layers=1"]))
    assert 0 < frozen.trainable_params < base.trainable_params
    qlora = predict(resolve("cuda_qlora_sft", ["model.path=builtin:tiny-llama"]))
    assert qlora.platform == "cuda" and qlora.weights_dtype == "nf4" and qlora.weights_bytes < base.weights_bytes


def test_estimate_imports_no_torch():
    code = ("import sys\nfrom llfarm.cli import cli\n"
            "try:\n    cli(['estimate', 'quickstart'], prog_name='llfarm')\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "heavy = ('torch', 'transformers', 'peft', 'trl', 'datasets')\n"
            "print('HEAVY', sorted(m for m in heavy if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


# ---------------------------------------------------------------- one-line errors

def fails(tmp_path: Path, *args: str, expect: list[str], env: dict | None = None) -> str:
    return one_line_error(llfarm("estimate", *args, cwd=tmp_path, env=env), expect)


def test_model_without_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    fails(tmp_path, "quickstart", "--set", "model.path=./m", expect=["model.path", "config.json"])


def test_unreadable_config_json(tmp_path):
    write(tmp_path / "m" / "config.json", '{"model_type": "llama", ')
    fails(tmp_path, "quickstart", "--set", "model.path=./m", expect=["config.json", "not valid JSON"])


def test_unknown_architecture_is_named(tmp_path):
    import shutil

    from llfarm.resources import resolve_builtin_model
    write(tmp_path / "m" / "config.json", json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"],
                                                      "hidden_size": 64, "vocab_size": 100}))
    for name in ("tokenizer.json", "tokenizer_config.json"):   # a real tokenizer: only the architecture is unknown
        shutil.copy(resolve_builtin_model("builtin:tiny-llama") / name, tmp_path / "m" / name)
    fails(tmp_path, "quickstart", "--set", "model.path=./m", expect=["'mamba'", "MambaForCausalLM", "llama"])


def test_hub_id_offline_without_a_cached_config(tmp_path):
    fails(tmp_path, "quickstart", "--set", "model.path=llfarm-test/no-such-model",
          expect=["llfarm-test/no-such-model", "HF_HUB_OFFLINE"],
          env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")})


def test_hub_id_uses_only_a_cached_config(tmp_path):
    """A hub id whose config.json alone is in the cache is estimated offline (data.max_length as the length)."""
    from llfarm.resources import resolve_builtin_model
    snap = tmp_path / "hf-home" / "hub" / "models--llfarm-test--tiny" / "snapshots" / ("0" * 40)
    write(snap / "config.json", (resolve_builtin_model("builtin:tiny-llama") / "config.json").read_text())
    write(snap.parent.parent / "refs" / "main", "0" * 40)
    proc = llfarm("estimate", "quickstart", "--set", "model.path=llfarm-test/tiny", "--json", cwd=tmp_path,
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["params"] == 235_840 and data["sequence"] == 64 and "no tokenizer" in data["sequence_source"]


# ---------------------------------------------------------------- predicted vs measured

def long_data(path: Path, n: int = 16) -> Path:
    """SFT examples long enough to fill data.max_length (three in four are cut at it), so every measured batch
    is the longest batch the estimate predicts, with padding."""
    sentence = "the capital of france is paris and the colour of the sky is blue"
    rows = [{"instruction": f"Write about topic {i}.", "output": " ".join([sentence] * (20 if i % 4 else 5))}
            for i in range(n)]
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def measured(tmp_path: Path, *sets: str) -> dict:
    data = long_data(tmp_path / "long.jsonl")
    args = ["estimate", "quickstart", "--set", f"data.train={data}", "--set", "data.max_length=128"]
    for s in sets:
        args += ["--set", s]
    proc = llfarm(*args, "--measure", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    m = out["measured"]
    print(f"{sets}: predicted {out['predicted_peak_bytes'] / 2**20:.1f} MiB, measured "
          f"{out['measured_peak_bytes'] / 2**20:.1f} MiB ({out['error_pct']:+.1f}%); process peak "
          f"{m['process_peak_bytes'] / 2**20:.1f} MiB, baseline {m['baseline_bytes'] / 2**20:.1f} MiB")
    assert not list(tmp_path.glob("runs")), "the measuring run must not leave a run directory here"
    return out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_tiny_model_measured_within_25_percent(tmp_path, method):
    """CPU: the tiny model's training state is ~25 MiB in a ~0.85 GiB process; measured = peak RSS − runtime
    baseline. Seen here: LoRA −11.5%, full −9.8% (predicted below measured)."""
    out = measured(tmp_path, f"method.type={method}")
    assert out["measured"]["platform"] == "cpu" and out["measured"]["steps"] == 3
    assert out["predicted_peak_bytes"] == pytest.approx(out["measured_peak_bytes"], rel=0.25)


@pytest.fixture(scope="module")
def model_105m(tmp_path_factory):
    """A random-init LlamaForCausalLM of 105M parameters (hidden 768, 12 layers, 12 heads / 4 KV heads,
    MLP 3072) saved with the tiny model's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llfarm.resources import resolve_builtin_model
    out = tmp_path_factory.mktemp("m105")
    cfg = LlamaConfig(vocab_size=768, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tiny = resolve_builtin_model("builtin:tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny / name, out / name)
    return out


@pytest.mark.heavy      # ~5 min on 2 cores; the tiny model's measured-vs-predicted test runs by default
@pytest.mark.parametrize("method", ["lora", "full"])
def test_100m_model_measured_within_25_percent(tmp_path, model_105m, method):
    """Seen here (CPU, batch 8 × 128 tokens): LoRA +1.3%, full +0.9%."""
    out = measured(tmp_path, f"model.path={model_105m}", f"method.type={method}")
    assert out["params"] == 105_007_872 + (3_194_880 if method == "lora" else 0)
    assert out["predicted_peak_bytes"] == pytest.approx(out["measured_peak_bytes"], rel=0.25)


def test_readme_example_as_written(tmp_path):
    """The README's `llfarm estimate` example, run as written from a fresh directory, prints what the README shows
    (the config path aside)."""
    import re

    from conftest import REPO
    section = (REPO / "README.md").read_text(encoding="utf-8").split("### Estimating memory", 1)[1]
    command = re.search(r"```bash\n(llfarm estimate [^\n]*)\n```", section).group(1)
    shown = re.search(r"```\n\n((?:    .*\n)+)", section).group(1)
    proc = llfarm(*command.split()[1:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = [line[4:] for line in shown.splitlines()]
    got = proc.stdout.splitlines()
    assert got[1:] == expected[1:], "README example output is stale"
    assert got[0].startswith(expected[0].split("(")[0])


def test_a_users_strategy_with_relative_paths(tmp_path):
    """A strategy and its data in the user's folder, by relative paths, from that folder and from another."""
    from llfarm.resources import BUILTIN_DATA
    write(tmp_path / "proj" / "s.yaml", "name: mine\nmodel: {path: 'builtin:tiny-llama'}\n"
                                        "data: {train: data/qa.jsonl, max_length: 32}\nmethod: {type: freeze}\n")
    write(tmp_path / "proj" / "data" / "qa.jsonl", BUILTIN_DATA["alpaca"].read_text(encoding="utf-8"))
    (tmp_path / "other").mkdir()
    for cwd, ref in ((tmp_path / "proj", "s.yaml"), (tmp_path / "other", "../proj/s.yaml")):
        proc = llfarm("estimate", ref, "--json", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["method"] == "freeze" and data["sequence"] <= 32 and data["trainable_params"] == 2 * 49_280
