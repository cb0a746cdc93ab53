"""Resume a run in place from its newest complete checkpoint, with the backend and strategy it was started with.

The caller holds the run's lock (``RunDir.lock``) before calling :func:`resume_run`: nothing in the run directory is
touched while another live process works on it. Incomplete checkpoints newer than the one chosen (a save cut short
by a kill or a full disk; see llfarm.checkpoints) are removed — training writes them again — and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunError, UnsupportedError
from .rundir import RunDir, checkpoint_step


@dataclass
class Resumed:
    ctx: Any                                  # CompileContext
    native: Any                               # NativePlan
    backend: Any                              # Backend
    notes: list[str] = field(default_factory=list)   # what the user should know (one line each)


def resume_run(run: RunDir | Path, max_steps: int | None = None, *, from_start: bool = False) -> Resumed:
    """``from_start``: when there is no complete checkpoint (or the backend cannot resume this stage), start the
    run over in place instead of refusing (the out-of-memory back-off, llfarm.oom)."""
    import shutil

    from .runner import compile_into

    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    manifest = run.read_manifest()
    if max_steps is not None and max_steps < 1:
        raise RunError(f"--max-steps must be at least 1, received {max_steps}",
                       hint="give the total number of steps to train to, e.g. --max-steps 100")
    choice = run.resumable_checkpoint()
    ckpt = choice.checkpoint
    if ckpt is None and not from_start:
        passed = f" ({choice.describe().split('(', 1)[1]}" if choice.skipped else ""
        raise RunError(f"no complete checkpoint to resume from{passed}", where=run.show(run.checkpoints),
                       hint="checkpoints are written every training.save_every steps; start a new run instead")
    step = checkpoint_step(ckpt) if ckpt is not None else 0
    if max_steps is not None and max_steps <= step:
        raise RunError(f"--max-steps {max_steps} is not beyond {ckpt.name} (step {step})",
                       hint=f"give a total step count above {step}")
    # The caller holds the lock, so a manifest that says running belongs to a process that died (kill -9, a crash).
    crashed = manifest.get("status") in ("running", "crashed")
    overrides = [f"training.max_steps={max_steps}"] if max_steps else []
    backoff_notes = []
    backoffs = manifest.get("oom_backoffs") or []
    if backoffs:      # the batch an out-of-memory back-off settled on stays (strategy.yaml keeps what was asked)
        last = backoffs[-1]
        overrides += [f"training.batch_size={last['batch_size']}", f"training.grad_accum={last['grad_accum']}"]
        backoff_notes.append(f"training with batch_size {last['batch_size']} × grad_accum {last['grad_accum']} "
                             f"(the out-of-memory back-off at step {last['step']})")
    prep, notes = reopen(run, overrides)
    notes = backoff_notes + notes
    try:
        prep.backend.check_resume(prep.resolved.strategy)
    except UnsupportedError:
        if not from_start:
            raise
        ckpt, step = None, 0
    if prep.resolved.strategy.distributed.nnodes > 1:
        raise RunError("llfarm resumes single-node runs; this run trained on "
                       f"{prep.resolved.strategy.distributed.nnodes} nodes", where=str(run),
                       hint="start every node again with `llfarm run` and a new --run-id")
    for partial, why in choice.skipped:
        shutil.rmtree(partial, ignore_errors=True)
        notes.append(f"removed {partial.name}: {why}")
    if ckpt is None:                 # starting over: the earlier attempt's checkpoints are not this run's any more
        from .checkpoints import checkpoints_in
        for old in checkpoints_in(run.checkpoints):
            shutil.rmtree(old, ignore_errors=True)
        notes.append("starting from the beginning (no complete checkpoint to continue from)")
    if crashed:
        run.update_manifest(status="crashed")
        notes.append("the llfarm process that ran it had died without finishing (status: crashed)")
    drop_metrics_after(run, step)
    ctx, native = compile_into(prep, run, resume_from=ckpt)
    run.update_manifest(resumed_from=str(ckpt.relative_to(run.root)) if ckpt is not None else None,
                        total_steps=native.total_steps)
    return Resumed(ctx, native, prep.backend, notes)


def reopen(run: RunDir, overrides: list[str] | None = None) -> tuple[Any, list[str]]:
    """The run's saved strategy (strategy.yaml, every --set already in it) prepared again for the backend it was
    made with: what `resume` and a `run --detach` background process train from. Returns (Prepared, notes)."""
    from .redact import MASK, is_secret_name
    from .runner import prepare_run
    from .strategy import resolve

    notes = []
    res = resolve(run.strategy_path, overrides or [])
    for bname, options in res.strategy.backend_options.items():   # secrets were never written: not in strategy.yaml
        for key in [k for k, v in options.items() if is_secret_name(k) and v == MASK]:
            del options[key]
            notes.append(f"backend_options.{bname}.{key} was not saved with the run (a secret); set it through "
                         "the environment (HF_TOKEN, ...) if the resumed run needs it")
    return prepare_run(res, run.read_manifest()["backend"]), notes


def drop_metrics_after(run: RunDir, step: int) -> None:
    """Training restarts at ``step``: rows logged after it belong to work the checkpoint does not hold."""
    import json

    from .rundir import atomic_write_text
    rows = [r for r in run.read_metrics() if r.get("step", 0) <= step]
    atomic_write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
