"""One writer per run directory: an exclusive lock that a killed process never leaves stuck.

`RunLock(run_dir).acquire()` takes `<run_dir>/.lock`. Mutual exclusion comes from `flock` on
that file: the kernel drops the lock when its process ends, however it ends (`kill -9` included),
so no stale lock can block a later run. The file also records who holds it (pid, host, start
time), which is what the refusal message names. Where `flock` is not available (some network
filesystems refuse it), the file's own existence is the lock (created with O_EXCL), and a lock
left by a dead process is detected as stale by pid and host: same host and no such process.
A lock held by a live process on another host cannot be judged from here; the message says how
to remove it by hand.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from headlab.errors import RunLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return f"process {info.get('pid', '?')} on {info.get('host', '?')} (since {info.get('started', '?')})"


def pid_alive(pid: Any, host: Any) -> bool:
    """False only when the process is known to be gone: same host, no such pid."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or host != socket.gethostname():
        return True  # another machine's process, or no record: cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class RunLock:
    """Exclusive lock on one run directory (a context manager; `acquire` / `release` too)."""

    def __init__(self, run_dir: str | Path, label: str | None = None) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.label = label or self.dir.name
        self._fd: int | None = None
        self._exclusive_file = False

    @property
    def held(self) -> bool:
        return self._fd is not None or self._exclusive_file

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def read_holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _refuse(self, holder: dict[str, Any]) -> RunLockedError:
        return RunLockedError(
            f"run {self.label!r} is being written by {_holder_text(holder)}; wait for it to finish, or choose "
            f"another --run-id (if that process is really gone, delete {self.path})")

    def acquire(self) -> "RunLock":
        """Take the lock, or raise RunLockedError naming the live process that holds it."""
        if self.held:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self.read_holder()) from None
            except OSError:  # no flock here (a network filesystem): the lock file alone
                os.close(fd)
                return self._acquire_exclusive_file()
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self._info()).encode())
            self._fd = fd
            return self
        return self._acquire_exclusive_file()

    def _acquire_exclusive_file(self) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.read_holder()
                if holder and not pid_alive(holder.get("pid"), holder.get("host")):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise self._refuse(holder) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._info()))
            self._exclusive_file = True
            return self
        raise self._refuse(self.read_holder())

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # the file stays (unlinking a flock'ed file races); empty = free
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        if self._exclusive_file:
            self.path.unlink(missing_ok=True)
            self._exclusive_file = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a Run dropped without release (an exception in a notebook) frees its lock
        try:
            self.release()
        except Exception:
            pass
