"""Long work off the request thread: a small thread pool whose tasks report progress.

Dash's background callbacks store results with pickle (diskcache / celery); this keeps results
in memory as plain data instead, so nothing is ever unpickled. A page starts a task, keeps its
id in a `dcc.Store` and polls `status()` with a `dcc.Interval`; other requests keep being served
meanwhile (the server is threaded), and a task that fails leaves a one-line message, not a trace.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from headlab.errors import HeadlabError

log = logging.getLogger("headlab.app")


@dataclass
class Task:
    id: str
    kind: str
    state: str = "queued"  # queued | running | done | error | cancelled
    progress: float = 0.0
    message: str = "queued"
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)


def error_message(exc: BaseException) -> str:
    """What a user sees for a failure: a HeadlabError's own message (it names the problem and the
    fix), otherwise the exception's type and text — never a traceback (that goes to the log)."""
    if isinstance(exc, HeadlabError):
        return str(exc)
    return f"internal error ({type(exc).__name__}: {exc}); the server log has the details"


class TaskManager:
    """Runs `fn(progress, should_stop)` callables in `workers` threads, keeping the last `keep` tasks."""

    def __init__(self, workers: int = 2, keep: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="headlab-task")
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep

    def submit(self, kind: str, fn: Callable[[Callable[[float, str], None], Callable[[], bool]], Any]) -> str:
        task = Task(id=uuid.uuid4().hex, kind=kind)
        with self._lock:
            self._tasks[task.id] = task
            while len(self._tasks) > self._keep:
                old_id, old = next(iter(self._tasks.items()))
                if old.state in ("queued", "running"):
                    break
                del self._tasks[old_id]

        def progress(fraction: float, message: str) -> None:
            task.progress, task.message = max(0.0, min(1.0, float(fraction))), message

        def run() -> None:
            if task.stop.is_set():
                task.state, task.message = "cancelled", "cancelled"
                return
            task.state, task.message = "running", "started"
            try:
                task.result = fn(progress, task.stop.is_set)
                task.state, task.progress, task.message = "done", 1.0, "done"
            except Exception as exc:  # noqa: BLE001 - every failure becomes a message in the page
                if task.stop.is_set():
                    task.state, task.message = "cancelled", "cancelled"
                    return
                if not isinstance(exc, HeadlabError):
                    log.exception("task %s (%s) failed", task.id, kind)
                task.state, task.error, task.message = "error", error_message(exc), "failed"

        self._pool.submit(run)
        return task.id

    def get(self, task_id: str | None) -> Task:
        with self._lock:
            task = self._tasks.get(task_id or "")
        if task is None:
            raise HeadlabError("this result has expired or the server restarted: start the computation again")
        return task

    def cancel(self, task_id: str | None) -> None:
        with self._lock:
            task = self._tasks.get(task_id or "")
        if task is not None:
            task.stop.set()

    def shutdown(self) -> None:
        with self._lock:
            for task in self._tasks.values():
                task.stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
