"""Resume a run in place from its latest checkpoint, with the backend and strategy it was started with."""

from __future__ import annotations

from pathlib import Path

from .errors import RunError
from .rundir import RunDir


def resume_run(run_dir: Path, max_steps: int | None = None):
    from .backend import CompileContext, get_backend
    from .runner import Prepared, prepare_run, write_command
    from .strategy import resolve

    run = RunDir(Path(run_dir))
    manifest = run.read_manifest()
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise RunError("no checkpoint to resume from", where=str(run.checkpoints),
                       hint="checkpoints are written every training.save_every steps; start a new run instead")
    overrides = [f"training.max_steps={max_steps}"] if max_steps else []
    res = resolve(run.strategy_path, overrides)
    prep: Prepared = prepare_run(res, manifest["backend"])
    backend = get_backend(manifest["backend"])
    prep.data.write(run.native / "data")
    ctx = CompileContext(strategy=res.strategy, run=run, platform=prep.platform, model_path=prep.model_path,
                         data=prep.data, precision=prep.precision, resume_from=ckpt)
    drop_metrics_after(run, int(ckpt.name.split("-")[-1]))
    native = backend.compile(ctx)
    write_command(run, native)
    run.update_manifest(resumed_from=str(ckpt.relative_to(run.root)),
                        total_steps=native.total_steps)
    return ctx, native, backend


def drop_metrics_after(run: RunDir, step: int) -> None:
    """Training restarts at ``step``: rows logged after it belong to work the checkpoint does not hold."""
    import json

    from .rundir import atomic_write_text
    rows = [r for r in run.read_metrics() if r.get("step", 0) <= step]
    atomic_write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
