"""Runs whose coordinator died without a word. A run killed outright (kill -9, the out-of-memory killer, a power
cut) cannot record its end, so its summary.json would say "running" for ever. The summary names its coordinator
process instead, and the next command that reads the run directory on that host marks the run "crashed" once that
process is gone."""

import json
import os
import socket
from pathlib import Path

from hsplit_sim.experiment.rundir import RunWriter


def identity() -> dict:
    """This process as summary.json's `coordinator`: pid, host, and where /proc exists its start time (field 22 of
    /proc/PID/stat, clock ticks after boot), so that another process given the same pid later is not taken for it."""
    fields = _stat(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": int(fields[19]) if fields else None}


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None where there is no /proc; raises
    FileNotFoundError for a pid that does not exist."""
    if not os.path.isdir("/proc/self"):
        return None
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _gone(coordinator: dict) -> bool:
    pid = coordinator["pid"]
    try:
        fields = _stat(pid)
        if fields is None:
            os.kill(pid, 0)
            return False
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:  # it exists but belongs to someone else (PermissionError), or cannot be read: leave the run be
        return False
    start = coordinator.get("start_ticks")
    return fields[0] in ("Z", "X") or (start is not None and int(fields[19]) != start)


def reconcile(run_dir: str | Path) -> dict | None:
    """The run directory's summary (None without a readable one), first marked "crashed" and rewritten when it
    says "running" on this host and its coordinator process is gone."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    coordinator = summary.get("coordinator")
    if (summary.get("status") == "running" and isinstance(coordinator, dict) and isinstance(coordinator.get("pid"), int)
            and coordinator.get("host") == socket.gethostname() and _gone(coordinator)):
        summary.update(status="crashed", error=f"the coordinator (pid {coordinator['pid']}) is gone: it was killed "
                                               "before it could record how the run ended")
        try:
            RunWriter(run_dir).write_summary(summary)
        except OSError:  # a directory this user cannot write: the caller still sees the run as crashed
            pass
    return summary
