"""The run lock: which process owns a run directory, and whether it is still alive.

``llfarm run`` and ``llfarm resume`` hold ``RUN/run.lock`` for as long as they work on a run (training, collecting,
exporting). The file is a small JSON object::

    {"pid": 4242, "host": "box", "started_at": "2026-11-22T07:00:00+0000", "heartbeat": 1795331234.5,
     "heartbeat_at": "2026-11-22T07:03:14+0000", "command": "run", "child_pid": 4250}

held with an exclusive ``flock`` for the holder's whole life, so the kernel releases it the moment the holder dies,
however it dies (kill -9 included); a thread rewrites ``heartbeat`` every :data:`HEARTBEAT_S` seconds (in place:
the lock is on the file, so the file is never replaced). The holder removes the file when it ends normally.

API (what ``llfarm runs`` / ``llfarm monitor`` build on; no heavy imports, cheap to call on many runs):

    with RunDir(path).lock("resume") as lock:   # RunLocked (exit 2, one line) if another live process holds it
        lock.update(child_pid=proc.pid)         # extra fields for observers
    RunDir(path).liveness()                     # "running" | "stale" | "none"
    RunDir(path).lock_info()                    # the lock file's fields, or {}
    RunDir(path).status()                       # the manifest's status, or "crashed" when it says running and
                                                # nothing holds the lock (the llfarm process died without a word)

Liveness on this host comes from the flock itself (no pid guessing: a reused pid cannot fool it). For a lock
written on another host (a shared filesystem where flock may not reach) it comes from the heartbeat: fresh within
:data:`STALE_AFTER_S` seconds means running.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .errors import RunError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; liveness falls back to the heartbeat
    fcntl = None  # type: ignore[assignment]


class RunLocked(RunError):
    """Another live process holds the run."""


class RunLock:
    """An exclusive, heartbeating lock on one run directory (see the module docstring)."""

    def __init__(self, root: Path, command: str = "", shown: str = "") -> None:
        self.path = Path(root) / LOCK_NAME
        self.command = command
        self.shown = shown or str(root)
        self.info: dict[str, Any] = {}
        self.previous: dict[str, Any] = {}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    # ---- holding it --------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        for _ in range(20):                   # retry when the file was replaced while we waited for it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _flock_retrying(fd):
                os.close(fd)
                raise self._held_error()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)                      # the previous holder removed the file after we opened it
        else:  # pragma: no cover - only under a pathological race
            raise RunLocked("could not lock the run directory", where=self.shown)
        self._fd = fd
        self.previous = read_info(self.path.parent)   # a dead holder's fields (the run crashed), or {}
        now = time.time()
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _iso(now),
                     "heartbeat": now, "heartbeat_at": _iso(now), "command": self.command}
        self._write()
        self._thread = threading.Thread(target=self._beat, name="llfarm-heartbeat", daemon=True)
        self._thread.start()
        return self

    def update(self, **fields: Any) -> None:
        """Add or change fields of the lock file (e.g. ``child_pid``)."""
        self.info.update(fields)
        self._write()

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still locked: a waiter sees a new file
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:  # noqa: PYI034
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            now = time.time()
            self.info.update(heartbeat=now, heartbeat_at=_iso(now))
            try:
                self._write()
            except OSError:
                pass                          # a full disk must not kill the run; the flock still says "alive"

    def _write(self) -> None:
        """Rewrite the JSON in place (the flock is on this inode, so the file is never replaced)."""
        with self._write_lock:
            if self._fd is None:
                return
            data = (json.dumps(self.info) + "\n").encode()
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.write(self._fd, data)
            os.ftruncate(self._fd, len(data))

    def _held_error(self) -> RunLocked:
        info = read_info(self.path.parent)
        who = f"llfarm {info.get('command') or 'process'} (pid {info.get('pid', '?')} on {info.get('host', '?')}"
        since = f", since {info['started_at']}" if info.get("started_at") else ""
        return RunLocked(f"the run is in use by {who}{since})", where=self.shown,
                         hint=f"wait for it to finish, or stop it (kill {info.get('pid', '<pid>')}) and resume")


# ---- observing it (any process) ---------------------------------------------------------------------

def read_info(root: Path) -> dict[str, Any]:
    """The lock file's fields, or {} (no lock, or caught mid-rewrite: retried a few times)."""
    path = Path(root) / LOCK_NAME
    for _ in range(5):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            time.sleep(0.01)
    return {}


def liveness(root: Path) -> str:
    """'running' (a live process holds the run), 'stale' (a lock file whose holder is gone) or 'none'."""
    path = Path(root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "none"
    except OSError:
        return "stale"
    try:
        info = read_info(root)
        if info.get("host") not in (None, socket.gethostname()):   # another machine: trust its heartbeat
            beat = info.get("heartbeat")
            fresh = isinstance(beat, (int, float)) and time.time() - beat < STALE_AFTER_S
            return "running" if fresh else "stale"
        if fcntl is None:  # pragma: no cover
            beat = info.get("heartbeat")
            return "running" if isinstance(beat, (int, float)) and time.time() - beat < STALE_AFTER_S else "stale"
        if _try_flock(fd, exclusive=False):   # nobody holds it exclusively: its holder is gone
            fcntl.flock(fd, fcntl.LOCK_UN)
            return "stale"
        return "running"
    finally:
        os.close(fd)


def derived_status(manifest_status: str | None, live: str) -> str | None:
    """The status to show: 'crashed' for a run that says it is running while nothing holds it."""
    if manifest_status == "running" and live != "running":
        return "crashed"
    return manifest_status


def _flock_retrying(fd: int, tries: int = 10) -> bool:
    """An exclusive lock, retried briefly: an observer (liveness) may hold a shared lock for a moment."""
    for i in range(tries):
        if _try_flock(fd, exclusive=True):
            return True
        time.sleep(0.03 * (i + 1))
    return False


def _try_flock(fd: int, *, exclusive: bool) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:                           # a filesystem without flock: fall back to the heartbeat
        return True


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
