"""Run a compiled plan: one place for process control, logs, progress, signals, manifest and resume.

    prepare()  resolve the model, check capabilities, load data   (nothing written yet; errors exit 2)
    create()   make the run directory, write data + native files   (removed again if compile fails)
    execute()  run the backend's command, tee logs, tail metrics.jsonl for the progress bar, handle Ctrl-C
    finish()   backend.collect → adapter/ | model/, loss.png, final metrics, status, exports
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .backend import Backend, CompileContext, NativePlan, RunResult, choose_backend, plan_platform, planning, registry
from .data import PreparedData, prepare
from .errors import DataError, LlfarmError, RunError
from .models import resolve_model
from .platform import Platform, detect, resolve_precision
from .rundir import RunDir, atomic_write_text, new_run_id, now_iso
from .strategy import Resolved, dump
from .templates import load_template
from .training import total_steps

CORE_LIBRARIES = ("llfarm", "datasets", "gguf")   # + every registered backend's distributions
SECRET_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")


@dataclass
class Prepared:
    resolved: Resolved
    backend: Backend
    platform: Platform
    model_path: str
    data: PreparedData
    precision: str


def prepare_run(resolved: Resolved, backend: str | None = None, *, plan: bool = False,
                write_data: bool = True) -> Prepared:
    """Every check that can fail on bad input, before any run directory is written. ``plan``: compile only (see
    backend.plan_platform), so a named backend is not refused for hardware this machine lacks. ``write_data``:
    fill the data cache while checking (`validate` reads only)."""
    strategy = resolved.strategy
    load_template(strategy.template)                  # unknown template → exit 2 now, not mid-run
    with planning() if plan else nullcontext():
        plat = plan_platform(strategy, detect(), backend) if plan else detect()
        choose_backend(strategy, plat, backend)       # refuse early, before the data is read
    model_path = resolve_model(strategy.model.path)
    data = prepare(strategy, write=write_data)
    with planning() if plan else nullcontext():       # then what the backend refuses in this data
        chosen = choose_backend(strategy, plat, backend, data)
    if not plan:
        from .distributed import check_devices
        check_devices(strategy, plat)
    steps = total_steps(strategy, data.n_train)
    if steps < 1:
        raise DataError(f"the strategy trains for zero steps ({data.n_train} examples, epochs "
                        f"{strategy.training.epochs}, batch {strategy.training.batch_size})",
                        where="training", hint="set training.max_steps or add data")
    return Prepared(resolved, chosen, plat, model_path, data,
                    resolve_precision(strategy.training.precision, plat))


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version
    out: dict[str, str | None] = {}
    libraries = dict.fromkeys([*CORE_LIBRARIES, *(d for b in registry().values() for d in b.distributions)])
    for lib in libraries:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    out["python"] = sys.version.split()[0]
    return out


def create_run(prep: Prepared, output: Path, run_id: str | None = None) -> tuple[CompileContext, NativePlan]:
    """Make the run directory and compile into it; on any error, leave nothing behind."""
    s = prep.resolved.strategy
    run = run_dir_for(s, output, run_id)
    if run.root.exists():
        raise RunError(f"run directory already exists: {run}", hint="pass another --run-id or --output")
    run.create()
    try:
        atomic_write_text(run.strategy_path, dump(prep.resolved))
        ctx, plan = compile_into(prep, run)
        run.write_manifest(initial_manifest(prep, run, plan))
        return ctx, plan
    except BaseException:
        shutil.rmtree(run.root, ignore_errors=True)
        raise


def run_dir_for(s, output: Path, run_id: str | None) -> RunDir:
    """``<output>/<run-id>``; on a node other than the head of a multi-node run, ``<output>/<run-id>-node<K>``
    (its native files and logs), writing outputs into the head's ``<output>/<run-id>``."""
    d = s.distributed
    if d.nnodes > 1 and not run_id:
        raise RunError(f"a {d.nnodes}-node run needs the same run id on every node", where="--run-id",
                       hint="pass --run-id NAME (the same NAME on each node; it is also the rendezvous id)")
    name = run_id or new_run_id(s.name)
    if d.nnodes > 1 and d.node_rank > 0:
        return RunDir(output / f"{name}-node{d.node_rank}", head_root=output / name)
    return RunDir(output / name)


def compile_into(prep: Prepared, run: RunDir, resume_from: Path | None = None) -> tuple[CompileContext, NativePlan]:
    """Point at the data (cached once, never copied per run), compile with the chosen backend, record the command."""
    prep.data.materialize()
    ctx = CompileContext(strategy=prep.resolved.strategy, run=run, platform=prep.platform,
                         model_path=prep.model_path, data=prep.data, precision=prep.precision,
                         resume_from=resume_from)
    plan = prep.backend.compile(ctx)
    write_command(run, plan)
    return ctx, plan


def write_command(run: RunDir, plan: NativePlan) -> None:
    atomic_write_text(run.native / "command.txt", redact_text(plan.command_line()) + "\n")


def initial_manifest(prep: Prepared, run: RunDir, plan: NativePlan) -> dict[str, Any]:
    s = prep.resolved.strategy
    tpl = load_template(s.template)
    return {
        "llfarm_version": __version__, "run_id": run.root.name, "status": "created",
        "strategy_name": s.name, "strategy_file": str(prep.resolved.file) if prep.resolved.file else None,
        "backend": prep.backend.name, "stage": s.stage, "method": s.method.type,
        "platform": prep.platform.name, "precision": prep.precision,
        "model_path": prep.model_path, "template": s.template, "template_eos": tpl.eos,
        "system": s.data.system, "output_kind": "adapter" if s.is_peft else "model",
        "data": prep.data.manifest(),
        "strategy_sha256": _sha256_text(run.strategy_path.read_text(encoding="utf-8")),
        "total_steps": plan.total_steps, "versions": library_versions(),
        **distributed_manifest(s, run),
        "paths": {"native": "native", "logs": "logs", "metrics": "metrics.jsonl", "checkpoints": "checkpoints"},
        "created_at": now_iso(), "timings": {}, "final_metrics": {},
    }


def distributed_manifest(s, run: RunDir) -> dict[str, Any]:
    """What a multi-process run was asked for (the trainer records the world size it saw in final_metrics)."""
    d = s.distributed
    if d.launcher == "none":
        return {}
    info: dict[str, Any] = {"launcher": d.launcher, "nnodes": d.nnodes, "nproc_per_node": d.nproc_per_node,
                            "world_size": d.world_size, "node_rank": d.node_rank, "rank_logs": "logs/ranks"}
    if d.nnodes > 1:
        info["rdzv_endpoint"] = d.endpoint
    for key in ("deepspeed", "fsdp"):
        if getattr(d, key) not in (None, "none"):
            info[key] = getattr(d, key)
    out: dict[str, Any] = {"distributed": info}
    if run.head_root is not None:
        out["role"] = "worker"
        out["head_run"] = str(run.head.root)
    return out


def _sha256_text(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()


def redact_text(text: str) -> str:
    text = SECRET_RE.sub("***", text)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"):
        val = os.environ.get(var)
        if val and len(val) > 4:
            text = text.replace(val, "***")
    return text


# ---------------------------------------------------------------- execution

def child_env(plan: NativePlan, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    env.update(plan.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


def execute(ctx: CompileContext, plan: NativePlan, *, verbose: bool = False) -> int:
    """Run the backend process; returns its exit code. Ctrl-C is forwarded; the status says what happened."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    run = ctx.run
    started = time.time()
    run.update_manifest(status="running", started_at=now_iso())
    log_path = run.logs / "train.log"
    console = Console(stderr=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {redact_text(plan.command_line())}\n")
        log.flush()
        from .training import tracking_env
        proc = subprocess.Popen(plan.argv, cwd=plan.cwd, env=child_env(plan, tracking_env(ctx.strategy, run)),
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = redact_text(line)
                log.write(line)
                log.flush()
                if verbose:
                    console.print(line.rstrip("\n"), markup=False, highlight=False)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        interrupted: int | None = None          # the signal that stopped the run (SIGINT, SIGTERM, SIGHUP)
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                            disable=verbose, transient=False)
        with progress:
            task = progress.add_task(f"{ctx.strategy.stage} · {plan_backend(run)}", total=plan.total_steps,
                                     info="starting")
            while True:
                try:
                    try:
                        code = proc.wait(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        _update_progress(progress, task, run.head)
                except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM/SIGHUP (cli.Terminated)
                    interrupted = getattr(exc, "signum", signal.SIGINT)
                    code = _stop(proc, interrupted)
                    break
            _update_progress(progress, task, run.head)
        reader.join(timeout=5)
    elapsed = round(time.time() - started, 2)
    timings = dict(run.read_manifest().get("timings", {}), train_s=elapsed)
    if interrupted is not None:
        mark_interrupted(run, timings=timings, signal=signal.Signals(interrupted).name)
        return 128 + interrupted
    if code != 0:
        run.update_manifest(status="failed", exit_code=code, timings=timings, ended_at=now_iso())
    else:
        run.update_manifest(timings=timings)
    return code


def _stop(proc: subprocess.Popen, signum: int) -> int:
    """Forward the signal to the backend's process group (a launcher passes it on to every rank it started);
    after 30 s (or a second signal), kill the whole process tree: torchrun starts each rank in a session of its
    own, out of reach of the group's signal."""
    tree = descendants(proc.pid)
    _signal(proc, signum)
    try:
        return proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        tree += descendants(proc.pid)
        _signal(proc, signal.SIGKILL)
        for child in tree:
            with suppress(Exception):   # gone already; psutil checks it is still the same process (pid + start)
                child.kill()
        return proc.wait()


def descendants(pid: int) -> list:
    """psutil.Process objects of every process below ``pid`` (psutil comes with accelerate; [] without it)."""
    try:
        import psutil
        return psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - gone already, or no psutil
        return []


def mark_interrupted(run: RunDir, **changes: Any) -> None:
    run.update_manifest(status="interrupted", ended_at=now_iso(), **changes)


def plan_backend(run: RunDir) -> str:
    try:
        return run.read_manifest().get("backend", "")
    except LlfarmError:
        return ""


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _update_progress(progress, task, run: RunDir) -> None:
    rows = run.read_metrics()
    if not rows:
        return
    last = rows[-1]
    losses = [r for r in rows if "loss" in r]
    info = f"loss {losses[-1]['loss']:.4f}" if losses else ""
    progress.update(task, completed=last.get("step", 0), total=last.get("total_steps") or None, info=info)


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def finish(ctx: CompileContext, backend: Backend) -> RunResult:
    """Normalize outputs, draw loss.png, record final metrics and mark the run completed."""
    from .metrics import plot_loss

    run = ctx.run
    result = backend.collect(ctx)
    rows = run.read_metrics()
    plot_loss(rows, run.loss_png, title=f"{ctx.strategy.name} ({backend.name}, {ctx.strategy.stage})")
    final = summarize(rows)
    final.update(result.final_metrics)
    run.update_manifest(status="completed", ended_at=now_iso(), final_metrics=final,
                        output_kind=result.output_kind,
                        paths={**run.read_manifest().get("paths", {}),
                               "output": str(result.output_dir.relative_to(run.root)), "loss_plot": "loss.png"})
    return result


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """first/last/min train loss and the last value of every other metric."""
    out: dict[str, Any] = {}
    losses = [r["loss"] for r in rows if "loss" in r]
    if losses:
        out.update(first_loss=losses[0], final_loss=losses[-1], min_loss=min(losses))
    for r in rows:
        for k, v in r.items():
            if k not in ("loss", "time"):
                out[k] = v
    if rows:
        out["steps"] = max(r.get("step", 0) for r in rows)
    return out
