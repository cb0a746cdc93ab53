"""The plain PyTorch backend: transformers + PEFT + TRL (SFTTrainer, DPOTrainer, RewardTrainer).

compile writes ``native/train_config.json`` (every value the worker uses, nothing implicit) and the
command ``python -m llfarm.backends.pytorch_worker native/train_config.json``, which can be re-run by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llfarm.backend import Backend, Capabilities, CompileContext, NativePlan, RunResult
from llfarm.data import total_steps
from llfarm.errors import UnsupportedError
from llfarm.rundir import atomic_write_text, read_json

OPTION_KEYS = {"optim", "lr_scheduler_kwargs", "dataloader_num_workers", "gradient_checkpointing_kwargs",
               "torch_compile", "neftune_noise_alpha", "label_smoothing_factor", "adam_beta1",
               "adam_beta2", "adam_epsilon"}


class PytorchBackend(Backend):
    name = "pytorch"
    extra = None
    packages = ("torch", "transformers", "peft", "trl")
    capabilities = Capabilities(
        stages=frozenset({"sft", "dpo", "rm"}),
        methods=frozenset({"lora", "qlora", "full", "freeze"}),
        quantization=frozenset({"none", "4bit", "8bit"}),
        platforms=frozenset({"cpu", "cuda", "mps"}),
        launchers=frozenset({"none", "torchrun", "accelerate"}),
    )

    def check(self, strategy, platform) -> None:
        super().check(strategy, platform)
        unknown = set(strategy.backend_options.get(self.name, {})) - OPTION_KEYS
        if unknown:
            from llfarm.errors import did_you_mean
            key = sorted(unknown)[0]
            raise UnsupportedError(f"unknown key '{key}'{did_you_mean(key, OPTION_KEYS)}",
                                   where=f"backend_options.{self.name}",
                                   hint=f"the pytorch backend accepts {', '.join(sorted(OPTION_KEYS))}")

    def compile(self, ctx: CompileContext) -> NativePlan:
        s, run = ctx.strategy, ctx.run
        steps = total_steps(s, ctx.data.n_train, s.distributed.nproc_per_node * s.distributed.nnodes)
        config = {
            "stage": s.stage,
            "model": {"path": ctx.model_path, "revision": s.model.revision, "dtype": s.model.dtype,
                      "quantization": s.quantization, "trust_remote_code": s.model.trust_remote_code},
            "template": s.template,
            "method": s.method.model_dump(mode="json"),
            "data": {"train": str(ctx.data.train_path),
                     "eval": str(ctx.data.eval_path) if ctx.data.eval_path else None,
                     "max_length": s.data.max_length},
            "training": {**s.training.model_dump(mode="json"), "precision": ctx.precision},
            "preference": s.preference.model_dump(mode="json"),
            "platform": ctx.platform.name,
            "options": s.backend_options.get(self.name, {}),
            "outputs": {"adapter": str(run.adapter), "model": str(run.model), "checkpoints": str(run.checkpoints),
                        "metrics": str(run.metrics_path), "final": str(run.native / "final_metrics.json")},
            "resume_from": str(ctx.resume_from) if ctx.resume_from else None,
            "deepspeed": write_deepspeed(s.distributed.deepspeed, run.native),
            "total_steps": steps,
        }
        path = run.native / "train_config.json"
        atomic_write_text(path, json.dumps(config, indent=2) + "\n")
        argv = [sys.executable, "-m", "llfarm.backends.pytorch_worker", str(path)]
        d = s.distributed
        if d.launcher == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={d.nproc_per_node}",
                    f"--nnodes={d.nnodes}", "-m", "llfarm.backends.pytorch_worker", str(path)]
        elif d.launcher == "accelerate":
            argv = [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={d.nproc_per_node}",
                    f"--num_machines={d.nnodes}", "-m", "llfarm.backends.pytorch_worker", str(path)]
        return NativePlan(argv=argv, env={"HF_HUB_OFFLINE": "1"} if Path(ctx.model_path).is_dir() else {},
                          cwd=run.root, files=[path], total_steps=steps)

    def collect(self, ctx: CompileContext) -> RunResult:
        run = ctx.run
        kind = "adapter" if ctx.strategy.is_peft else "model"
        out = run.adapter if kind == "adapter" else run.model
        return RunResult(output_kind=kind, output_dir=out,
                         final_metrics=read_json(run.native / "final_metrics.json"))


def write_deepspeed(spec: str | None, native: Path) -> str | None:
    """zero2 / zero3 → a standard DeepSpeed JSON in native/; a user's JSON is copied there as given."""
    if spec is None:
        return None
    path = native / "deepspeed.json"
    if spec in ("zero2", "zero3"):
        stage = int(spec[-1])
        config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                  "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
                  "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                        **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})}}
        atomic_write_text(path, json.dumps(config, indent=2) + "\n")
        return str(path)
    src = Path(spec)
    if not src.is_file():
        from llfarm.errors import StrategyError
        raise StrategyError([f"DeepSpeed config not found: {spec}"], where="distributed.deepspeed",
                            hint="use zero2, zero3, or a path to a DeepSpeed JSON file")
    atomic_write_text(path, src.read_text(encoding="utf-8"))
    return str(path)


backend = PytorchBackend()
