"""Distributed training handed to existing engines (torchrun, accelerate, DeepSpeed, Slurm).

Default suite: what each engine is given, checked by the engine's own parser (torchrun's, accelerate's,
DeepSpeed's launcher and config classes); bad input as one line and exit 2 with nothing written; the sbatch
script; and two "nodes" on 127.0.0.1 (two `llfarm run` launchers, one rank each) training together through
torchrun's c10d rendezvous.

Slow (@slow): the quickstart with 2 DDP processes on CPU (gloo) against one process, on pytorch and llamafactory
(loss, run directory file set, rank-0-only outputs, per-rank logs); resume and Ctrl-C under DDP; LlamaFactory's own
FORCE_TORCHRUN launcher on the compiled YAML; the sbatch script run with stand-ins for srun and scontrol.
GPU only (@gpu): FSDP2 through accelerate and DeepSpeed ZeRO runs (no GPU on the development machine).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from conftest import LLFARM, llfarm, manifest, metrics, run_dir_from, write

from llfarm.platform import detect
from llfarm.runner import create_run, prepare_run
from llfarm.strategy import resolve

PY = sys.executable
HAS_DEEPSPEED = find_spec("deepspeed") is not None
CUDA_GPUS = int(subprocess.run([PY, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True,
                               text=True, check=False).stdout.strip() or 0) if Path("/dev/nvidia0").exists() else 0
QUICK = ["export.formats=[]"]
DDP2 = ["distributed.launcher=torchrun", "distributed.nproc_per_node=2", "training.batch_size=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def one_line_error(proc) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr}\n{proc.stdout}"
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, f"not one line:\n{err}"
    assert err.startswith("llfarm: error:")
    return err


def compiled(tmp: Path, overrides: list[str], backend: str = "pytorch", run_id: str = "r"):
    prep = prepare_run(resolve("quickstart", [*QUICK, *overrides]), backend, plan=True)
    return create_run(prep, tmp / "runs", run_id=run_id)


def torchrun_args(argv: list[str]):
    """argv as torchrun itself parses it (argv = python -m torch.distributed.run ...)."""
    from torch.distributed.run import get_args_parser
    assert argv[1:3] == ["-m", "torch.distributed.run"], argv
    return get_args_parser().parse_args(argv[3:])


# ---------------------------------------------------------------- what the engines are given

def test_single_node_ddp_is_torchrun_standalone_with_per_rank_logs(tmp_path):
    ctx, plan = compiled(tmp_path, DDP2)
    a = torchrun_args(plan.argv)
    assert (a.nproc_per_node, a.nnodes, a.standalone, a.max_restarts) == ("2", "1", True, 0)
    assert a.log_dir == str(ctx.run.logs / "ranks") and a.tee == "3" and a.local_ranks_filter == "0"
    assert a.module and a.training_script == "llfarm.trainer"
    assert a.training_script_args == [str(ctx.run.native / "trainer.json")]
    spec = json.loads((ctx.run.native / "trainer.json").read_text())
    assert spec["args"]["ddp_backend"] == "gloo" and spec["args"]["ddp_find_unused_parameters"] is False
    assert spec["args"]["per_device_train_batch_size"] == 4 and spec["distributed"]["world_size"] == 2
    assert plan.env["ACCELERATE_TORCH_DEVICE"] == "cpu"      # resume maps optimizer state to "cpu", not "cpu:0"
    # one process: no launcher, no DDP keys
    ctx1, plan1 = compiled(tmp_path / "one", [])
    assert plan1.argv[1:3] == ["-m", "llfarm.trainer"]
    assert "ddp_backend" not in json.loads((ctx1.run.native / "trainer.json").read_text())["args"]
    # same global batch: half the per-device batch on twice the processes gives the same number of steps
    assert plan.total_steps == plan1.total_steps == 160


@pytest.mark.parametrize("spelling", [["distributed.rdzv_endpoint=10.1.2.3:29411"],
                                      ["distributed.master_addr=10.1.2.3", "distributed.master_port=29411"]])
def test_multi_node_compiles_to_c10d_rendezvous_and_outputs_go_to_the_head(tmp_path, spelling):
    multi = ["distributed.launcher=torchrun", "distributed.nnodes=2", "distributed.nproc_per_node=2", *spelling]
    head_ctx, head = compiled(tmp_path, [*multi, "distributed.node_rank=0"], run_id="job")
    ctx, plan = compiled(tmp_path, [*multi, "distributed.node_rank=1"], run_id="job")
    h, w = torchrun_args(head.argv), torchrun_args(plan.argv)
    for a, rank, host in ((h, 0, 1), (w, 1, 0)):
        assert (a.nnodes, a.nproc_per_node, a.node_rank) == ("2", "2", rank)
        assert (a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id) == ("c10d", "10.1.2.3:29411", "job")
        assert a.rdzv_conf == f"is_host={host}" and not a.standalone
    # node 1 keeps its native files and logs beside the head's run directory; outputs go into the head's
    assert ctx.run.root == tmp_path / "runs" / "job-node1" and head_ctx.run.root == tmp_path / "runs" / "job"
    spec = json.loads((ctx.run.native / "trainer.json").read_text())
    head_dir = str(head_ctx.run.root)
    assert spec["outputs"] == {"dir": f"{head_dir}/adapter", "metrics": f"{head_dir}/metrics.jsonl",
                               "final_metrics": f"{head_dir}/native/final_metrics.json"}
    assert spec["args"]["output_dir"] == f"{head_dir}/checkpoints"
    m = json.loads((ctx.run.root / "manifest.json").read_text())
    assert m["role"] == "worker" and m["head_run"] == head_dir and m["distributed"]["world_size"] == 4


def test_llamafactory_ddp_config_and_its_own_launcher_line(tmp_path):
    import yaml
    multi = ["distributed.launcher=torchrun", "distributed.nnodes=2", "distributed.nproc_per_node=2",
             "distributed.rdzv_endpoint=10.1.2.3:29411", "distributed.node_rank=1"]
    ctx, plan = compiled(tmp_path, multi, backend="llamafactory", run_id="job")
    a = torchrun_args(plan.argv)
    assert a.training_script == "llfarm.backends.llamafactory.entry" and a.rdzv_backend == "c10d"
    text = (ctx.run.native / "llamafactory_train.yaml").read_text()
    c = yaml.safe_load(text)
    assert c["output_dir"] == str(tmp_path / "runs" / "job" / "checkpoints")
    assert c["ddp_backend"] == "gloo" and c["ddp_find_unused_parameters"] is False
    assert ("# By hand: FORCE_TORCHRUN=1 NPROC_PER_NODE=2 NNODES=2 NODE_RANK=1 MASTER_ADDR=10.1.2.3 "
            "MASTER_PORT=29411 DISABLE_VERSION_CHECK=1 llamafactory-cli train") in text
    assert a.training_script_args[a.training_script_args.index("--metrics") + 1] == \
        str(tmp_path / "runs" / "job" / "metrics.jsonl")


def test_accelerate_ddp_and_fsdp2_config_read_by_accelerate(tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    ctx, plan = compiled(tmp_path, ["distributed.launcher=accelerate", "distributed.nproc_per_node=2"])
    assert plan.argv[1:3] == ["-m", "accelerate.commands.launch"]
    a = launch_command_parser().parse_args(plan.argv[3:])
    assert a.config_file == str(ctx.run.native / "accelerate.yaml") and a.module
    assert a.training_script == "llfarm.trainer" and a.log_dir == str(ctx.run.logs / "ranks")
    cfg = load_config_from_file(a.config_file)
    assert (cfg.distributed_type, cfg.num_processes, cfg.num_machines) == ("MULTI_GPU", 2, 1)
    # FSDP2: planned for a CUDA GPU (accelerate runs FSDP only there); accelerate reads the config it gets
    monkeypatch.setenv("LLFARM_PLATFORM", "cuda")
    detect.cache_clear()
    try:
        ctx, plan = compiled(tmp_path / "fsdp", ["distributed.launcher=accelerate", "distributed.nproc_per_node=2",
                                                 "distributed.fsdp=shard_grad_op"])
    finally:
        monkeypatch.delenv("LLFARM_PLATFORM")
        detect.cache_clear()
    cfg = load_config_from_file(str(ctx.run.native / "accelerate.yaml"))
    assert cfg.distributed_type == "FSDP" and cfg.mixed_precision == "bf16"
    f = cfg.fsdp_config
    assert f["fsdp_version"] == 2 and f["fsdp_reshard_after_forward"] is False
    assert f["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert json.loads((ctx.run.native / "trainer.json").read_text())["distributed"]["fsdp"] is True


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install 'llfarm[deepspeed]')")
def test_deepspeed_launcher_command_is_deepspeeds_own(tmp_path):
    from deepspeed.launcher.runner import parse_args
    ctx, plan = compiled(tmp_path, ["distributed.launcher=deepspeed", "distributed.nproc_per_node=2",
                                    "distributed.deepspeed=zero2"])
    assert ctx.platform.name == "cuda"       # planned for a GPU: DeepSpeed is refused on this CPU machine
    assert plan.argv[1:3] == ["-m", "deepspeed.launcher.runner"]
    a = parse_args(plan.argv[3:])
    assert (a.num_gpus, a.no_local_rank, a.module, a.user_script) == (2, True, True, "llfarm.trainer")
    assert a.enable_each_rank_log == str(ctx.run.logs / "ranks")
    spec = json.loads((ctx.run.native / "trainer.json").read_text())
    assert spec["args"]["deepspeed"] == str(ctx.run.native / "deepspeed.json")


DS_CHECK = r"""
import json, sys
from trl import SFTConfig
from transformers import AutoConfig
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
from deepspeed.runtime.config import DeepSpeedConfig
dev = lambda o: None if o is None else str(o.device).rpartition(".")[2]
results = {}
for name, (spec_path, ds_path) in json.load(open(sys.argv[1])).items():
    spec, ds = json.load(open(spec_path)), json.load(open(ds_path))
    args = dict(spec["args"]); args.pop("deepspeed", None); args["use_cpu"] = True
    targs = SFTConfig(**args)
    hf = HfTrainerDeepSpeedConfig(ds)               # the Hugging Face integration fills the "auto" values
    hf.trainer_config_process(targs)
    class Model: config = AutoConfig.from_pretrained(spec["model"]["path"])
    hf.trainer_config_finalize(targs, Model(), spec["total_steps"])
    try:
        c = DeepSpeedConfig(hf.config)              # DeepSpeed's own parser and pydantic config classes
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    z = c.zero_config
    results[name] = {"stage": int(z.stage), "offload_optimizer": dev(z.offload_optimizer),
                     "offload_param": dev(z.offload_param), "train_batch_size": c.train_batch_size,
                     "micro": c.train_micro_batch_size_per_gpu, "accum": c.gradient_accumulation_steps,
                     "reduce_bucket_size": z.reduce_bucket_size}
print(json.dumps(results))
"""


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install 'llfarm[deepspeed]')")
def test_zero_configs_are_valid_deepspeed_configs(tmp_path):
    cases = {"zero2": ([], (2, None, None)), "zero2-offload": (["optimizer"], (2, "cpu", None)),
             "zero3": ([], (3, None, None)), "zero3-offload": (["optimizer", "param"], (3, "cpu", "cpu"))}
    files = {}
    for name, (offload, _) in cases.items():
        ctx, _ = compiled(tmp_path / name, [f"distributed.deepspeed={name[:5]}",
                                            f"distributed.offload=[{','.join(offload)}]", "training.grad_accum=2"])
        files[name] = (str(ctx.run.native / "trainer.json"), str(ctx.run.native / "deepspeed.json"))
    # the check is real: DeepSpeed refuses a misspelt key in the same config
    bad = json.loads(Path(files["zero3-offload"][1]).read_text())
    bad["zero_optimization"]["offload_optimiser"] = bad["zero_optimization"].pop("offload_optimizer")
    files["misspelt"] = (files["zero3-offload"][0], str(write(tmp_path / "bad.json", json.dumps(bad))))
    out = subprocess.run([PY, str(write(tmp_path / "ds_check.py", DS_CHECK)),
                          str(write(tmp_path / "cases.json", json.dumps(files)))],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name, (_, expected) in cases.items():
        g = got[name]
        assert "error" not in g, (name, g)
        assert (g["stage"], g["offload_optimizer"], g["offload_param"]) == expected, (name, g)
        assert (g["micro"], g["accum"], g["train_batch_size"]) == (8, 2, 16)
        assert g["reduce_bucket_size"] == 64 * 64           # "auto" → hidden_size², filled by the integration
    assert "offload_optimiser" in got["misspelt"]["error"]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

GPU_ENV = {"LLFARM_PLATFORM": "cuda"}


@pytest.mark.parametrize("args,env,names,says", [
    (sets("distributed.launcher=torchrun", "distributed.nnodes=2"), {}, "distributed.rdzv_endpoint",
     "every node must reach the head's rendezvous"),
    (sets("distributed.nproc_per_node=2"), {}, "distributed.nproc_per_node", "set distributed.launcher: torchrun"),
    (sets("distributed.launcher=torchrun", "distributed.nnodes=2", "distributed.node_rank=2",
          "distributed.rdzv_endpoint=127.0.0.1:29500"), {}, "distributed.node_rank", "node ranks are 0..1"),
    (sets("distributed.launcher=torchrun", "distributed.nproc_per_node=4"), GPU_ENV, "distributed.nproc_per_node",
     "4 processes per node, one per GPU, but this machine has 0 CUDA devices"),
    (sets("distributed.deepspeed=zero2"), {}, "distributed.deepspeed", "DeepSpeed ZeRO needs CUDA GPUs"),
    (["--backend", "unsloth", *sets("distributed.deepspeed=zero3")], GPU_ENV, "distributed.deepspeed",
     "does not run DeepSpeed"),
    (["--backend", "llamafactory", *sets("distributed.launcher=deepspeed", "distributed.deepspeed=zero2")], GPU_ENV,
     "launcher 'deepspeed'", "FORCE_TORCHRUN"),
    (sets("distributed.launcher=accelerate", "distributed.fsdp=full_shard"), {}, "distributed.fsdp",
     "needs CUDA GPUs"),
    (sets("distributed.offload=[param]", "distributed.deepspeed=zero2"), {}, "distributed.offload", "zero3"),
    (sets("distributed.launcher=torchrun", "distributed.nnodes=2", "distributed.rdzv_endpoint=10.0.0.1"), {},
     "distributed.rdzv_endpoint", "HOST:PORT"),
])
def test_bad_distributed_input_is_one_line_and_writes_nothing(tmp_path, args, env, names, says):
    out = tmp_path / "runs"
    proc = llfarm("run", "quickstart", "-o", str(out), "--run-id", "x", *args, env=env)
    err = one_line_error(proc)
    assert names in err and says in err, err
    assert not out.exists() or not any(out.iterdir())


def test_several_nodes_need_one_run_id(tmp_path):
    err = one_line_error(llfarm("run", "quickstart", "-o", str(tmp_path / "runs"), *sets(
        "distributed.launcher=torchrun", "distributed.nnodes=2", "distributed.rdzv_endpoint=127.0.0.1:29500")))
    assert "--run-id" in err and "same run id on every node" in err


# ---------------------------------------------------------------- Slurm

def slurm_script(tmp_path: Path, *extra: str, cwd: Path | None = None) -> str:
    proc = llfarm("plan", "quickstart", "--emit", "slurm", "-o", "runs", *sets(
        "distributed.launcher=torchrun", "distributed.nnodes=4", "distributed.nproc_per_node=2", *QUICK, *extra),
        cwd=cwd or tmp_path)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_emit_slurm_writes_an_sbatch_script_for_n_nodes(tmp_path):
    text = slurm_script(tmp_path)
    path = write(tmp_path / "job.sbatch", text)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, check=False).returncode == 0
    directives = dict(line[len("#SBATCH "):].split("=", 1) for line in text.splitlines()
                      if line.startswith("#SBATCH "))
    assert directives["--nodes"] == "4" and directives["--ntasks-per-node"] == "1"
    assert directives["--chdir"] == str(tmp_path)
    assert "##SBATCH --gpus-per-node=2" in text                 # planned on CPU: the GPU line is offered
    # the head's torchrun command, as torchrun parses it
    preview = next(line[4:] for line in text.splitlines() if "-m torch.distributed.run" in line)
    argv = shlex.split(preview)
    argv = argv[next(i for i, a in enumerate(argv) if a.endswith(("python", "python3"))):]
    a = torchrun_args(argv)
    assert (a.nnodes, a.nproc_per_node, a.rdzv_backend) == ("4", "2", "c10d")
    assert (a.rdzv_endpoint, a.rdzv_id) == ("$HEAD_NODE:29500", "$LLFARM_RUN_ID")
    assert a.training_script_args == [f"{tmp_path}/runs/$LLFARM_RUN_ID/native/trainer.json"]
    # one task per node runs llfarm run with the node's rank and the head's endpoint
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    words = shlex.split(srun)
    assert words[:5] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    node = shlex.split(words[5])
    assert node[:4] == ["exec", "$LLFARM", "run", "quickstart"] and node[node.index("-o") + 1] == f"{tmp_path}/runs"
    assert node[node.index("--run-id") + 1] == "$LLFARM_RUN_ID"
    given = [node[i + 1] for i, w in enumerate(node) if w == "--set"]
    assert given[-2:] == ["distributed.node_rank=$SLURM_NODEID", "distributed.rdzv_endpoint=$HEAD_NODE:29500"]
    assert "distributed.nnodes=4" in given and "export.formats=[]" in given
    assert 'HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"' in text


def test_the_head_node_is_found_in_a_long_node_list(tmp_path):
    """The script's preamble (set -euo pipefail, HEAD_NODE) with a scontrol that lists 20,000 hosts: a reader that
    stops after the first line (head -n 1) leaves scontrol writing into a closed pipe, and pipefail made that the
    job's exit status 141 (seen in CI with two hosts, where it is a race)."""
    text = slurm_script(tmp_path)
    preamble = text[:text.index("srun ")] + 'echo "head=$HEAD_NODE"\n'
    bin_dir = tmp_path / "bin"
    write(bin_dir / "scontrol", "#!/bin/sh\necho n00001\nseq 2 20000 | sed 's/^/node-/'\n").chmod(0o755)
    done = subprocess.run(["bash", "-c", preamble], cwd=tmp_path, capture_output=True, text=True, check=False,
                          env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7",
                                   SLURM_JOB_NODELIST="n[00001-20000]"))
    assert (done.returncode, done.stdout.strip()) == (0, "head=n00001"), done.stderr


def test_emit_slurm_keeps_the_strategys_port_and_refuses_other_launchers(tmp_path):
    strategy = write(tmp_path / "s.yaml", "extends: quickstart\nname: s\n"
                                          "distributed: {master_addr: 10.0.0.9, master_port: 29777}\n")
    proc = llfarm("plan", str(strategy), "--emit", "slurm", *sets("distributed.launcher=torchrun",
                                                                   "distributed.nnodes=2"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert 'distributed.rdzv_endpoint="$HEAD_NODE:29777"' in text      # the head's address comes from Slurm
    assert "--set distributed.master_addr=null --set distributed.master_port=null" in text
    assert f"run {strategy}" in text
    proc = llfarm("plan", "quickstart", "--emit", "slurm", *sets("distributed.launcher=accelerate",
                                                                  "distributed.nproc_per_node=2"), cwd=tmp_path)
    assert "--emit slurm starts torchrun" in one_line_error(proc)


# ---------------------------------------------------------------- two "nodes" on this machine (default suite)

def test_two_nodes_rendezvous_and_train_together(tmp_path):
    """Two launchers (two `llfarm run`, one rank each) meet at a c10d rendezvous on 127.0.0.1 and train one model:
    the head's run directory has the outputs (written once, by global rank 0) and world_size 2 from 2 nodes; each
    node kept its rank's log."""
    port = free_port()
    common = ["run", "quickstart", "-o", "runs", "--run-id", "two", *sets(
        *QUICK, "training.max_steps=4", "training.logging_steps=1", "training.save_every=2",
        "distributed.launcher=torchrun", "distributed.nnodes=2", f"distributed.rdzv_endpoint=127.0.0.1:{port}")]
    env = dict(os.environ)
    procs = [subprocess.Popen([LLFARM, *common, "--set", f"distributed.node_rank={k}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (1, 0)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    head, worker = tmp_path / "runs" / "two", tmp_path / "runs" / "two-node1"
    assert outs[1][0].strip().splitlines()[-1] == "runs/two"
    m = manifest(head)
    assert m["status"] == "completed" and m["distributed"]["nnodes"] == 2
    fm = m["final_metrics"]
    assert (fm["world_size"], fm["nnodes"], fm["ddp_backend"], fm["global_step"]) == (2, 2, "gloo", 4)
    assert [r["step"] for r in metrics(head)] == [1, 2, 3, 4]         # one writer: one row per step
    assert (head / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (head / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert {p.name for p in (head / "checkpoints" / "checkpoint-4").glob("rng_state_*.pth")} == \
        {"rng_state_0.pth", "rng_state_1.pth"}                        # both ranks saved their RNG state
    wm = manifest(worker)
    assert wm["status"] == "completed" and wm["role"] == "worker" and wm["head_run"] == str(head)
    assert not (worker / "metrics.jsonl").exists() and not (worker / "adapter").exists()
    for node in (head, worker):                                        # each node kept its rank's log
        logs = list((node / "logs" / "ranks").glob("two_*/attempt_0/0/stderr.log"))
        assert logs and logs[0].stat().st_size > 0, node


# ---------------------------------------------------------------- slow: DDP runs of the quickstart

def file_set(run: Path) -> set[str]:
    """The run directory's files, with what DDP adds by design set apart: per-rank RNG states in checkpoints
    (rng_state_<rank>.pth instead of rng_state.pth, as the trainer resumes them) and logs/ranks/."""
    out = set()
    for p in run.rglob("*"):
        rel = p.relative_to(run).as_posix()
        if p.is_file() and not rel.startswith("logs/ranks/"):
            out.add("/".join("rng_state*.pth" if part.startswith("rng_state") else part for part in rel.split("/")))
    return out


@pytest.fixture(scope="module")
def quickstart_runs(tmp_path_factory):
    """backend -> the quickstart three ways: 1 process (batch 8); 1 process with the 8 split in two micro-batches of
    4 (grad_accum 2); 2 DDP processes with batch_size halved (each rank's micro-batch is 4; the same global batch)."""
    cache: dict[str, dict[str, Path]] = {}

    def get(backend: str) -> dict[str, Path]:
        if backend not in cache:
            out = tmp_path_factory.mktemp(f"qs-{backend}")
            # one thread per process, as torchrun gives each rank: the same losses, much faster on 2 busy cores
            one_thread = {"OMP_NUM_THREADS": "1"}
            cache[backend] = {name: run_dir_from(llfarm("run", "quickstart", "-b", backend, "-o", str(out),
                                                        "--run-id", name, *sets(*QUICK, *extra), env=one_thread))
                              for name, extra in (("one", []), ("accum", ["training.batch_size=4",
                                                                         "training.grad_accum=2"]), ("ddp", DDP2))}
        return cache[backend]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "llamafactory"])
def test_ddp_quickstart_matches_one_process(quickstart_runs, backend):
    runs = quickstart_runs(backend)
    one, accum, two = runs["one"], runs["accum"], runs["ddp"]
    f1, fa, f2 = (manifest(r)["final_metrics"] for r in (one, accum, two))
    assert f2["world_size"] == 2 and f2["ddp_backend"] == "gloo" and f1["world_size"] == fa["world_size"] == 1
    r1, r2 = metrics(one), metrics(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2]          # rank 0 alone wrote metrics.jsonl
    # 2 processes x 4 = 1 process x 8: the same global batches, identical losses until float rounding differences
    # (micro-batches of 4 against one batch of 8) grow; the mean loss over the run within 2%
    early = [(a["loss"], b["loss"]) for a, b in zip(r1, r2) if a["step"] <= 25]
    assert all(abs(a - b) <= 1e-4 * a for a, b in early), early
    mean1, mean2 = (sum(r["loss"] for r in rows) / len(rows) for rows in (r1, r2))
    assert abs(mean2 - mean1) <= 0.02 * mean1, (mean1, mean2)
    # the final loss within 2% of one process training on the same micro-batches (4, accumulated twice): DDP adds
    # nothing of its own (against batch 8 the final loss drifts, as grad_accum does: benchmarks/RESULTS-distributed.md)
    assert abs(f2["final_loss"] - fa["final_loss"]) <= 0.02 * fa["final_loss"], (fa, f2)
    assert f2["final_loss"] < 0.05 * f2["first_loss"]
    # the same run directory, and every rank's log
    assert file_set(one) == file_set(two)
    ranks = {p.parent.name for p in (two / "logs" / "ranks").glob("*/attempt_0/*/stderr.log")}
    assert ranks == {"0", "1"}


@pytest.mark.slow
def test_resume_under_ddp(tmp_path):
    run = run_dir_from(llfarm("run", "quickstart", "-o", str(tmp_path), *sets(
        *QUICK, *DDP2, "training.max_steps=6", "training.save_every=3", "training.logging_steps=1")))
    proc = llfarm("resume", str(run), "--max-steps", "9")
    assert run_dir_from(proc) == run
    m = manifest(run)
    assert m["status"] == "completed" and m["resumed_from"] == "checkpoints/checkpoint-6"
    assert m["final_metrics"]["world_size"] == 2
    steps = [r["step"] for r in metrics(run)]
    assert steps == list(range(1, 10)), steps                         # continued at 7, not restarted
    assert (run / "checkpoints" / "checkpoint-9" / "rng_state_1.pth").is_file()


def run_processes(run_dir: Path) -> list[int]:
    """Processes whose command line names this run directory (launcher and ranks)."""
    import psutil
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(run_dir) in part for part in p.info["cmdline"] or []):
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_every_rank(tmp_path, sig):
    proc = subprocess.Popen([LLFARM, "run", "quickstart", "-o", str(tmp_path), "--run-id", "stop", *sets(
        *QUICK, *DDP2, "training.max_steps=100000", "training.save_every=1000000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    run = tmp_path / "stop"
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert (run / "metrics.jsonl").exists(), "training never started"
    ranks = [p for p in run_processes(run) if p != proc.pid]
    assert len(ranks) >= 3, ranks                                      # torchrun and its two ranks
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    m = manifest(run)
    assert m["status"] == "interrupted" and m["signal"] == signal.Signals(sig).name
    time.sleep(1)
    assert run_processes(run) == [], "a rank outlived the run"


@pytest.mark.slow
def test_llamafactorys_own_force_torchrun_launcher_trains_the_compiled_yaml(tmp_path):
    """LlamaFactory's launcher (`llamafactory-cli train` with FORCE_TORCHRUN=1) starts torchrun itself on the
    YAML llfarm compiled, exactly as its "By hand" line says; two CPU processes train it."""
    proc = llfarm("plan", "quickstart", "-b", "llamafactory", "--out", str(tmp_path / "plan"),
                  *sets(*QUICK, *DDP2, "training.max_steps=4", "training.logging_steps=1"))
    assert proc.returncode == 0, proc.stderr
    cfg = tmp_path / "plan" / "native" / "llamafactory_train.yaml"
    by_hand = next(line for line in cfg.read_text().splitlines() if line.startswith("# By hand: "))
    assert by_hand.startswith("# By hand: FORCE_TORCHRUN=1 NPROC_PER_NODE=2 DISABLE_VERSION_CHECK=1 ")
    env = dict(os.environ, FORCE_TORCHRUN="1", NPROC_PER_NODE="2", DISABLE_VERSION_CHECK="1",
               MASTER_PORT=str(free_port()), PATH=f"{Path(PY).parent}:{os.environ['PATH']}")  # it runs `torchrun`
    cli = str(Path(PY).parent / "llamafactory-cli")
    done = subprocess.run([cli, "train", str(cfg)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "plan" / "checkpoints"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and (out / "adapter_model.safetensors").is_file()
    assert {p.name for p in (out / "checkpoint-4").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}


SRUN = """#!/bin/bash
# stand-in for srun: one task per node on this machine, SLURM_NODEID 0..N-1, in parallel
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((k = 0; k < SLURM_NNODES; k++)); do SLURM_NODEID=$k "$@" > "node$k.out" 2> "node$k.err" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.slow
def test_the_sbatch_script_runs_two_nodes_with_stand_ins_for_srun(tmp_path):
    """The emitted script itself, with srun and scontrol replaced by local stand-ins: both nodes start
    `llfarm run`, meet at the head's rendezvous and train."""
    port = free_port()
    proc = llfarm("plan", "quickstart", "--emit", "slurm", "-o", "runs", *sets(
        *QUICK, "distributed.launcher=torchrun", "distributed.nnodes=2", "training.max_steps=3",
        f"distributed.rdzv_endpoint=anything:{port}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    script = write(tmp_path / "job.sbatch", proc.stdout)
    bin_dir = tmp_path / "bin"
    write(bin_dir / "srun", SRUN).chmod(0o755)
    write(bin_dir / "scontrol", "#!/bin/sh\necho 127.0.0.1\necho 127.0.0.2\n").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_JOB_ID="42",
               SLURM_JOB_NODELIST="n[1-2]")
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    errs = "".join((tmp_path / f"node{k}.err").read_text()[-1500:] for k in (0, 1) if (tmp_path / f"node{k}.err")
                   .exists())
    assert done.returncode == 0, done.stderr + errs
    head = tmp_path / "runs" / "42-quickstart"
    fm = manifest(head)["final_metrics"]
    assert (fm["world_size"], fm["nnodes"], fm["global_step"]) == (2, 2, 3)
    assert manifest(tmp_path / "runs" / "42-quickstart-node1")["role"] == "worker"


# ---------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.skipif(CUDA_GPUS < 2, reason="FSDP through accelerate needs 2 CUDA GPUs: accelerate 1.11 enables FSDP "
                                         "only for GPU states (on CPU it sets up plain DDP), so it is planned here")
def test_fsdp2_runs_on_two_gpus(tmp_path):
    run = run_dir_from(llfarm("run", "quickstart", "-o", str(tmp_path), *sets(
        *QUICK, "distributed.launcher=accelerate", "distributed.nproc_per_node=2", "distributed.fsdp=full_shard",
        "training.batch_size=4", "training.max_steps=10")))
    fm = manifest(run)["final_metrics"]
    assert (fm["world_size"], fm["distributed_type"], fm["fsdp_version"]) == (2, "FSDP", 2)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_GPUS < 2 or not HAS_DEEPSPEED, reason="DeepSpeed ZeRO needs 2 CUDA GPUs and the deepspeed "
                                                               "package")
@pytest.mark.parametrize("launcher,zero", [("torchrun", "zero2"), ("deepspeed", "zero3")])
def test_deepspeed_runs_on_two_gpus(tmp_path, launcher, zero):
    run = run_dir_from(llfarm("run", "quickstart", "-o", str(tmp_path), *sets(
        *QUICK, f"distributed.launcher={launcher}", "distributed.nproc_per_node=2", f"distributed.deepspeed={zero}",
        "training.batch_size=4", "training.max_steps=10")))
    fm = manifest(run)["final_metrics"]
    assert (fm["world_size"], fm["distributed_type"]) == (2, "DEEPSPEED")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
