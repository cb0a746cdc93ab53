"""The normalized run directory — the same for every backend.

    runs/<run-id>/
      manifest.json   status, backend, stage, versions, hashes, timings, final metrics, paths (atomic writes)
      strategy.yaml   the resolved strategy (secrets redacted)
      native/         what the backend was given, plus command.txt
      logs/           backend stdout/stderr
      metrics.jsonl   one line per logging step
      checkpoints/    resumable checkpoints
      adapter/ | model/   the final PEFT adapter or full model (+ tokenizer)
      loss.png        the loss curve
      exports/        merged/, *.gguf, Modelfile
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunError

STATUSES = ("created", "running", "completed", "failed", "interrupted")


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
        ckpts = [p for p in self.checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return max(ckpts, key=checkpoint_step) if ckpts else None


def checkpoint_step(path: Path) -> int:
    """The optimizer step a ``checkpoint-N`` directory holds."""
    return int(path.name.split("-")[-1])


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
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
