"""The plain PyTorch backend: transformers + PEFT + TRL (SFT, DPO, ORPO, CPO/SimPO, KTO, Reward, PPO, GRPO trainers).

compile writes ``native/trainer.json`` — the spec of llfarm's shared training layer (``llfarm.training``): the
exact TrainingArguments/SFTConfig, LoraConfig, BitsAndBytesConfig and dtype — and the command
``python -m llfarm.trainer native/trainer.json`` (the shared trainer child with the transformers loader), which can
be re-run by hand.
"""

from __future__ import annotations

import json
import sys

from llfarm.backend import Backend, Capabilities, CompileContext, NativePlan, RunResult, launcher_argv, offline_env
from llfarm.distributed import launch_env, write_launcher_files
from llfarm.rundir import atomic_write_text, read_json
from llfarm.training import TrainerOptions, total_steps, trainer_spec

SPEC = "trainer.json"


class PytorchBackend(Backend):
    name = "pytorch"
    summary = "transformers + PEFT + TRL (SFT, DPO, ORPO, CPO/SimPO, KTO, Reward, PPO, GRPO trainers); CPU, CUDA, MPS"
    priority = 20
    default = True
    extra = None
    packages = ("torch", "transformers", "peft", "trl")
    distributions = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes")
    options = TrainerOptions
    capabilities = Capabilities(
        stages=frozenset({"sft", "pt", "dpo", "orpo", "simpo", "kto", "rm", "ppo", "grpo"}),
        methods=frozenset({"lora", "qlora", "full", "freeze"}),
        quantization=frozenset({"none", "4bit", "8bit"}),
        platforms=frozenset({"cpu", "cuda", "mps"}),
        launchers=frozenset({"none", "torchrun", "accelerate", "deepspeed"}),
        resumable=frozenset({"sft", "pt", "dpo", "orpo", "simpo", "kto", "rm", "grpo"}),
        reasons={"resume:ppo": "TRL 0.24's PPOTrainer.train takes no checkpoint to resume from; start a new run"},
    )

    def check(self, strategy, platform, data=None) -> None:
        super().check(strategy, platform, data)
        if strategy.stage == "ppo":
            from llfarm.training import check_reward_model
            check_reward_model(strategy, value_head=False)

    def compile(self, ctx: CompileContext) -> NativePlan:
        s, run = ctx.strategy, ctx.run
        steps = total_steps(s, ctx.data.n_train)
        spec = trainer_spec(ctx, steps, self.option_values(s))
        launcher_files = write_launcher_files(ctx)
        path = run.native / SPEC
        atomic_write_text(path, json.dumps(spec, indent=2) + "\n")
        argv = launcher_argv(ctx, [sys.executable], ["-m", "llfarm.trainer", str(path)])
        return NativePlan(argv=argv, env={**offline_env(ctx), **launch_env(ctx)},
                          cwd=run.root, files=[path, *launcher_files], total_steps=steps,
                          trainer=f"trl.{spec['trainer']}(args=trl.{spec['config']}(**{SPEC}['args']))")

    def collect(self, ctx: CompileContext) -> RunResult:
        run = ctx.run
        kind = "adapter" if ctx.strategy.is_peft else "model"
        return RunResult(output_kind=kind, output_dir=run.adapter if kind == "adapter" else run.model,
                         final_metrics=read_json(run.final_metrics_path))


backend = PytorchBackend()
