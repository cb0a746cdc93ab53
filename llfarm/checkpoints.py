"""Checkpoint completeness: a checkpoint is resumable only once llfarm has marked it complete.

transformers' Trainer writes ``checkpoint-N/`` in place (weights, optimizer, scheduler, RNG state, then
``trainer_state.json``, then it deletes the oldest checkpoints beyond ``save_total_limit``) and only then calls the
callbacks' ``on_save``. A kill, a second Ctrl-C or a full disk in between leaves a partial folder under the final
name. So every training process llfarm starts (``llfarm.trainer``, LlamaFactory's entry) adds
:func:`completeness_callback` last: in ``on_save`` it waits for every rank (distributed runs), flushes each file of
the checkpoint to disk (fsync) and writes :data:`MARKER` atomically (a temporary name, then a rename) listing every
file with its size. The marker is the commit point: a checkpoint without one, or whose files no longer match it,
is incomplete.

``llfarm resume`` asks :func:`choose` (through ``RunDir.resumable_checkpoint``) for the newest complete checkpoint,
says which one it took and why it passed over newer ones, and removes those (training rewrites them). Runs written
before markers existed (no checkpoint has one) fall back to ``trainer_state.json``, which the Trainer writes last:
it must parse and name the checkpoint's step.

This module imports nothing heavy; transformers loads only inside :func:`completeness_callback`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "llfarm-complete.json"
TRAINER_STATE = "trainer_state.json"
# Tests only: the training process kills itself (SIGKILL) in the middle of saving checkpoint-N.
FAULT_ENV = "LLFARM_FAULT_KILL_IN_SAVE"


def checkpoint_step(path: Path) -> int:
    """The optimizer step a ``checkpoint-N`` directory holds."""
    return int(path.name.split("-")[-1])


def checkpoints_in(folder: Path) -> list[Path]:
    """``checkpoint-N`` directories in ``folder``, newest (highest N) first."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


# ---------------------------------------------------------------- writing the marker (training process)

def mark_complete(ckpt: Path, step: int) -> Path:
    """Flush every file of ``ckpt`` to disk, then write the marker listing them (atomically)."""
    from .rundir import atomic_write_text, now_iso
    files: dict[str, int] = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MARKER and not p.name.startswith(f".{MARKER}"):
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            files[p.relative_to(ckpt).as_posix()] = p.stat().st_size
    _fsync_dir(ckpt)
    marker = ckpt / MARKER
    atomic_write_text(marker, json.dumps({"step": step, "files": files, "completed_at": now_iso()}, indent=1) + "\n")
    _fsync_dir(ckpt)
    return marker


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                                  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def completeness_callback():
    """A transformers TrainerCallback that marks each saved checkpoint complete (add it after every callback that
    writes into checkpoints, e.g. LlamaFactory's tokenizer saver)."""
    from transformers import TrainerCallback

    class CheckpointComplete(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            _barrier()                        # every rank has written its part of the checkpoint
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    mark_complete(ckpt, state.global_step)
            _barrier()

    return CheckpointComplete()


def _barrier() -> None:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except ImportError:
        pass


class CheckpointSaveError(RuntimeError):
    """Saving a checkpoint failed; the message names the checkpoint, the file and the free space on its disk."""


def instrument_saves() -> None:
    """In a training process: a failed checkpoint save (a full disk, a vanished mount) ends with one line that names
    the checkpoint, the file being written and the free space left — torch's own error names neither
    ("[enforce fail at inline_container.cc] unexpected pos"). Also installs the tests' fault injection."""
    from transformers import Trainer
    original = Trainer._save_checkpoint

    def save_checkpoint(self, model, trial, *args, **kwargs):
        try:
            return original(self, model, trial, *args, **kwargs)
        except Exception as exc:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            raise CheckpointSaveError(describe_save_error(exc, folder)) from exc

    Trainer._save_checkpoint = save_checkpoint
    install_fault_injection()


def describe_save_error(exc: BaseException, folder: Path) -> str:
    """'writing checkpoint-8/optimizer.pt failed: <error> (its disk has 0 B free); ...'"""
    import shutil
    written = _file_being_written(exc, folder)
    what = f"{folder.name}/{written.relative_to(folder)}" if written else folder.name
    try:
        free = f"{shutil.disk_usage(folder if folder.exists() else folder.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    reason = " ".join(str(exc).split())[:300] or type(exc).__name__
    return (f"llfarm: writing {what} failed: {type(exc).__name__}: {reason} (its disk, {folder.parent}, has {free}); "
            f"the checkpoint is incomplete and resume will not use it")


def _file_being_written(exc: BaseException, folder: Path) -> Path | None:
    """The path under ``folder`` named by the innermost frame of the traceback that holds one (torch.save's ``f``,
    safetensors' ``filename``, ...)."""
    found = None
    tb = exc.__traceback__
    prefix = str(folder) + os.sep
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)) and str(value).startswith(prefix):
                found = Path(str(value))
        tb = tb.tb_next
    return found


def install_fault_injection() -> None:
    """Tests only (``LLFARM_FAULT_KILL_IN_SAVE=N``): SIGKILL this process while it saves checkpoint-N — after the
    weights and the optimizer state are written, with the optimizer file cut in half, before the RNG and trainer
    state — which is what a kill -9, a second Ctrl-C or a power cut in the middle of a save leaves behind."""
    step = os.environ.get(FAULT_ENV)
    if not step:
        return
    import signal

    from transformers import Trainer
    original = Trainer._save_optimizer_and_scheduler

    def save_then_die(self, output_dir):
        original(self, output_dir)
        if self.state.global_step == int(step):
            optimizer = Path(output_dir) / "optimizer.pt"
            if optimizer.is_file():
                with open(optimizer, "r+b") as fh:
                    fh.truncate(optimizer.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._save_optimizer_and_scheduler = save_then_die


# ---------------------------------------------------------------- choosing one (llfarm resume)

def problem(ckpt: Path, *, legacy: bool = False) -> str | None:
    """Why ``ckpt`` cannot be resumed from (None when it is complete). ``legacy``: the run predates markers."""
    if legacy:
        state = _read(ckpt / TRAINER_STATE)
        if state is None:
            return f"no readable {TRAINER_STATE} (the save was cut short)"
        if state.get("global_step") != checkpoint_step(ckpt):
            return f"{TRAINER_STATE} is for step {state.get('global_step')}"
        return None
    marker = _read(ckpt / MARKER)
    if marker is None:
        return "not marked complete (the save was cut short)"
    if marker.get("step") != checkpoint_step(ckpt):
        return f"its marker is for step {marker.get('step')}"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "its marker lists no files"
    for rel, size in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} when it was saved"
    return None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Choice:
    """The checkpoint resume takes (None: no complete one) and the newer ones it passed over, with the reason."""
    checkpoint: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    legacy: bool = False

    def describe(self) -> str:
        """'checkpoint-8' or 'checkpoint-8 (checkpoint-12: not marked complete (...))'."""
        name = self.checkpoint.name if self.checkpoint else "nothing"
        if not self.skipped:
            return name
        why = "; ".join(f"{p.name}: {reason}" for p, reason in self.skipped)
        return f"{name} (passed over {why})"


def choose(folder: Path) -> Choice:
    """The newest complete checkpoint in ``folder`` and the newer incomplete ones."""
    found = checkpoints_in(folder)
    legacy = bool(found) and not any((p / MARKER).is_file() for p in found)
    skipped: list[tuple[Path, str]] = []
    for ckpt in found:
        why = problem(ckpt, legacy=legacy)
        if why is None:
            return Choice(ckpt, skipped, legacy)
        skipped.append((ckpt, why))
    return Choice(None, skipped, legacy)
