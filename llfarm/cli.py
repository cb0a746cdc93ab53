"""The llfarm command line. Heavy libraries (torch, transformers, backends) load only inside commands that
train or generate, so `llfarm --help` and `llfarm plan` stay fast. Any LlfarmError becomes one line on
stderr and exit code 2; nothing half-written stays behind.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .errors import LlfarmError

SET_HELP = "Override a strategy value: --set training.max_steps=20 (repeatable)."


class LlfarmGroup(click.Group):
    """Turns LlfarmError into one line + its exit code, and keeps commands in definition order."""

    def list_commands(self, ctx):
        return list(self.commands)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlfarmError as exc:
            # an error never prints a secret it quotes (a --set value...)
            from .redact import redact_text
            click.echo(f"llfarm: error: {redact_text(exc.render())}", err=True)
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            raise  # the reader went away (`llfarm plan x | head -1`): click ends quietly
        except click.UsageError as exc:  # a bad option or argument: one line too, not click's three
            path = exc.ctx.command_path if exc.ctx else "llfarm"
            click.echo(f"llfarm: error: {exc.format_message()} — hint: see `{path} --help`", err=True)
            sys.exit(2)
        except OSError as exc:  # an unwritable --output, a folder given for a file, a full disk...
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"llfarm: error: {where}{exc.strerror or exc} — hint: {_os_hint(exc)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            click.echo("llfarm: interrupted", err=True)
            sys.exit(128 + getattr(exc, "signum", signal.SIGINT))


def _os_hint(exc: OSError) -> str:
    import errno
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk (or pass --output on another one)"
    if exc.errno == errno.EROFS:
        return "that filesystem is read-only; pass --output somewhere writable"
    return "check the path and its permissions"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`, a container stop) or SIGHUP (a closed terminal), handled like Ctrl-C:
    forwarded to the training process, the run marked interrupted and resumable, exit code 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame) -> None:
    raise Terminated(signum)


@click.group(cls=LlfarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llfarm")
def cli() -> None:
    """llfarm — one YAML strategy, many fine-tuning backends, one run directory.

    \b
    llfarm strategies list
    llfarm backends
    llfarm plan quickstart --backend auto
    llfarm run quickstart
    llfarm generate runs/<id> --prompt "What is the capital of France?"
    llfarm export runs/<id> --format ollama
    """


# ---------------------------------------------------------------- strategies

@cli.group(cls=LlfarmGroup)
def strategies() -> None:
    """List and show the shipped strategies."""


@strategies.command("list")
def strategies_list() -> None:
    """Shipped strategies with their stage, method and description."""
    import yaml

    from .strategy import shipped_strategies
    for name, path in shipped_strategies().items():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        method = (data.get("method") or {}).get("type", "")
        click.echo(f"{name:<18} {data.get('stage', 'sft'):<4} {method:<7} {data.get('description', '')}")


@strategies.command("show")
@click.argument("name")
@click.option("--resolved", is_flag=True, help="Show every value after extends/defaults, with its source.")
def strategies_show(name: str, resolved: bool) -> None:
    """Print a shipped strategy (or any strategy file)."""
    from .strategy import find_strategy, resolve
    from .yamlload import read_text
    if not resolved:
        click.echo(read_text(find_strategy(name)), nl=False)
        return
    _print_sources(resolve(name))


def _print_sources(res) -> None:
    from .platform import detect, resolve_precision
    from .strategy import _flatten
    plat = detect()
    for key, value in _flatten(res.strategy.model_dump(mode="json")).items():
        source = res.source_of(key)
        if key == "training.precision" and value == "auto":
            value, source = resolve_precision("auto", plat), f"platform default ({plat.name}; {source}: auto)"
        click.echo(f"{key} = {value!r}    # {source}")


BACKEND_HELP = "A backend listed by `llfarm backends`, or auto (default: the strategy's)."


@cli.command()
@click.argument("strategy")
@click.option("--backend", "-b", help=BACKEND_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--explain", is_flag=True, help="Print every resolved value and where it came from.")
def validate(strategy: str, backend: str | None, overrides: tuple[str, ...], explain: bool) -> None:
    """Check a strategy without running anything: every check `plan` makes short of compiling (schema, extends,
    --set, backend and its capabilities and options, template, model path, data)."""
    from .runner import prepare_run
    from .strategy import resolve
    res = resolve(strategy, overrides)
    prep = prepare_run(res, backend, plan=True, write_data=False)
    if explain:
        _print_sources(res)
    d = prep.data
    used = f" (a seeded {d.n_train} for {res.strategy.training.max_steps} steps)" if d.n_train < d.n_available else ""
    click.echo(f"ok: {res.file} — backend {prep.backend.name}, stage {res.strategy.stage}, method "
               f"{res.strategy.method.type}, {d.n_available} training examples{used}, {d.n_eval} eval "
               f"({d.source_format})")


@cli.command()
def backends() -> None:
    """Each backend, what it supports, and whether it can run here (and why not)."""
    from .backend import BROKEN, registry
    from .errors import BackendUnavailable
    from .platform import detect
    plat = detect()
    click.echo(f"platform: {plat.name} ({plat.accelerator})")
    for b in registry().values():
        problems = []
        if plat.name not in b.capabilities.platforms:
            problems.append("cannot run here: " + b.capabilities.reasons.get(f"platform:{plat.name}",
                                                                         f"no {plat.name} support"))
        try:
            b.check_installed()
        except BackendUnavailable as exc:
            problems.append(f"not installed: {exc.render()}")
        status = "; ".join(problems) or "ready"
        caps = b.capabilities.table()
        click.echo(f"{b.name:<13} {status}")
        click.echo(f"{'':<13} {b.summary}{' (the default)' if b.default else ''}")
        click.echo(f"{'':<13} stages {','.join(caps['stages'])}; methods {','.join(caps['methods'])}; "
                   f"quantization {','.join(caps['quantization'])}; platforms {','.join(caps['platforms'])}")
    for name, why in BROKEN.items():
        click.echo(f"{name:<13} broken: {why}")


# ---------------------------------------------------------------- plan and run

@cli.command()
@click.argument("strategy")
@click.option("--backend", "-b", help=BACKEND_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", type=click.Path(path_type=Path), help="Keep the native files in this directory.")
@click.option("--emit", type=click.Choice(["slurm"]), help="Print a job script instead: slurm = an sbatch script "
                                                           "that runs `llfarm run` (and so torchrun) on each of "
                                                           "distributed.nnodes nodes.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="--emit slurm: the folder of run directories the job writes (on a filesystem every node sees).")
def plan(strategy: str, backend: str | None, overrides: tuple[str, ...], out: Path | None, emit: str | None,
         output: Path) -> None:
    """Resolve, validate and compile a strategy; print the native config. Runs nothing."""
    import tempfile

    from .platform import detect
    from .runner import create_run, prepare_run
    from .strategy import resolve
    if emit == "slurm":
        _emit_slurm(strategy, backend, list(overrides), output)
        return
    res = resolve(strategy, overrides)
    prep = prepare_run(res, backend, plan=True)
    with tempfile.TemporaryDirectory(prefix="llfarm-plan-") as tmp:
        root = out or Path(tmp)
        ctx, native = create_run(prep, root.parent if out else root, run_id=root.name if out else "plan")
        s = res.strategy
        click.echo(f"# strategy: {res.file}")
        click.echo(f"# backend: {prep.backend.name}")
        click.echo(f"# stage: {s.stage}")
        click.echo(f"# method: {s.method.type}")
        click.echo(f"# platform: {prep.platform.name} (precision {prep.precision})")
        if prep.platform != detect():       # planned for hardware this machine lacks (backend.plan_platform)
            click.echo(f"# note: {prep.platform.accelerator}; `llfarm run` needs one")
        click.echo(f"# model: {prep.model_path}")
        d = prep.data
        used = f" (a seeded {d.n_train} of {d.n_available} for {s.training.max_steps} steps)" \
            if d.n_train < d.n_available else ""
        click.echo(f"# data: {d.n_train} train{used} / {d.n_eval} eval ({d.source_format}); {d.train_path}")
        click.echo(f"# steps: {native.total_steps}")
        click.echo(f"# trainer: {native.trainer}")
        click.echo(f"# command: {native.command_line()}")
        for f in native.files:
            click.echo(f"# ---- {f.relative_to(ctx.run.root) if out else f.name}")
            click.echo(f.read_text(encoding="utf-8").rstrip("\n"))
        if out:
            click.echo(f"# written to {ctx.run}")


SLURM_KEYS = ("distributed.node_rank", "distributed.rdzv_endpoint", "distributed.master_addr",
              "distributed.master_port")


def _emit_slurm(strategy: str, backend: str | None, overrides: list[str], output: Path) -> None:
    """Print an sbatch script for the strategy's nnodes: each node runs `llfarm run` with the same run id, its
    SLURM_NODEID as node_rank and the allocation's first node as the rendezvous host. The strategy is checked and
    compiled here as every node will compile it, with the head node's address left to the job."""
    import os
    import tempfile

    from .distributed import slurm_script
    from .errors import UnsupportedError
    from .runner import create_run, prepare_run
    from .strategy import parse_set, raw_values, resolve

    given = [o for o in overrides if parse_set(o)[0] not in SLURM_KEYS]
    asked = raw_values(strategy, overrides).get("distributed") or {}        # the port, wherever it was set
    endpoint = asked.get("rdzv_endpoint") if isinstance(asked, dict) else None
    port = str(endpoint).rpartition(":")[2] if endpoint else str(asked.get("master_port") or 29500)
    kept = raw_values(strategy, given).get("distributed") or {}             # what each node will read
    clear_master = isinstance(kept, dict) and (kept.get("master_addr") is not None or
                                               kept.get("master_port") is not None)
    job = [f"distributed.rdzv_endpoint=$HEAD_NODE:{port}", "distributed.node_rank=0"]
    if clear_master:
        job += ["distributed.master_addr=null", "distributed.master_port=null"]
    res = resolve(strategy, [*given, *job])
    d = res.strategy.distributed
    if d.launcher != "torchrun":
        raise UnsupportedError(f"--emit slurm starts torchrun on every node; distributed.launcher is '{d.launcher}'",
                               where="distributed.launcher", hint="--set distributed.launcher=torchrun")
    prep = prepare_run(res, backend, plan=True)
    out_abs = Path(os.path.abspath(output))
    with tempfile.TemporaryDirectory(prefix="llfarm-slurm-") as tmp:
        _, native = create_run(prep, Path(tmp), run_id="RUN_ID")
        preview = native.command_line().replace(f"{tmp}/", f"{out_abs}/").replace("RUN_ID", "$LLFARM_RUN_ID")
    preview = preview.split(" && ", 1)[-1].replace(f"'--rdzv-endpoint=$HEAD_NODE:{port}'",
                                                   f"--rdzv-endpoint=$HEAD_NODE:{port}")   # without its `cd`
    ref = str(res.file) if res.file and not _is_shipped(strategy) else strategy
    click.echo(slurm_script(res.strategy, ref, prep.backend.name, given, out_abs, prep.platform, preview,
                            workdir=Path.cwd(), clear_master=clear_master), nl=False)


def _is_shipped(ref: str) -> bool:
    from .strategy import shipped_strategies
    return ref in shipped_strategies() and not Path(ref).is_file()


@cli.command()
@click.argument("strategy")
@click.option("--backend", "-b", help=BACKEND_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Folder that holds run directories.")
@click.option("--run-id", help="Name of the run directory (default: <timestamp>-<strategy name>).")
@click.option("--verbose", "-v", is_flag=True, help="Stream the backend's own output instead of a progress bar.")
@click.option("--detach", "-d", is_flag=True,
              help="Check and create the run, start training in the background, print the run and return; "
                   "follow it with `llfarm monitor ID` (its own output: RUN/logs/llfarm.log).")
def run(strategy: str, backend: str | None, overrides: tuple[str, ...], output: Path, run_id: str | None,
        verbose: bool, detach: bool) -> None:
    """Train: compile for the backend, run it, normalize the run directory. Prints the run dir last."""
    from .runner import create_run, prepare_run
    from .strategy import resolve
    res = resolve(strategy, overrides)
    prep = prepare_run(res, backend)
    ctx, native = create_run(prep, output, run_id)
    if detach:
        _start_detached(ctx.run, native.total_steps)
        return
    with ctx.run.lock("run") as lock:
        click.echo(f"run: {ctx.run} (backend {prep.backend.name}, stage {res.strategy.stage}, "
                   f"{native.total_steps} steps)", err=True)
        _execute_and_finish(ctx, native, prep.backend, verbose, lock)


def _execute_and_finish(ctx, native, backend, verbose: bool, lock) -> None:
    from .errors import TrainingFailed
    from .runner import execute, failure_hint, finish, mark_interrupted, tail
    run = ctx.run
    code = execute(ctx, native, verbose=verbose, lock=lock)
    if run.read_manifest().get("status") == "interrupted":
        _interrupted(run, code)
    if code != 0:
        log_tail = tail(run.logs / "train.log")
        click.echo(log_tail, err=True)
        raise TrainingFailed(f"the {backend.name} process exited with code {code}", where=str(run),
                             hint=failure_hint(run, log_tail))
    if run.head_root is not None:         # another node of a multi-node run: the head collects the outputs
        from .rundir import now_iso
        run.update_manifest(status="completed", ended_at=now_iso())
        click.echo(f"node {ctx.strategy.distributed.node_rank} done; the run directory is {run.head}", err=True)
        click.echo(str(run))
        return
    try:
        result = finish(ctx, backend)
    except KeyboardInterrupt as exc:      # training is done and checkpointed; collecting it was cut short
        mark_interrupted(run)
        _interrupted(run, 128 + getattr(exc, "signum", signal.SIGINT))
    from .stopping import ending_note
    manifest = run.read_manifest()
    fm = manifest.get("final_metrics", {})
    if "first_loss" in fm:
        click.echo(f"loss {fm['first_loss']:.4f} → {fm['final_loss']:.4f} over {fm.get('steps')} steps; "
                   f"{result.output_kind}: {run.show(result.output_dir)}{ending_note(manifest)}", err=True)
    spec = ctx.strategy.export
    if spec.formats:
        _do_export(run, list(spec.formats), spec.quant, None, spec.name, spec.ollama_template, spec.ollama_base)
    click.echo(str(run))


def _start_detached(run, total_steps: int) -> None:
    """Start `llfarm _detached RUN` in a session of its own (a closed terminal does not stop it) and return once it
    holds the run's lock — or report its error if it ended before that."""
    import os
    import subprocess
    import time

    from .errors import TrainingFailed
    from .lifeline import ENV
    from .runner import tail
    log_path = run.logs / "llfarm.log"
    env = {k: v for k, v in os.environ.items() if k != ENV}   # not tied to this process: it is meant to outlive it
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llfarm", "_detached", str(run.root)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while run.lock_info().get("pid") != proc.pid:
        code = proc.poll()
        if code is not None:
            if run.lock_info().get("pid") == proc.pid or run.read_manifest().get("status") == "completed":
                break
            click.echo(tail(log_path), err=True)
            raise TrainingFailed(f"the background run ended before training began (exit code {code})",
                                 where=str(run), hint=f"full log: {run.show(log_path)}")
        time.sleep(0.1)
    click.echo(f"started {run} in the background (pid {proc.pid}, {total_steps} steps); follow it with: "
               f"llfarm monitor {run}", err=True)
    click.echo(str(run))


@cli.command("_detached", hidden=True)
@click.argument("run_dir", type=click.Path(path_type=Path))
def detached(run_dir: Path) -> None:
    """The background half of `llfarm run --detach`: train the run `run --detach` created and checked."""
    from .resume import reopen
    from .rundir import RunDir
    from .runner import compile_into
    run = RunDir(run_dir)
    with run.lock("run") as lock:
        try:
            prep, notes = reopen(run)
            ctx, native = compile_into(prep, run)
        except LlfarmError as exc:            # the run must not stay "created" for ever: say why it never started
            run.update_manifest(status="failed", error=exc.render())
            raise
        for note in notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"run: {run} (backend {prep.backend.name}, stage {prep.resolved.strategy.stage}, "
                   f"{native.total_steps} steps, pid {os.getpid()})", err=True)
        _execute_and_finish(ctx, native, prep.backend, False, lock)


def _interrupted(run, code: int) -> None:
    click.echo(f"interrupted; resume with: llfarm resume {run}", err=True)
    click.echo(str(run))
    sys.exit(code)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--max-steps", type=int, help="Train until this many total steps (default: the strategy's).")
@click.option("--verbose", "-v", is_flag=True, help="Stream the backend's own output.")
def resume(run_dir: Path, max_steps: int | None, verbose: bool) -> None:
    """Continue an interrupted or finished run from its newest complete checkpoint, in the same run directory."""
    from .resume import resume_run
    from .rundir import RunDir
    run = RunDir(run_dir)
    run.read_manifest()                                  # not a run directory → one line, before any lock file
    with run.lock("resume") as lock:                     # refused while another live process works on the run
        resumed = resume_run(run, max_steps)
        click.echo(f"resuming {run} from {resumed.ctx.resume_from.name}", err=True)
        for note in resumed.notes:
            click.echo(f"note: {note}", err=True)
        _execute_and_finish(resumed.ctx, resumed.native, resumed.backend, verbose, lock)


@cli.command("runs")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Folder that holds run directories.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (one object per run).")
def runs_(output: Path, as_json: bool) -> None:
    """List runs: id, strategy, backend, stage, status (a run whose process died shows as crashed), step/total,
    final loss, eval loss, age."""
    import json

    from .runs import list_runs, table
    snaps = list_runs(output)
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in snaps], indent=2))
    elif not snaps:
        click.echo(f"no runs in {output}", err=True)
    else:
        for line in table(snaps):
            click.echo(line)


@cli.command()
@click.argument("run_ref", metavar="RUN|ID")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Where to look up a run id.")
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True, help="Seconds between looks.")
def monitor(run_ref: str, output: Path, interval: float) -> None:
    """Follow a run from any terminal — started here, elsewhere or with --detach: progress, loss, eval loss,
    learning rate, tokens/s, memory, ETA. Ends with the run and says how it ended (exit 0 only if it completed).
    Ctrl-C stops watching, not the run."""
    from .runs import ENDED, ending, find_run, snapshot
    run = find_run(run_ref, output)
    try:
        snap = _watch(run, interval, snapshot, ENDED)
    except KeyboardInterrupt:
        snap = snapshot(run)
        if snap.status not in ENDED:
            click.echo(f"stopped watching; {snap.id} goes on{f' (pid {snap.pid})' if snap.pid else ''}", err=True)
            sys.exit(130)
        raise
    line, code = ending(run, snap)
    click.echo(line)
    sys.exit(code)


def _watch(run, interval: float, snapshot, ended):
    """Poll the run until it ends: a rich progress bar on a terminal, else one line per logged step."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .runs import progress_line
    snap = snapshot(run)
    console = Console(stderr=False)
    head = f"{snap.id} · {snap.backend or '?'} · {snap.stage or '?'}"
    if snap.status in ended:
        return snap
    if not console.is_terminal:
        click.echo(f"monitoring {head} (status {snap.status})")
        last = None
        while snap.status not in ended:
            key = (snap.step, snap.eval_loss)
            if snap.step is not None and key != last:
                click.echo(progress_line(snap))
                last = key
            time.sleep(interval)
            snap = snapshot(run)
        if snap.step is not None and (snap.step, snap.eval_loss) != last:
            click.echo(progress_line(snap))
        return snap
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
    with progress:
        task = progress.add_task(head, total=snap.total_steps, info=snap.status or "")
        while True:
            # the line's figures without its "step N/M" (the bar shows that)
            info = progress_line(snap).partition("  ")[2] if snap.step is not None else (snap.status or "")
            progress.update(task, completed=snap.step or 0, total=snap.total_steps, info=info)
            if snap.status in ended:
                return snap
            time.sleep(interval)
            snap = snapshot(run)


# ---------------------------------------------------------------- using a run

@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", required=True, multiple=True, help="User message (repeat for several prompts).")
@click.option("--max-new-tokens", type=click.IntRange(1, 100_000), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True,
              help="0 = greedy decoding.")
@click.option("--system", help="System prompt (default: the strategy's data.system).")
def generate(run_dir: Path, prompt: tuple[str, ...], max_new_tokens: int, temperature: float,
             system: str | None) -> None:
    """Generate with a run's model (base + adapter, or the full model) and its training template."""
    from .compat import quiet_libraries
    from .generate import Generator
    quiet_libraries()
    gen = Generator.from_run(run_dir)
    for p in prompt:
        click.echo(gen.generate(p, max_new_tokens=max_new_tokens, temperature=temperature, system=system))


EXPORT_FORMATS = ("merged", "gguf", "adapter", "ollama")  # = llfarm.export.FORMATS (kept literal: fast --help)
EXPORT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "-f", "formats", multiple=True, required=True, type=click.Choice(EXPORT_FORMATS),
              help="What to write (repeatable): merged HF model; gguf; adapter (a GGUF LoRA adapter of a LoRA run); "
                   "ollama (a Modelfile: for the gguf, or with adapter: FROM base + ADAPTER).")
@click.option("--quant", "-q", type=click.Choice(EXPORT_QUANTS), default="q8_0", show_default=True,
              help="GGUF tensor type. q4_k_m/q5_k_m/q6_k need llama.cpp's quantizer (pip install "
                   "'llfarm[llamacpp]'). An adapter GGUF is f32/f16/bf16/q8_0 (f16 for other values).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: RUN/exports).")
@click.option("--name", help="Model name for the file and `ollama create` (default: the strategy name).")
@click.option("--no-template", is_flag=True,
              help="Write the Modelfile without TEMPLATE/stops (Ollama then uses the GGUF's own chat template).")
@click.option("--ollama-base", metavar="MODEL|GGUF",
              help="FROM of an adapter Modelfile: an Ollama model you have (llama3.2:1b) or a base GGUF file; "
                   "default: the base model converted beside the adapter.")
def export(run_dir: Path, formats: tuple[str, ...], quant: str, out: Path | None, name: str | None,
           no_template: bool, ollama_base: str | None) -> None:
    """Export a run: merged HF model, GGUF, GGUF LoRA adapter, and an Ollama Modelfile."""
    from .rundir import RunDir
    run = RunDir(run_dir)
    run.read_manifest()                                  # not a run directory → one line, before any lock file
    with run.lock("export"):                             # not while a run or resume writes the model
        _do_export(run, list(formats), quant, out, name, not no_template, ollama_base)


def _do_export(run, formats: list[str], quant: str, out: Path | None, name: str | None,
               ollama_template: bool = True, ollama_base: str | None = None) -> None:
    """Export and record it in the manifest: paths inside the run relative to it, others absolute (a later
    command, run from anywhere, finds them); paths are shown the way the user named the run and --out."""
    import os

    from .compat import quiet_libraries
    from .export import export_name, export_run, ollama_create_command
    quiet_libraries()
    from .errors import ExportError
    from .redact import find_secret
    secret = find_secret(name)
    if secret:
        raise ExportError(f"the name holds {secret}; it would name the exported files", where="--name",
                          hint="choose another name")
    out_abs = Path(os.path.abspath(out)) if out else None
    paths = export_run(run, formats, quant=quant, out=out_abs, name=name, ollama_template=ollama_template,
                       ollama_base=ollama_base)

    def shown(p: Path) -> str:
        if out_abs is not None and p.is_relative_to(out_abs):
            return str(out / p.relative_to(out_abs))
        return run.show(p)

    for p in paths:
        click.echo(f"wrote {shown(p)}", err=True)
    recorded = run.read_manifest().get("exports", [])
    kept = [str(p.relative_to(run.root)) if p.is_relative_to(run.root) else str(p) for p in paths]
    run.update_manifest(exports=recorded + [{"formats": formats, "quant": quant, "paths": kept}])
    modelfiles = [p for p in paths if p.name == "Modelfile"]
    if modelfiles:
        command = ollama_create_command(Path(shown(modelfiles[0])), export_name(run.root, name))
        click.echo(f"load it in Ollama: {command}", err=True)


# ---------------------------------------------------------------- import

@cli.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--from", "source", help="The tool the config is for (axolotl, trl, or a backend with a config format; "
                                       "default: detected).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Default: <stem>.llfarm.yaml here.")
@click.option("--name", help="The strategy's name (default: the file's stem).")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
def import_(file: Path, source: str | None, output: Path | None, name: str | None, force: bool) -> None:
    """Turn a peer's training YAML (LlamaFactory, Axolotl, TRL) into an llfarm strategy, listing every key that did
    not carry over (and why)."""
    import yaml

    from .errors import StrategyError
    from .importers import import_file
    from .rundir import atomic_write_text

    importer, out = import_file(file, source, name)
    target = output or Path(f"{file.name.split('.')[0]}.llfarm.yaml")
    if target.exists() and not force:
        raise StrategyError(["the output exists"], where=str(target), hint="pass --force to replace it, or -o")
    lines = [f"# llfarm strategy imported from {importer.name}: {file}"]
    for title, items in (("not mapped", out.not_mapped), ("left to llfarm", out.left_to_llfarm)):
        if items:
            lines.append(f"# {title}: " + "; ".join(f"{k} ({v})" for k, v in items.items()))
    text = "\n".join(lines) + "\n" + yaml.safe_dump(out.strategy, sort_keys=False, allow_unicode=True, width=110)
    atomic_write_text(target, text)
    for k, v in out.not_mapped.items():
        click.echo(f"not mapped: {k} — {v}", err=True)
    if out.left_to_llfarm:
        click.echo(f"left to llfarm: {', '.join(out.left_to_llfarm)}", err=True)
    click.echo(str(target))


# ---------------------------------------------------------------- data

@cli.group(cls=LlfarmGroup)
def data() -> None:
    """Inspect, split and convert datasets (every format `data.train` reads)."""


def _strategy_target(target: str):
    """A strategy (shipped name, .yaml/.yml, or a .json whose top level has `data:`), or None for a data source."""
    from .strategy import shipped_strategies
    if target in shipped_strategies() or target.endswith((".yaml", ".yml")):
        return target
    if target.endswith(".json") and Path(target).is_file():
        import json
        try:
            with open(target, encoding="utf-8") as fh:
                head = json.load(fh) if Path(target).stat().st_size < 1_000_000 else None
        except (ValueError, UnicodeDecodeError):
            head = None
        if isinstance(head, dict) and "data" in head:
            return target
    return None


@data.command("inspect")
@click.argument("target")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--model", help="A data file's token lengths with this model's tokenizer (a strategy uses its own).")
@click.option("--template", help="Chat template for a data file's token lengths (default chatml).")
@click.option("--max-length", type=int, help="max_length to check a data file against (default 256).")
@click.option("--format", "fmt", default="auto", show_default=True, help="Record format of a data file.")
@click.option("--sample", type=int, default=2_000, show_default=True,
              help="How many examples (a seeded sample) to measure token lengths on; 0 = all.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_inspect(target: str, overrides: tuple[str, ...], model: str | None, template: str | None,
                 max_length: int | None, fmt: str, sample: int, as_json: bool) -> None:
    """What a dataset (a FILE, or a STRATEGY's training data) holds: format, records, roles, turns, duplicates,
    empty answers, and the token lengths its template gives, with what max_length truncates or drops."""
    import json

    from .data import FORMATS, STAGE_KIND, open_source
    from .data.inspect import Stats, length_counter, render, report, token_lengths
    from .data.prepare import scan
    from .errors import DataError, did_you_mean
    from .models import resolve_model

    if sample < 0:
        raise DataError("must be 0 (every example) or more", where="--sample")
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"unknown format '{fmt}'{did_you_mean(fmt, FORMATS)}", where="--format",
                        hint=f"one of auto, {', '.join(FORMATS)}")
    stats = Stats(sample_size=sample)
    ref = _strategy_target(target)
    if ref is not None:
        from .strategy import resolve
        s = resolve(ref, overrides).strategy
        d = s.data
        sources = [scan(open_source(i.path, f"data.train[{n}]", split=i.split, text_unit=d.text_unit),
                        weight=i.weight, fmt_setting=d.format, stage_kind=STAGE_KIND[s.stage], system=d.system,
                        columns=d.columns, write=False, visit=stats.add) for n, i in enumerate(d.sources())]
        model_path, tpl_ref, limit = resolve_model(s.model.path), s.template, d.max_length
    else:
        sources = [scan(open_source(target, target), weight=1.0, fmt_setting=fmt, stage_kind=None, system=None,
                        columns={}, write=False, visit=stats.add)]
        model_path = resolve_model(model) if model else None
        tpl_ref, limit = template or "chatml", max_length or 256
    tokens = None
    if model_path is not None:
        from .templates import load_template
        tpl = load_template(tpl_ref)
        tokens = token_lengths(stats.sample, tpl, length_counter(model_path, tpl), limit)
    rep = report(stats, [src.manifest() for src in sources], tokens)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        render(rep)


@data.command("split")
@click.argument("file")
@click.option("--eval-percentage", required=True, type=float, help="Percent of records for eval, in (0, 100).")
@click.option("--seed", type=int, default=42, show_default=True, help="The same seed gives the same split.")
@click.option("--train-output", type=click.Path(path_type=Path), help="Default: FILE's stem + .train.<ext>.")
@click.option("--eval-output", type=click.Path(path_type=Path), help="Default: FILE's stem + .eval.<ext>.")
@click.option("--force", is_flag=True, help="Replace outputs that exist.")
def data_split(file: str, eval_percentage: float, seed: int, train_output: Path | None, eval_output: Path | None,
               force: bool) -> None:
    """Split a data file into train and eval files, deterministically (the rule data.eval_split uses)."""
    from .data import open_source
    from .data.tools import check_outputs, default_outputs, split_file
    from .errors import DataError

    if not 0 < eval_percentage < 100:
        raise DataError(f"must be between 0 and 100 (exclusive), received {eval_percentage:g}",
                        where="--eval-percentage", hint="for example --eval-percentage 10")
    reader = open_source(file, file)
    if reader.path is None or reader.path.is_dir():
        raise DataError("split reads a data file", where=file, hint="give a .jsonl, .json, .csv, .tsv or .txt file")
    defaults = default_outputs(reader, "train", "eval")
    outs = [train_output or defaults[0], eval_output or defaults[1]]
    check_outputs(outs, force)
    n_train, n_eval = split_file(reader, eval_percentage / 100, seed, *outs)
    click.echo(f"{outs[0]}: {n_train} records")
    click.echo(f"{outs[1]}: {n_eval} records")


@data.command("convert")
@click.argument("file")
@click.option("--to", "target", required=True, help="alpaca, messages, sharegpt or preference.")
@click.option("--format", "fmt", default="auto", show_default=True, help="The input's record format.")
@click.option("--output", type=click.Path(path_type=Path), help="Default: FILE's stem + .<to>.jsonl.")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
def data_convert(file: str, target: str, fmt: str, output: Path | None, force: bool) -> None:
    """Convert records between the alpaca, messages and ShareGPT forms (and preference pairs to TRL's form)."""
    from .data import FORMATS, open_source
    from .data.tools import TARGETS, check_outputs, convert_file, default_outputs
    from .errors import DataError, did_you_mean

    if target not in TARGETS:
        raise DataError(f"unknown target form '{target}'{did_you_mean(target, TARGETS)}", where="--to",
                        hint=f"one of {', '.join(TARGETS)}")
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"unknown format '{fmt}'{did_you_mean(fmt, FORMATS)}", where="--format")
    reader = open_source(file, file)
    out = output or default_outputs(reader, target)[0].with_suffix(".jsonl")
    check_outputs([out], force)
    click.echo(f"{out}: {convert_file(reader, target, fmt, {}, out)} records")


# ---------------------------------------------------------------- run lifecycle: estimate, eval

@cli.command()
@click.argument("strategy")
@click.option("--backend", "-b", help=BACKEND_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--measure", is_flag=True,
              help="Also train a few real steps (llfarm run into a temporary folder) and print measured vs predicted.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (predicted_peak_bytes, "
                                                      "measured_peak_bytes with --measure, the breakdown).")
def estimate(strategy: str, backend: str | None, overrides: tuple[str, ...], measure: bool, as_json: bool) -> None:
    """Parameters, trainable parameters and peak training memory (weights, gradients, optimizer state,
    activations) from the model's config.json alone: no weights are read, nothing is downloaded but a hub
    model's config.json. --measure trains 3 steps and compares."""
    import json

    from . import estimate as est
    from .strategy import resolve
    res = resolve(strategy, overrides)
    prediction = est.predict(res, backend)
    measured = est.measure(strategy, overrides, backend, verbose=False) if measure else None
    if as_json:
        click.echo(json.dumps(est.as_json(prediction, measured), indent=2))
    else:
        for line in est.render(prediction, measured):
            click.echo(line)


@cli.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", "-d", help="SFT data to score (a .jsonl/.json file or builtin:NAME; default: the run's eval data).")
@click.option("--baseline", is_flag=True, help="Score the base model too, so the gain is visible.")
@click.option("--max-new-tokens", type=click.IntRange(1, 100_000),
              help="Tokens to generate per answer for exact match (default: the reference's length + 16).")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json instead of the table.")
def eval_(run_dir: Path, data: str | None, baseline: bool, max_new_tokens: int | None, as_json: bool) -> None:
    """Loss, perplexity and token accuracy on the answer tokens, and exact match of greedy answers; written to
    RUN/eval.json and summarized in manifest.json."""
    import json

    from .evaluation import evaluate, render
    from .rundir import RunDir
    run = RunDir(run_dir)
    result = evaluate(run_dir, data, baseline=baseline, max_new_tokens=max_new_tokens)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for line in render(result, str(run), result["data"]["shown"]):
        click.echo(line)
    click.echo(f"wrote {run.show(run.root / 'eval.json')}", err=True)


class PipeSafe:
    """stdout/stderr that go quiet when their reader goes away (`llfarm run ... 2>&1 | head -1`): the rest of the
    output goes to /dev/null and the command carries on — a training run is not killed, nor left marked running,
    because nobody reads its progress bar any more."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()
            self._stream.flush()

    def _silence(self) -> None:
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())   # pending and later output (and the exit-time flush) go nowhere
        finally:
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    if hasattr(signal, "pthread_sigmask"):   # a mask inherited from the parent (blocked around a fork) would
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})  # hide Ctrl-C
    sys.stdout, sys.stderr = PipeSafe(sys.stdout), PipeSafe(sys.stderr)
    cli(prog_name="llfarm")


if __name__ == "__main__":
    main()
