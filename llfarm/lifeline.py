"""One process tree: the training processes die with the llfarm process that started them.

The runner starts the backend's command in its own session (its own process group, so Ctrl-C and SIGTERM are
forwarded to the whole group at once) and passes ``LLFARM_PARENT=<pid>:<start time>`` in its environment
(:func:`parent_env`). Every training process llfarm's code runs in — ``llfarm.trainer``, a backend's own entry
module, and each worker a torchrun/accelerate launcher starts with them — calls :func:`guard` first:

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` when its parent is llfarm itself, so the kernel signals it the
  moment llfarm dies, and a SIGTERM handler that kills its whole process group (a SIGTERM forwarded by llfarm
  ends the group the same way);
- everywhere: a daemon thread that checks every :data:`POLL_S` seconds that the llfarm process still exists (same
  pid *and* start time, so a reused pid does not count) and otherwise kills, with SIGKILL, its own process group
  (itself and its data-loader processes) and its launcher's (torchrun starts each worker in a session of its own,
  so the launcher is in another group) — never llfarm's own group.

So ``kill -9`` of llfarm (or its terminal closing) takes the training with it within a second instead of leaving
it training unseen and holding the GPU. Run by hand from ``native/command.txt`` (no ``LLFARM_PARENT``), nothing
changes. After the backend process exits, the runner also kills whatever is left of its group.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "LLFARM_PARENT"
POLL_S = 0.5
PR_SET_PDEATHSIG = 1


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or '' where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]   # fields after "(comm)": state is field 3 → index 0


def parent_env() -> dict[str, str]:
    """What the runner adds to the child's environment."""
    pid = os.getpid()
    return {ENV: f"{pid}:{start_time(pid)}"}


def alive(pid: int, started: str) -> bool:
    """Whether the process ``pid`` that started at ``started`` (from :func:`start_time`) still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                  # exists, owned by someone else
    if started:
        now = start_time(pid)
        if now and now != started:
            return False                      # the pid was reused
        if not now and os.path.isdir("/proc"):
            return False                      # gone between the two checks
    return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().decode("ascii", "replace").rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def guard() -> threading.Thread | None:
    """Tie this process (and its process group) to the llfarm process named in ``LLFARM_PARENT``; no-op without it.
    Returns the watchdog thread."""
    value = os.environ.get(ENV, "")
    if not value:
        return None
    pid_text, _, started = value.partition(":")
    try:
        parent = int(pid_text)
    except ValueError:
        return None
    groups = groups_to_end(parent)
    if not groups:
        return None
    if os.getppid() == parent and threading.current_thread() is threading.main_thread():
        # The direct child: SIGTERM (llfarm dying, or llfarm forwarding a SIGTERM/SIGHUP) takes the whole group.
        signal.signal(signal.SIGTERM, lambda signum, frame: _kill_groups(groups))
        _set_pdeathsig(signal.SIGTERM)
    if not alive(parent, started):
        _kill_groups(groups)
    thread = threading.Thread(target=_watch, args=(parent, started, groups), name="llfarm-lifeline", daemon=True)
    thread.start()
    return thread


def groups_to_end(parent: int) -> set[int]:
    """The process groups to kill when llfarm (``parent``) dies: ours, when we or our parent lead it (the runner
    starts the backend in a session of its own; torchrun starts each worker in one), and our parent's when it is a
    launcher leading its own group. Never llfarm's group (its terminal's job) nor init's, so a process that was not
    started that way kills nothing."""
    own, ppid = os.getpgrp(), os.getppid()
    try:
        llfarm_group: int | None = os.getpgid(parent)
    except ProcessLookupError:
        llfarm_group = None                   # already gone
    except OSError:
        return set()
    groups = {own} if own in (os.getpid(), ppid) else set()
    if llfarm_group is not None and ppid not in (1, parent):
        try:
            if os.getpgid(ppid) == ppid:      # the launcher leads its own group
                groups.add(ppid)
        except OSError:
            pass
    return groups - {llfarm_group, 0, 1}


def _watch(parent: int, started: str, groups: set[int]) -> None:
    import time
    while alive(parent, started):
        time.sleep(POLL_S)
    _kill_groups(groups)


def _kill_groups(groups: set[int]) -> None:
    own = os.getpgrp()
    try:
        for group in sorted(groups - {own}):  # the launcher's first, then ours (which includes this process)
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                pass
        os.killpg(own, signal.SIGKILL)
    finally:
        os._exit(137)                         # pragma: no cover - only if the group kill did not take us


def _set_pdeathsig(sig: int) -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass                                  # not Linux: the watchdog thread does the job
