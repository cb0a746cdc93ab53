"""The stages beyond SFT/DPO/RM: continued pretraining (pt), ORPO, SimPO, KTO, PPO and GRPO — what each compiles
to on each backend, what each refuses (one line), and, on CPU with the tiny model, that each does its job. The
shared backend suite (test_backends.py) runs them for a few steps on every backend; here are the checks that need
more: no answer mask in pt, unpaired KTO, reward functions, and (marker `rl`, opt-in) GRPO's and PPO's reward rising
over a longer run from an SFT-trained start."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import llfarm, manifest, metrics, run_dir_from, write

from llfarm.errors import UnsupportedError
from llfarm.runner import create_run, prepare_run
from llfarm.strategy import resolve


def plan(tmp_path, backend: str, strategy: str, *sets: str):
    prep = prepare_run(resolve(strategy, list(sets)), backend, plan=True)
    _, native = create_run(prep, tmp_path / backend, run_id="p")
    if backend == "llamafactory":
        return yaml.safe_load(native.files[0].read_text())
    return json.loads(native.files[-1].read_text())


@pytest.mark.parametrize("strategy,trainer,keys", [
    ("pretrain", "SFTTrainer", {"completion_only_loss": False}),
    ("orpo", "ORPOTrainer", {"beta": 0.1}),
    ("simpo", "CPOTrainer", {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5, "beta": 2.0}),
    ("kto", "KTOTrainer", {"desirable_weight": 1.0, "undesirable_weight": 1.0}),
    ("grpo", "GRPOTrainer", {"num_generations": 8, "max_completion_length": 16, "beta": 0.0}),
])
def test_each_stage_compiles_to_its_trl_trainer(tmp_path, strategy, trainer, keys):
    spec = plan(tmp_path, "pytorch", strategy)
    assert spec["trainer"] == trainer
    assert {k: spec["args"][k] for k in keys} == keys


def pairs(n: int = 4) -> list[dict]:
    from llfarm.resources import BUILTIN_DATA
    rows = [json.loads(line) for line in BUILTIN_DATA["preference"].read_text().splitlines()[:n]]
    return [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]


def llfarm_pair_ids(trainer: str, rows: list[dict], max_length: int = 64, max_prompt_length: int = 32):
    """What the pytorch backend's ORPOTrainer/CPOTrainer trains on: render_turns_batch, then its tokenize_row."""
    from types import SimpleNamespace

    import trl
    from transformers import AutoTokenizer

    from llfarm.resources import BUILTIN_MODELS
    from llfarm.templates import load_template
    from llfarm.train_common import render_turns_batch, tokenizer_for_template
    from llfarm.trainer import template_tokenized

    template = load_template("chatml")
    tok = tokenizer_for_template(AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"]), template)
    batch = render_turns_batch({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}, template, tok)
    this = SimpleNamespace(processing_class=tok, max_length=max_length, max_prompt_length=max_prompt_length,
                           truncation_mode="keep_end", label_pad_token_id=-100,
                           is_encoder_decoder=False)
    cls = template_tokenized(getattr(trl, trainer))
    this.build_tokenized_answer = lambda prompt, answer: cls.build_tokenized_answer(this, prompt, answer)
    return tok, [cls.tokenize_row(this, dict(zip(batch, v, strict=True))) for v in zip(*batch.values(), strict=True)]


@pytest.mark.parametrize("trainer", ["CPOTrainer", "ORPOTrainer"])
def test_orpo_and_simpo_train_on_llamafactorys_token_ids(trainer):
    """The same ids as LlamaFactory's pairwise processor: the template's prompt without a bos, each answer with the
    template's end of turn (`<|im_end|>\\n`), the prompt masked in the labels. TRL's own tokenize_row added a bos
    and replaced the end of turn with the bare eos — SimPO ended 18.5% apart from LlamaFactory on the same data."""
    lf_data = pytest.importorskip("llamafactory.data")
    from llamafactory.hparams import DataArguments

    rows = pairs()
    tok, ours = llfarm_pair_ids(trainer, rows)
    template = lf_data.get_template_and_fix_tokenizer(tok, DataArguments(template="chatml"))
    for row, got in zip(rows, ours, strict=True):
        for k in ("chosen", "rejected"):
            prompt, answer = template.encode_oneturn(tok, [*row["prompt"], {"role": "assistant", "content": row[k]}])
            assert got[f"{k}_input_ids"] == prompt + answer
            assert got[f"{k}_labels"] == [-100] * len(prompt) + answer
            assert tok.decode(answer) == row[k] + "<|im_end|>\n"
        assert got["prompt_input_ids"] == prompt and tok.bos_token_id not in prompt


def test_orpo_and_simpo_truncate_the_prompts_start_then_the_answers():
    rows = pairs(1)
    rows[0]["prompt"][0]["content"] = "word " * 80
    rows[0]["chosen"] = "yes " * 80
    _, [got] = llfarm_pair_ids("CPOTrainer", rows, max_length=48, max_prompt_length=24)
    assert len(got["prompt_input_ids"]) == 24 and len(got["chosen_input_ids"]) == 48
    assert got["prompt_input_ids"][-3:] == got["chosen_input_ids"][21:24]        # the prompt's end is kept
    assert got["chosen_labels"][:24] == [-100] * 24 and -100 not in got["chosen_labels"][24:]


@pytest.mark.parametrize("strategy,lf", [
    ("pretrain", {"stage": "pt", "packing": False}),
    ("orpo", {"stage": "dpo", "pref_loss": "orpo", "pref_beta": 0.1}),
    ("simpo", {"stage": "dpo", "pref_loss": "simpo", "simpo_gamma": 0.5, "pref_beta": 2.0}),
    ("kto", {"stage": "kto", "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0}),
])
def test_llamafactory_stages(tmp_path, strategy, lf):
    config = plan(tmp_path, "llamafactory", strategy)
    assert {k: config[k] for k in lf} == lf


@pytest.mark.parametrize("stage,backend,reason", [
    ("grpo", "llamafactory", "has no GRPO stage"),
    ("ppo", "llamafactory", "requires TRL version >=0.8.6,<=0.9.6"),
    ("ppo", "unsloth", "PPOTrainer"),
])
def test_stages_a_backend_cannot_run(tmp_path, stage, backend, reason):
    sets = [f"stage={stage}", *(["preference.rewards=[exact_match]"] if stage == "grpo" else
                                ["preference.reward_model=nowhere"])]
    with pytest.raises(UnsupportedError, match=reason):
        prepare_run(resolve("quickstart", sets), backend, plan=True)


def test_kto_unpairs_preference_pairs_when_asked():
    from llfarm.data import prepare
    d = prepare(resolve("dpo", ["stage=kto", "preference.unpair=true"]).strategy, write=True)
    rows = list(d.rows())
    assert d.kind == "kto" and len(rows) == 64
    assert rows[0]["label"] is True and rows[1]["label"] is False and rows[0]["prompt"] == rows[1]["prompt"]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

REWARDS = {
    "broken.py": "import no_such_module_here\n",
    "signature.py": "def score(text):\n    return [1.0]\n",
    "raises.py": "def score(completions, **kw):\n    raise ValueError('no score today')\n",
    "wrong.py": "def score(completions, **kw):\n    return 'high'\n",
}


@pytest.mark.parametrize("sets,pieces", [
    (["stage=dpo", "data.train=builtin:kto"], ["stage 'dpo' cannot train on KTO feedback", "data.train"]),
    (["stage=pt", "data.train=builtin:preference"], ["stage 'pt' needs plain text", "preference"]),
    (["stage=kto", "data.train=builtin:preference"], ["stage 'kto' needs unpaired feedback",
                                                       "preference.unpair: true"]),
    (["stage=grpo", "preference.rewards=[broken.py:score]"], ["broken.py:score", "does not import",
                                                             "no_such_module_here"]),
    (["stage=grpo", "preference.rewards=[signature.py:score]"], ["signature.py:score",
                                                                "score(completions, **kwargs)"]),
    (["stage=grpo", "preference.rewards=[raises.py:score]"], ["raises.py:score", "ValueError: no score today"]),
    (["stage=grpo", "preference.rewards=[wrong.py:score]"], ["wrong.py:score", "one number per completion"]),
    (["stage=grpo", "preference.rewards=[missing.py:score]"], ["reward file not found: "]),
    (["stage=grpo", "preference.rewards=[exactmatch]"], ["unknown reward 'exactmatch'"]),
    (["stage=grpo"], ["'preference.rewards' is required for stage grpo"]),
    (["stage=ppo"], ["'preference.reward_model' is required for stage ppo"]),
    (["stage=ppo", "preference.reward_model=."], ["not an llfarm run directory"]),
    (["preference.rewards=[exact_match]"], ["'preference.rewards' is for stage grpo"]),
])
def test_stage_bad_input(tmp_path, sets, pieces):
    for name, code in REWARDS.items():
        write(tmp_path / name, code)
    args = ["run", "quickstart", "-o", "runs"]
    for s in sets:
        args += ["--set", s]
    proc = llfarm(*args, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for p in pieces:
        assert p in err, (p, err)
    assert not (tmp_path / "runs").exists()


def test_ppo_refuses_a_reward_model_it_cannot_load(tmp_path):
    """A LlamaFactory rm run keeps a value head; the pytorch backend's PPO loads a classification head."""
    fake = tmp_path / "rm"
    write(fake / "manifest.json", json.dumps({"stage": "rm", "status": "completed", "backend": "llamafactory",
                                              "model_path": "x", "output_kind": "adapter"}))
    write(fake / "adapter" / "value_head.safetensors", "")
    proc = llfarm("run", "quickstart", "-o", "runs", "--set", "stage=ppo", "--set", "preference.reward_model=rm",
                  cwd=tmp_path)
    assert proc.returncode == 2 and "LlamaFactory's value head" in proc.stderr and "same backend" in proc.stderr


# ---------------------------------------------------------------- runs

@pytest.mark.slow
def test_pt_trains_every_token(tmp_path):
    run = run_dir_from(llfarm("run", "pretrain", "-o", str(tmp_path), "--set", "training.max_steps=12",
                              "--set", "training.logging_steps=1"))
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    from datasets import load_from_disk
    token_cache = json.loads((run / "native" / "trainer.json").read_text())["data"]["token_cache"]
    ds = load_from_disk(f"{token_cache}/train")
    assert ds.column_names == ["input_ids"], "pt has no completion mask: every token has a loss"
    gen = llfarm("generate", str(run), "--prompt", "The capital of France is", "--max-new-tokens", "6")
    assert gen.returncode == 0, gen.stderr


@pytest.mark.slow
def test_user_reward_function_runs_in_training(tmp_path):
    write(tmp_path / "my_rewards.py", "def brevity(completions, **kw):\n"
                                      "    return [1.0 / (1 + len(c)) for c in completions]\n")
    write(tmp_path / "g.yaml", "extends: grpo\nname: g\n"
                               "training: {max_steps: 2, batch_size: 8, logging_steps: 1}\n"
                               "preference: {rewards: [my_rewards.py:brevity, exact_match], num_generations: 4, "
                               "max_new_tokens: 8}\n")
    run = run_dir_from(llfarm("run", "g.yaml", "-o", "runs", cwd=tmp_path))
    log = (tmp_path / run / "logs" / "train.log").read_text()
    assert "rewards/brevity/mean" in log and "rewards/exact_match/mean" in log


def sft_start(tmp_path) -> str:
    """A partly SFT-trained tiny model (60 steps), merged: RL needs a policy that sometimes gets it right."""
    run = run_dir_from(llfarm("run", "quickstart", "-o", str(tmp_path), "--run-id", "sft", "--set",
                              "training.max_steps=60", "--set", "export.formats=[merged]"))
    return str(run / "exports" / "merged")


def third_means(values: list[float]) -> tuple[float, float]:
    n = len(values) // 3
    return sum(values[:n]) / n, sum(values[-n:]) / n


@pytest.mark.rl
def test_grpo_exact_match_reward_rises(tmp_path):
    """The capital-city facts (the first 12 shipped examples), exact match against the reference answer, 60 steps:
    the mean reward of the last third of the run beats the first third's."""
    run = run_dir_from(llfarm("run", "grpo", "-o", str(tmp_path), "--set", f"model.path={sft_start(tmp_path)}",
                              "--set", "data.max_samples=12"))
    first, last = third_means([r["reward"] for r in metrics(run) if "reward" in r])
    assert last > first + 0.05, (first, last)


@pytest.mark.rl
def test_ppo_reward_rises(tmp_path):
    """PPO from an llfarm rm run (trained on the preference pairs) onto a partly SFT-trained policy: the reward model's
    mean score of the last third of the run beats the first third's."""
    rm = run_dir_from(llfarm("run", "reward_model", "-o", str(tmp_path), "--run-id", "rm", "--set",
                             "training.max_steps=32"))
    run = run_dir_from(llfarm("run", "quickstart", "-o", str(tmp_path), "--run-id", "ppo", "--set", "stage=ppo",
                              "--set", f"model.path={sft_start(tmp_path)}", "--set", f"preference.reward_model={rm}",
                              "--set", "training.max_steps=48", "--set", "training.logging_steps=1", "--set",
                              "training.learning_rate=3e-3", "--set", "data.max_samples=12", "--set",
                              "export.formats=[]", "--set", "preference.max_new_tokens=12", "--set",
                              "preference.temperature=0.7"))
    first, last = third_means([r["reward"] for r in metrics(run) if "reward" in r])
    assert last > first, (first, last)
    assert manifest(run)["status"] == "completed"
