"""Multi-process and multi-node training, handed to existing engines: torchrun (``torch.distributed.run``),
``accelerate launch`` (DDP, FSDP2), DeepSpeed's launcher and Slurm. llfarm launches nothing itself; it compiles the
strategy's ``distributed:`` section into those engines' command lines and config files, once, here:

    launch_argv(ctx, python, entry)   python -m torch.distributed.run ... | accelerate launch ... | deepspeed ...
    accelerate_config(ctx)            native/accelerate.yaml (DDP or FSDP2), what `accelerate launch` reads
    deepspeed_config(strategy)        native/deepspeed.json (zero2 / zero3, CPU offload), what the HF trainer reads
    check_devices(strategy, plat)     nproc_per_node against the GPUs this machine has (run, not plan)
    slurm_script(...)                 an sbatch script that starts `llfarm run` (and so the same torchrun) per node

Ranks: node 0 is the head. It owns the run directory; another node (node_rank K > 0) keeps its native files and
logs in ``<run-id>-node<K>/`` beside it, and its processes write outputs into the head's run directory (only global
rank 0 writes metrics.jsonl, checkpoints, the adapter and final metrics), so the output folder must be one that
every node sees (a shared filesystem, as for any multi-node Hugging Face job).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UnsupportedError

if TYPE_CHECKING:
    from .backend import CompileContext
    from .platform import Platform
    from .schema import Strategy

RANK_LOGS = "ranks"                  # logs/ranks/: one folder of stdout/stderr per local rank (torchrun --log-dir)
ACCELERATE_CONFIG = "accelerate.yaml"
DEEPSPEED_CONFIG = "deepspeed.json"


def is_distributed(s: Strategy) -> bool:
    return s.distributed.launcher != "none"


def is_worker_node(s: Strategy) -> bool:
    """A node other than the head of a multi-node run: it trains, the head keeps the run directory."""
    return s.distributed.nnodes > 1 and s.distributed.node_rank > 0


def rdzv_id(ctx: CompileContext) -> str:
    """The rendezvous id every node agrees on: the head's run id (all nodes are started with the same --run-id)."""
    return ctx.run.head.root.name


# ---------------------------------------------------------------- launch command lines

def launch_argv(ctx: CompileContext, python: list[str], entry: list[str]) -> list[str]:
    """``python entry...`` under the strategy's launcher, or as it is for launcher: none. ``entry`` is
    ``["-m", "module", args...]`` (every llfarm training child is a module)."""
    d = ctx.strategy.distributed
    assert entry[0] == "-m", entry
    if d.launcher == "torchrun":
        return [*python, "-m", "torch.distributed.run", *torchrun_args(ctx), *entry]
    if d.launcher == "accelerate":
        return [*python, "-m", "accelerate.commands.launch", "--config_file",
                str(ctx.run.native / ACCELERATE_CONFIG), *_accelerate_logs(ctx), "--module", *entry[1:]]
    if d.launcher == "deepspeed":
        # DeepSpeed's launcher (deepspeed.launcher.runner, the `deepspeed` command); --no_local_rank: the child
        # reads LOCAL_RANK from the environment, as under torchrun.
        return [*python, "-m", "deepspeed.launcher.runner", f"--num_gpus={d.nproc_per_node}",
                f"--master_port={_port(d.endpoint) or 29500}", "--no_local_rank",
                f"--enable_each_rank_log={ctx.run.logs / RANK_LOGS}", "--module", *entry[1:]]
    return [*python, *entry]


def torchrun_args(ctx: CompileContext) -> list[str]:
    """torchrun's options: one node → --standalone (a free local port); several → c10d rendezvous at the head's
    endpoint with the run id. Every rank's stdout/stderr is kept under logs/ranks/ (console: local rank 0)."""
    d = ctx.strategy.distributed
    args = [f"--nproc-per-node={d.nproc_per_node}", f"--nnodes={d.nnodes}"]
    if d.nnodes == 1:
        args.append("--standalone")
    else:
        args += [f"--node-rank={d.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={d.endpoint}",
                 f"--rdzv-id={rdzv_id(ctx)}", f"--rdzv-conf=is_host={int(d.node_rank == 0)}"]
    return [*args, "--max-restarts=0", f"--log-dir={ctx.run.logs / RANK_LOGS}", "--tee=3", "--local-ranks-filter=0"]


def _accelerate_logs(ctx: CompileContext) -> list[str]:
    return ["--log_dir", str(ctx.run.logs / RANK_LOGS), "--tee", "3"]


def _port(endpoint: str | None) -> int | None:
    return int(endpoint.rpartition(":")[2]) if endpoint else None


def launch_env(ctx: CompileContext) -> dict[str, str]:
    """Environment for the launcher. On CUDA, what LlamaFactory's FORCE_TORCHRUN launcher sets for DDP
    (OPTIM_TORCH): expandable CUDA segments and no NCCL record streams. On CPU, accelerate's device override:
    its multi-CPU state names the device "cpu:<local rank>", which torch.load cannot map a checkpoint's optimizer
    state to (the trainer loads it with map_location=args.device when world_size > 1), so resume would fail."""
    if not is_distributed(ctx.strategy):
        return {}
    if ctx.platform.name == "cpu":
        return {"ACCELERATE_TORCH_DEVICE": "cpu"}
    if ctx.platform.name == "cuda":
        return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}
    return {}


# ---------------------------------------------------------------- accelerate

def accelerate_config(ctx: CompileContext) -> dict[str, Any]:
    """native/accelerate.yaml for `accelerate launch --config_file`: DDP, or FSDP2 (fsdp_version 2) sharding each
    decoder layer. accelerate starts several processes only through its multi-GPU (torchrun) launcher, so on a CPU
    machine the type is MULTI_GPU too and each process trains on CPU with gloo (TrainingArguments.use_cpu)."""
    s = ctx.strategy
    d = s.distributed
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if d.fsdp != "none" else "MULTI_GPU",
        "num_processes": d.world_size, "num_machines": d.nnodes, "machine_rank": d.node_rank,
        "main_process_port": _port(d.endpoint) if d.nnodes > 1 else 0,
        "mixed_precision": {"bf16": "bf16", "fp16": "fp16"}.get(ctx.precision, "no"),
        "use_cpu": False, "gpu_ids": "all", "rdzv_backend": "static" if d.nnodes == 1 else "c10d",
        "same_network": True, "downcast_bf16": "no", "tpu_env": [], "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }
    if d.nnodes > 1:
        cfg["main_process_ip"] = d.endpoint.rpartition(":")[0] if d.endpoint else None
    if d.fsdp != "none":
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": d.fsdp == "full_shard",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": decoder_layer_class(ctx.model_path),
            "fsdp_state_dict_type": "FULL_STATE_DICT",   # the adapter/model saves as one file, as without FSDP
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": s.training.gradient_checkpointing,
        }
    return cfg


def decoder_layer_class(model_path: str) -> str:
    """The decoder layer class FSDP wraps, from the model's config.json (LlamaForCausalLM → LlamaDecoderLayer)."""
    import json
    cfg_path = Path(model_path) / "config.json"
    try:
        arch = json.loads(cfg_path.read_text(encoding="utf-8"))["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "LlamaDecoderLayer"
    for suffix in ("ForCausalLM", "ForSequenceClassification", "ForConditionalGeneration", "Model"):
        if arch.endswith(suffix):
            return arch[: -len(suffix)] + "DecoderLayer"
    return "LlamaDecoderLayer"


# ---------------------------------------------------------------- DeepSpeed

def deepspeed_config(s: Strategy) -> dict[str, Any]:
    """zero2 / zero3 as a standard DeepSpeed config whose "auto" values the Hugging Face integration fills in from
    TrainingArguments (batch sizes, accumulation, clipping, precision), with the strategy's CPU offload."""
    stage = int(s.distributed.deepspeed[-1])
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    else:
        zero.update({"allgather_partitions": True, "reduce_scatter": True})
    if "optimizer" in s.distributed.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if "param" in s.distributed.offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": zero}


def write_deepspeed(ctx: CompileContext) -> Path | None:
    """distributed.deepspeed → native/deepspeed.json (what the trainer arguments point at); a user's JSON is
    copied as given."""
    import json

    from .errors import StrategyError
    from .rundir import atomic_write_text

    spec = ctx.strategy.distributed.deepspeed
    if spec is None:
        return None
    path = ctx.run.native / DEEPSPEED_CONFIG
    if spec in ("zero2", "zero3"):
        atomic_write_text(path, json.dumps(deepspeed_config(ctx.strategy), indent=2) + "\n")
        return path
    src = Path(spec)
    if not src.is_file():
        raise StrategyError([f"DeepSpeed config not found: {spec}"], where="distributed.deepspeed",
                            hint="use zero2, zero3, or a path to a DeepSpeed JSON file")
    atomic_write_text(path, src.read_text(encoding="utf-8"))
    return path


def write_launcher_files(ctx: CompileContext) -> list[Path]:
    """The launcher's own files in native/ (accelerate.yaml, deepspeed.json), for `plan` to show."""
    import yaml

    from .rundir import atomic_write_text

    files = []
    if ctx.strategy.distributed.launcher == "accelerate":
        path = ctx.run.native / ACCELERATE_CONFIG
        atomic_write_text(path, "# accelerate launch --config_file (written by llfarm)\n" +
                          yaml.safe_dump(accelerate_config(ctx), sort_keys=False))
        files.append(path)
    ds = write_deepspeed(ctx)
    if ds is not None:
        files.append(ds)
    return files


# ---------------------------------------------------------------- checks that need this machine

def cuda_device_count() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES respected)."""
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable torch/CUDA: no devices
        return 0


def check_devices(s: Strategy, plat: Platform) -> None:
    """On a GPU machine each process needs its own GPU: refuse nproc_per_node beyond what is visible."""
    d = s.distributed
    if d.launcher == "none" or plat.name != "cuda":
        return
    n = cuda_device_count()
    if d.nproc_per_node > n:
        raise UnsupportedError(
            f"{d.nproc_per_node} processes per node, one per GPU, but this machine has {n} CUDA "
            f"device{'s' if n != 1 else ''}" + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                                                if "CUDA_VISIBLE_DEVICES" in os.environ else ""),
            where="distributed.nproc_per_node", hint=f"set distributed.nproc_per_node: {max(n, 1)} or fewer")


def check_fsdp(s: Strategy, plat: Platform) -> None:
    """FSDP runs through accelerate, and accelerate 1.11 turns it on only for GPU-type states: on CPU it sets up
    plain multi-CPU DDP and ignores the FSDP config (torch 2.11's fully_shard itself does train on gloo)."""
    if s.distributed.fsdp != "none" and plat.name != "cuda":
        raise UnsupportedError(f"FSDP through accelerate needs CUDA GPUs (on {plat.name} accelerate sets up plain "
                               "DDP and would ignore the FSDP config); this machine has " + plat.accelerator,
                               where="distributed.fsdp",
                               hint="`llfarm plan` still writes native/accelerate.yaml; on this machine use "
                                    "distributed.fsdp: none (DDP)")


def check_deepspeed(s: Strategy, plat: Platform) -> None:
    """DeepSpeed's ZeRO engine runs on CUDA GPUs (its CPU accelerator needs Intel's extension and oneCCL)."""
    if (s.distributed.deepspeed or s.distributed.launcher == "deepspeed") and plat.name != "cuda":
        raise UnsupportedError(f"DeepSpeed ZeRO needs CUDA GPUs; this machine has {plat.accelerator}",
                               where="distributed.deepspeed",
                               hint="`llfarm plan` still writes the DeepSpeed config and command; run it on a GPU "
                                    "machine, or remove distributed.deepspeed here")


# ---------------------------------------------------------------- Slurm

def slurm_script(s: Strategy, strategy_ref: str, backend: str, overrides: list[str], output: Path,
                 platform: Platform, torchrun_preview: str, workdir: Path, clear_master: bool = False) -> str:
    """An sbatch script for ``distributed.nnodes`` nodes: one task per node, each running ``llfarm run`` with the
    same run id, its SLURM_NODEID as node_rank and the first node of the allocation as the rendezvous host, so every
    node compiles and starts the same torchrun command (c10d rendezvous, rdzv id = the run id)."""
    import sys

    d = s.distributed
    port = _port(d.endpoint) or 29500
    q = shlex.quote
    llfarm = Path(sys.executable).parent / "llfarm"
    node = " ".join([
        'exec "$LLFARM" run', q(strategy_ref), "--backend", q(backend), "-o", q(str(output)),
        '--run-id "$LLFARM_RUN_ID"', *(f"--set {q(o)}" for o in overrides),
        *(["--set distributed.master_addr=null --set distributed.master_port=null"] if clear_master else []),
        '--set distributed.node_rank="$SLURM_NODEID"', f'--set distributed.rdzv_endpoint="$HEAD_NODE:{port}"'])
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={q(s.name)}",
        f"#SBATCH --nodes={d.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={max(4, 4 * d.nproc_per_node)}",
        f"#SBATCH --gpus-per-node={d.nproc_per_node}" if platform.name == "cuda" else
        f"##SBATCH --gpus-per-node={d.nproc_per_node}   # planned on {platform.name}; GPU nodes: drop one '#'",
        f"#SBATCH --chdir={q(str(workdir))}",
        "#SBATCH --output=slurm-%j.out",
        "",
        (f"# Written by `llfarm plan --emit slurm`: {d.nnodes} node(s) x {d.nproc_per_node} process(es) per node, "
         f"backend {backend}."),
        "# Every node runs `llfarm run` with the same --run-id; node 0 (the allocation's first node) is the head: it",
        "# owns the run directory and hosts torchrun's c10d rendezvous. The head starts this torchrun command (node K",
        "# the same with --node-rank=K and is_host=0, its files in <run id>-node<K>/):",
        *(f"#   {line}" for line in torchrun_preview.splitlines()),
        f"# {output} must be on a filesystem every node sees.",
        "set -euo pipefail",
        "",
        f'export LLFARM="${{LLFARM:-{llfarm}}}"',
        # sed reads every line (head -n 1 would leave scontrol writing into a closed pipe: SIGPIPE, and pipefail
        # turns that into the job's exit status 141)
        'HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
        "export HEAD_NODE",
        f'export LLFARM_RUN_ID="${{LLFARM_RUN_ID:-${{SLURM_JOB_ID}}-{s.name}}}"',
        "",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c " + q(node),
        "",
    ]
    return "\n".join(lines)
