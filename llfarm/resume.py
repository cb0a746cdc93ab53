"""Resume a run in place from its latest checkpoint, with the backend and strategy it was started with."""

from __future__ import annotations

from pathlib import Path

from .errors import RunError
from .rundir import RunDir, checkpoint_step


def resume_run(run_dir: Path, max_steps: int | None = None):
    from .runner import compile_into, prepare_run
    from .strategy import resolve

    run = RunDir(Path(run_dir))
    manifest = run.read_manifest()
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise RunError("no checkpoint to resume from", where=str(run.checkpoints),
                       hint="checkpoints are written every training.save_every steps; start a new run instead")
    overrides = [f"training.max_steps={max_steps}"] if max_steps else []
    prep = prepare_run(resolve(run.strategy_path, overrides), manifest["backend"])
    prep.backend.check_resume(prep.resolved.strategy)
    if prep.resolved.strategy.distributed.nnodes > 1:
        raise RunError("llfarm resumes single-node runs; this run trained on "
                       f"{prep.resolved.strategy.distributed.nnodes} nodes", where=str(run),
                       hint="start every node again with `llfarm run` and a new --run-id")
    drop_metrics_after(run, checkpoint_step(ckpt))
    ctx, native = compile_into(prep, run, resume_from=ckpt)
    run.update_manifest(resumed_from=str(ckpt.relative_to(run.root)), total_steps=native.total_steps)
    return ctx, native, prep.backend


def drop_metrics_after(run: RunDir, step: int) -> None:
    """Training restarts at ``step``: rows logged after it belong to work the checkpoint does not hold."""
    import json

    from .rundir import atomic_write_text
    rows = [r for r in run.read_metrics() if r.get("step", 0) <= step]
    atomic_write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
