"""Run a compiled plan: one place for process control, logs, progress, signals, manifest and resume.

    prepare()  resolve the model, check capabilities, load data   (nothing written yet; errors exit 2)
    create()   make the run directory, write data + native files   (removed again if compile fails)
    execute()  run the backend's command, tee logs, tail metrics.jsonl for the progress bar, handle Ctrl-C
    finish()   backend.collect → adapter/ | model/, loss.png, final metrics, status, exports
"""

from __future__ import annotations

import os
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

from . import __version__, lifeline
from .backend import Backend, CompileContext, NativePlan, RunResult, choose_backend, plan_platform, planning, registry
from .data import PreparedData, prepare
from .errors import DataError, ExportError, LlfarmError, RunError, TrainingFailed
from .models import check_model, resolve_model
from .oom import EXIT_CODE
from .platform import Platform, detect, resolve_precision
from .redact import redact_text, secret_values
from .rundir import RunDir, atomic_write_text, new_run_id, now_iso, run_dir_in
from .runlock import RunLock
from .strategy import Resolved, dump
from .templates import check_renders, load_template
from .training import total_steps

CORE_LIBRARIES = ("llfarm", "datasets", "gguf")   # + every registered backend's distributions
RENDER_CHECKED = 16       # examples rendered with the template before anything is written


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
    template = load_template(strategy.template)       # unknown template, broken jinja → exit 2 now, not mid-run
    with planning() if plan else nullcontext():
        plat = plan_platform(strategy, detect(), backend) if plan else detect()
        choose_backend(strategy, plat, backend)       # refuse early, before the data is read
    model_path = resolve_model(strategy.model.path)
    check_model(model_path, strategy.model.path, revision=strategy.model.revision, hub_cache=not plan)
    data = prepare(strategy, write=write_data)
    bos, eos = special_tokens(model_path, template)
    check_renders(template, first_rows(data), bos=bos, eos=eos)
    with planning() if plan else nullcontext():       # then what the backend refuses in this data
        chosen = choose_backend(strategy, plat, backend, data)
    check_export_formats(strategy, template)
    if strategy.preference.rewards:              # the user's reward functions: import and call them once, now
        from .rewards import check
        rows = [r for r in data.sample(2) if "messages" in r]
        check(list(strategy.preference.rewards), [template.render(r["messages"][:-1], add_generation_prompt=True)
                                                  for r in rows], [r["messages"][-1]["content"] for r in rows])
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


def check_export_formats(strategy, template) -> None:
    """A strategy ``export:`` that the run could not honour after training is refused before it trains."""
    formats = set(strategy.export.formats)
    if strategy.stage == "rm" and formats & {"gguf", "ollama"}:
        raise ExportError("a reward model (stage rm) is not a causal LM, so it has no GGUF or Ollama form",
                          where="export.formats", hint="use export.formats: [merged] for a reward model")
    if "ollama" in formats and template.ollama is None:
        raise ExportError(f"template '{template.name}' has no Ollama form, so the Ollama export after training "
                          "would be refused", where="export.formats",
                          hint="use a template with one (chatml, llama3, alpaca), or export gguf/merged only")
    if "ollama" in formats and strategy.data.system and '"""' in strategy.data.system:
        raise ExportError('data.system contains \'"""\', which a Modelfile SYSTEM cannot quote',
                          where="data.system", hint="remove the triple quote, or drop ollama from export.formats")


def first_rows(data: PreparedData, limit: int = RENDER_CHECKED) -> list[dict[str, Any]]:
    """The first normalized rows of every train and eval source, from the data cache (read-only `validate` of data
    no run has cached yet sees none: its template is then only compiled, not rendered)."""
    import json
    rows: list[dict[str, Any]] = []
    for src in (*data.sources, *data.eval_sources):
        if src.dir is not None and src.data_path.is_file():
            with open(src.data_path, "rb") as fh:
                rows += [json.loads(line) for _, line in zip(range(limit), fh)]
    return rows


def special_tokens(model_path: str, template) -> tuple[str, str]:
    """(bos, eos) as the training process gives them to the template: the tokenizer's, eos replaced by the template's
    end-of-turn marker. Read from tokenizer_config.json (no transformers); '' where unknown."""
    import json

    def text(v):
        return v.get("content", "") if isinstance(v, dict) else v if isinstance(v, str) else ""

    cfg = Path(model_path) / "tokenizer_config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    return text(data.get("bos_token")), template.eos or text(data.get("eos_token"))


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
    """``<output>/<run-id>`` (a safe id, inside ``output``: :func:`run_dir_in`); on a node other than the head of a
    multi-node run, ``<output>/<run-id>-node<K>`` (its native files and logs), writing outputs into the head's
    ``<output>/<run-id>``."""
    d = s.distributed
    if d.nnodes > 1 and run_id is None:
        raise RunError(f"a {d.nnodes}-node run needs the same run id on every node", where="--run-id",
                       hint="pass --run-id NAME (the same NAME on each node; it is also the rendezvous id)")
    run = run_dir_in(output, run_id if run_id is not None else new_run_id(s.name))   # "" is refused there
    if d.nnodes > 1 and d.node_rank > 0:
        return RunDir(Path(output) / f"{run.root.name}-node{d.node_rank}", head_root=run.root)
    return run


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
    atomic_write_text(run.native / "command.txt", plan.command_line() + "\n")


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


# ---------------------------------------------------------------- execution

def child_env(plan: NativePlan, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    env.update(plan.env)
    env.update(plan.secret_env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.update(lifeline.parent_env())        # the child dies with this process (llfarm.lifeline)
    return env


def execute(ctx: CompileContext, plan: NativePlan, *, verbose: bool = False, lock: RunLock | None = None) -> int:
    """Run the backend process; returns its exit code. Ctrl-C is forwarded; the status says what happened.
    ``lock`` (the run's, held by the caller) records the child's pid for observers.

    When the process ran out of memory during training, the run backs off (llfarm.oom: a smaller per-device batch,
    the same effective batch, from the newest complete checkpoint) and goes on: ``ctx`` and ``plan`` are updated in
    place to the attempt that ran last. TrainingFailed when no back-off is left."""
    from .oom import backoff, clear

    def say(line: str) -> None:               # on stderr and in the log
        print(f"llfarm: {line}", file=sys.stderr, flush=True)
        with open(ctx.run.logs / "train.log", "a", encoding="utf-8") as log:
            log.write(f"llfarm: {line}\n")

    started = time.time()
    clear(ctx.run)
    while True:
        code = execute_once(ctx, plan, verbose=verbose, lock=lock)
        if code == 0 or ctx.run.read_manifest().get("status") == "interrupted":
            break
        try:
            retried = backoff(ctx, plan, say)
        except KeyboardInterrupt as exc:      # Ctrl-C while the back-off prepares the next attempt
            signum = getattr(exc, "signum", signal.SIGINT)
            mark_interrupted(ctx.run, signal=signal.Signals(signum).name)
            return 128 + signum
        except TrainingFailed:
            mark_failed(ctx.run, code)
            raise
        if not retried:
            mark_failed(ctx.run, code)
            break
    if ctx.run.read_manifest().get("oom_backoffs"):     # train_s: every attempt, not only the last
        m = ctx.run.read_manifest()
        ctx.run.update_manifest(timings=dict(m.get("timings", {}), train_s=round(time.time() - started, 2)))
    return code


def execute_once(ctx: CompileContext, plan: NativePlan, *, verbose: bool = False,
                 lock: RunLock | None = None) -> int:
    """One training process: run it, tee its log, draw progress; returns its exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    run = ctx.run
    started = time.time()
    run.update_manifest(status="running", started_at=now_iso(), exit_code=None, ended_at=None)
    log_path = run.logs / "train.log"
    console = Console(stderr=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {redact_text(plan.command_line())}\n")
        log.flush()
        from .training import tracking_env
        proc = subprocess.Popen(plan.argv, cwd=plan.cwd, env=child_env(plan, tracking_env(ctx.strategy, run)),
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        if lock is not None:
            lock.update(child_pid=proc.pid)

        secrets = secret_values()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = redact_text(line, secrets)
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
        _signal(proc, signal.SIGKILL)      # whatever the backend left running in its group (one process tree)
        reader.join(timeout=5)
    elapsed = round(time.time() - started, 2)
    timings = dict(run.read_manifest().get("timings", {}), train_s=elapsed)
    if interrupted is not None:
        mark_interrupted(run, timings=timings, signal=signal.Signals(interrupted).name)
        return 128 + interrupted
    if code not in (0, EXIT_CODE):
        mark_failed(run, code, timings=timings)
    else:                                  # EXIT_CODE: out of memory; execute() backs off (still running) or fails
        run.update_manifest(exit_code=code, timings=timings)
    return code


def mark_failed(run: RunDir, code: int, **fields: Any) -> None:
    if run.read_manifest().get("status") != "failed":
        run.update_manifest(status="failed", exit_code=code, ended_at=now_iso(), **fields)


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


def failure_hint(run: RunDir, log_tail: str) -> str:
    """The hint under a failed training process: what the log says, when it is something the user can fix."""
    full_log = f"full log: {run.show(run.logs / 'train.log')}"
    if "llfarm: writing checkpoint-" in log_tail or "No space left on device" in log_tail:
        return (f"free space on that disk, then `llfarm resume {run}` continues from the last complete checkpoint; "
                f"{full_log}")
    return full_log


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def finish(ctx: CompileContext, backend: Backend) -> RunResult:
    """Normalize outputs, draw loss.png, record final metrics and mark the run completed."""
    from .metrics import memory_peaks, plot_loss
    from .stopping import manifest_fields

    run = ctx.run
    result = backend.collect(ctx)
    rows = run.read_metrics()
    plot_loss(rows, run.loss_png, title=f"{ctx.strategy.name} ({backend.name}, {ctx.strategy.stage})")
    final = summarize(rows)
    final.update(result.final_metrics)
    run.update_manifest(status="completed", ended_at=now_iso(), final_metrics=final, memory=memory_peaks(rows),
                        **manifest_fields(run.native, ctx.strategy),
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
