"""What `llfarm runs` lists and `llfarm monitor` watches: a run's state read from its directory alone.

Everything here reads files another process writes (manifest.json, metrics.jsonl, run.lock, eval.json), so it works
the same on a run started in the foreground, with ``--detach``, on another terminal or by another user; nothing
here imports torch. A run's status comes from :meth:`RunDir.status`: the manifest's word, except that a run whose
manifest says ``running`` while no live process holds its lock (kill -9, a power cut) is ``crashed``, and one
whose training has ended while its `llfarm run`/`resume` process still holds it (collecting, exporting) is
``finishing``: `monitor` waits for that process to let go.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import RunError
from .rundir import RunDir
from .runlock import derived_status

ENDED = ("completed", "failed", "interrupted", "crashed")
TAIL_BYTES = 64 * 1024


@dataclass
class Snapshot:
    """One look at a run (``llfarm runs --json`` prints these)."""

    id: str
    path: str
    strategy: str | None
    backend: str | None
    stage: str | None
    status: str | None
    step: int | None
    total_steps: int | None
    loss: float | None
    eval_loss: float | None
    learning_rate: float | None
    tokens_per_s: float | None
    memory_mb: float | None
    eta_s: float | None
    created_at: str | None
    age_s: float | None
    eval: dict[str, Any] | None
    pid: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_run(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def find_run(ref: str | Path, output: Path) -> RunDir:
    """A run named by its directory (any path) or by its id under ``output``; a unique prefix of an id will do."""
    path = Path(ref)
    if is_run(path):
        return RunDir(path)
    if path.is_dir():
        raise RunError("not a run directory (no manifest.json)", where=str(ref),
                       hint="give a folder `llfarm run` made, or its id (see `llfarm runs`)")
    if len(path.parts) == 1 and str(ref) not in (".", ".."):
        candidate = Path(output) / path
        if is_run(candidate):
            return RunDir(candidate)
        ids = [p.name for p in run_dirs(output)] if Path(output).is_dir() else []
        matches = [i for i in ids if i.startswith(str(ref))]
        if len(matches) == 1:
            return RunDir(Path(output) / matches[0])
        if len(matches) > 1:
            raise RunError(f"'{ref}' matches {len(matches)} runs in {output}: {', '.join(sorted(matches)[:5])}",
                           hint="give more of the id")
    raise RunError(f"no run '{ref}' (not a run directory, nor a run id in {output})", where=str(ref),
                   hint="`llfarm runs` lists the runs; pass --output for runs kept elsewhere")


def run_dirs(output: Path) -> list[Path]:
    """The run directories directly inside ``output``, by name (:func:`list_runs` orders them by creation)."""
    output = Path(output)
    if not output.exists():
        raise RunError("no such folder", where=str(output), hint="pass --output with the folder your runs are in")
    if not output.is_dir():
        raise RunError("not a folder", where=str(output), hint="pass --output with the folder your runs are in")
    found = [p for p in output.iterdir() if p.is_dir() and is_run(p)]
    return sorted(found, key=lambda p: p.name)


def list_runs(output: Path) -> list[Snapshot]:
    """Every run in ``output``, oldest first (by the manifest's created_at, then id)."""
    now = time.time()
    snaps = [snapshot(RunDir(p), now) for p in run_dirs(output)]
    return sorted(snaps, key=lambda s: (-(s.age_s or 0.0), s.id))


def tail_metrics(path: Path, limit: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The metrics rows in the last ``limit`` bytes of metrics.jsonl (a partly written last line is skipped)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            chunk = fh.read()
    except OSError:
        return []
    lines = chunk.split(b"\n")
    if size > limit:
        lines = lines[1:]                     # the first line is cut
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def snapshot(run: RunDir, now: float | None = None) -> Snapshot:
    now = time.time() if now is None else now
    try:
        manifest = run.read_manifest()
    except RunError:
        manifest = {}
    rows = tail_metrics(run.metrics_path)
    live = run.liveness()                     # the manifest, the lock and its holder: each read once
    holder = run.lock_info() if live == "running" else {}
    status = derived_status(manifest.get("status"), live)
    if status in ("completed", "failed", "interrupted") and holder.get("command") in ("run", "resume"):
        status = "finishing"                  # trained; the llfarm process still collects or exports
    last = rows[-1] if rows else {}
    step = last.get("step")
    total = last.get("total_steps") or manifest.get("total_steps")
    final = manifest.get("final_metrics") or {}
    loss = _last(rows, "loss")
    if status == "completed" and "final_loss" in final:
        loss = final["final_loss"]
    memory = _last(rows, "gpu_peak_mb") or _last(rows, "rss_mb") or _last(rows, "memory_mb")
    ev = manifest.get("eval") if isinstance(manifest.get("eval"), dict) else None
    eval_loss = _last(rows, "eval_loss")
    created = _parse_time(manifest.get("created_at"))
    return Snapshot(
        id=run.root.name, path=str(run), strategy=manifest.get("strategy_name"), backend=manifest.get("backend"),
        stage=manifest.get("stage"), status=status, step=step, total_steps=total, loss=loss, eval_loss=eval_loss,
        learning_rate=_last(rows, "learning_rate"), tokens_per_s=_last(rows, "tokens_per_s"), memory_mb=memory,
        eta_s=eta(rows, total) if status == "running" else None, created_at=manifest.get("created_at"),
        age_s=round(now - created, 1) if created else None, eval=ev,
        pid=holder.get("pid") if status in ("running", "finishing") else None)


def _last(rows: list[dict[str, Any]], key: str) -> Any:
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key]
    return None


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def eta(rows: list[dict[str, Any]], total: int | None) -> float | None:
    """Seconds left at the pace of the logged steps so far (None until two steps with times are logged)."""
    timed = [r for r in rows if isinstance(r.get("step"), int) and isinstance(r.get("time"), (int, float))]
    if not total or len(timed) < 2:
        return None
    first, last = timed[0], timed[-1]
    steps, secs = last["step"] - first["step"], last["time"] - first["time"]
    if steps <= 0 or secs <= 0:
        return None
    return round(max(0, total - last["step"]) * secs / steps, 1)


# ---------------------------------------------------------------- text

def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def table(snaps: list[Snapshot]) -> list[str]:
    """`llfarm runs`: one line per run."""
    head = ("ID", "STRATEGY", "BACKEND", "STAGE", "STATUS", "STEP", "LOSS", "EVAL LOSS", "AGE")
    rows = [head]
    for s in snaps:
        ev = s.eval_loss if s.eval_loss is not None else (s.eval or {}).get("loss")
        rows.append((s.id, s.strategy or "-", s.backend or "-", s.stage or "-", s.status or "-",
                     f"{s.step if s.step is not None else 0}/{s.total_steps or '?'}", _num(s.loss), _num(ev),
                     duration(s.age_s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def progress_line(s: Snapshot) -> str:
    """`llfarm monitor` off a terminal: one line per logged step."""
    parts = [f"step {s.step if s.step is not None else 0}/{s.total_steps or '?'}"]
    if s.loss is not None:
        parts.append(f"loss {s.loss:.4f}")
    if s.eval_loss is not None:
        parts.append(f"eval_loss {s.eval_loss:.4f}")
    if s.learning_rate is not None:
        parts.append(f"lr {s.learning_rate:.2e}")
    if s.tokens_per_s is not None:
        parts.append(f"{s.tokens_per_s:.0f} tok/s")
    if s.memory_mb is not None:
        parts.append(f"mem {s.memory_mb:.0f} MiB")
    if s.eta_s is not None:
        parts.append(f"eta {duration(s.eta_s)}")
    return "  ".join(parts)


def ending(run: RunDir, s: Snapshot) -> tuple[str, int]:
    """How the run ended, in a line, and `monitor`'s exit code (0 only for completed)."""
    manifest = run.read_manifest()
    fm = manifest.get("final_metrics") or {}
    if s.status == "completed":
        loss = (f"loss {fm['first_loss']:.4f} → {fm['final_loss']:.4f} over {fm.get('steps')} steps"
                if "first_loss" in fm else f"{s.step or 0} steps")
        out = (manifest.get("paths") or {}).get("output")
        where = f"; {manifest.get('output_kind', 'output')}: {run.show(run.root / out)}" if out else ""
        from .stopping import ending_note
        return f"{s.id}: completed — {loss}{where}{ending_note(manifest)}", 0
    if s.status == "failed":
        return (f"{s.id}: failed (exit code {manifest.get('exit_code')}) — see "
                f"{run.show(run.logs / 'train.log')}"), 1
    if s.status == "interrupted":
        return f"{s.id}: interrupted at step {s.step} — resume with: llfarm resume {run}", 1
    return (f"{s.id}: crashed (the llfarm process died at step {s.step}) — resume with: llfarm resume {run}"), 1
