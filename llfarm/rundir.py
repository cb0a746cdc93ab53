"""The normalized run directory — the same for every backend.

    runs/<run-id>/
      manifest.json   status, backend, stage, versions, hashes, timings, final metrics, paths (atomic writes)
      strategy.yaml   the resolved strategy (secrets redacted)
      native/         what the backend was given, plus command.txt
      run.lock        while a process works on the run: pid, host, heartbeat (llfarm.runlock)
      logs/           backend stdout/stderr
      metrics.jsonl   one line per logging step
      checkpoints/    checkpoint-N/, each with llfarm-complete.json once fully saved (llfarm.checkpoints)
      adapter/ | model/   the final PEFT adapter or full model (+ tokenizer)
      loss.png        the loss curve
      exports/        merged/, *.gguf, Modelfile
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import Choice, checkpoint_step, checkpoints_in, choose
from .errors import RunError
from .runlock import LOCK_NAME, RunLock, derived_status, liveness, read_info

# Written to the manifest as a run moves. "crashed" is derived (RunDir.status): the manifest says running while no
# live process holds the run's lock; resume records it when it takes such a run over.
STATUSES = ("created", "running", "completed", "failed", "interrupted", "crashed")

__all__ = ["STATUSES", "RunDir", "atomic_write_text", "checkpoint_step", "name_problem", "now_iso", "read_json",
           "run_dir_in"]


@dataclass(frozen=True)
class RunDir:
    """A run directory. ``root`` is always absolute: the training child runs with another working directory and
    later commands run from anywhere. ``shown`` is the path as the user gave it (``runs/<id>``), for messages."""
    root: Path
    shown: str = field(default="", compare=False)
    # A node other than the head of a multi-node run keeps its own native files and logs here, and its training
    # processes write outputs (metrics.jsonl, checkpoints/, adapter/, final metrics) into the head's run directory.
    head_root: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        given = Path(self.root)
        object.__setattr__(self, "root", Path(os.path.abspath(given.expanduser())))
        if not self.shown:
            object.__setattr__(self, "shown", str(given))
        if self.head_root is not None:
            object.__setattr__(self, "head_root", Path(os.path.abspath(Path(self.head_root).expanduser())))

    @property
    def head(self) -> RunDir:
        """The run directory that receives the outputs: this one, or the head node's for another node."""
        return RunDir(self.head_root) if self.head_root is not None else self

    def __str__(self) -> str:
        return self.shown

    def show(self, path: Path) -> str:
        """A path inside the run as the user would write it (under the run directory as they named it)."""
        try:
            return str(Path(self.shown) / Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    @property
    def manifest_path(self) -> Path: return self.root / "manifest.json"
    @property
    def strategy_path(self) -> Path: return self.root / "strategy.yaml"
    @property
    def native(self) -> Path: return self.root / "native"
    @property
    def logs(self) -> Path: return self.root / "logs"
    @property
    def metrics_path(self) -> Path: return self.root / "metrics.jsonl"
    @property
    def checkpoints(self) -> Path: return self.root / "checkpoints"
    @property
    def adapter(self) -> Path: return self.root / "adapter"
    @property
    def model(self) -> Path: return self.root / "model"
    @property
    def loss_png(self) -> Path: return self.root / "loss.png"
    @property
    def exports(self) -> Path: return self.root / "exports"
    @property
    def final_metrics_path(self) -> Path: return self.native / "final_metrics.json"

    def create(self) -> RunDir:
        for d in (self.root, self.native, self.logs, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # ---- manifest -----------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError("not a run directory (no manifest.json)", where=self.shown,
                           hint="pass a directory printed by `llfarm run`, e.g. runs/<run-id>") from None
        except json.JSONDecodeError as exc:
            raise RunError(f"manifest.json is corrupt: {exc.msg}", where=self.show(self.manifest_path)) from None

    def write_manifest(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.manifest_path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def update_manifest(self, **changes: Any) -> dict[str, Any]:
        if "status" in changes and changes["status"] not in STATUSES:
            raise ValueError(f"unknown run status {changes['status']!r}; expected one of {STATUSES}")
        data = self.read_manifest() if self.manifest_path.exists() else {}
        data.update(changes)
        data["updated_at"] = now_iso()
        self.write_manifest(data)
        return data

    # ---- outputs ------------------------------------------------------------------------
    def output_dir(self) -> Path:
        """The final adapter/ or model/ directory; a clear error if training left neither."""
        for d in (self.adapter, self.model):
            if d.is_dir() and any(d.iterdir()):
                return d
        raise RunError("the run has no adapter/ or model/ (did training finish?)", where=self.shown,
                       hint="check manifest.json's status and logs/, or resume with `llfarm resume`")

    def eval_data(self) -> Path | None:
        """The run's own evaluation data (data.eval or the data.eval_split hold-out, as normalized JSONL), or None
        when it was trained without. The one place that knows where a run keeps it (`llfarm eval` reads it through
        here): the file manifest.json's ``data.eval`` names (in the data cache), else a run's own copy in
        native/data/ (runs made before the cache)."""
        recorded = (self.read_manifest().get("data") or {}).get("eval")
        if recorded:
            return Path(recorded)
        legacy = self.native / "data" / "eval.jsonl"
        return legacy if legacy.is_file() else None

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line being written right now
        return rows

    def latest_checkpoint(self) -> Path | None:
        """The newest ``checkpoint-N`` folder, complete or not (see resumable_checkpoint)."""
        found = checkpoints_in(self.checkpoints)
        return found[0] if found else None

    def resumable_checkpoint(self) -> Choice:
        """The newest complete checkpoint and the newer ones passed over (llfarm.checkpoints)."""
        return choose(self.checkpoints)

    # ---- who holds it (llfarm.runlock) ------------------------------------------------------------
    @property
    def lock_path(self) -> Path: return self.root / LOCK_NAME

    def lock(self, command: str = "") -> RunLock:
        """``with run.lock("resume") as lock:`` — exclusive, heartbeating; RunLocked if a live process has it."""
        return RunLock(self.root, command, self.shown)

    def liveness(self) -> str:
        """'running' | 'stale' | 'none' (see llfarm.runlock)."""
        return liveness(self.root)

    def lock_info(self) -> dict[str, Any]:
        return read_info(self.root)

    def status(self) -> str | None:
        """The manifest's status, or 'crashed' when it says running but no live process holds the run."""
        try:
            recorded = self.read_manifest().get("status")
        except RunError:
            return None
        return derived_status(recorded, self.liveness())


def atomic_write_text(path: Path, text: str, *, redact: bool = True) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old or the new file, never
    half of one. Secrets are masked first (llfarm.redact; ``redact=False`` only for the user's training data, which
    is copied as is). An OS error always names the file (a full disk reports none by itself)."""
    if redact:
        from .redact import redact_text
        text = redact_text(text)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_run_id(name: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
SAFE_NAME_RULE = "letters, digits, '-', '_' and '.', not starting with '.' or '-', no '..', at most 100 characters"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a run id or a strategy name (one path component inside --output), or None.
    One rule for both: no separators, no '..', nothing a shell or another OS reads specially, no secret."""
    from .redact import find_secret
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name or len(name) > 100:
        return f"must be {SAFE_NAME_RULE}"
    secret = find_secret(name)
    if secret:
        return f"holds {secret}; it would become a folder name"
    return None


def run_dir_in(output: Path, run_id: str) -> RunDir:
    """The run directory ``output/run_id``, refused unless it is a direct child of ``output``."""
    from .redact import redact_text
    problem = name_problem(run_id)
    shown = redact_text(run_id if len(run_id) <= 60 else run_id[:57] + "...")
    if problem:
        raise RunError(f"run id {shown!r} {problem}", where="--run-id",
                       hint="for example --run-id my-run-2")
    run = RunDir(Path(output) / run_id)
    if run.root.parent != Path(os.path.abspath(Path(output).expanduser())):
        raise RunError(f"run id {shown!r} leads outside --output", where="--run-id")
    return run
