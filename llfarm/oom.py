"""Out-of-memory back-off: a run whose training step runs out of memory continues with a smaller batch.

In every training process llfarm starts (its shared trainer child, and a backend's own entry), :func:`watch` is a
TrainerCallback that notes the step in progress and the batch it trains with. When training ends with an
out-of-memory error (``torch.OutOfMemoryError``, or what accelerate's ``should_reduce_batch_size`` recognises: CUDA,
ROCm, XPU and CPU allocator failures), :func:`report` writes ``native/oom.json`` (step, batch, grad_accum, the error),
prints one line, and the process exits with :data:`EXIT_CODE`. An error before training began (loading a model too
large for the device) is not backed off: a smaller batch would not help.

In llfarm's runner, :func:`backoff` sees the marker and — while ``training.oom_retries`` allows and the batch can
shrink — records the back-off in the manifest (``oom_backoffs``), then restarts the run through the resume path
(``llfarm.resume.resume_run``): a new training process from the newest complete checkpoint (from the beginning when
there is none) with the smaller per-device batch and a larger grad_accum. The rule: the new batch is the largest
divisor of the batch that is at most half of it (8 → 4, 6 → 3, 3 → 1) and grad_accum grows by the same factor, so
the effective batch (batch × grad_accum × processes) is unchanged. A later ``llfarm resume`` keeps the backed-off
batch. At batch size 1, or with the retries spent, the run fails with one line and a hint.

Tests (and anyone checking the path without a GPU): ``LLFARM_FAULT_OOM_AT_STEP=N`` makes the training process raise
``torch.OutOfMemoryError`` as it begins step N — once per run (``native/fault-oom.fired`` remembers it fired) — and
``LLFARM_FAULT_OOM_AT_STEP=N:B`` every time step N begins with a per-device batch above B (a device on which larger
batches do not fit; ``N:0`` always fails).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

MARKER = "oom.json"             # in native/, written by the training process that ran out of memory
EXIT_CODE = 75                  # EX_TEMPFAIL: the runner may try again
FAULT_ENV = "LLFARM_FAULT_OOM_AT_STEP"
FIRED = "fault-oom.fired"       # in native/: the once-per-run fault has fired
HINT = ("turn on training.gradient_checkpointing, lower data.max_length, or load the model quantized "
        "(method.type: qlora, CUDA)")

_WATCH: Any = None              # the training process's watcher (one per process)


# ---------------------------------------------------------------- the training process

def watch(native: str | Path):
    """The TrainerCallback that notes the step in progress (and injects the tests' fault)."""
    from transformers import TrainerCallback

    class OOMWatch(TrainerCallback):
        def __init__(self) -> None:
            self.native = Path(native)
            self.training = False
            self.step = 0
            self.batch_size: int | None = None
            self.grad_accum: int | None = None

        def on_train_begin(self, args, state, control, **kw):
            self.training = True
            self.step = state.global_step
            self.batch_size, self.grad_accum = args.per_device_train_batch_size, args.gradient_accumulation_steps

        def on_step_begin(self, args, state, control, **kw):
            self.step = state.global_step + 1
            inject_fault(self.native, self.step, args.per_device_train_batch_size)

        def on_step_end(self, args, state, control, **kw):    # (loops that call no on_step_begin: TRL's PPO)
            self.step = state.global_step + 1

    global _WATCH
    _WATCH = OOMWatch()
    return _WATCH


def inject_fault(native: Path, step: int, batch_size: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, _, above = spec.partition(":")
    if step != int(at):
        return
    if above:
        if batch_size <= int(above):
            return
    else:
        fired = native / FIRED
        if fired.exists():
            return
        fired.write_text(f"{step}\n", encoding="utf-8")
    import torch
    raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (llfarm fault injection: "
                                 f"{FAULT_ENV}={spec}, per-device batch {batch_size})")


# What accelerate's should_reduce_batch_size (accelerate.utils.memory) recognises in a RuntimeError's message.
OOM_MESSAGES = (" out of memory.", "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
                "DefaultCPUAllocator: can't allocate memory", "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed")


def is_oom(exc: BaseException | None) -> bool:
    """An out-of-memory error (torch.OutOfMemoryError, or a RuntimeError saying so), or one raised while handling
    one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "OutOfMemoryError":
            return True
        if isinstance(exc, RuntimeError) and len(exc.args) == 1 and isinstance(exc.args[0], str) \
                and any(m in exc.args[0] for m in OOM_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def report(exc: BaseException) -> bool:
    """After training raised ``exc``: when it is an out-of-memory error during training, write the marker, print
    the traceback and then one line, and return True (the process then exits with EXIT_CODE)."""
    w = _WATCH
    if w is None or not w.training or not is_oom(exc):
        return False
    import traceback
    traceback.print_exception(exc)
    reason = " ".join(str(exc).split())[:300]
    info = {"step": w.step, "batch_size": w.batch_size, "grad_accum": w.grad_accum,
            "error": f"{type(exc).__name__}: {reason}"}
    try:
        from .rundir import atomic_write_text
        atomic_write_text(w.native / MARKER, json.dumps(info, indent=2) + "\n")
    except OSError:
        pass
    print(f"llfarm: out of memory at step {w.step} (per-device batch {w.batch_size}, grad_accum {w.grad_accum}): "
          f"{info['error']}", flush=True)
    return True


# ---------------------------------------------------------------- the runner

def smaller(batch_size: int, grad_accum: int) -> tuple[int, int] | None:
    """(batch, grad_accum) with the same effective batch and at most half the per-device batch; None at 1."""
    if batch_size <= 1:
        return None
    new = next(d for d in range(batch_size // 2, 0, -1) if batch_size % d == 0)
    return new, grad_accum * (batch_size // new)


def clear(run) -> None:
    """Before a run's first attempt: no marker from an earlier process may be taken for this one's."""
    (run.native / MARKER).unlink(missing_ok=True)


def take_marker(run) -> dict[str, Any] | None:
    """native/oom.json of the process that just ended (removed: each attempt writes its own)."""
    from .rundir import read_json
    path = run.native / MARKER
    if not path.exists():
        return None
    info = read_json(path)
    path.unlink(missing_ok=True)
    return info or None


def backoff(ctx, plan, say) -> bool:
    """After the training process failed: when it ran out of memory, back off and recompile the run in place —
    ``ctx`` and ``plan`` are updated to the new attempt — and return True. False: it was not an out-of-memory
    error. Raises TrainingFailed when it was one and no back-off is left."""
    from .errors import TrainingFailed
    from .resume import resume_run
    from .rundir import now_iso

    run = ctx.run
    info = take_marker(run)
    if info is None:
        return False
    tr = ctx.strategy.training
    step = info.get("step")
    done = run.read_manifest().get("oom_backoffs") or []
    nxt = smaller(tr.batch_size, tr.grad_accum)
    asked = done[0]["was"]["batch_size"] if done else tr.batch_size
    spent = f", after {len(done)} back-off{'s' if len(done) != 1 else ''}" if done else ""
    if nxt is None:
        raise TrainingFailed(f"training ran out of memory at step {step} with batch size 1, the smallest "
                             f"(training.batch_size={asked}{spent})", where=str(run), hint=f"in a new run, {HINT}")
    if len(done) >= tr.oom_retries:
        raise TrainingFailed(f"training ran out of memory at step {step} with batch size {tr.batch_size} and no "
                             f"back-off left (training.oom_retries={tr.oom_retries}{spent})", where=str(run),
                             hint=f"in a new run, raise training.oom_retries or lower training.batch_size, or {HINT}")
    batch, accum = nxt
    choice = run.resumable_checkpoint().checkpoint
    entry = {"step": step, "batch_size": batch, "grad_accum": accum,
             "was": {"batch_size": tr.batch_size, "grad_accum": tr.grad_accum},
             "from_checkpoint": choice.name if choice is not None else None, "error": info.get("error"),
             "at": now_iso()}
    run.update_manifest(oom_backoffs=[*done, entry])
    resumed = resume_run(run, from_start=True)
    entry["from_checkpoint"] = resumed.ctx.resume_from.name if resumed.ctx.resume_from else None
    run.update_manifest(oom_backoffs=[*done, entry])
    start = f"from {entry['from_checkpoint']}" if entry["from_checkpoint"] else "from the beginning"
    say(f"out of memory at step {step} with batch_size {tr.batch_size} × grad_accum {tr.grad_accum}: backing off "
        f"to batch_size {batch} × grad_accum {accum} (back-off {len(done) + 1} of {tr.oom_retries}), {start}")
    for note in resumed.notes:
        if not note.startswith(("training with batch_size", "starting from the beginning")):   # said above
            say(f"note: {note}")
    for f in fields(ctx):
        setattr(ctx, f.name, getattr(resumed.ctx, f.name))
    for f in fields(plan):
        setattr(plan, f.name, getattr(resumed.native, f.name))
    return True
