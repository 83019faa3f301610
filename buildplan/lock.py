"""One build at a time per artifacts/ directory.

A second build started while one runs stops at once with a message naming the holder
(or waits, with BLIPC_WAIT=1). Read-only commands (list, info, stale, ...) never lock: each
command declares whether it builds (buildplan/session.py).
"""
from __future__ import annotations

import atexit
import fcntl
import os
import sys
import time
from pathlib import Path

from buildplan import env
from buildplan.files import SymlinkRefused, refuse_symlinks

_held = None  # keeps the file (and so the lock) open for the life of the process


def holding() -> bool:
    return _held is not None


def hold(root: str, argv: list[str]) -> None:
    """Take the build lock of `root` for this process (the session calls it for commands that
    build; a read-only command creates nothing, not even the artifacts folder)."""
    global _held
    if _held is not None:
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    path = Path(root) / ".build.lock"
    try:
        refuse_symlinks(root, path)
        # O_NOFOLLOW: a link made between the check and the open is refused too
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666), "a+")
    except (SymlinkRefused, OSError) as e:
        print(f"error: cannot take the build lock: {e}", file=sys.stderr)
        sys.exit(2)
    wait = env.flag(env.WAIT)
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not wait:
                print(f"error: another build is running on {root} ({holder}).\n"
                      f"  fix: wait for it to finish, or rerun with BLIPC_WAIT=1 to wait automatically.",
                      file=sys.stderr)
                sys.exit(3)
            time.sleep(1)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}: doit {' '.join(argv)}".strip())
    f.flush()
    _held = f
    atexit.register(f.close)
    _clean_dead_staging(Path(root) / ".staging")


def _clean_dead_staging(staging: Path) -> None:
    """Scratch folders `<task>.<pid>` of runs that were killed (a build holds the lock, so no other
    build owns them; the pid tells whether a parallel worker of this one still does)."""
    import shutil

    for d in staging.glob("*.*"):
        pid = d.suffix[1:]
        if not pid.isdigit():
            continue
        if not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process runs: a zombie (dead, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process; or not a pid at all: leave its folder alone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(") ")[2][:1] != "Z"  # the state follows the command's name
    except OSError:
        return True
