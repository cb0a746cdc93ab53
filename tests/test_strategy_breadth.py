"""The knobs practitioners expect: each strategy key reaches the trainer of every backend that claims it (read back
from the compiled native config), is refused with a reason where a backend cannot honour it, and — for what runs on
CPU — changes training the way it should. Plus `llfarm import` from LlamaFactory, Axolotl and TRL."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import llfarm, manifest, metrics, run_dir_from, write

from llfarm.backend import registry
from llfarm.errors import UnsupportedError
from llfarm.runner import create_run, prepare_run
from llfarm.strategy import resolve


def compiled(tmp_path, backend: str, *sets: str) -> dict:
    """The trainer arguments a backend writes for quickstart + sets, flattened to {key: value}."""
    prep = prepare_run(resolve("quickstart", ["export.formats=[]", *sets]), backend, plan=True)
    _, plan = create_run(prep, tmp_path / backend, run_id="c")
    if backend == "llamafactory":
        return yaml.safe_load(plan.files[0].read_text())
    spec = json.loads(plan.files[-1].read_text())
    flat = {**spec["args"], **{f"model.{k}": v for k, v in spec["model"].items()},
            "loraplus_lr_ratio": spec["loraplus_lr_ratio"]}
    flat.update({f"peft.{k}": v for k, v in (spec["peft"] or {}).items()})
    flat.update({f"quant.{k}": v for k, v in (spec["model"]["quantization"] or {}).items()})
    flat.update({f"unsloth.{k}": v for c in (spec.get("unsloth") or {}).values() for k, v in c.items()})
    return flat


# strategy --set → (pytorch/unsloth trainer key, value) and (llamafactory key, value); None: refused there
KEYS = [
    ("training.optimizer=adafactor", ("optim", "adafactor"), ("optim", "adafactor")),
    ("training.adam_beta2=0.95", ("adam_beta2", 0.95), ("adam_beta2", 0.95)),
    ("training.adam_epsilon=1e-6", ("adam_epsilon", 1e-6), ("adam_epsilon", 1e-6)),
    ("training.warmup_steps=7", ("warmup_steps", 7), ("warmup_steps", 7)),
    ("training.scheduler=polynomial", ("lr_scheduler_type", "polynomial"), ("lr_scheduler_type", "polynomial")),
    ("training.group_by_length=true", ("train_sampling_strategy", "group_by_length"),
     ("train_sampling_strategy", "group_by_length")),
    ("training.dataloader_workers=2", ("dataloader_num_workers", 2), ("dataloader_num_workers", 2)),
    ("training.neftune_alpha=5", ("neftune_noise_alpha", 5.0), ("neftune_alpha", 5.0)),
    ("training.packing=true", ("packing", True), ("packing", True)),
    ("training.attention=eager", ("model.attn_implementation", "eager"), ("flash_attn", "disabled")),
    ("tracking.report_to=[tensorboard]", ("report_to", ["tensorboard"]), ("report_to", ["tensorboard"])),
    ("method.use_dora=true", ("peft.use_dora", True), ("use_dora", True)),
    ("method.use_rslora=true", ("peft.use_rslora", True), ("use_rslora", True)),
    ("method.init=pissa", ("peft.init_lora_weights", "pissa"), ("pissa_init", True)),
    ("method.init=gaussian", ("peft.init_lora_weights", "gaussian"), None),
    ("method.bias=lora_only", ("peft.bias", "lora_only"), None),
    ("method.modules_to_save=[lm_head]", ("peft.modules_to_save", ["lm_head"]), ("additional_target", "lm_head")),
    ("method.layers_to_transform=[1]", ("peft.layers_to_transform", [1]), None),
    ("method.loraplus_lr_ratio=16", ("loraplus_lr_ratio", 16.0), ("loraplus_lr_ratio", 16.0)),
]


@pytest.mark.parametrize("setting,hf,lf", KEYS, ids=[k[0] for k in KEYS])
def test_each_key_reaches_the_trainer_or_is_refused(tmp_path, setting, hf, lf):
    got = compiled(tmp_path, "pytorch", setting)
    assert got[hf[0]] == hf[1], (setting, got.get(hf[0]))
    if lf is None:
        with pytest.raises(UnsupportedError, match=f"backend 'llamafactory' cannot run {setting.split('=')[0]}"):
            compiled(tmp_path, "llamafactory", setting)
    else:
        assert compiled(tmp_path, "llamafactory", setting)[lf[0]] == lf[1]


@pytest.mark.parametrize("setting", ["method.use_rslora=true", "method.modules_to_save=[lm_head]",
                                     "method.layers_to_transform=[1]", "method.init=pissa",
                                     "training.optimizer=adafactor", "method.loraplus_lr_ratio=16"])
def test_unsloth_takes_them_through_its_own_calls(tmp_path, setting):
    got = compiled(tmp_path, "unsloth", setting)
    key, value = setting.split("=", 1)
    expect = {"method.use_rslora": ("unsloth.use_rslora", True),
              "method.modules_to_save": ("unsloth.modules_to_save", ["lm_head"]),
              "method.layers_to_transform": ("unsloth.layers_to_transform", [1]),
              "method.init": ("unsloth.init_lora_weights", "pissa"), "training.optimizer": ("optim", "adafactor"),
              "method.loraplus_lr_ratio": ("loraplus_lr_ratio", 16.0)}[key]
    assert got[expect[0]] == expect[1]


@pytest.mark.parametrize("setting,backend,reason", [
    ("method.use_dora=true", "unsloth", "do not implement DoRA"),
    ("training.attention=sdpa", "unsloth", "picks its own attention"),
    ("model.quant_type=fp4", "unsloth", "NF4"),
    ("method.bias=all", "llamafactory", "without biases"),
])
def test_backends_refuse_what_they_cannot_honour(tmp_path, setting, backend, reason):
    with pytest.raises(UnsupportedError, match=reason):
        compiled(tmp_path, backend, setting)


def test_qlora_details_reach_bitsandbytes(tmp_path, monkeypatch):
    monkeypatch.setenv("LLFARM_PLATFORM", "cuda")
    from llfarm.platform import detect
    detect.cache_clear()
    try:
        got = compiled(tmp_path, "pytorch", "method.type=qlora", "model.quant_type=fp4", "model.double_quant=false",
                       "model.compute_dtype=float16", "training.optimizer=paged_adamw_8bit", "training.tf32=true")
        assert (got["quant.bnb_4bit_quant_type"], got["quant.bnb_4bit_use_double_quant"],
                got["quant.bnb_4bit_compute_dtype"]) == ("fp4", False, "float16")
        assert got["optim"] == "paged_adamw_8bit" and got["tf32"] is True
        lf = compiled(tmp_path, "llamafactory", "method.type=qlora", "model.quant_type=fp4", "model.double_quant=false")
        assert (lf["quantization_bit"], lf["quantization_type"], lf["double_quantization"]) == (4, "fp4", False)
    finally:
        detect.cache_clear()


def test_shipped_cuda_qlora_strategy_uses_the_paged_optimizer_and_nf4(tmp_path):
    s = resolve("cuda_qlora_sft").strategy
    assert (s.training.optimizer, s.model.quant_type, s.model.double_quant) == ("paged_adamw_8bit", "nf4", True)
    proc = llfarm("plan", "cuda_qlora_sft", cwd=tmp_path)
    assert proc.returncode == 0 and '"optim": "paged_adamw_8bit"' in proc.stdout, proc.stderr


# ---------------------------------------------------------------- bad input: one line, exit 2

@pytest.mark.parametrize("sets,pieces", [
    (["training.optimizer=adamw_8bt"], ["'training.optimizer' must be", "did you mean 'adamw_8bit'"]),
    (["training.warmup_steps=-1"], ["'training.warmup_steps'", "greater than or equal to 0"]),
    (["stage=dpo", "data.train=builtin:preference", "training.packing=true"],
     ["'training.packing' packs SFT and pretraining examples", "stage 'dpo'"]),
    (["method.type=qlora", "method.use_dora=true", "--backend", "unsloth"],
     ["method.use_dora", "do not implement DoRA", "--backend pytorch"]),
    (["training.optimizer=paged_adamw_8bit", "--backend", "pytorch"], ["'paged_adamw_8bit' needs CUDA"]),
    (["training.attention=flash_attention_2"], ["flash-attention 2 needs a CUDA GPU"]),
    (["method.type=full", "method.use_rslora=true"], ["'method.use_rslora' is a LoRA setting"]),
    (["backend_options.pytorch.optim=sgd"], ["comes from the strategy field training.optimizer"]),
])
def test_bad_settings_are_one_line(tmp_path, sets, pieces):
    args = ["run", "quickstart", "-o", "runs"]
    it = iter(sets)
    for s in it:
        args += [s, next(it)] if s.startswith("--") else ["--set", s]
    proc = llfarm(*args, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for p in pieces:
        assert p in err, (p, err)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- on CPU, for real

def short_run(tmp_path, run_id: str, *sets: str, backend: str = "pytorch"):
    args = ["run", "quickstart", "--backend", backend, "-o", str(tmp_path), "--run-id", run_id,
            "--set", "export.formats=[]", "--set", "training.logging_steps=1", "--set", "training.max_steps=12"]
    for s in sets:
        args += ["--set", s]
    return run_dir_from(llfarm(*args))


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["method.use_dora=true", "method.use_rslora=true", "method.loraplus_lr_ratio=16"])
def test_dora_rslora_loraplus_train_and_the_loss_falls(tmp_path, setting):
    run = short_run(tmp_path, "r", setting)
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    key, value = setting.split("=")
    if key == "method.use_dora":
        assert cfg["use_dora"] is True
    if key == "method.use_rslora":
        assert cfg["use_rslora"] is True


@pytest.mark.slow
def test_loraplus_changes_training(tmp_path):
    plain = short_run(tmp_path, "plain")
    plus = short_run(tmp_path, "plus", "method.loraplus_lr_ratio=16")
    a, b = ([r["loss"] for r in metrics(x) if "loss" in r] for x in (plain, plus))
    assert a[0] == pytest.approx(b[0]) and a[-1] != pytest.approx(b[-1]), "LoRA+ must change the updates"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "llamafactory"])
def test_tensorboard_events_hold_the_loss(tmp_path, backend):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = short_run(tmp_path, backend, "tracking.report_to=[tensorboard]", backend=backend)
    events = list((run / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under logs/tensorboard"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.endswith("loss") and "eval" not in t)
    values = [e.value for e in acc.Scalars(tag)]
    assert len(values) >= 10 and values[-1] < values[0]
    assert values[0] == pytest.approx([r["loss"] for r in metrics(run) if "loss" in r][0], rel=1e-3)


@pytest.mark.slow
def test_wandb_offline_and_mlflow_write_under_the_run(tmp_path):
    run = short_run(tmp_path, "t", "tracking.report_to=[wandb, mlflow]", "tracking.project=llfarm-test")
    assert list((run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")), "no offline wandb run"
    assert list((run / "logs" / "mlruns").rglob("metrics/loss")), "no mlflow loss metric"


@pytest.mark.slow
def test_packing_reduces_the_steps(tmp_path):
    """32 examples of ~24 tokens: batch 8 gives 4 steps an epoch; packed into max_length 64 they make fewer
    sequences, so the same epoch takes fewer steps."""
    sets = ["training.max_steps=null", "training.epochs=1", "training.batch_size=4", "data.max_length=64"]
    plain = run_dir_from(llfarm("run", "quickstart", "-o", str(tmp_path), "--run-id", "plain", "--set",
                                "export.formats=[]", *[x for s in sets for x in ("--set", s)]))
    packed = run_dir_from(llfarm("run", "quickstart", "-o", str(tmp_path), "--run-id", "packed", "--set",
                                 "export.formats=[]", "--set", "training.packing=true",
                                 *[x for s in sets for x in ("--set", s)]))
    steps = [manifest(r)["final_metrics"]["global_step"] for r in (plain, packed)]
    assert steps[0] == 8 and steps[1] < steps[0], steps


# ---------------------------------------------------------------- llfarm import

ROUND_TRIPS = {
    "cpu_lora_sft": ["method.use_dora=true", "training.optimizer=adamw_torch", "training.neftune_alpha=5",
                     "data.eval_split=0.25", "training.warmup_steps=3", "method.modules_to_save=[lm_head]"],
    "pretrain": [], "dpo": ["preference.loss=ipo", "preference.beta=0.3"], "orpo": ["preference.beta=0.2"],
    "simpo": ["preference.simpo_gamma=0.7"], "kto": ["preference.undesirable_weight=1.5"], "reward_model": [],
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_import_round_trips_a_llamafactory_plan(tmp_path, name):
    """Importing the YAML `llfarm plan --backend llamafactory` wrote gives back an equivalent strategy, for every
    stage LlamaFactory runs (ORPO and SimPO are its dpo stage with another pref_loss): every value resolves the same,
    and its data reads as the same examples."""
    from llfarm.data import prepare
    sets = ROUND_TRIPS[name]
    args = ["plan", name, "--backend", "llamafactory", "--out", "p", *[x for s in sets for x in ("--set", s)]]
    assert llfarm(*args, cwd=tmp_path).returncode == 0
    proc = llfarm("import", "p/native/llamafactory_train.yaml", "-o", "back.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not mapped" not in proc.stderr, proc.stderr
    original = resolve(name, sets).strategy
    back = resolve(str(tmp_path / "back.yaml")).strategy
    from llfarm.training import model_dtype
    a, b = original.model_dump(), back.model_dump()
    a["training"]["precision"] = "fp32"           # auto, resolved on this CPU
    for s, strategy in ((a, original), (b, back)):
        s.pop("name"), s.pop("description"), s.pop("export"), s.pop("backend")
        s["data"].pop("train"), s["data"].pop("eval_split"), s["data"].pop("eval")
        s["model"].pop("path")
        s["model"]["dtype"] = model_dtype(strategy, s["training"]["precision"])   # LlamaFactory: float32 weights
    assert a == b
    # the data: the plan's train and eval files are the original's split
    d1, d2 = prepare(original, write=True), prepare(back, write=True)
    assert list(d1.rows("train")) == list(d2.rows("train")) and list(d1.rows("eval")) == list(d2.rows("eval"))


def test_import_axolotl_and_trl(tmp_path):
    write(tmp_path / "data" / "train.jsonl", '{"instruction": "a", "output": "b"}\n')
    write(tmp_path / "axo.yml", """\
base_model: NousResearch/Llama-3.2-1B
load_in_4bit: true
adapter: qlora
datasets:
  - path: data/train.jsonl
    type: alpaca
val_set_size: 0.1
sequence_len: 2048
sample_packing: true
lora_r: 32
lora_alpha: 16
lora_target_linear: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
bf16: auto
flash_attention: true
loss_watchdog_threshold: 5.0
output_dir: ./outputs/qlora-out
wandb_project:
""")
    proc = llfarm("import", "axo.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not mapped: loss_watchdog_threshold" in proc.stderr and "output_dir" in proc.stderr
    s = resolve(str(tmp_path / "axo.llfarm.yaml")).strategy
    assert (s.method.type, s.method.r, s.method.target_modules, s.training.optimizer) == ("qlora", 32, "all",
                                                                                          "adamw_8bit")
    assert (s.data.train, s.data.max_length, s.training.packing, s.training.attention) == \
        (str((tmp_path / "data" / "train.jsonl").resolve()), 2048, True, "flash_attention_2")
    write(tmp_path / "trl.yaml", """\
model_name_or_path: Qwen/Qwen2.5-0.5B
dataset_name: trl-lib/ultrafeedback_binarized
learning_rate: 5.0e-7
beta: 0.1
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
use_peft: true
lora_r: 16
lora_target_modules: all-linear
bf16: true
push_to_hub: true
""")
    proc = llfarm("import", "trl.yaml", "--from", "trl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = resolve(str(tmp_path / "trl.llfarm.yaml")).strategy
    assert (s.stage, s.preference.beta, s.method.type, s.method.target_modules, s.data.train) == \
        ("dpo", 0.1, "lora", "all", "hf:trl-lib/ultrafeedback_binarized")


@pytest.mark.parametrize("rl, extra, expect", [
    ("orpo", "orpo_alpha: 0.2\n", {"stage": "orpo", "beta": 0.2}),
    ("simpo", "simpo_gamma: 0.8\nrl_beta: 2.0\n", {"stage": "simpo", "beta": 2.0, "simpo_gamma": 0.8}),
    ("kto", "kto_undesirable_weight: 1.5\n", {"stage": "kto", "undesirable_weight": 1.5}),
    ("ipo", "", {"stage": "dpo", "loss": "ipo"}),
    ("grpo", "trl:\n  beta: 0.04\n  num_generations: 8\n  reward_funcs: [rewards.format_reward, exact_match]\n",
     {"stage": "grpo", "beta": 0.04, "num_generations": 8, "rewards": ["rewards:format_reward", "exact_match"]}),
])
def test_import_axolotl_preference_stages(tmp_path, rl, extra, expect):
    """Axolotl's `rl:` stages become llfarm's stages, with their own knobs."""
    write(tmp_path / "pairs.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    write(tmp_path / "axo.yml", f"base_model: HuggingFaceTB/SmolLM2-135M\nadapter: lora\nrl: {rl}\n{extra}"
                                "datasets:\n  - path: pairs.jsonl\n")
    proc = llfarm("import", "axo.yml", "-o", "s.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not mapped" not in proc.stderr, proc.stderr
    got = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert {k: got["stage"] if k == "stage" else got["preference"][k] for k in expect} == expect


def test_import_bad_input(tmp_path):
    write(tmp_path / "x.yaml", "foo: 1\n")
    proc = llfarm("import", "x.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot tell which tool" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = llfarm("import", "x.yaml", "--from", "axolot", cwd=tmp_path)
    assert proc.returncode == 2 and "did you mean 'axolotl'" in proc.stderr


def test_every_backend_importer_is_reachable():
    from llfarm.importers import importers
    assert {"axolotl", "trl"} <= set(importers())
    for b in registry().values():
        if b.importer is not None:
            assert b.importer.name in importers()
